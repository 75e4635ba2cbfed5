"""auth-sidecar: an OpenID Connect auth sidecar and reverse proxy."""

__version__ = "0.1.0"
