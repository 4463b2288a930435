"""What the demo shows, apart from the web framework: per-session visits kept in
this machine's memory (exactly the state sticky sessions protect), and the page."""

from __future__ import annotations

import html
import json
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any

SESSION_COOKIE = "demo-session"
SESSION_MAX_AGE = 6 * 24 * 3600
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_PAGE = Template((Path(__file__).parent / "templates" / "index.html").read_text())


def machine_id() -> str:
    return os.environ.get("FLY_MACHINE_ID", "local")


def region() -> str:
    return os.environ.get("FLY_REGION", "local")


class Visits:
    """Visit counts per session, in this process only; the oldest are forgotten first."""

    def __init__(self, limit: int = 10_000) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._limit = limit

    def hit(self, session_id: str | None) -> tuple[str, int, bool]:
        """(session id, visits so far, whether the session cookie must be set)."""
        fresh = session_id is None or not _SESSION_ID.fullmatch(session_id)
        if fresh or session_id is None:
            session_id = secrets.token_urlsafe(16)
        count = self._counts.pop(session_id, 0) + 1
        self._counts[session_id] = count
        while len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return session_id, count, fresh


def describe(decision: Any, header: Callable[[str], str | None], visits: int) -> dict[str, Any]:
    """Everything the page and /api/visit show about this request."""
    return {
        "machine": machine_id(),
        "region": region(),
        "visits": visits,
        "outcome": decision.outcome.value if decision is not None else "off-fly",
        "pinned_to": decision.pinned_to if decision is not None else None,
        "replayed_from": header("fly-replay-src"),
        "replay_cache": header("fly-replay-cache-status"),
        "preferred_unavailable": header("fly-preferred-instance-unavailable"),
    }


def session_cookie_options(header: Callable[[str], str | None]) -> dict[str, Any]:
    """The demo-session cookie's attributes, as both Sanic's add_cookie and Quart's
    set_cookie take them; Secure when TLS ended at Fly's edge."""
    https = (header("x-forwarded-proto") or "").split(",")[0].strip() == "https"
    return {"max_age": SESSION_MAX_AGE, "httponly": True, "samesite": "Lax", "secure": https}


_ARRIVALS = {
    "stamped": "First visit here: this machine pinned your session to itself.",
    "pinned": "Your cookie names this machine, so it served you directly.",
    "repinned": "Your machine was gone, so Fly delivered you here and you were re-pinned.",
    "off_pin": "Your request body was too big to replay, so this machine served it.",
    "skipped": "This path is not sticky.",
    "off-fly": "Not on Fly (no FLY_MACHINE_ID): flysticky does nothing.",
}


def render(info: dict[str, Any]) -> str:
    if info["replay_cache"] == "hit":
        route = "Fly's replay cache sent you straight here: no extra hop."
    elif info["replayed_from"]:
        route = "Another machine replayed your request here with fly-replay."
    else:
        route = "The proxy's load balancer sent you here."
    return _PAGE.substitute(
        machine=html.escape(info["machine"]),
        region=html.escape(info["region"]),
        visits=info["visits"],
        outcome=html.escape(info["outcome"]),
        arrival=html.escape(_ARRIVALS.get(info["outcome"], "")),
        route=html.escape(route),
    )


def hello() -> str:
    return json.dumps({"machine": machine_id(), "region": region(), "message": "connected"})


def pong(message: str | bytes) -> str:
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    return json.dumps({"machine": machine_id(), "region": region(), "message": text[:200]})
