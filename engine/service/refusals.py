"""How a request that a check rejected is answered: counted, logged, and the response.

    return refuse(metrics, Rejected("too_large", 413, "..."), close=True)
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse, Response

from engine.runtime.metrics import Metrics
from engine.service.intake import Rejected

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "30"


def refuse(metrics: Metrics, error: Rejected, *, close: bool) -> Response:
    """The answer to `error`, counted in `linkcrm_requests_rejected_total{reason}`.

    `close` for a request answered before its body was read in full: it must not keep the
    connection, or the rest of the body would be read (and dropped) for as long as the client
    sends it. A 401 has no body, by design; a 503 says when to retry.
    """
    metrics.rejected.inc(reason=error.reason)
    log.info("request rejected", extra={"reason": error.reason, "status": error.status})
    headers = {"connection": "close"} if close else {}
    if error.status == 503:
        headers["retry-after"] = RETRY_AFTER_SECONDS
    if error.status == 401:
        if error.reason == "unauthorized":
            headers["www-authenticate"] = "Bearer"
        return Response(status_code=401, headers=headers)  # no detail, by design
    body = {"error": error.reason, "message": error.message}
    return JSONResponse(body, status_code=error.status, headers=headers)
