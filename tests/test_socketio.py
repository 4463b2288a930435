"""Socket.IO stays on one machine behind Fly's proxy with flysticky, and breaks without it.

A Socket.IO connection is a session held in one machine's memory: the client opens it with
a long-polling request, which answers with an Engine.IO sid, and every later request
(the websocket upgrade, polling GETs and POSTs) names that sid. The proxy balances each
request on its own (the emulator round-robins them over the machines, as Fly's proxy
spreads them), so a request that lands on another machine gets Engine.IO's
``400 "Invalid session <sid>"`` (on a websocket: the handshake refused): the unknown
session this test counts, on each machine (tests/apps/socketio_app.py's ``/stats``).

With flysticky each client's first answer pins it by cookie, and every later request that
lands elsewhere is replayed (``fly-replay``) to its machine, the websocket handshake
included. The test proves, on 3 real Hypercorn machines behind the emulator with 50 real
python-socketio clients (each with its own cookie jar, starting on polling and upgrading to
websocket): 0 unknown sessions, every sid stable, every ack answered by the machine its
cookie names, over websocket. Destroying a machine disconnects its clients; they reconnect
on their own and are re-pinned to a surviving machine (new cookie, acks from it), with still
0 unknown sessions and the other clients undisturbed.

The control runs the same app on the same 3 machines without flysticky (``SIO_STICKY=0``)
and asserts that it fails: unknown sessions on the machines and clients that cannot
connect or upgrade. Without it, the first test could pass because the emulator happened
to keep clients on one machine, and would prove nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import socketio
from yarl import URL

from .emulator_fixtures import HERE, running

SERVE = [sys.executable, "-m", "flysticky.proxy.serve", "tests.apps.socketio_app:app"]
COOKIE = "fly-machine-id"
CLIENTS = 50
CONTROL_CLIENTS = 20  # not a multiple of 3: no lockstep round robin can land all upgrades
ACKS = 5
TRANSPORTS = ["polling", "websocket"]  # open by long-polling, then upgrade


def fleet_env(sticky: bool) -> dict[str, str]:
    return {"SIO_STICKY": "1" if sticky else "0", "PYTHONPATH": str(HERE.parent)}


@dataclass
class Client:
    """One Socket.IO client with its own cookie jar, and what happened to it."""

    url: str
    reconnect: bool
    session: aiohttp.ClientSession = field(init=False)
    sio: socketio.AsyncClient = field(init=False)
    connects: int = 0
    disconnects: int = 0
    connect_errors: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        # unsafe=True: keep cookies for an IP-address host such as 127.0.0.1.
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sio = socketio.AsyncClient(
            http_session=self.session,
            handle_sigint=False,
            request_timeout=15,
            reconnection=self.reconnect,
            reconnection_delay=0.5,
            reconnection_delay_max=1,
            randomization_factor=0.25,
        )
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("connect_error", self._on_connect_error)

    async def _on_connect(self) -> None:
        self.connects += 1

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.disconnects += 1

    async def _on_connect_error(self, data: Any = None) -> None:
        self.connect_errors.append(data)

    async def connect(self, wait_timeout: float = 10) -> None:
        await self.sio.connect(self.url, transports=TRANSPORTS, wait_timeout=wait_timeout)

    @property
    def cookie(self) -> str | None:
        morsel = self.session.cookie_jar.filter_cookies(URL(self.url)).get(COOKIE)
        return None if morsel is None else str(morsel.value)

    @property
    def sid(self) -> str | None:
        sid: str | None = self.sio.get_sid()
        return sid

    @property
    def ready(self) -> bool:
        return self.sio.connected and self.sid is not None

    async def acks(self, count: int = ACKS) -> list[dict[str, Any]]:
        """``count`` emits with acks, one after another: what the server answered."""
        # Generous: 50 clients and 3 machines share 2 cores with whatever else CI runs.
        return [await self.sio.call("whoami", n, timeout=20) for n in range(count)]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.sio.shutdown()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.sio.disconnect()
        await self.session.close()


async def machine_stats(stats: aiohttp.ClientSession, machine_ids: list[str]) -> dict[str, Any]:
    """Each machine's counts, asked of that machine through the proxy."""
    result = {}
    for machine_id in machine_ids:
        async with stats.get("/stats", headers={"fly-force-instance-id": machine_id}) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
            assert body["machine"] == machine_id
            result[machine_id] = body
    return result


