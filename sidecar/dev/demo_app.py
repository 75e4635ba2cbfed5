"""The demo's upstream app: a page that shows, live, what the sidecar does for the app.

It tells the story a platform engineer needs in two minutes: which access token the app
received now and when it was issued, a log of every token the app has seen (so a refresh
shows up as "token #3 arrived 10 s before #2 expired"), which headers the sidecar added, and
a button that fires 50 requests at once just as the token is due: 50 answers, one refresh
grant at the IdP, no reuse. It reads the dev IdP's counters in-process.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from sidecar.dev.idp.models import DevIdPStats

__all__ = ["demo_app"]

# Headers the sidecar writes for the app; everything else came from the browser.
_ADDED: Final = frozenset(
    {
        "authorization",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "host",
    }
)
_HISTORY: Final = 20  # tokens remembered per user


@dataclass
class _Token:
    number: int
    token_id: str
    issued_at: float | None
    expires_at: float | None
    first_seen: float
    previous_left: float | None  # how long the previous token still had when this one came


@dataclass
class _Seen:
    """Every access token the app received, per user, in order of arrival."""

    by_user: dict[str, list[_Token]] = field(default_factory=dict)

    def note(self, user: str, token: str) -> _Token | None:
        claims = _claims(token)
        if claims is None:
            return None
        token_id = str(claims.get("jti") or token[-8:])
        tokens = self.by_user.setdefault(user, [])
        for old in reversed(tokens):  # the current one, or one a slow request still carries
            if old.token_id == token_id:
                return old
        now = time.time()
        previous = tokens[-1] if tokens else None
        left = (
            previous.expires_at - now
            if previous is not None and previous.expires_at is not None
            else None
        )
        entry = _Token(
            number=(previous.number + 1) if previous else 1,
            token_id=token_id,
            issued_at=_number(claims.get("iat")),
            expires_at=_number(claims.get("exp")),
            first_seen=now,
            previous_left=left,
        )
        tokens.append(entry)
        del tokens[:-_HISTORY]
        return entry


def demo_app(idp_stats: Callable[[], DevIdPStats]) -> web.Application:
    """The app behind the demo's sidecar; `idp_stats` reads the dev IdP's counters."""
    seen = _Seen()
    app = web.Application()

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response(_whoami(request, seen))

    async def idp(request: web.Request) -> web.Response:
        stats = idp_stats()
        return web.json_response(
            {
                "refresh_grants": stats.refresh_grants,
                "reuse_detected": stats.reuse_detected,
                "token_requests": stats.token_requests,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def page(request: web.Request) -> web.Response:
        who = _whoami(request, seen)
        admin = request.path.startswith("/admin")
        return web.Response(text=_page(who, admin), content_type="text/html")

    async def signed_out(request: web.Request) -> web.Response:
        return web.Response(text=_SIGNED_OUT, content_type="text/html")

    app.router.add_get("/api/whoami", whoami)
    app.router.add_get("/api/idp", idp)
    app.router.add_get("/signed-out", signed_out)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


def _whoami(request: web.Request, seen: _Seen) -> dict[str, Any]:
    user = request.headers.get("X-Forwarded-User") or ""
    token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    current = seen.note(user, token) if user and token else None
    now = time.time()
    return {
        "user": user,
        "email": request.headers.get("X-Forwarded-Email") or "",
        "groups": request.headers.get("X-Forwarded-Groups") or "",
        "token": None
        if current is None
        else {
            "number": current.number,
            "id": current.token_id,
            "issued_at": current.issued_at,
            "expires_at": current.expires_at,
            "seconds_left": None
            if current.expires_at is None
            else round(current.expires_at - now, 1),
        },
        # Kept for scripts written against the first demo.
        "token_seconds_left": None
        if current is None or current.expires_at is None
        else round(current.expires_at - now, 1),
        "history": [
            {
                "number": t.number,
                "id": t.token_id,
                "issued_at": t.issued_at,
                "first_seen": t.first_seen,
                "previous_left": None if t.previous_left is None else round(t.previous_left, 1),
            }
            for t in seen.by_user.get(user, [])
        ],
        "headers": [
            {"name": name, "value": _shown(name, value), "added": name.lower() in _ADDED}
            for name, value in request.headers.items()
        ],
    }


def _claims(token: str) -> dict[str, Any] | None:
    """The JWT's claims, unverified: the demo shows them, it decides nothing on them."""
    try:
        claims = json.loads(extract_compact(token.encode()).payload)
    except (JoseError, ValueError, AttributeError):
        return None
    return claims if isinstance(claims, dict) else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _shown(name: str, value: str) -> str:
    """A token is shown by its last characters, never whole."""
    if name.lower() == "authorization" and len(value) > 20:
        return f"Bearer …{value[-8:]} ({len(value)} characters)"
    return value


def _page(who: dict[str, Any], admin: bool) -> str:
    title = "Admin area" if admin else f"Hello, {who['user']}"
    note = (
        "<p class=ok>Only the <code>admins</code> group gets here: the sidecar answered 403 "
        "to bob and carol before this app saw the request.</p>"
        if admin
        else ""
    )
    return _PAGE.format(
        title=html.escape(title),
        note=note,
        user=html.escape(who["user"]),
        email=html.escape(who["email"] or "none"),
        groups=html.escape(who["groups"] or "none"),
        # Inside a script element entities are not decoded: escape what could end it instead.
        initial=json.dumps(who)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026"),
    )


