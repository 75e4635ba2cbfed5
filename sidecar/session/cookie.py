"""The browser's two cookies: the session id, and the short-lived login binding secret."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from sidecar.config import SessionConfig

__all__ = ["Cookies"]

_LOGIN_MAX_AGE: Final = 600  # matches the pending-login lifetime
_MAX_COOKIE_VALUE: Final = 128  # ids and secrets are 43 characters; anything longer is junk


class Cookies:
    """Reads and writes the sidecar's cookies with Secure, HttpOnly, SameSite and Path=/."""

    def __init__(self, config: SessionConfig) -> None:
        self.session_name = config.cookie_name
        self.login_name = config.cookie_name + "-login"
        self.names = frozenset({self.session_name, self.login_name})
        self._secure = config.cookie_secure
        self._same_site = config.same_site.capitalize()
        self._max_age = int(config.lifetime)

    def session_id(self, request: web.BaseRequest) -> str | None:
        return _bounded(_cookie(request, self.session_name))

    def login_secret(self, request: web.BaseRequest) -> str | None:
        return _bounded(_cookie(request, self.login_name))

    def set_session(self, response: web.StreamResponse, session_id: str) -> None:
        self._set(response, self.session_name, session_id, self._max_age, self._same_site)

    def clear_session(self, response: web.StreamResponse) -> None:
        self._set(response, self.session_name, "", 0, self._same_site)

    def set_login(self, response: web.StreamResponse, secret: str) -> None:
        # Lax even when the session cookie is Strict: the IdP's redirect back is cross-site.
        self._set(response, self.login_name, secret, _LOGIN_MAX_AGE, "Lax")

    def _set(
        self, response: web.StreamResponse, name: str, value: str, max_age: int, same_site: str
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self._secure,
            httponly=True,
            samesite=same_site,
        )

    def strip(self, header: str) -> str:
        """A `Cookie` header without the sidecar's cookies; others stay byte for byte."""
        kept = [
            part
            for part in header.split(";")
            if part.strip().partition("=")[0].strip() not in self.names
        ]
        return ";".join(kept).strip()


def _cookie(request: web.BaseRequest, name: str) -> str | None:
    """One cookie's value, read straight from the `Cookie` headers (the last one wins, as in
    `request.cookies`), without parsing every other cookie the browser sends along."""
    value = None
    for header in request.headers.getall("Cookie", ()):
        if name not in header:
            continue
        for part in header.split(";"):
            key, sep, found = part.partition("=")
            if sep and key.strip() == name:
                value = found.strip()
    return value


def _bounded(value: str | None) -> str | None:
    return value if value and len(value) <= _MAX_COOKIE_VALUE else None
