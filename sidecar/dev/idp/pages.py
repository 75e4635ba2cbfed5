"""The dev IdP's HTML: the user picker, error and logged-out pages. Every value is escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from sidecar.dev.idp.models import DevUser

__all__ = ["error_page", "logged_out_page", "login_page"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}"
    "button{display:block;width:100%;margin:.4rem 0;padding:.6rem;text-align:left}"
    ".warn{background:#fff3cd;padding:.5rem;border:1px solid #e0c36c}"
)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        '<p class="warn">Development identity provider: for development and tests only.</p>'
        f"<h1>{escape(title)}</h1>{body}</body></html>"
    )


def login_page(
    action: str, params: Mapping[str, Sequence[str]], users: Sequence[DevUser], client_id: str
) -> str:
    """A form that POSTs the authorization request back with the chosen `user`."""
    hidden = "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, values in params.items()
        if name not in ("user", "deny")
        for value in values
    )
    buttons = "".join(
        f'<button type="submit" name="user" value="{escape(u.sub)}">'
        f"<b>{escape(u.name)}</b> &lt;{escape(u.email)}&gt;"
        f" — groups: {escape(', '.join(u.groups) or 'none')}</button>"
        for u in users
    )
    deny = '<button type="submit" name="deny" value="1">Deny access</button>'
    body = (
        f"<p>Sign in to <b>{escape(client_id)}</b> as:</p>"
        f'<form method="post" action="{escape(action)}">{hidden}{buttons}{deny}</form>'
    )
    return _page("Choose a user", body)


def error_page(message: str) -> str:
    """Shown instead of redirecting when the redirect target cannot be trusted."""
    return _page("Authorization error", f"<p>{escape(message)}</p>")


def logged_out_page() -> str:
    """Shown after RP-initiated logout without a post_logout_redirect_uri."""
    return _page("Signed out", "<p>You have been signed out of the development IdP.</p>")
