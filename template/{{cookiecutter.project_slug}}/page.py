"""What the demo shows, apart from the web framework: per-session visits kept in
this machine's memory (exactly the state sticky sessions protect), chat rooms kept in
the memory of the machine that owns them, the page, and where the server listens."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import re
import secrets
import socket
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from string import Template
from typing import Any

SESSION_COOKIE = "demo-session"
SESSION_MAX_AGE = 6 * 24 * 3600
#: The largest request body the app takes (flysticky sends one over 1 MiB to its machine
#: over the private network instead of replaying it).
REQUEST_MAX_BYTES = 16 * 1024 * 1024
#: Seconds a stopping server gives requests in flight: well within fly.toml's kill_timeout.
STOP_GRACE_SECONDS = 5
#: flysticky's metrics port: fly.toml's [metrics] port (`flysticky check` compares them).
METRICS_PORT = 9091
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_PAGE = Template((Path(__file__).parent / "templates" / "index.html").read_text())

log = logging.getLogger(__name__)


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
        "outcome": outcome(decision),
        "pinned_to": decision.pinned_to if decision is not None else None,
        "replayed_from": header("fly-replay-src"),
        "replay_cache": header("fly-replay-cache-status"),
        "preferred_unavailable": header("fly-preferred-instance-unavailable"),
    }


def outcome(decision: Any) -> str:
    return decision.outcome.value if decision is not None else "off-fly"


def session_cookie_options(header: Callable[[str], str | None]) -> dict[str, Any]:
    """The demo-session cookie's attributes, as Sanic's add_cookie, Quart's set_cookie and
    Starlette's (FastAPI's) set_cookie all take them; Secure when TLS ended at Fly's edge."""
    https = (header("x-forwarded-proto") or "").split(",")[0].strip() == "https"
    return {"max_age": SESSION_MAX_AGE, "httponly": True, "samesite": "Lax", "secure": https}


_ARRIVALS = {
    "stamped": "First visit here: this machine pinned your session to itself.",
    "pinned": "Your cookie names this machine, so it served you directly.",
    "repinned": "Your machine was gone, so Fly delivered you here and you were re-pinned.",
    "off_pin": "Your request body was too big to replay, so this machine served it.",
    "forwarded": "Your request body was too big to replay, so it went to your machine over "
    "Fly's private network.",
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
        room_pattern=html.escape(ROOM_PATTERN),
        room_rule=html.escape(ROOM_RULE),
        message_limit=MESSAGE_LIMIT,
    )


def hello() -> str:
    return json.dumps({"machine": machine_id(), "region": region(), "message": "connected"})


def pong(message: str | bytes) -> str:
    text = message.decode(errors="replace") if isinstance(message, bytes) else message
    return json.dumps({"machine": machine_id(), "region": region(), "message": text[:200]})


# --- Rooms -------------------------------------------------------------------------------
# A room's messages live in the memory of ONE machine, the room's owner: flysticky's
# `key=room_key` sends every request under /rooms/<room>/ (the websocket included) to the
# machine that owns that room, whichever machine a visitor's cookie pins them to.

#: The one grammar of room names (the page's input checks it too): lowercase ASCII, so a
#: name needs no escaping anywhere and two spellings never name one room. "\-", not a
#: bare "-": browsers read an input's pattern with the regex v flag, which requires it.
ROOM_PATTERN = r"[a-z0-9\-]{1,32}"
ROOM_RULE = "A room name is 1 to 32 lowercase letters a-z, digits or dashes, such as lobby."
# \Z, not $: "$" also matches before a final newline.
_ROOM_PATH = re.compile(rf"/rooms/({ROOM_PATTERN})(?=/|\Z)")
#: Rooms one machine keeps (with their recent messages); rooms nobody is in go first.
MAX_ROOMS = 100
#: Open websockets per room.
ROOM_SOCKETS = 25
#: Characters per message; longer ones are refused (the server caps frames too).
MESSAGE_LIMIT = 500
#: The largest websocket frame either server accepts (the /ws feed's pings included).
WEBSOCKET_MAX_BYTES = 16 * 1024
#: Recent messages a room keeps, sent to each socket that joins.
HISTORY = 20
#: Messages queued for one socket: a socket that falls further behind is closed.
OUTBOX = 32
#: How often each machine checks that it still owns the rooms it serves.
REBALANCE_SECONDS = 1.0
#: Close codes: the page reconnects after any close but REFUSED.
MOVED = 1012  # "service restart": the room has a new owner; reconnect, and get there
TOO_SLOW = 1013  # "try again later"
REFUSED = 1008  # "policy violation": a bad name, a full room
GOING_AWAY = 1001  # the server is stopping; reconnect (with backoff), to a live machine


def room_of(path: str) -> str | None:
    """The room a path is about (``/rooms/<room>`` and below), or None."""
    match = _ROOM_PATH.match(path)
    return match.group(1) if match is not None else None


