"""Server-side grant state: IdP sessions, authorization codes, refresh-token families and
issued access tokens. Tokens are stored only as SHA-256 digests, like a production IdP.

A *family* is everything one authorization code led to: its refresh tokens (each used once,
RFC 9700 §4.14.2 rotation) and the access tokens issued alongside. Revoking a family
invalidates all of them at once.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.dev.idp.errors import CodeReplayed, InvalidGrant, RefreshTokenReused

__all__ = ["AuthorizationCode", "GrantFamily", "GrantStore", "IdPSession", "opaque_key"]

CODE_TTL = 60.0  # RFC 6749 §4.1.2: "a maximum authorization code lifetime of 10 minutes is
# RECOMMENDED"; shorter is stricter


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def opaque_key(token: str) -> str:
    """Where an opaque access token is remembered among the JWTs' `jti`s."""
    return "opaque:" + _digest(token)


def _new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits, RFC 6749 §10.10


@dataclass
class IdPSession:
    """One login at the IdP (OIDC Core §2 `sid`), shared by the grants it produced."""

    sid: str
    sub: str
    auth_time: int


@dataclass
class AuthorizationCode:
    """What a code stands for (RFC 6749 §4.1.2), bound to client, redirect_uri and PKCE."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    nonce: str | None
    sub: str
    sid: str
    auth_time: int
    expires_at: float
    used: bool = False
    family_id: str | None = None
    offline: bool = True  # refresh tokens may be issued for this grant


@dataclass
class GrantFamily:
    """The grant behind one code exchange and all its rotated refresh tokens."""

    id: str
    client_id: str
    sub: str
    sid: str
    scope: str
    auth_time: int
    revoked: bool = False
    offline: bool = True  # refresh tokens may be issued


@dataclass
class _RefreshRecord:
    family_id: str
    expires_at: float
    used: bool = False


@dataclass
class _AccessRecord:
    family_id: str
    client_id: str
    expires_at: float
    revoked: bool = False
    scope: str | None = None  # None: read from the JWT's `scope` claim


@dataclass
class GrantStore:
    """All grant state of one DevIdP; time comes from `clock`."""

    clock: Callable[[], float]
    sessions: dict[str, IdPSession] = field(default_factory=dict)
    _browser: dict[str, str] = field(default_factory=dict)  # digest(cookie) -> sid
    _codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    _families: dict[str, GrantFamily] = field(default_factory=dict)
    _refresh: dict[str, _RefreshRecord] = field(default_factory=dict)
    _access: dict[str, _AccessRecord] = field(default_factory=dict)  # by jti
    # (client_id, sub) that were given offline access once (Google's consent memory).
    offline_consents: set[tuple[str, str]] = field(default_factory=set)

    # --- IdP sessions -------------------------------------------------------------------

    def start_session(self, sub: str) -> tuple[IdPSession, str]:
        """A new login of `sub`; returns the session and the browser cookie value."""
        session = IdPSession(secrets.token_urlsafe(16), sub, int(self.clock()))
        self.sessions[session.sid] = session
        cookie = _new_token()
        self._browser[_digest(cookie)] = session.sid
        return session, cookie

    def session_for_cookie(self, cookie: str | None) -> IdPSession | None:
        """The live IdP session a browser cookie names, if any."""
        if not cookie:
            return None
        sid = self._browser.get(_digest(cookie))
        return self.sessions.get(sid) if sid else None

    def end_session(self, sid: str) -> bool:
        """End an IdP session and revoke every grant made under it; False if unknown."""
        session = self.sessions.pop(sid, None)
        self._browser = {k: v for k, v in self._browser.items() if v != sid}
        for family in self._families.values():
            if family.sid == sid:
                family.revoked = True
        return session is not None

    def end_sessions_of(self, sub: str) -> None:
        """End every IdP session of `sub` and revoke all of the user's grants."""
        for sid in [s.sid for s in self.sessions.values() if s.sub == sub]:
            self.end_session(sid)
        for family in self._families.values():
            if family.sub == sub:
                family.revoked = True

    # --- authorization codes (RFC 6749 §4.1.2, §4.1.3) ----------------------------------

    def issue_code(
        self,
        *,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        scope: str,
        nonce: str | None,
        session: IdPSession,
        offline: bool = True,
    ) -> str:
        """A new one-use code valid for CODE_TTL seconds; `offline`: refresh tokens may come
        of it."""
        self._prune()
        code = _new_token()
        self._codes[_digest(code)] = AuthorizationCode(
            client_id=client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            scope=scope,
            nonce=nonce,
            sub=session.sub,
            sid=session.sid,
            auth_time=session.auth_time,
            expires_at=self.clock() + CODE_TTL,
            offline=offline,
        )
        return code

    def redeem_code(self, code: str, client_id: str) -> AuthorizationCode:
        """Consume a code. RFC 6749 §4.1.2: on a second use, revoke what the first produced."""
        record = self._codes.get(_digest(code))
        if record is None or record.client_id != client_id:
            raise InvalidGrant("unknown authorization code")
        if record.used:
            if record.family_id is not None:
                self._families[record.family_id].revoked = True
            raise CodeReplayed("authorization code already used; its grant is revoked")
        record.used = True
        if self.clock() >= record.expires_at:
            raise InvalidGrant("authorization code expired")
        return record

    # --- grant families and refresh tokens (RFC 6749 §6, RFC 9700 §4.14.2) ---------------

    def start_family(self, code: AuthorizationCode) -> GrantFamily:
        """The grant a successful code exchange creates."""
        family = GrantFamily(
            id=secrets.token_hex(8),
            client_id=code.client_id,
            sub=code.sub,
            sid=code.sid,
            scope=code.scope,
            auth_time=code.auth_time,
            offline=code.offline,
        )
        self._families[family.id] = family
        code.family_id = family.id
        return family

    def issue_refresh_token(self, family: GrantFamily, ttl: float) -> str:
        """A new refresh token of `family`, valid `ttl` seconds from now."""
        token = _new_token()
        self._refresh[_digest(token)] = _RefreshRecord(family.id, self.clock() + ttl)
        return token

    def use_refresh_token(self, token: str, client_id: str, *, rotate: bool = True) -> GrantFamily:
        """Spend a refresh token; a second presentation revokes its family (reuse detection).
        `rotate=False`: the token stays valid for further refreshes (Google, Entra ID)."""
        record = self._refresh.get(_digest(token))
        family = self._families.get(record.family_id) if record else None
        if record is None or family is None or family.client_id != client_id:
            raise InvalidGrant("unknown refresh token")
        if family.revoked:
            raise InvalidGrant("refresh token revoked")
        if record.used:
            family.revoked = True
            raise RefreshTokenReused("refresh token already used; the grant is revoked")
        if self.clock() >= record.expires_at:
            raise InvalidGrant("refresh token expired")
        if rotate:
            record.used = True
        return family

    def family_of_refresh_token(self, token: str) -> GrantFamily | None:
        """The family a refresh token belongs to, used or not."""
        record = self._refresh.get(_digest(token))
        return self._families.get(record.family_id) if record else None

    def revoke_family(self, family: GrantFamily) -> None:
        """Invalidate every refresh and access token of the family."""
        family.revoked = True

    # --- access tokens ------------------------------------------------------------------

    def record_access_token(
        self, jti: str, family: GrantFamily, expires_at: float, scope: str | None = None
    ) -> None:
        """Remember an issued access token so it can be revoked (RFC 7009 §2); `scope` for a
        token that does not carry its own (opaque, or `scp` in another form)."""
        self._access[jti] = _AccessRecord(family.id, family.client_id, expires_at, scope=scope)

    def issue_opaque_access_token(self, family: GrantFamily, expires_at: float, scope: str) -> str:
        """A new opaque access token (Google's), remembered by its digest."""
        token = "ya29." + _new_token()
        self.record_access_token(opaque_key(token), family, expires_at, scope)
        return token

    def access_token_scope(self, jti: str) -> str | None:
        """The scope recorded with an access token, if it was recorded with one."""
        record = self._access.get(jti)
        return None if record is None else record.scope

    def access_token_family(self, jti: str) -> GrantFamily | None:
        """The family of a live (unrevoked, unexpired) access token, else None."""
        record = self._access.get(jti)
        if record is None or record.revoked or self.clock() >= record.expires_at:
            return None
        family = self._families.get(record.family_id)
        return None if family is None or family.revoked else family

    def revoke_access_token(self, jti: str, client_id: str) -> bool:
        """Revoke one access token of `client_id`; False when unknown."""
        record = self._access.get(jti)
        if record is None or record.client_id != client_id:
            return False
        record.revoked = True
        return True

    def _prune(self) -> None:
        """Forget state that can no longer matter, so a long demo does not grow forever."""
        now = self.clock()
        horizon = now - CODE_TTL  # keep used codes a while for replay detection
        self._codes = {k: c for k, c in self._codes.items() if c.expires_at > horizon}
        self._refresh = {k: r for k, r in self._refresh.items() if r.expires_at > now}
        self._access = {k: a for k, a in self._access.items() if a.expires_at > now}
