"""CRM targets: the Target protocol (base), the one HTTP request loop (session), and one
package per kind of target (local, hubspot, salesforce, pipedrive), each declaring its kind
(`<package>.kind.KIND`); the registry names them and builds those the environment selects."""
