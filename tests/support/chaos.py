"""The timeline the refresh chaos and fault tests share: 6-second access tokens, due after 3 s.

A session is "due" 3 s before its token expires (`before_expiry` 3s): requests sent then must
refresh it while its token still works. The IdP signs exp = floor(issue time) + ACCESS_TTL
(whole seconds), the sidecar caps the token's expiry at that exp and stops forwarding it
lifetime / 10 (0.6 s) before. Counted from the login a token is usable for 4.4-5.4 s, by where
in its second the code exchange fell; tests whose timeline needs the old token log in with
`login_known_exp` and count from its exp.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from tests.support.login import Site, login_cookie
from tests.support.storm import Result, Storm

__all__ = [
    "ACCESS_TTL",
    "DUE_AFTER",
    "EXCHANGE_AT",
    "REFRESH",
    "STILL_VALID",
    "explain",
    "login_known_exp",
]

ACCESS_TTL = 6.0  # the tests' IdP (the `idp` fixture reads the module's ACCESS_TTL)
DUE_AFTER = 3.3  # seconds after a (re)fresh token was requested: less than 3 s left, still valid
REFRESH = {"before_expiry": "3s", "idp_timeout": "2s", "lock_ttl": "6s", "wait_timeout": "5s"}
EXCHANGE_AT = 0.05  # seconds into a wall-clock second: when `login_known_exp` exchanges
STILL_VALID = 0.6  # lifetime / 10: the sidecar's margin before the token's `exp`


async def login_known_exp(sc: Site, user: str) -> tuple[str, float]:
    """Log in with the code exchange `EXCHANGE_AT` s into a wall-clock second.

    Returns the session cookie and the access token's `exp` (Unix time): that second plus
    ACCESS_TTL (login returns well within a second of the exchange). The token's lifetime is
    then ACCESS_TTL - EXCHANGE_AT: it is due from exp - 2.97 s (before_expiry 3 s) and
    forwarded until exp - STILL_VALID.
    """
    cookie = await login_cookie(sc, user, exchange_at_fraction=EXCHANGE_AT)
    return cookie, math.floor(time.time() - EXCHANGE_AT) + ACCESS_TTL


def explain(results: list[Result], token: str | None, storm: Storm, exp: float) -> str:
    """Per replica: (status, ok, same token?) counts, when the calls were sent and answered
    against the token's exp, the error bodies and Retry-After (for failure messages)."""
    lines = [f"token exp {exp:.0f}; the sidecar forwards it until exp - {STILL_VALID}s"]
    for replica in sorted({r.target.replica for r in results}):
        mine = [r for r in results if r.target.replica == replica]
        kinds = Counter(
            (r.status, r.ok, "no token" if r.token is None else r.token == token) for r in mine
        )
        sent = [exp - storm.wall(r.started) for r in mine]
        ended = [exp - storm.wall(r.ended) for r in mine]
        bodies = Counter(str(r.body) for r in mine if r.status != 200)
        lines.append(
            f"replica {replica}: {dict(kinds)} sent at exp - {max(sent):.2f}..{min(sent):.2f}s, "
            f"answered at exp - {max(ended):.2f}..{min(ended):.2f}s; bodies {dict(bodies)}; "
            f"Retry-After {sorted({str(r.retry_after) for r in mine})}"
        )
    return "\n".join(lines)
