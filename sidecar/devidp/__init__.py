"""A small, strict OpenID provider for `auth-sidecar demo` and for tests. Never production.

from sidecar.devidp import DevClient, DevIdP
idp = DevIdP("http://127.0.0.1:5556/dev", clients={"app": DevClient(...)})
web.run_app(idp.app(), host="127.0.0.1", port=5556)
"""

from sidecar.devidp.errors import OAuthError
from sidecar.devidp.models import DevClient, DevIdPStats, DevUser, default_users
from sidecar.devidp.provider import SESSION_COOKIE, DevIdP

__all__ = [
    "SESSION_COOKIE",
    "DevClient",
    "DevIdP",
    "DevIdPStats",
    "DevUser",
    "OAuthError",
    "default_users",
]
