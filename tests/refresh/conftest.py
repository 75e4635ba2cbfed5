"""Fixtures of the refresh tests: sidecar replicas on the module's IdP, and breaking that IdP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.idp import ThreadedIdP, set_delay, set_garbage, set_token_failures
from tests.support.sidecars import SidecarProcess, StartProcess
from tests.support.storm import StartReplicas, start_replicas
from tests.support.upstreams import VerifyingUpstream


@pytest.fixture(name="start_replicas")
def start_replicas_fixture(
    idp: ThreadedIdP,
    upstream: VerifyingUpstream,
    redis_prefix: str,
    sidecar_process: StartProcess,
) -> StartReplicas:
    """`start_replicas(n, refresh=None)`: n ready sidecar processes sharing the test's Redis
    prefix, logged in at the module's IdP, before the verifying upstream (storm settings by
    default); stopped after the test."""

    def start(n: int, refresh: dict[str, str] | None = None) -> list[SidecarProcess]:
        return start_replicas(n, idp, upstream, redis_prefix, sidecar_process, refresh)

    return start


@pytest.fixture
def faulty_idp(idp: ThreadedIdP) -> Iterator[ThreadedIdP]:
    """The module's IdP, for a test that turns its token endpoint knobs (delay, failures,
    garbage): every knob is reset after the test, so the next one finds a working IdP."""
    yield idp
    set_delay(idp, 0.0)
    set_token_failures(idp, 0)
    set_garbage(idp, 0)
