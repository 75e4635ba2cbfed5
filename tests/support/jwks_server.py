"""A second OAuth issuer for bearer-token tests: discovery, JWKS and RFC 7662 introspection
served from a thread, with key rotation, failure knobs and request counters.

Tokens are signed with `sign` (any header, any claims, no library checks), so a test can
break each validation rule alone. The issuer's state lives on its own loop: tests change and
read it through the methods here, which run there.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from aiohttp import web
from joserfc.jwk import ECKey, OctKey, RSAKey
from joserfc.jws import JWSRegistry

from tests.support.ports import free_port
from tests.support.threads import AppThread

__all__ = ["INTROSPECTION_CLIENT", "INTROSPECTION_SECRET", "IssuerServer", "b64", "sign"]

INTROSPECTION_CLIENT = "resource-server"
INTROSPECTION_SECRET = "introspection secret/with:odd chars"  # form-encoded before Basic

SigningKey = RSAKey | ECKey | OctKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(
    claims: Mapping[str, Any] | bytes,
    key: SigningKey,
    algorithm: str = "RS256",
    **header: Any,
) -> str:
    """A compact JWS of `claims` (or exactly these payload bytes) signed by `key` with
    `algorithm`; header: `alg` (the algorithm), the key's `kid`, `typ: at+jwt`, then
    `header`, which may override any of them (a None value drops one)."""
    head = {"alg": algorithm, "kid": key.kid, "typ": "at+jwt", **header}
    head = {k: v for k, v in head.items() if v is not None}
    payload = claims if isinstance(claims, bytes) else json.dumps(dict(claims)).encode()
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(payload)}"
    signature = JWSRegistry.algorithms[algorithm].sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64(signature)}"


class IssuerServer:
    """An issuer at `http://127.0.0.1:<port>` publishing the public parts of `keys`.

    Introspection answers `{"active": false}` for any token not given to `introspect`, and
    401 to a client that does not authenticate as `INTROSPECTION_CLIENT` (with
    `INTROSPECTION_SECRET` in Basic, or with the id alone in the form when `secret` is None).
    """

    def __init__(
        self,
        keys: Sequence[SigningKey],
        *,
        secret: str | None = INTROSPECTION_SECRET,
        discovered_issuer: str | None = None,
    ) -> None:
        port = free_port()
        self.issuer = f"http://127.0.0.1:{port}"
        self.jwks_url = self.issuer + "/keys"
        self.introspection_url = self.issuer + "/introspect"
        self._secret = secret
        self._discovered_issuer = discovered_issuer or self.issuer
        self._published = [k.as_dict(private=False) for k in keys]
        self._answers: dict[str, dict[str, Any]] = {}
        self._failure: str | None = None  # "503" or "garbage": introspection misbehaves
        self._counts: Counter[str] = Counter()
        self._last_form: dict[str, str] = {}
        self._thread = AppThread(self._app(), port, "bearer-issuer")

    # --- knobs and readings (run on the server's loop) -----------------------------------

    def publish(self, *keys: SigningKey) -> None:
        """Rotate: the JWKS now holds exactly these keys."""
        published = [k.as_dict(private=False) for k in keys]
        self._thread.call(setattr, self, "_published", published)

    def introspect(self, token: str, answer: dict[str, Any]) -> None:
        """What introspection answers about `token`."""
        self._thread.call(self._answers.__setitem__, token, answer)

    def fail_introspection(self, how: str | None) -> None:
        """ "503", "garbage" (an HTML 200) or None (answer normally)."""
        self._thread.call(setattr, self, "_failure", how)

    def counts(self) -> dict[str, int]:
        """Requests so far: discovery, jwks, introspection."""
        return dict(self._thread.call(lambda: dict(self._counts)))

    def last_introspection_form(self) -> dict[str, str]:
        return dict(self._thread.call(lambda: dict(self._last_form)))

    def stop(self) -> None:
        self._thread.stop()

    # --- the application -----------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/keys", self._jwks)
        app.router.add_post("/introspect", self._introspect)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        self._counts["discovery"] += 1
        return web.json_response(
            {
                "issuer": self._discovered_issuer,
                "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.jwks_url,
                "introspection_endpoint": self.introspection_url,
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self._counts["jwks"] += 1
        return web.json_response({"keys": self._published})

    async def _introspect(self, request: web.Request) -> web.Response:
        self._counts["introspection"] += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        self._last_form = {k: v for k, v in form.items() if k != "token"}
        if self._failure == "503":
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if self._failure == "garbage":
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if not self._authenticated(request.headers.get("Authorization"), form):
            return web.json_response({"error": "invalid_client"}, status=401)
        answer = self._answers.get(form.get("token", ""), {"active": False})
        return web.json_response(answer)

    def _authenticated(self, authorization: str | None, form: Mapping[str, str]) -> bool:
        if self._secret is None:
            return authorization is None and form.get("client_id") == INTROSPECTION_CLIENT
        pair = f"{quote(INTROSPECTION_CLIENT, safe='')}:{quote(self._secret, safe='')}"
        expected = "Basic " + base64.b64encode(pair.encode()).decode()
        return authorization == expected and "client_id" not in form