_STYLE: Final = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:64rem;padding:0 1rem}
th{text-align:left;padding-right:1rem;font-weight:normal}td code{word-break:break-all}
.added{background:#e6f4ea}
.panel{border:1px solid #ccc;border-radius:6px;padding:.8rem;margin:1rem 0}
.big{font-size:1.4rem}.ok{color:#176c2e}.bad{color:#a12}#log li{margin:.2rem 0}
button{padding:.5rem .8rem;margin-right:.5rem}
"""

_PAGE: Final = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>auth-sidecar demo</title>
<style>"""
    + _STYLE.replace("{", "{{").replace("}", "}}")
    + """</style></head>
<body><h1>{title}</h1>{note}
<p>Signed in as <b id="user">{user}</b>, email <b>{email}</b>, groups <b id="groups">{groups}</b>.
This app never talks to the identity provider: the sidecar in front of it logs you in,
keeps your tokens server-side and hands the app a fresh access token with every request.</p>

<div class="panel"><div class="big">Access token <b id="token-number">?</b>
(<code id="token-id">?</code>), issued <span id="issued">?</span>,
expires in <b id="left">?</b> s</div>
<p>The sidecar refreshes it 10 s before it expires, on whichever request comes first; the
page asks the app every second. <span id="api">waiting</span></p>
<ol id="log"></ol></div>

<div class="panel"><button id="burst">50 requests at once, right when the token is due</button>
<span id="burst-result"></span>
<p>Waits until the token enters its refresh window, then fires 50 requests in parallel. A
proxy without a per-session lock would send the IdP up to 50 refresh grants with the same
rotating refresh token, and the IdP would revoke the session.</p></div>

<p><a href="/admin/">Admin area</a> (admins only) ·
<form style="display:inline" method="post" action="/oauth2/sign_out">
<button id="signout" type="submit">Sign out</button></form></p>

<h2>Headers the app received</h2>
<p>Highlighted: written by the sidecar (identity, token, forwarding). The rest came from
your browser; the sidecar's own cookies were removed.</p>
<table id="headers"></table>
<script type="application/json" id="initial">{initial}</script>
<script>
const initial = JSON.parse(document.getElementById("initial").textContent);
let paused = false, lastLeft = null, lastAt = 0;
function time(t) {{ return t ? new Date(t * 1000).toLocaleTimeString() : "?"; }}
function text(id, value) {{ document.getElementById(id).textContent = value; }}
function show(who) {{
  if (who.token) {{
    text("token-number", "#" + who.token.number); text("token-id", who.token.id);
    text("issued", time(who.token.issued_at)); text("left", who.token.seconds_left);
    lastLeft = who.token.seconds_left; lastAt = Date.now();
  }}
  const log = document.getElementById("log"); log.innerHTML = "";
  for (const t of who.history) {{
    const li = document.createElement("li");
    li.textContent = "token #" + t.number + " (" + t.id + ") issued " + time(t.issued_at) +
      (t.previous_left === null ? ", at login" :
       ", refreshed " + t.previous_left + " s before #" + (t.number - 1) + " expired");
    log.appendChild(li);
  }}
  const table = document.getElementById("headers"); table.innerHTML = "";
  for (const h of who.headers) {{
    const tr = document.createElement("tr"); if (h.added) tr.className = "added";
    const th = document.createElement("th"); th.textContent = h.name;
    const td = document.createElement("td"); const c = document.createElement("code");
    c.textContent = h.value; td.appendChild(c); tr.appendChild(th); tr.appendChild(td);
    table.appendChild(tr);
  }}
}}
async function whoami() {{
  const r = await fetch("/api/whoami", {{headers: {{Accept: "application/json"}}}});
  return [r.status, r.ok ? await r.json() : null];
}}
async function poll() {{
  if (paused) return;
  try {{
    const [status, who] = await whoami();
    text("api", "Last call: " + status + " at " + new Date().toLocaleTimeString() + ".");
    if (who) show(who);
  }} catch (e) {{ text("api", "Last call failed: " + e); }}
}}
async function idp() {{ return (await fetch("/api/idp")).json(); }}
document.getElementById("burst").addEventListener("click", async () => {{
  paused = true;  // no other request may start the refresh
  // The counters are read before the wait: any request, this one too, passes the sidecar
  // and would start the refresh itself once the token is due.
  const before = await idp();
  const due = Math.max(0, (lastLeft - 10 + 0.3) * 1000 - (Date.now() - lastAt));
  text("burst-result", "waiting " + Math.round(due / 1000) + " s for the token to be due…");
  await new Promise(ok => setTimeout(ok, due));
  const answers = await Promise.all(Array.from({{length: 50}}, () => whoami()));
  const after = await idp();
  const ok = answers.filter(([s]) => s === 200).length;
  const tokens = new Set(answers.filter(([, w]) => w && w.token).map(([, w]) => w.token.id));
  window.burstResult = {{answers: answers.length, ok: ok, tokens: tokens.size,
    grants: after.refresh_grants - before.refresh_grants,
    reuse: after.reuse_detected - before.reuse_detected}};
  text("burst-result", answers.length + " requests: " + ok + " answered 200, " + tokens.size +
    " token(s) returned, " + window.burstResult.grants + " refresh grant(s) at the IdP, " +
    window.burstResult.reuse + " reuse detected");
  paused = false; poll();
}});
show(initial); setInterval(poll, 1000);
</script></body></html>
"""
)

_SIGNED_OUT: Final = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Signed out</title><style>"""
    + _STYLE
    + """</style></head><body><h1>Signed out</h1>
<p>The sidecar deleted your session, revoked its refresh token at the identity provider and
signed you out there too. This page is a public path: it needs no session.</p>
<p><a href="/">Sign in again</a></p></body></html>
"""
)