def room_key(request: Any) -> str | None:
    """flysticky's ``key``: the room of a request's path, or None (the visitor's cookie
    decides). It runs on every request, so it is one regex match, and it never raises."""
    try:
        path = request.path
    except ValueError:  # Sanic: a path whose bytes are not UTF-8
        return None
    return room_of(path) if isinstance(path, str) else None


class RoomRefused(Exception):
    """A websocket that cannot join: the message says why (never echoing the request)."""


class RoomSocket:
    """One websocket in a room: the messages it has yet to send, and whether to close."""

    def __init__(self) -> None:
        self.name = f"guest-{secrets.token_hex(2)}"
        self.close_code: int | None = None
        self.close_reason = ""
        #: The room's owner as this socket's page was last told.
        self.owner_told: str | None = None
        self._outbox: deque[str] = deque()
        self._wake = asyncio.Event()

    def push(self, data: str) -> None:
        if len(self._outbox) >= OUTBOX:
            self.close(TOO_SLOW, "too slow to keep up with the room")
        else:
            self._outbox.append(data)
            self._wake.set()

    def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._wake.set()

    async def next(self) -> str | None:
        """The next message to send; None once the socket must close."""
        while self.close_code is None:
            if self._outbox:
                return self._outbox.popleft()
            self._wake.clear()
            await self._wake.wait()
        return None


class Room:
    def __init__(self) -> None:
        self.sockets: set[RoomSocket] = set()
        self.history: deque[dict[str, str]] = deque(maxlen=HISTORY)


