"""Typed, frozen models of every configuration section (docs/configuration.md).

One model per YAML section; unknown keys are errors so that typos never pass silently.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import ipaddress
import re
from typing import Annotated, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from yarl import URL

from sidecar.config.types import ASYMMETRIC_ALGORITHMS, Duration, ListenAddress
from sidecar.forwarding.paths import BadPath, CanonicalPath, canonical_path

__all__ = [
    "AccessConfig",
    "AdminConfig",
    "BearerConfig",
    "BearerIssuer",
    "ClusterConfig",
    "Config",
    "CsrfConfig",
    "ForwardAuthConfig",
    "InjectConfig",
    "IntrospectionConfig",
    "LoggingConfig",
    "LoginConfig",
    "ManagementConfig",
    "OIDCConfig",
    "RedisConfig",
    "RefreshConfig",
    "RouteRule",
    "SentinelConfig",
    "ServerConfig",
    "SessionConfig",
    "TelemetryConfig",
    "UpstreamConfig",
]

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        # Userinfo can hold a password: never echo it.
        shown = str(url.with_user(None)) if url.user or url.password else value
        raise ValueError(f"expected an absolute http:// or https:// URL, got {shown!r}")
    if url.query_string or url.fragment:
        raise ValueError("must not contain a query or fragment")
    return value


def _base_url(value: str) -> str:
    return _http_url(value).rstrip("/")


def _path_prefix(value: str) -> str:
    # Requests are matched on their canonical path, so a prefix must be canonical too, or it
    # could never match (`/a/../b`) or match something other than it seems (`/%61`).
    try:
        canonical = canonical_path(value) if "?" not in value else None
    except BadPath:
        canonical = None
    if canonical != CanonicalPath(value):
        raise ValueError(
            f"expected a path starting with /, in canonical form (no query, no //, no dot "
            f"segments, no ;, no %-escapes of unreserved characters), got {value!r}"
        )
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]  # kept exactly: IdPs compare byte for byte
BaseUrl = Annotated[str, AfterValidator(_base_url)]  # paths are appended: no trailing slash
PathPrefix = Annotated[str, AfterValidator(_path_prefix)]


class ServerConfig(_Section):
    listen: ListenAddress = Field(default="0.0.0.0:4180", validate_default=True)
    public_url: BaseUrl = Field(description="redirect_uri = public_url + /oauth2/callback")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="CIDRs whose X-Forwarded-* headers are believed"
    )
    workers: int = Field(1, ge=1, le=64)
    shutdown_delay: Duration = Field(
        0.0, description="after SIGTERM, keep serving while /readyz says not ready"
    )
    shutdown_grace: Duration = Field(
        25.0, description="how long in-flight requests may take to finish on shutdown"
    )
    header_timeout: Duration = Field(
        10.0, gt=0, description="deadline for a whole request head, from its first byte"
    )
    body_timeout: Duration = Field(
        30.0, gt=0, description="longest wait for the next bytes of a request body"
    )
    keepalive_timeout: Duration = Field(
        75.0, gt=0, description="how long an idle keep-alive connection is kept open"
    )
    max_header_size: int = Field(
        8190, ge=1024, le=65536, description="bytes in the request line or one header line"
    )
    max_headers: int = Field(100, ge=8, le=1000, description="header lines in a request")

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR such as 10.0.0.0/8") from None
        return value


class ManagementConfig(_Section):
    listen: ListenAddress = Field(default="0.0.0.0:9180", validate_default=True)
    readiness_requires: list[Literal["redis", "idp"]] = Field(default_factory=list)


class OIDCConfig(_Section):
    issuer: BaseUrl
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"  # noqa: S105 - a method name, not a secret
    )
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    extra_auth_params: dict[str, str] = Field(default_factory=dict)
    post_logout_redirect_url: HttpUrl | None = None

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("must include 'openid'")
        return value


def _encryption_key(value: SecretStr) -> SecretStr:
    try:
        raw = base64.b64decode(value.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("expected 32 bytes of base64 (make one with `auth-sidecar generate-key`)")
    return value


class SessionConfig(_Section):
    store: Literal["redis", "memory"] = "redis"
    cookie_name: str = "__Host-sidecar"
    cookie_secure: bool = True
    same_site: Literal["lax", "strict", "none"] = "lax"
    lifetime: Duration = Field(86400.0, gt=0)
    idle_timeout: Duration = 0.0
    cache_ttl: Duration = Field(
        1.0,
        ge=0,
        description="how long a replica may reuse a session it opened; changes elsewhere "
        "reach it within milliseconds through the store's change feed; 0 turns it off",
    )
    cache_max_entries: int = Field(10_000, ge=1, description="sessions kept per process")
    max_per_user: int = Field(
        0,
        ge=0,
        description="sessions one user (issuer and sub) may hold; above it a new login ends "
        "the user's oldest session; 0: unlimited",
    )
    encryption_keys: list[Annotated[SecretStr, AfterValidator(_encryption_key)]] = Field(
        min_length=1
    )

    @field_validator("cookie_name")
    @classmethod
    def _cookie_name(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid cookie name")
        return value

    @model_validator(mode="after")
    def _host_prefix_needs_secure(self) -> Self:
        if self.cookie_name.startswith("__Host-") and not self.cookie_secure:
            raise ValueError(
                "cookie_secure: a __Host- cookie must be Secure; "
                "rename the cookie to use plain HTTP (local development only)"
            )
        return self


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


class SentinelConfig(_Section):
    master_name: str = Field(min_length=1)
    addresses: list[HostPort] = Field(min_length=1, description="sentinels as host:port")
    password: SecretStr | None = Field(None, description="the sentinels' own password")
    username: str | None = None


class ClusterConfig(_Section):
    nodes: list[HostPort] = Field(min_length=1, description="seed nodes as host:port")


class RedisConfig(_Section):
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="standalone server; with sentinel or cluster only scheme, "
        "credentials and database are used",
    )
    username: str | None = Field(None, description="ACL user (or in the URL)")
    password: SecretStr | None = Field(None, description="password (or in the URL)")
    tls_ca_file: str | None = Field(None, description="CA bundle for rediss://")
    key_prefix: str = Field("sidecar", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    sentinel: SentinelConfig | None = None
    cluster: ClusterConfig | None = None

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        scheme = URL(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {scheme!r}")
        return value

    @model_validator(mode="after")
    def _one_topology(self) -> Self:
        if self.sentinel is not None and self.cluster is not None:
            raise ValueError("cluster: choose either sentinel or cluster, not both")
        if self.tls_ca_file is not None and URL(self.url).scheme != "rediss":
            raise ValueError("tls_ca_file: only used with a rediss:// URL")
        return self


_LATE_ANSWER_MAX: Final = 600.0  # seconds; a grant unanswered this long is not coming back
# seconds; a shorter lease, renewed every third, would be lost to one slow Redis reply.
_LEASE_MIN: Final = 1.0


class RefreshConfig(_Section):
    before_expiry: Duration = 60.0
    idp_timeout: Duration = 10.0
    # The lock's lease: renewed every third of it while its holder lives, so a dead holder's
    # lock is taken over within it (docs/refresh.md, "The lease").
    lock_ttl: Duration = 5.0
    wait_timeout: Duration = 15.0
    late_answer_timeout: Duration = 60.0
    # While the IdP circuit breaker is open, one refresh grant per interval and process
    # probes the IdP (docs/refresh.md, "IdP circuit breaker").
    probe_interval: Duration = 1.0

    @model_validator(mode="after")
    def _relations(self) -> Self:
        # docs/refresh.md step 3: a waiter must wait at least as long as the holder's call can
        # take. The lease need not outlive the call: its holder renews it meanwhile.
        if self.idp_timeout <= 0:
            raise ValueError("idp_timeout: must be greater than 0")
        if self.probe_interval <= 0:
            raise ValueError("probe_interval: must be greater than 0")
        if self.lock_ttl < _LEASE_MIN:
            raise ValueError(
                f"lock_ttl: must be at least {_LEASE_MIN:.0f}s (renewed every third of it)"
            )
        if self.wait_timeout < self.idp_timeout:
            raise ValueError("wait_timeout: must be at least refresh.idp_timeout")
        # A grant past idp_timeout keeps running (and the lock held) until this bound: a
        # second grant with the same refresh token would be reuse (docs/refresh.md).
        if not self.idp_timeout <= self.late_answer_timeout <= _LATE_ANSWER_MAX:
            raise ValueError(
                "late_answer_timeout: must be between refresh.idp_timeout and "
                f"{_LATE_ANSWER_MAX:.0f}s"
            )
        return self


class AccessConfig(_Section):
    allowed_groups: list[str] = Field(default_factory=list)
    groups_claim: str = Field("groups", description="claim path of the groups: realm_access.roles")
    allowed_emails: list[str] = Field(default_factory=list)
    allowed_email_domains: list[str] = Field(default_factory=list)
    require_verified_email: bool = Field(
        True, description="email rules accept only an `email_verified` claim that is boolean true"
    )


_METHOD: Final = re.compile(r"[A-Z][A-Z0-9_-]*")
_GLOB_SEGMENT: Final = re.compile(r"[^/?#\\]*")
ClaimValue = str | int | bool


class RouteRule(_Section):
    """One rule of an upstream: which requests it matches, and who may pass (docs/rules.md)."""

    methods: list[str] = Field(
        default_factory=list, description="HTTP methods this rule matches; none: any"
    )
    paths: list[str] = Field(
        default_factory=list,
        description="globs on the canonical path: * within one segment, ** across segments; "
        "none: any path",
    )
    allow: Literal["public", "authenticated", "deny"] = Field(
        "authenticated",
        description="public: no login, no identity; deny: 403 for everyone; authenticated: "
        "a session or bearer token that meets every condition of the rule",
    )
    groups: list[str] = Field(
        default_factory=list, description="any one of these groups (access.groups_claim)"
    )
    emails: list[str] = Field(default_factory=list, description="any one of these addresses")
    email_domains: list[str] = Field(
        default_factory=list, description="any address in one of these domains"
    )
    claims: dict[str, list[ClaimValue]] = Field(
        default_factory=dict, description="claim path (dotted) -> any one of these values"
    )
    scopes: list[str] = Field(
        default_factory=list, description="every one of these scopes (bearer tokens' scope claim)"
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        upper = [m.upper() for m in value]
        for method in upper:
            if not _METHOD.fullmatch(method):
                raise ValueError(f"{method!r} is not an HTTP method")
        return upper

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for glob in value:
            if not glob.startswith("/"):
                raise ValueError(f"{glob!r}: a path glob starts with /")
            if any(not _GLOB_SEGMENT.fullmatch(part) for part in glob.split("/")):
                raise ValueError(f"{glob!r}: no query, fragment or backslash in a path glob")
            if any("**" in part and part != "**" for part in glob.split("/")):
                raise ValueError(f"{glob!r}: ** must be a whole segment")
        return value

    @model_validator(mode="after")
    def _conditions_need_a_login(self) -> Self:
        conditions = self.groups or self.emails or self.email_domains or self.claims
        if self.allow != "authenticated" and (conditions or self.scopes):
            raise ValueError(f"allow: {self.allow} takes no conditions")
        return self


class UpstreamConfig(_Section):
    path: PathPrefix = "/"
    url: BaseUrl
    # Must be > 0: there is no "never time out"; a hung upstream must not hold requests forever.
    timeout: Duration = Field(30.0, gt=0, description="wait for response headers and between reads")
    connect_timeout: Duration = Field(5.0, gt=0)
    strip_prefix: bool = False
    pass_host_header: bool = True
    max_connections: int = Field(1024, ge=1, description="pooled connections to this upstream")
    pool_timeout: Duration = Field(
        5.0, gt=0, description="wait for a free pool slot before answering 503"
    )
    allow_encoded_slashes: bool = Field(
        False, description="accept %2F and %5C in paths routed here (docs/security.md)"
    )
    allow_path_params: bool = Field(
        False, description="accept `;` path parameters in paths routed here (docs/security.md)"
    )
    access: AccessConfig | None = None
    rules: list[RouteRule] = Field(
        default_factory=list,
        description="ordered rules, first match wins; no rule matched: access (docs/rules.md)",
    )


class LoginConfig(_Section):
    max_pending_per_browser: int = Field(
        5, ge=1, le=100, description="pending logins kept per login cookie; the oldest goes"
    )
    rate_per_minute: float = Field(
        60.0, ge=0, description="/oauth2/start per client IP and process; 0 = no limit"
    )
    burst: int = Field(50, ge=1, description="/oauth2/start calls a client IP may make at once")


class InjectConfig(_Section):
    authorization: Literal["access_token", "id_token", "none"] = "access_token"
    headers: dict[str, str] = Field(
        default_factory=lambda: {
            "X-Forwarded-User": "sub",
            "X-Forwarded-Email": "email",
            "X-Forwarded-Groups": "groups",
        }
    )

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
        return value


class BearerIssuer(_Section):
    issuer: BaseUrl
    audiences: list[str] = Field(
        min_length=1, description="the token's aud must contain one of these"
    )
    jwks_url: HttpUrl | None = Field(
        None, description="the issuer's JWKS; default: jwks_uri of its discovery document"
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"],
        min_length=1,
        description="signing algorithms accepted (asymmetric only)",
    )

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        for algorithm in value:
            if algorithm not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"{algorithm!r}: only asymmetric algorithms ({_ALGORITHMS})")
        return value


_ALGORITHMS: Final = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))


class IntrospectionConfig(_Section):
    endpoint: HttpUrl = Field(description="the RFC 7662 introspection endpoint")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    cache_ttl: Duration = Field(
        60.0, ge=0, description="how long an answer is reused (never past the token's exp)"
    )


class BearerConfig(_Section):
    accept_provider_tokens: bool = Field(
        False, description="accept JWT access tokens of oidc.issuer (audience: audiences)"
    )
    audiences: list[str] = Field(
        default_factory=list,
        description="audiences of the provider's tokens; none: oidc.client_id",
    )
    issuers: list[BearerIssuer] = Field(
        default_factory=list, description="other issuers whose JWT access tokens are accepted"
    )
    introspection: IntrospectionConfig | None = Field(
        None, description="check opaque tokens at this endpoint (RFC 7662)"
    )
    cache_max_entries: int = Field(
        10_000, ge=1, description="validated tokens remembered per process, by hash"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.accept_provider_tokens or self.issuers or self.introspection)


class CsrfConfig(_Section):
    enabled: bool = Field(
        True,
        description="unsafe methods with the session cookie must come from this site",
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="other origins allowed to send them, e.g. https://x.y"
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            url = URL(origin)
            if url.scheme not in ("http", "https") or not url.host or str(url.origin()) != origin:
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return value


class ForwardAuthConfig(_Section):
    authorization: bool = Field(
        True, description="answer the Authorization header for the upstream too"
    )
    redirect: bool = Field(
        False,
        description="send unauthenticated navigations to login (Traefik, Caddy) instead of 401",
    )


class AdminConfig(_Section):
    tokens: list[SecretStr] = Field(
        default_factory=list,
        description="bearer tokens of the admin API on the management listener, usually "
        "${ADMIN_TOKEN} or ${file:/path}; none: the admin API is off (404)",
    )

    @field_validator("tokens")
    @classmethod
    def _strong_tokens(cls, value: list[SecretStr]) -> list[SecretStr]:
        for index, token in enumerate(value):
            if len(token.get_secret_value()) < 16:
                raise ValueError(f"tokens[{index}]: an admin token needs at least 16 characters")
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


# Imported when tracing is configured (sidecar/telemetry.py): the optional `otel` extra.
_OTEL_MODULES: Final = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


def _otel_installed() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in _OTEL_MODULES)
    except ImportError:  # a missing parent package raises instead of answering None
        return False


class TelemetryConfig(_Section):
    otlp_endpoint: str = Field(
        "",
        description="URL of the OTLP/HTTP traces endpoint, e.g. "
        "http://otel-collector:4318/v1/traces; empty: tracing off",
    )
    service_name: str = Field("auth-sidecar", min_length=1, description="service.name of spans")
    sampling: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded, 0..1; a caller's traceparent decides for "
        "its own trace (parent-based)",
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value:
            return value
        _http_url(value)
        if not _otel_installed():
            raise ValueError(
                "tracing needs the optional extra: pip install 'auth-sidecar[otel]' "
                "(opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http)"
            )
        return value


class Config(_Section):
    server: ServerConfig
    management: ManagementConfig = Field(default_factory=ManagementConfig)
    oidc: OIDCConfig
    session: SessionConfig
    redis: RedisConfig = Field(default_factory=RedisConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    upstreams: list[UpstreamConfig] = Field(min_length=1)
    login: LoginConfig = Field(default_factory=LoginConfig)
    inject: InjectConfig = Field(default_factory=InjectConfig)
    public_paths: list[PathPrefix] = Field(default_factory=list)
    access: AccessConfig = Field(default_factory=AccessConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    bearer: BearerConfig = Field(default_factory=BearerConfig)
    csrf: CsrfConfig = Field(default_factory=CsrfConfig)
    forward_auth: ForwardAuthConfig = Field(default_factory=ForwardAuthConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> Self:
        first: dict[str, int] = {}
        for index, upstream in enumerate(self.upstreams):
            if upstream.path in first:
                raise ValueError(
                    f"upstreams[{index}].path: {upstream.path!r} is already routed by "
                    f"upstreams[{first[upstream.path]}]; each path prefix needs one upstream"
                )
            first[upstream.path] = index
        if self.session.store == "memory" and self.server.workers > 1:
            raise ValueError(
                "session.store: memory keeps sessions inside one process; "
                "use redis with server.workers > 1"
            )
        if self.server.listen.port == self.management.listen.port and (
            self.server.listen.host == self.management.listen.host
        ):
            raise ValueError("management.listen: must differ from server.listen")
        return self
