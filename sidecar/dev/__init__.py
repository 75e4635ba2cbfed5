"""Development only: `auth-sidecar demo` and the dev IdP. Never imported by the production
app (tests/ops/test_layout.py checks it).
"""
