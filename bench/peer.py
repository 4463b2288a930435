"""The peer of the ASGI rows: echofly's sticky sessions as a Starlette user writes them by
hand today, on ``BaseHTTPMiddleware``, from echofly's README and nothing cleverer.

No cookie: serve, and pin the session to this machine (``fly-machine-id``, HttpOnly,
SameSite=Lax, Path=/, 6 days). The cookie names this machine: serve. It names another:
307 with ``fly-replay: instance=<id>``, and Fly's proxy replays the request there.
"""

from __future__ import annotations

import os

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

COOKIE_NAME = "fly-machine-id"
MAX_AGE = 6 * 24 * 60 * 60  # 6 days


class FlyStickySessions(BaseHTTPMiddleware):
    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.machine_id = os.environ.get("FLY_MACHINE_ID", "")

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if not self.machine_id:  # not on Fly
            return await call_next(request)
        pinned = request.cookies.get(COOKIE_NAME)
        if pinned and pinned != self.machine_id:
            return Response(status_code=307, headers={"fly-replay": f"instance={pinned}"})
        response = await call_next(request)
        if not pinned:
            response.set_cookie(
                COOKIE_NAME,
                self.machine_id,
                max_age=MAX_AGE,
                path="/",
                httponly=True,
                samesite="lax",
            )
        return response
