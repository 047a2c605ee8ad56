"""HTTP: the receiver. `server` runs the process (storage, uvicorn); `app` routes to the
endpoints `receiver` (webhook, identify), `health` and `metrics`; `intake` and `deadline`
check what arrives, over `framing` (strict HTTP/1.1 on httptools) and `coalesce` (one send per
answer). No CRM call and no worker in here: `linkcrm serve` passes the worker in.
"""
