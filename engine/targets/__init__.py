"""CRM targets: the Target protocol (base), the embedded CRM (local), and the HubSpot,
Salesforce and Pipedrive adapters, chosen from the environment by `targets`."""
