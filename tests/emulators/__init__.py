"""Local emulators of the HubSpot, Salesforce and Pipedrive APIs (the subset linkcrm uses).

Each is a Starlette app that behaves as `CRM_FACTS.md` says the real service does (status codes,
error bodies, duplicates, rate limits, token expiry), can inject faults at a chosen rate, and
runs on loopback through `serve()` for behaviour tests or in-process via `httpx.ASGITransport`.
"""
