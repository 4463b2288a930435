"""A python-socketio ASGI server the Socket.IO test runs on each machine.

``SIO_STICKY=1`` (the default) wraps it in flysticky's ASGI middleware; ``SIO_STICKY=0``
serves the very same app without it (the control). Between flysticky and Socket.IO a
small counter watches every answer on ``/socket.io/``: a 400 is an Engine.IO error, and
one whose body (or, on a websocket, close reason) says ``Invalid session <sid>`` is an
unknown session: a request that reached a machine other than the one holding its sid.
``GET /stats`` gives this machine's counts as JSON (reach one machine with the
``fly-force-instance-id`` request header).

The ``whoami`` event's ack names the machine, the Socket.IO sid and the transport the
server sees, so a client can check who answered it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import socketio

from flysticky.asgi import StickySessions

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MACHINE = os.environ.get("FLY_MACHINE_ID", "local")
STICKY = os.environ.get("SIO_STICKY", "1") == "1"
INVALID_SESSION = "Invalid session"

STATS: dict[str, int] = {
    "bad_requests": 0,  # HTTP 400 answers on /socket.io/ (any Engine.IO error)
    "unknown_sessions": 0,  # "Invalid session <sid>": polling or websocket
    "connects": 0,  # Socket.IO connections accepted here
    "disconnects": 0,
}

# Pings every 5 s (Engine.IO's default: 25 s): a long-poll GET is answered within 5 s,
# so a client that gives up on polling (the control's) disconnects in seconds, not 25.
sio = socketio.AsyncServer(
    async_mode="asgi", cors_allowed_origins="*", ping_interval=5, ping_timeout=5
)


@sio.event
async def connect(sid: str, environ: dict[str, Any]) -> None:
    STATS["connects"] += 1


@sio.event
async def disconnect(sid: str, reason: str) -> None:
    STATS["disconnects"] += 1


@sio.event
async def whoami(sid: str, data: Any) -> dict[str, Any]:
    return {"machine": MACHINE, "sid": sid, "transport": sio.transport(sid), "echo": data}


class Counted:
    """Counts Engine.IO's 400s and unknown sessions, and serves ``GET /stats``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"] == "/stats":
            return await self._stats(send)
        if kind not in ("http", "websocket") or not scope["path"].startswith("/socket.io/"):
            return await self.app(scope, receive, send)
        status = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                if status == 400:
                    STATS["bad_requests"] += 1
            elif kind == "http.response.body" and status == 400:
                if INVALID_SESSION.encode() in message.get("body", b""):
                    STATS["unknown_sessions"] += 1
            elif kind == "websocket.close" and INVALID_SESSION in (message.get("reason") or ""):
                # Engine.IO refuses a websocket for an unknown sid by closing it unaccepted:
                # the server answers the handshake with a 403.
                STATS["bad_requests"] += 1
                STATS["unknown_sessions"] += 1
            await send(message)

        await self.app(scope, receive, counting_send)

    async def _stats(self, send: Send) -> None:
        body = json.dumps({"machine": MACHINE, "sticky": STICKY, **STATS}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


counted = Counted(socketio.ASGIApp(sio))
app: ASGIApp = StickySessions(counted) if STICKY else counted
