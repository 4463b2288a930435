"""Affinity by key end to end: real Sanic / Quart-on-Hypercorn machines behind the
emulator, finding each other through its internal DNS, as on Fly.

Rooms go to their owners, header sessions to the machine that minted them, both heal
when that machine is destroyed, and a 5 MB upload reaches its pinned machine over the
emulated private network.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from .emulator_fixtures import FRAMEWORKS, running
from .test_end_to_end import CACHE, SERVE, fleet_env, session

pytestmark = pytest.mark.parametrize("framework", FRAMEWORKS)
ROOMS = [f"room-{n}" for n in range(12)]
REFRESH = 0.3  # discovery's interval on the machines


def keys_env(framework: str) -> dict[str, str]:
    return {**fleet_env(framework), "STICKY_REFRESH": str(REFRESH)}


async def room(client: aiohttp.ClientSession, name: str) -> dict[str, Any]:
    async with client.get(f"/rooms/{name}") as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def owners_seen(url: str, users: int = 8) -> tuple[dict[str, set[str]], bool]:
    """Which machines served each room, over several users with their own cookies, and
    whether every answer came from the machine that knows it owns that room."""
    served: dict[str, set[str]] = {name: set() for name in ROOMS}
    settled = True
    for _ in range(users):
        async with session(url) as client:
            for _ in range(4):  # a visitor cookie pinning it somewhere, and (with the
                # replay cache on) an entry sending its later requests straight there
                await client.get("/whoami")
            for name in ROOMS:
                body = await room(client, name)
                served[name].add(body["machine"])
                assert (body["key"], body["routed_by"]) == (name, "key")
                settled &= body["owner"] == body["machine"] and body["outcome"] == "pinned"
    return served, settled and all(len(m) == 1 for m in served.values())


async def test_every_user_of_a_room_lands_on_its_owner(framework: str) -> None:
    # The template's replay cache, keyed on the visitor cookie at "/", sends a visitor's
    # room requests to the visitor's machine too: the room still reaches its owner.
    async with running(SERVE, env=keys_env(framework), cache_rules=CACHE) as (emulator, _):
        served, settled = await owners_seen(emulator.url)
        assert sum(m.counters.cache_hits for m in emulator.fleet.machines) > 0
        assert settled, served
        owners = Counter(next(iter(m)) for m in served.values())
        assert len(owners) > 1  # twelve rooms spread over the three machines
        # The room's websocket is decided before the upgrade: it opens on the owner too.
        async with session(emulator.url) as client:
            for name in ROOMS[:4]:
                async with client.ws_connect(f"/rooms/{name}/ws") as ws:
                    assert await ws.receive_str() == next(iter(served[name]))


async def wait_until(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(REFRESH)


async def test_a_destroyed_owner_s_rooms_move_to_one_new_owner_each(framework: str) -> None:
    async with running(SERVE, env=keys_env(framework)) as (emulator, _):
        served, settled = await owners_seen(emulator.url)
        assert settled, served
        before = {name: next(iter(m)) for name, m in served.items()}
        victim_id = Counter(before.values()).most_common(1)[0][0]
        victim = emulator.fleet.get(victim_id)
        assert victim is not None
        await emulator.destroy(victim)

        async def moved() -> dict[str, set[str]] | None:
            # Until every machine has seen the new set, a room may be served elsewhere.
            seen, settled = await owners_seen(emulator.url, users=3)
            return seen if settled else None

        after = await wait_until(moved)
        assert after is not None, "rooms did not settle on one owner each"
        for name, machines in after.items():
            owner = next(iter(machines))
            assert owner != victim_id
            if before[name] != victim_id:
                assert owner == before[name]  # only the destroyed machine's rooms moved


async def test_a_header_session_goes_to_the_machine_that_made_it(framework: str) -> None:
    async with running(SERVE, env=keys_env(framework)) as (emulator, _):
        sessions: dict[str, str] = {}
        async with aiohttp.ClientSession(emulator.url) as client:  # an API client: no cookies
            for _ in range(9):
                async with client.post("/mcp") as response:
                    body = await response.json()
                    sessions[response.headers["mcp-session-id"]] = body["machine"]
            assert len(set(sessions.values())) > 1
            for session_id, machine in sessions.items():
                for _ in range(3):
                    async with client.post("/mcp", headers={"mcp-session-id": session_id}) as r:
                        body = await r.json()
                        assert body["machine"] == machine
                        assert body["outcome"] == "pinned"
                        assert body["routed_by"] == "mcp-session-id"
            # Its machine destroyed, a session is served wherever it lands: the app answers
            # "unknown session" itself; nothing loops, nothing fails.
            session_id, victim_id = next(iter(sessions.items()))
            victim = emulator.fleet.get(victim_id)
            assert victim is not None
            await emulator.destroy(victim)
            for _ in range(4):
                async with client.post("/mcp", headers={"mcp-session-id": session_id}) as r:
                    assert r.status == 200
                    body = await r.json()
                    assert body["machine"] != victim_id
                    assert body["outcome"] == "unowned"


async def test_a_five_megabyte_upload_reaches_the_pinned_machine(framework: str) -> None:
    upload = b"u" * (5 * 1024 * 1024)
    async with (
        running(SERVE, env=keys_env(framework)) as (emulator, _),
        session(emulator.url) as client,
    ):
        async with client.get("/whoami") as response:
            pinned = (await response.json())["machine"]
        forwarded = 0
        for _ in range(6):  # the proxy balances them over the machines
            async with client.post("/upload", data=upload) as response:
                assert response.status == 200
                body = await response.json()
            assert (body["machine"], body["bytes"]) == (pinned, len(upload))
            if body["forwarded_from"] is not None:
                assert body["forwarded_from"] != pinned
                assert body["outcome"] == "pinned"
                forwarded += 1
        assert forwarded > 0, "every upload landed on the pinned machine by chance"
