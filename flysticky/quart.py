"""Quart extension: ``StickySessions(app)`` or ``StickySessions().init_app(app)``.

Its ``before_request`` and ``before_websocket`` functions are put first in the
app's lists, so a due replay is answered before any app hook runs. The Set-Cookie
is added by a per-request ``after_this_request``, so the pinned path pays for one
hook only.
"""

from __future__ import annotations

import os
from typing import Any, cast

from quart import Quart, Response, after_this_request, g, request, websocket
from werkzeug.datastructures import Headers
from werkzeug.wrappers import Response as WerkzeugResponse

from .config import StickyConfig
from .core import (
    REPLAY_HEADER,
    REPLAY_STATUS,
    Decider,
    Decision,
    apply_stamp,
    join_cookie_headers,
    log,
    machine_id_from_env,
)

__all__ = ["StickySessions", "current_decision"]


def current_decision() -> Decision | None:
    """The decision flysticky made for the current request or websocket; None off Fly."""
    return cast("Decision | None", g.get("flysticky"))


class StickySessions:
    """Pins each session to the Fly machine that first served it."""

    def __init__(self, app: Quart | None = None, config: StickyConfig | None = None) -> None:
        self.config = config if config is not None else StickyConfig()
        self._env_value: str | None = None
        self._decider: Decider | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        if "flysticky" in app.extensions:
            raise RuntimeError(f"flysticky is already installed on Quart app {app.name!r}")
        app.extensions["flysticky"] = self
        app.before_request_funcs.setdefault(None, []).insert(0, self._before_request)
        app.before_websocket_funcs.setdefault(None, []).insert(0, self._before_websocket)

    def _current_decider(self) -> Decider | None:
        # Read per request: Quart's test client never runs before_serving, and the
        # lookup costs well under a microsecond against Quart's ~100.
        value = os.environ.get("FLY_MACHINE_ID")
        if value != self._env_value:
            self._env_value = value
            machine_id = machine_id_from_env(lambda _: value)
            self._decider = Decider(self.config, machine_id) if machine_id else None
            log.debug("flysticky for Quart: machine %s", machine_id)
        return self._decider

    def _decide(self, target: Any, headers: Headers, is_websocket: bool) -> Response | None:
        decider = self._current_decider()
        if decider is None:
            return None
        cookie = join_cookie_headers(headers.getlist("cookie"))
        decision = decider.decide(target, cookie, headers, is_websocket)
        g.flysticky = decision
        if decision.replay is not None:
            return Response(b"", REPLAY_STATUS, {REPLAY_HEADER: decision.replay})
        if decision.set_cookie is not None:

            async def stamp(
                response: Response | WerkzeugResponse,
            ) -> Response | WerkzeugResponse:
                apply_stamp(decision, response.headers)
                return response

            after_this_request(stamp)
        return None

    async def _before_request(self) -> Response | None:
        target = request._get_current_object()  # type: ignore[attr-defined]
        return self._decide(target, target.headers, False)

    async def _before_websocket(self) -> Response | None:
        target = websocket._get_current_object()  # type: ignore[attr-defined]
        return self._decide(target, target.headers, True)
