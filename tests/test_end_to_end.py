"""Stickiness end to end: real Sanic, Quart, Starlette, FastAPI and Litestar machines (all
but Sanic on Hypercorn) behind the emulator.

Every client session has its own cookie jar; everything runs on 127.0.0.1 and every
machine process is stopped by its pid (emulator_fixtures.running asserts it).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Any

import aiohttp
import pytest

from flysticky.proxy.cache import CacheRule

from .emulator_fixtures import FRAMEWORKS, HERE, running

SERVE = [sys.executable, "-m", "flysticky.proxy.serve", "tests.apps.sticky:app"]
SESSIONS = 50
REQUESTS = 10
CACHE = [CacheRule("/", 300, "cookie", "fly-machine-id")]
pytestmark = pytest.mark.parametrize("framework", FRAMEWORKS)


def fleet_env(framework: str, mode: str = "prefer_instance") -> dict[str, str]:
    return {"STICKY_FRAMEWORK": framework, "STICKY_MODE": mode, "PYTHONPATH": str(HERE.parent)}


def session(base_url: str) -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for an IP-address host such as 127.0.0.1.
    return aiohttp.ClientSession(base_url=base_url, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def whoami(client: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
    async with client.get("/whoami") as response:
        return response.status, await response.json() if response.status == 200 else {}


async def pinned_sessions(url: str, count: int) -> list[tuple[aiohttp.ClientSession, str]]:
    clients = [session(url) for _ in range(count)]
    pins = []
    for client in clients:
        status, body = await whoami(client)
        assert status == 200 and body["outcome"] == "stamped"
        pins.append((client, body["machine"]))
    return pins


async def test_fifty_sessions_each_stick_to_one_machine(framework: str) -> None:
    async with running(SERVE, env=fleet_env(framework)) as (emulator, _):

        async def one_session() -> list[tuple[int, str]]:
            async with session(emulator.url) as client:
                seen = []
                for _ in range(REQUESTS):
                    status, body = await whoami(client)
                    seen.append((status, body.get("machine", "")))
                return seen

        results = await asyncio.wait_for(
            asyncio.gather(*(one_session() for _ in range(SESSIONS))), timeout=120
        )
        assert all(status == 200 for seen in results for status, _ in seen)
        machines_per_session = [{machine for _, machine in seen} for seen in results]
        assert all(len(machines) == 1 for machines in machines_per_session)
        spread = Counter(next(iter(m)) for m in machines_per_session)
        assert set(spread) == {m.id for m in emulator.fleet.machines}  # all three got sessions


async def test_destroyed_machine_sessions_heal_and_are_repinned(framework: str) -> None:
    async with running(SERVE, env=fleet_env(framework)) as (emulator, _):
        pins = await pinned_sessions(emulator.url, 12)
        victim_id = Counter(machine for _, machine in pins).most_common(1)[0][0]
        victim = emulator.fleet.get(victim_id)
        assert victim is not None
        await emulator.destroy(victim)
        try:
            for client, machine in pins:
                status, body = await whoami(client)
                assert status == 200
                if machine == victim_id:
                    assert body["machine"] != victim_id
                    assert body["outcome"] in ("repinned", "stamped")
                    if body["outcome"] == "repinned":
                        assert body["arrived_by"] == "fly-preferred-instance-unavailable"
                    # ...and from now on it sticks to its new machine.
                    again = await whoami(client)
                    assert again[1]["machine"] == body["machine"]
                    assert again[1]["outcome"] == "pinned"
                else:
                    assert body["machine"] == machine
        finally:
            await asyncio.gather(*(client.close() for client, _ in pins))


async def test_strict_mode_fails_sessions_of_a_dead_machine(framework: str) -> None:
    # echofly's behaviour, as the README says: instance=<id> cannot be delivered
    # once the machine is destroyed, so the proxy answers an error until the cookie goes.
    async with running(SERVE, env=fleet_env(framework, "instance")) as (emulator, _):
        pins = await pinned_sessions(emulator.url, 9)
        try:
            victim_id = pins[0][1]
            victim = emulator.fleet.get(victim_id)
            assert victim is not None
            await emulator.destroy(victim)
            outcomes = set()
            for client, machine in pins:
                for _ in range(3):
                    async with client.get("/whoami") as response:
                        if machine == victim_id:
                            # The dead machine gets no traffic, and every live one
                            # answers instance=<dead machine>, which Fly cannot deliver.
                            assert response.status == 502
                            assert response.headers["x-fly-emulator-error"] == "no_candidate"
                        else:
                            assert response.status == 200
                        outcomes.add(response.status)
            assert outcomes == {200, 502}
        finally:
            await asyncio.gather(*(client.close() for client, _ in pins))


async def test_websocket_from_a_pinned_session_lands_on_its_machine(framework: str) -> None:
    async with running(SERVE, env=fleet_env(framework)) as (emulator, _):
        pins = await pinned_sessions(emulator.url, 6)
        try:
            # Reversed, so that round-robin does not line handshakes up with their pins.
            for client, machine in reversed(pins):
                async with client.ws_connect("/ws") as ws:
                    assert await asyncio.wait_for(ws.receive_str(), 10) == machine
                    await ws.send_str("hello")
                    assert await asyncio.wait_for(ws.receive_str(), 10) == f"{machine}:hello"
            replays = sum(m.counters.replays for m in emulator.fleet.machines)
            assert replays > 0  # some handshakes landed elsewhere and were replayed
        finally:
            await asyncio.gather(*(client.close() for client, _ in pins))


@pytest.mark.parametrize("forward", [True, False])
async def test_two_mib_post_from_a_pinned_session_succeeds(framework: str, forward: bool) -> None:
    env = {**fleet_env(framework), "STICKY_FORWARD": "1" if forward else "0"}
    async with running(SERVE, env=env) as (emulator, _):
        pins = await pinned_sessions(emulator.url, 6)
        try:
            outcomes = Counter()
            for client, machine in pins:
                for _ in range(3):
                    async with client.post("/upload", data=b"x" * (2 * 1024 * 1024)) as response:
                        assert response.status == 200
                        body = await response.json()
                    assert body["bytes"] == 2 * 1024 * 1024
                    if body["forwarded_from"] is not None:
                        outcomes["forwarded"] += 1
                    outcomes[body["outcome"]] += 1
                    if body["outcome"] == "off_pin":
                        assert body["machine"] != machine
                    else:
                        assert (body["outcome"], body["machine"]) == ("pinned", machine)
            if forward:  # those that landed elsewhere went home over the private network
                assert outcomes["forwarded"] > 0 and outcomes["off_pin"] == 0
            else:  # some landed elsewhere and were served there
                assert outcomes["off_pin"] > 0 and outcomes["forwarded"] == 0
            assert emulator.stats.proxy_errors == 0
        finally:
            await asyncio.gather(*(client.close() for client, _ in pins))


async def test_replay_cache_leaves_about_one_replay_per_session(framework: str) -> None:
    sessions, requests = 20, 10
    async with running(SERVE, env=fleet_env(framework), cache_rules=CACHE) as (emulator, _):

        async def one_session() -> list[dict[str, Any]]:
            async with session(emulator.url) as client:
                return [(await whoami(client))[1] for _ in range(requests)]

        results = await asyncio.gather(*(one_session() for _ in range(sessions)))
        replays = sum(m.counters.replays for m in emulator.fleet.machines)
        hits = sum(m.counters.cache_hits for m in emulator.fleet.machines)
        # The cache is keyed on the cookie's value, the machine id, which every session
        # pinned to that machine shares: at most one replay per session, usually far fewer.
        assert 0 < replays <= sessions
        for seen in results:
            assert len({body["machine"] for body in seen}) == 1
            routed = [i for i, body in enumerate(seen) if body["cache"] in ("hit", "miss")]
            assert sum(body["cache"] == "miss" for body in seen) <= 1
            if routed:  # once the cache knows the session, every request skips the hop
                assert all(body["cache"] == "hit" for body in seen[routed[0] + 1 :])
        assert hits == sum(body["cache"] == "hit" for seen in results for body in seen)
        assert hits >= sessions * (requests - 3)


class StrayBrowser:
    """A browser's cookie store for one host and path, as RFC 6265 5.3-5.4 has it: our
    cookie, set and expired by the responses, and a stray of the same name from another
    domain. Equal paths list older cookies first; overwriting keeps a cookie's creation
    time, expiring it and setting it again gives a new one."""

    def __init__(self, stray: str, stray_created: int) -> None:
        self.cookies = {"stray": (stray_created, stray)}
        self.clock = 1000

    def header(self) -> str:
        ordered = sorted(self.cookies.values())
        return "; ".join(f"fly-machine-id={value}" for _, value in ordered)

    def receive(self, set_cookies: list[str]) -> None:
        for line in set_cookies:
            value = line.split(";", 1)[0].split("=", 1)[1]
            self.clock += 1
            if "Max-Age=0" in line:
                self.cookies.pop("ours", None)
            elif "ours" in self.cookies:
                self.cookies["ours"] = (self.cookies["ours"][0], value)
            else:
                self.cookies["ours"] = (self.clock, value)


async def browse(url: str, browser: StrayBrowser, requests: int) -> list[dict[str, Any]]:
    seen = []
    async with aiohttp.ClientSession(base_url=url) as client:  # cookies from the model only
        for _ in range(requests):
            async with client.get("/whoami", headers={"cookie": browser.header()}) as response:
                assert response.status == 200
                browser.receive(response.headers.getall("set-cookie", []))
                seen.append(await response.json())
    return seen


async def test_a_stray_duplicate_neither_poisons_the_cache_nor_unsticks_a_browser(
    framework: str,
) -> None:
    async with running(SERVE, env=fleet_env(framework), cache_rules=CACHE) as (emulator, _):
        a, b, c = (m.id for m in emulator.fleet.machines)
        # Sessions pinned to A warm the replay cache for A's value.
        async with aiohttp.ClientSession(base_url=emulator.url) as plain:
            for _ in range(6):
                async with plain.get("/whoami", headers={"cookie": f"fly-machine-id={a}"}) as r:
                    assert (await r.json())["machine"] == a
        # A browser whose cookie reads "A; B" (an older stray A first, its own B last),
        # over and over. Which value a proxy's cache looks up is Fly's choice (the emulator
        # takes the first: a hit sends it to A, which re-pins it there once); either way
        # it sticks to one machine, and no replay it causes is cached under A's value.
        browser = StrayBrowser(a, stray_created=0)
        browser.cookies["ours"] = (1, b)
        seen = await browse(emulator.url, browser, 12)
        homes = [body["machine"] for body in seen]
        assert len(set(homes[1:])) == 1, homes
        assert sum(body["outcome"] == "repinned" for body in seen) <= 1, seen
        async with aiohttp.ClientSession(base_url=emulator.url) as plain:
            for _ in range(6):
                async with plain.get("/whoami", headers={"cookie": f"fly-machine-id={a}"}) as r:
                    body = await r.json()
                    assert (body["machine"], body["outcome"]) == (a, "pinned")
        # A stray that names a machine which is gone, listed after the browser's own
        # cookie: one failover re-pins, the cookie is set anew (listed last), and the
        # browser sticks again.
        victim = emulator.fleet.get(c)
        assert victim is not None
        await emulator.destroy(victim)
        browser = StrayBrowser(c, stray_created=5)
        browser.cookies["ours"] = (1, a)
        seen = await browse(emulator.url, browser, 12)
        homes = [body["machine"] for body in seen]
        assert c not in homes
        assert len(set(homes[2:])) == 1, homes
        assert sum(body["outcome"] == "repinned" for body in seen) <= 1, seen
