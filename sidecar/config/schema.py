"""The JSON Schema of the configuration file (`auth-sidecar config-schema`), for editors.

Pydantic's schema, with two corrections so that it agrees with the validator: a duration's
default is written as a duration (`"60s"`, not `60.0`, which the validator would refuse as
ambiguous), and every key has a description (those the models do not carry come from
`_DESCRIPTIONS`, in the words of config.example.yaml).
"""

from __future__ import annotations

from typing import Any, Final

from sidecar.config.models import Config
from sidecar.config.types import DURATION_PATTERN, format_duration

__all__ = ["config_schema"]

_DESCRIPTIONS: Final = {
    "AccessConfig.allowed_groups": "allow members of any of these groups (claim: groups_claim)",
    "AccessConfig.allowed_emails": "allow these email addresses (verified ones only by default)",
    "AccessConfig.allowed_email_domains": "allow addresses in these domains",
    "InjectConfig.authorization": "which token goes upstream as Authorization: Bearer",
    "InjectConfig.headers": "upstream header name -> claim path, e.g. X-Forwarded-Email: email",
    "LoggingConfig.level": "log level of the JSON logs on stderr",
    "LoggingConfig.access_log": "one JSON line per request (path without query)",
    "ManagementConfig.listen": "host:port of /healthz, /readyz and /metrics",
    "ManagementConfig.readiness_requires": "dependencies whose outage makes /readyz fail",
    "OIDCConfig.issuer": "the provider's issuer URL; metadata from its discovery document",
    "OIDCConfig.client_id": "the sidecar's client id at the provider",
    "OIDCConfig.client_secret": "the client secret, usually ${OIDC_CLIENT_SECRET}",
    "OIDCConfig.token_endpoint_auth_method": "how the client authenticates at the token endpoint",
    "OIDCConfig.scopes": "scopes asked for; offline_access for refresh tokens at most IdPs",
    "OIDCConfig.extra_auth_params": "extra parameters of the authorization request",
    "OIDCConfig.post_logout_redirect_url": "where the IdP sends the browser after sign-out",
    "RedisConfig.key_prefix": "prefix of every Redis key, so several deployments can share one",
    "RedisConfig.sentinel": "connect through Redis Sentinel",
    "RedisConfig.cluster": "connect to a Redis Cluster",
    "RefreshConfig.before_expiry": "refresh when less than this (or half the lifetime) is left",
    "RefreshConfig.idp_timeout": "callers wait this long for a refresh grant's answer",
    "RefreshConfig.lock_ttl": "refresh lock lease, renewed by a live holder; a dead one's lapses",
    "RefreshConfig.wait_timeout": "how long a request waits for another replica's refresh",
    "RefreshConfig.late_answer_timeout": "how long a slow grant's answer is still waited for",
    "RefreshConfig.probe_interval": "while the IdP fails, one refresh probe per this, per process",
    "SentinelConfig.master_name": "the monitored master's name",
    "SentinelConfig.username": "the sentinels' ACL user",
    "ServerConfig.listen": "host:port of the main listener",
    "ServerConfig.workers": "processes sharing the port (needs session.store: redis above 1)",
    "SessionConfig.store": "redis (every replica) or memory (one process)",
    "SessionConfig.cookie_name": "session cookie; the __Host- prefix needs cookie_secure",
    "SessionConfig.cookie_secure": "Secure cookies (HTTPS); false only for plain-HTTP tests",
    "SessionConfig.same_site": "SameSite of the session cookie",
    "SessionConfig.lifetime": "a session's absolute lifetime",
    "SessionConfig.idle_timeout": "end a session unused this long; 0: never",
    "SessionConfig.encryption_keys": "base64 32-byte keys; the first seals, all open",
    "UpstreamConfig.path": "path prefix this upstream serves (whole segments)",
    "UpstreamConfig.url": "the upstream's base URL, http:// or https://",
    "UpstreamConfig.connect_timeout": "how long to wait for a connection to the upstream",
    "UpstreamConfig.strip_prefix": "remove `path` before forwarding",
    "UpstreamConfig.pass_host_header": "forward the client's Host instead of the upstream's",
    "UpstreamConfig.access": "rules for this upstream, on top of the global access rules",
    "Config.server": "the main listener",
    "Config.management": "the management listener",
    "Config.oidc": "the OpenID Connect provider and client",
    "Config.session": "sessions and their cookie",
    "Config.redis": "the Redis that holds sessions (session.store: redis)",
    "Config.refresh": "token refresh",
    "Config.upstreams": "where requests go, by path prefix; the longest match wins",
    "Config.login": "bounds on logins per client and browser",
    "Config.inject": "what the upstream receives about the user",
    "Config.public_paths": "path prefixes forwarded without a session or identity",
    "Config.access": "who may pass at all",
    "Config.logging": "logs",
    "Config.bearer": "bearer tokens of machine clients beside browser sessions",
    "Config.csrf": "CSRF defence for cookie-authenticated unsafe requests",
    "Config.forward_auth": "how /oauth2/auth answers front proxies",
    "Config.telemetry": "OpenTelemetry traces (the otel extra); off without otlp_endpoint",
    "BearerIssuer.issuer": "the issuer URL; its tokens' iss must equal it",
    "IntrospectionConfig.client_id": "the sidecar's client id at the introspection endpoint",
    "IntrospectionConfig.client_secret": "its secret, usually ${INTROSPECTION_SECRET}",
    "Config.admin": "the admin API on the management listener (sessions by user, ending them)",
}


def config_schema() -> dict[str, Any]:
    """The JSON Schema `config-schema` prints."""
    schema = Config.model_json_schema(mode="validation")
    sections = {"Config": schema, **schema.get("$defs", {})}
    for model, section in sections.items():
        for name, prop in section.get("properties", {}).items():
            described = prop.get("description") or _DESCRIPTIONS.get(f"{model}.{name}")
            if described is not None:
                prop["description"] = described
            if _is_duration(prop) and isinstance(prop.get("default"), int | float):
                prop["default"] = format_duration(float(prop["default"]))
    return schema


def _is_duration(prop: dict[str, Any]) -> bool:
    alternatives = [prop, *prop.get("anyOf", ())]
    return any(p.get("pattern") == DURATION_PATTERN for p in alternatives)
