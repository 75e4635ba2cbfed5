"""Helpers shared by test modules: tests import from here, never from each other or a conftest.

- ports, keys, repo, environment: free ports, the tests' keys, repository paths, and the
  caller's variables no test may inherit;
- configs, stores, records: sidecar configurations, Redis store sections, session records;
- sidecars, processes: the sidecar in-process or as a process, and stopping OS processes;
- threads, idp, upstreams: servers in threads, the dev IdP, the echo and verifying upstreams;
- login, browse, provider: the code-flow login at the dev IdP, a provider-form browser and the
  e2e `oidc-provider` process;
- raw_http, recording_upstream, probe: raw HTTP on sockets and the hostile-request probe;
- redis_fleet, tls, storm, chaos: Redis processes of a test, certificates, refresh storms and
  the chaos tests' timeline;
- jwks_server: a second token issuer (discovery, JWKS, introspection) for bearer tokens;
- front_proxies: real nginx and Caddy in front of the sidecar, with the guide's configurations;
- demo, chromium: the running demo and headless Chromium;
- helm, containers: the real helm and checkov, and the image built and run with podman;
- promtool: Prometheus' rule checker and unit-test runner, for the chart's alerts.
"""