def assert_pinned(client: Client, answers: list[dict[str, Any]], machine: str) -> None:
    """Every ack came over websocket from ``machine``, for the client's own sid."""
    assert client.sio.transport() == "websocket"
    assert [a["machine"] for a in answers] == [machine] * len(answers)
    assert {a["sid"] for a in answers} == {client.sid}
    assert {a["transport"] for a in answers} == {"websocket"}
    assert [a["echo"] for a in answers] == list(range(len(answers)))


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``condition()`` to hold, checking every 50 ms, at most ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_fifty_socketio_clients_keep_their_sessions_and_follow_a_destroyed_machine() -> None:
    async with running(SERVE, machines=3, env=fleet_env(sticky=True)) as (emulator, stats):
        machine_ids = [m.id for m in emulator.fleet.machines]
        assert len(machine_ids) == 3
        clients = [Client(emulator.url, reconnect=True) for _ in range(CLIENTS)]
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*(c.connect() for c in clients))
            # Pinned on first answer, upgraded to websocket on the machine holding the sid.
            pins: dict[int, str] = {}  # by id(client): the machine its cookie names
            sids: dict[int, str | None] = {}
            for client in clients:
                assert client.ready and client.sio.transport() == "websocket"
                cookie = client.cookie
                assert cookie is not None and cookie in machine_ids
                pins[id(client)], sids[id(client)] = cookie, client.sid
            async with asyncio.timeout(30):
                answers = await asyncio.gather(*(c.acks() for c in clients))
            for client, answered in zip(clients, answers, strict=True):
                assert_pinned(client, answered, pins[id(client)])
                assert client.sid == sids[id(client)]
            spread = Counter(pins.values())
            assert set(spread) == set(machine_ids), spread  # every machine holds sessions
            before = await machine_stats(stats, machine_ids)
            assert {m: s["unknown_sessions"] for m, s in before.items()} == dict.fromkeys(
                machine_ids, 0
            )
            assert sum(s["bad_requests"] for s in before.values()) == 0
            assert sum(s["connects"] for s in before.values()) == CLIENTS
            assert all(c.connects == 1 and c.disconnects == 0 for c in clients)
            assert not any(c.connect_errors for c in clients)
            # Not luck: the proxy did send upgrades elsewhere, and flysticky replayed them.
            assert emulator.totals().replays > 0

            # Destroy the machine holding the most sessions: its clients lose their
            # websocket, reconnect by themselves and are re-pinned to a survivor.
            victim_id = spread.most_common(1)[0][0]
            victim = emulator.fleet.get(victim_id)
            assert victim is not None
            moved = [c for c in clients if pins[id(c)] == victim_id]
            stayed = [c for c in clients if pins[id(c)] != victim_id]
            await emulator.destroy(victim)
            destroyed_at = asyncio.get_running_loop().time()
            survivors = [m for m in machine_ids if m != victim_id]
            await until(
                lambda: all(c.connects == 2 and c.ready for c in moved),
                timeout=20,
                what="the destroyed machine's clients to reconnect",
            )
            healed = asyncio.get_running_loop().time() - destroyed_at
            for client in moved:
                assert client.disconnects == 1
                assert client.cookie in survivors  # re-pinned: the cookie names a survivor
                assert client.sid != sids[id(client)]  # a new session, on the new machine
            async with asyncio.timeout(30):
                answers = await asyncio.gather(*(c.acks() for c in clients))
            for client, answered in zip(clients, answers, strict=True):
                assert client.cookie is not None
                assert_pinned(client, answered, client.cookie)
            for client in stayed:  # undisturbed: same connection, sid and machine
                assert client.connects == 1 and client.disconnects == 0
                assert client.sid == sids[id(client)]
                assert client.cookie == pins[id(client)]
            after = await machine_stats(stats, survivors)
            assert {m: s["unknown_sessions"] for m, s in after.items()} == dict.fromkeys(
                survivors, 0
            )
            assert sum(s["bad_requests"] for s in after.values()) == 0
            assert sum(s["connects"] for s in after.values()) == CLIENTS
            assert not any(c.connect_errors for c in clients)
            print(
                f"sticky: spread {sorted(spread.values())}, {emulator.totals().replays} replays,"
                f" {len(moved)} clients re-pinned in {healed:.1f} s, 0 unknown sessions"
            )
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_control_without_flysticky_socketio_sessions_break() -> None:
    """The same app and clients without flysticky: the proxy's balancing sends requests
    for a sid to machines that never heard of it."""
    async with running(SERVE, machines=3, env=fleet_env(sticky=False)) as (emulator, stats):
        machine_ids = [m.id for m in emulator.fleet.machines]
        clients = [Client(emulator.url, reconnect=False) for _ in range(CONTROL_CLIENTS)]

        async def attempt(client: Client) -> bool:
            """Whether the client connected, upgraded and got its acks from its session."""
            try:
                async with asyncio.timeout(8):
                    await client.connect(wait_timeout=3)
                    if client.sio.transport() != "websocket":
                        return False
                    answers = await client.acks(3)
            except (socketio.exceptions.SocketIOError, TimeoutError):
                return False
            return {a["sid"] for a in answers} == {client.sid}

        try:
            async with asyncio.timeout(30):
                worked = await asyncio.gather(*(attempt(c) for c in clients))
            counts = await machine_stats(stats, machine_ids)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        assert all(not s["sticky"] for s in counts.values())
        unknown = sum(s["unknown_sessions"] for s in counts.values())
        failed = worked.count(False)
        print(f"control: {unknown} unknown sessions, {failed}/{len(clients)} clients failed")
        assert unknown > 0
        assert failed > 0
        assert all(c.cookie is None for c in clients)  # no flysticky, no cookie