class Rooms:
    """The rooms this machine serves, in its memory only, bounded everywhere."""

    def __init__(self) -> None:
        self._rooms: OrderedDict[str, Room] = OrderedDict()
        self._watcher: asyncio.Task[None] | None = None

    def names(self) -> list[str]:
        return list(self._rooms)

    def sockets(self, name: str) -> int:
        room = self._rooms.get(name)
        return len(room.sockets) if room is not None else 0

    def history(self, name: str) -> list[dict[str, str]]:
        room = self._rooms.get(name)
        return list(room.history) if room is not None else []

    def join(self, name: str) -> RoomSocket:
        room = self._rooms.get(name)
        if room is None:
            if len(self._rooms) >= MAX_ROOMS:
                empty = next((n for n, r in self._rooms.items() if not r.sockets), None)
                if empty is None:
                    raise RoomRefused("This machine has too many rooms open; try again later.")
                del self._rooms[empty]
            room = self._rooms[name] = Room()
        self._rooms.move_to_end(name)
        if len(room.sockets) >= ROOM_SOCKETS:
            raise RoomRefused(f"This room is full ({ROOM_SOCKETS} people).")
        member = RoomSocket()
        room.sockets.add(member)
        return member

    def leave(self, name: str, member: RoomSocket) -> None:
        room = self._rooms.get(name)
        if room is not None:
            room.sockets.discard(member)

    def say(self, name: str, member: RoomSocket, text: str | bytes) -> None:
        """Broadcast a message to every socket in the room on this machine."""
        if not isinstance(text, str):
            member.push(_error("Send text, not binary frames."))
            return
        text = text.strip()
        if not text:
            return
        if len(text) > MESSAGE_LIMIT:
            member.push(_error(f"A message is at most {MESSAGE_LIMIT} characters."))
            return
        room = self._rooms.get(name)
        if room is None or member not in room.sockets:
            return  # the room moved away from this machine a moment ago
        message = {"type": "message", "from": member.name, "text": text, "machine": machine_id()}
        room.history.append(message)
        data = json.dumps(message)
        for other in room.sockets:
            other.push(data)

    def move_away(self, name: str) -> None:
        """Close the room's sockets (their pages reconnect, to its owner) and forget it."""
        room = self._rooms.pop(name, None)
        if room is not None:
            for member in room.sockets:
                member.close(MOVED, "the room moved to its new owner")

    def start_rebalancing(self, owner: Callable[[str], str | None]) -> None:
        """Every REBALANCE_SECONDS, give up the rooms another machine owns now (one joined
        or left, so ownership moved): each room ends on ONE machine, its owner."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._rebalance(owner))

    async def stop_rebalancing(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _rebalance(self, owner: Callable[[str], str | None]) -> None:
        here = machine_id()
        while True:
            await asyncio.sleep(REBALANCE_SECONDS)
            for name in self.names():
                # None: off Fly, or the machines are not known yet: keep serving.
                now = owner(name)
                if now is not None and now != here:
                    log.info("room %s is owned by %s now: moving its sockets there", name, now)
                    self.move_away(name)
                else:
                    self._tell_owner(name, now)

    def _tell_owner(self, name: str, owner: str | None) -> None:
        """Tell the pages that joined while the machines disagreed who owns the room now."""
        data = json.dumps({"type": "owner", "owner": owner})
        for member in self._rooms[name].sockets:
            if member.owner_told != owner:
                member.owner_told = owner
                member.push(data)


def _error(message: str) -> str:
    return json.dumps({"type": "error", "error": message})


def room_info(
    rooms: Rooms, name: str | None, owner_of: Callable[[str], str | None], decision: Any
) -> tuple[int, dict[str, Any]]:
    """(status, body) of GET /rooms/<room>: who serves the room and who owns it."""
    if name is None:
        return 400, {"error": ROOM_RULE}
    owner = owner_of(name)
    return 200, {
        "room": name,
        "machine": machine_id(),
        "region": region(),
        "owner": owner,
        "is_owner": owner == machine_id(),
        "outcome": outcome(decision),
        "sockets": rooms.sockets(name),
        "messages": rooms.history(name),
    }


async def room_socket(
    rooms: Rooms,
    name: str | None,
    owner_of: Callable[[str], str | None],
    decision: Any,
    send: Callable[[str], Awaitable[object]],
    receive: Callable[[], Awaitable[str | bytes | None]],
    close: Callable[[int, str], Awaitable[object]],
) -> None:
    """One websocket in a room (``name``: None for a bad name), given the framework's
    ``send``/``receive``/``close`` and ``owner_of`` (StickySessions.owner):
    a greeting naming the machine and the room's owner, then messages both ways until
    the client leaves or the room moves (then close: the page reconnects)."""
    if name is None:
        await send(_error(ROOM_RULE))
        await close(REFUSED, "bad room name")
        return
    try:
        member = rooms.join(name)
    except RoomRefused as refusal:
        await send(_error(str(refusal)))
        await close(REFUSED, "room refused")
        return
    try:
        member.owner_told = owner_of(name)
        welcome = {
            "type": "joined",
            "room": name,
            "you": member.name,
            "machine": machine_id(),
            "region": region(),
            "owner": member.owner_told,
            "outcome": outcome(decision),
            "messages": rooms.history(name),
        }
        await send(json.dumps(welcome))

        async def read() -> None:
            while (message := await receive()) is not None:
                rooms.say(name, member, message)

        async def write() -> None:
            while (data := await member.next()) is not None:
                await send(data)

        tasks = {asyncio.create_task(read()), asyncio.create_task(write())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if member.close_code is not None:
            await close(member.close_code, member.close_reason)
        for task in done:
            task.result()  # a connection error surfaces as the framework expects
    finally:
        rooms.leave(name, member)


class OpenSockets:
    """The websocket handlers running now. A stopping server stops them and closes their
    sockets with GOING_AWAY, so that pages reconnect, to a live machine. Left open,
    Hypercorn waits for them past its graceful_timeout (on Python 3.12 it never exits) and
    Fly kills the machine; Uvicorn closes them itself with 1012, which the page reads as
    MOVED. Sanic closes them with 1000 on its own."""

    def __init__(self) -> None:
        self._handlers: set[asyncio.Task[None]] = set()
        self._none_open = asyncio.Event()
        self._none_open.set()
        self.closing = False

    async def close_all(self) -> None:
        """Stop every handler; wait (STOP_GRACE_SECONDS at most) until its socket is closed."""
        self.closing = True
        for task in self._handlers:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_open.wait(), STOP_GRACE_SECONDS)

    async def run(
        self,
        handler: Callable[[], Coroutine[Any, Any, None]],
        close: Callable[[int, str], Awaitable[object]],
    ) -> None:
        """Run a websocket handler, given the framework's ``close``; if the server stops
        meanwhile, stop the handler and close the socket. The handler is a task of its own:
        close_all cancels it, never the server's task for the connection (Uvicorn would
        log that as an error)."""
        if self.closing:
            await close(GOING_AWAY, "server stopping")
            return
        task = asyncio.create_task(handler())
        self._handlers.add(task)
        self._none_open.clear()
        try:
            await asyncio.wait({task})
            if task.cancelled():  # by close_all
                await close(GOING_AWAY, "server stopping")
            else:
                task.result()  # the handler's error, if any, goes to the framework
        except asyncio.CancelledError:
            # The framework is ending the connection, and the handler with it. The error
            # raised is the framework's own, which it knows (anyio, under Starlette's
            # TestClient, tells its cancellations by their message).
            task.cancel()
            raise
        finally:
            self._handlers.discard(task)
            if not self._handlers:
                self._none_open.set()


# --- Where the server listens ---------------------------------------------------------------


def listening_socket() -> socket.socket:
    """The socket the server listens on: $HOST:$PORT when HOST is set (the local Fly
    proxy emulator gives each machine a loopback address of its own), else every
    address, IPv4 and IPv6 on one dual-stack socket. Fly's proxy may reach the app over
    either, and the app's other machines reach it over the private network (6PN), which
    is IPv6 only; asyncio's own "::" would be IPv6 only, "0.0.0.0" IPv4 only."""
    port = int(os.environ.get("PORT", "8080"))
    host = os.environ.get("HOST")
    if host:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(address, family=family, backlog=100)
    if socket.has_dualstack_ipv6():
        return socket.create_server(
            ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=100
        )
    return socket.create_server(("0.0.0.0", port), backlog=100)  # a host without IPv6
