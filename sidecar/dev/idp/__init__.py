"""A small, strict OpenID provider for `auth-sidecar demo` and for tests. Never production.

from sidecar.dev.idp import DevClient, DevIdP
idp = DevIdP("http://127.0.0.1:5556/dev", clients={"app": DevClient(...)})
web.run_app(idp.app(), host="127.0.0.1", port=5556)
"""

from sidecar.dev.idp.errors import OAuthError
from sidecar.dev.idp.models import DevClient, DevIdPStats, DevUser, default_users
from sidecar.dev.idp.provider import SESSION_COOKIE, DevIdP

__all__ = [
    "SESSION_COOKIE",
    "DevClient",
    "DevIdP",
    "DevIdPStats",
    "DevUser",
    "OAuthError",
    "default_users",
]
