"""Database URLs made safe to print: the password (in the user part or the query) is hidden.

Every message, log line and `repr` that names a database goes through `redact_url`, so an
operator sees which database is meant without the credential that opens it.

    >>> redact_url("postgresql://app:s3cret@db:5432/linkcrm?sslmode=require&password=x")
    'postgresql://app:***@db:5432/linkcrm?sslmode=require&password=***'
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"

# Query parameters that hold a credential (libpq's `password` and `sslpassword`).
_SECRET_PARAMETER = re.compile(r"(^|&)([^=&]*password[^=&]*)=[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`; a URL that cannot be parsed shows only its
    scheme, since its parts cannot be told apart safely."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in url and "@" not in netloc:
            # An unescaped "/", "?" or "#" in the password split it off the user part.
            raise ValueError("the user part does not parse")
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            if ":" in user:
                user = user.split(":", 1)[0] + ":" + HIDDEN
            netloc = f"{user}@{host}"
        query = _SECRET_PARAMETER.sub(lambda m: f"{m.group(1)}{m.group(2)}={HIDDEN}",
                                      parts.query)
        if (netloc, query) == (parts.netloc, parts.query):
            return url  # nothing to hide: as written (urlunsplit would drop "sqlite:///"'s //)
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        scheme = url.split("://", 1)[0] if "://" in url else "database"
        return f"{scheme}://{HIDDEN}"
