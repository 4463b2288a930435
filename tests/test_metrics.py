"""flysticky's Prometheus metrics: counted in the core, served on a port of their own,
the same in every adapter, and read through the emulator as Fly's Prometheus would.

End to end: real machines of each framework behind the emulator with a replay cache,
each machine's endpoint scraped over HTTP and parsed with prometheus-client's parser;
what they count must equal what the clients sent and what the emulator saw, before and
after a machine is destroyed and after one crashes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections import Counter, defaultdict
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flysticky import StickyConfig
from flysticky.core import Decider, HeaderTable, Outcome, Tally
from flysticky.metrics import TallyCollector
from flysticky.proxy.cache import CacheRule
from flysticky.proxy.flytoml import Metrics
from flysticky.proxy.machines import Machine, free_port
from flysticky.serving import Serving

from .emulator_fixtures import FRAMEWORKS, HERE, running

MACHINE = "90801679a10038"
OTHER = "148ed193b04d89"
SERVE = [__import__("sys").executable, "-m", "flysticky.proxy.serve", "tests.apps.sticky:app"]
CACHE = [CacheRule("/", 300, "cookie", "fly-machine-id")]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v
        for (n, pairs), v in samples.items()
        if n == name and all(dict(pairs).get(k) == want for k, want in labels.items())
    )


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, url, timeout=aiohttp.ClientTimeout(total=10)) as answer,
    ):
        return answer.status, dict(answer.headers), await answer.text()


def headers(**values: str) -> HeaderTable:
    return HeaderTable((k.replace("_", "-"), v) for k, v in values.items())


# ---------------------------------------------------------------- the core's counts
def test_metrics_off_decides_without_counting() -> None:
    decider = Decider(StickyConfig(), MACHINE)
    assert decider.tally is None
    assert decider.decide == decider._decide_by_cookie  # no wrapper: nothing is paid


def test_every_outcome_is_counted_by_what_routed_it() -> None:
    tally = Tally()
    config = StickyConfig(
        metrics_port=free_port(),
        skipper=lambda path: path == "/health",
        key=lambda path: path.removeprefix("/rooms/") if path.startswith("/rooms/") else None,
    )
    decider = Decider(config, MACHINE, tally)
    decider.owners.update([MACHINE, OTHER])
    here = f"fly-machine-id={MACHINE}"
    there = f"fly-machine-id={OTHER}"
    decider.decide("/", here, headers(), False)
    decider.decide("/", here, headers(fly_replay_cache_status="hit"), False)
    decider.decide("/", None, headers(), False)
    decider.decide("/", there, headers(), False)
    decider.decide("/", there, headers(fly_replay_src="instance=x"), False)
    decider.decide("/", there, headers(fly_preferred_instance_unavailable=OTHER), False)
    decider.decide("/", there, headers(content_length=str(2 * 1024 * 1024)), False)
    decider.decide("/health", there, headers(), False)
    rooms = [f"room-{n}" for n in range(40)]
    for room in rooms:
        decider.decide(f"/rooms/{room}", here, headers(), False)
    assert tally.pinned == 2
    by_outcome = Counter({k: v for k, v in tally.decisions.items()})
    assert by_outcome[("stamped", "cookie")] == 1
    assert by_outcome[("replayed", "cookie")] == 1
    assert by_outcome[("repinned", "cookie")] == 2
    assert by_outcome[("off_pin", "cookie")] == 1
    assert by_outcome[("skipped", "cookie")] == 1
    owned_here = sum(decider.owners.owner(r) == MACHINE for r in rooms)
    assert by_outcome[("pinned", "key")] == owned_here
    assert by_outcome[("replayed", "key")] == len(rooms) - owned_here
    assert tally.repins == {"fly-replay-src": 1, "fly-preferred-instance-unavailable": 1}
    assert tally.cache_arrivals == {"hit": 1}
    # What is scraped: no key, session or machine id in any label.
    text = exposition(tally, decider)
    assert not any(room in text for room in rooms)
    assert MACHINE not in text and OTHER not in text
    samples = parse(text)
    assert value(samples, "flysticky_decisions_total", outcome="pinned", routed_by="cookie") == 2
    assert value(samples, "flysticky_decisions_total") == 8 + len(rooms)
    assert value(samples, "flysticky_machines") == 2


def exposition(tally: Tally, decider: Decider | None) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(TallyCollector(tally, lambda: decider))
    return generate_latest(registry).decode()


def test_hostile_cache_status_values_are_one_label_value() -> None:
    tally = Tally()
    decider = Decider(StickyConfig(metrics_port=free_port()), MACHINE, tally)
    for n in range(500):
        decider.decide(None, None, headers(fly_replay_cache_status=f"x{n}\r\nevil"), False)
    decider.decide(None, None, headers(fly_replay_cache_status=" HIT "), False)
    assert tally.cache_arrivals == {"other": 500, "hit": 1}
    samples = parse(exposition(tally, decider))
    statuses = {dict(k[1])["status"] for k in samples if k[0].startswith("flysticky_replay_cache")}
    assert statuses == {"hit", "miss", "bypass", "other"}


def test_every_outcome_is_exported_from_the_first_scrape() -> None:
    samples = parse(exposition(Tally(), None))
    outcomes = {dict(k[1])["outcome"] for k in samples if k[0] == "flysticky_decisions_total"}
    assert outcomes == {o.value for o in Outcome if o is not Outcome.FORWARDED}
    assert all(v == 0 for k, v in samples.items() if k[0].endswith("_total"))
    assert not any(k[0] == "flysticky_machines" for k in samples)  # discovery off: no gauge


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("metrics_port", 0),
        ("metrics_port", 70000),
        ("metrics_port", "9091"),
        ("metrics_port", True),
        ("metrics_path", "metrics"),
        ("metrics_path", "/a b"),
        ("metrics_path", "/m\r\nx"),
    ],
)
def test_bad_metrics_settings_are_refused_by_name(field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"StickyConfig.{field}="):
        StickyConfig(**{field: bad})


def test_the_metrics_port_is_not_the_apps() -> None:
    with pytest.raises(ValueError, match="a port of its own"):
        StickyConfig(metrics_port=8080, forward_port=8080)


# ---------------------------------------------------------------- the endpoint
async def served(config: StickyConfig, env: dict[str, str]) -> Serving:
    serving = Serving(config)
    await serving.start()
    return serving


@pytest.fixture
def on_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_MACHINE_ID", MACHINE)
    monkeypatch.delenv("FLY_APP_NAME", raising=False)
    monkeypatch.delenv("FLYSTICKY_METRICS_HOST", raising=False)
    monkeypatch.delenv("FLYSTICKY_METRICS_PORT", raising=False)


async def test_endpoint_answers_get_and_head_at_its_path_only(on_fly: None) -> None:
    port = free_port()
    serving = Serving(StickyConfig(metrics_port=port, metrics_path="/fly/metrics"))
    await serving.start()
    try:
        decider = serving.current()
        assert decider is not None
        decider.decide(None, f"fly-machine-id={OTHER}", headers(), False)
        status, answer_headers, body = await get(f"http://127.0.0.1:{port}/fly/metrics?x=1")
        assert status == 200
        assert answer_headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse(body)
        assert value(samples, "flysticky_decisions_total", outcome="replayed") == 1
        assert value(samples, "flysticky_build_info") == 1
        # prometheus-client's default registry is served too: the process's metrics.
        assert any(name.startswith("process_") or name.startswith("python_") for name, _ in samples)
        status, _, body = await get(f"http://127.0.0.1:{port}/fly/metrics", "HEAD")
        assert (status, body) == (200, "")
        assert (await get(f"http://127.0.0.1:{port}/metrics"))[0] == 404
        assert (await get(f"http://127.0.0.1:{port}/fly/metrics", "POST"))[0] == 405
        # Over IPv6 too, where Fly's scraper comes from (when this machine has IPv6).
        assert serving.metrics is not None
        if socket.has_ipv6 and any(":" in host for host, _ in serving.metrics.addresses()):
            assert (await get(f"http://[::1]:{port}/fly/metrics"))[0] == 200
    finally:
        await serving.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{port}/fly/metrics")


async def test_garbage_slow_and_huge_requests_are_closed(
    on_fly: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flysticky.metrics._HEAD_SECONDS", 0.3)
    port = free_port()
    serving = Serving(StickyConfig(metrics_port=port))
    await serving.start()
    try:
        for sent in (b"\x00\xff garbage\r\n\r\n", b"GET /metrics HTTP/1.1\r\n", b"A" * 40_000):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 404"), answer[:80]
            writer.close()
        # Still serving after all that.
        assert (await get(f"http://127.0.0.1:{port}/metrics"))[0] == 200
    finally:
        await serving.stop()


async def test_idle_connections_beyond_the_limit_are_closed_at_once(
    on_fly: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flysticky.metrics._MAX_CONNECTIONS", 4)
    port = free_port()
    serving = Serving(StickyConfig(metrics_port=port))
    await serving.start()
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not held
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
        await asyncio.sleep(0.1)
        assert (await get(f"http://127.0.0.1:{port}/metrics"))[0] == 200
    finally:
        await serving.stop()


async def test_a_second_process_finds_the_port_taken_and_says_so(
    on_fly: None, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    first = Serving(StickyConfig(metrics_port=port))
    second = Serving(StickyConfig(metrics_port=port))
    await first.start()
    try:
        with caplog.at_level(logging.WARNING, "flysticky"):
            await second.start()
        assert second.started and second.metrics is None
        assert f"port {port} is taken" in caplog.text and "one per machine" in caplog.text
        assert (await get(f"http://127.0.0.1:{port}/metrics"))[0] == 200
    finally:
        await second.stop()
        await first.stop()


async def test_the_apps_own_port_is_never_taken_for_metrics(
    on_fly: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    monkeypatch.setenv("PORT", str(port))
    serving = Serving(StickyConfig(metrics_port=port))
    with caplog.at_level(logging.ERROR, "flysticky"):
        await serving.start()
    try:
        assert serving.started and serving.metrics is None
        assert "the app's own port ($PORT)" in caplog.text
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await serving.stop()


async def test_off_fly_nothing_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_MACHINE_ID", raising=False)
    port = free_port()
    serving = Serving(StickyConfig(metrics_port=port))
    await serving.start()
    try:
        assert serving.metrics is None
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await serving.stop()


async def test_counts_survive_a_server_restart(on_fly: None) -> None:
    port = free_port()
    serving = Serving(StickyConfig(metrics_port=port))
    for _ in range(2):
        await serving.start()
        decider = serving.current()
        assert decider is not None
        decider.decide(None, None, headers(), False)
        await serving.stop()
    await serving.start()
    try:
        samples = parse((await get(f"http://127.0.0.1:{port}/metrics"))[2])
        assert value(samples, "flysticky_decisions_total", outcome="stamped") == 2
    finally:
        await serving.stop()


def plain_app(framework: str, config: StickyConfig) -> Any:
    """A hello world with flysticky, each framework's way, for LifespanClient."""
    if framework == "sanic":
        from sanic import Sanic, text

        from flysticky.sanic import StickySessions as SanicSticky

        from .asgi_client import sanic_asgi

        Sanic.test_mode = True  # many apps start in one process (see tests/harness.py)
        sanic_app = Sanic(f"metrics_{uuid.uuid4().hex[:8]}")

        @sanic_app.get("/")
        async def sanic_hello(request: Any) -> Any:
            return text("hi")

        SanicSticky(sanic_app, config)
        return sanic_asgi(sanic_app)
    if framework == "quart":
        from quart import Quart

        from flysticky.quart import StickySessions as QuartSticky

        quart_app = Quart("metrics")

        @quart_app.get("/")
        async def quart_hello() -> str:
            return "hi"

        QuartSticky(quart_app, config)
        return quart_app
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from flysticky.asgi import StickySessions

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    return Starlette(
        routes=[Route("/", hello)], middleware=[Middleware(StickySessions, config=config)]
    )


@pytest.mark.parametrize("framework", ["sanic", "quart", "starlette"])
async def test_the_pinned_path_counts_alike_in_every_adapter(on_fly: None, framework: str) -> None:
    """Sanic's and the ASGI adapter's raw-cookie shortcut skips decide(): they must count
    what it counts (Quart always decides)."""
    from .asgi_client import LifespanClient

    port = free_port()
    async with LifespanClient(plain_app(framework, StickyConfig(metrics_port=port))) as client:
        pin = {"cookie": f"a=b; fly-machine-id={MACHINE}"}
        for _ in range(3):
            assert (await client.get("/", headers=pin)).status_code == 200
        hit = {**pin, "fly-replay-cache-status": "hit"}
        assert (await client.get("/", headers=hit)).status_code == 200
        assert (
            await client.get("/", headers={"cookie": f"fly-machine-id={MACHINE}"})
        ).status_code == 200
        assert (await client.get("/")).status_code == 200
        assert (
            await client.get("/", headers={"cookie": f"fly-machine-id={OTHER}"})
        ).status_code == 307
        samples = parse((await get(f"http://127.0.0.1:{port}/metrics"))[2])
    assert value(samples, "flysticky_decisions_total", outcome="pinned") == 5
    assert value(samples, "flysticky_decisions_total", outcome="stamped") == 1
    assert value(samples, "flysticky_decisions_total", outcome="replayed") == 1
    assert value(samples, "flysticky_replay_cache_arrivals_total", status="hit") == 1
    assert value(samples, "flysticky_decisions_total") == 7


# ---------------------------------------------------------------- end to end
def fleet_env(framework: str, port: int) -> dict[str, str]:
    return {
        "STICKY_FRAMEWORK": framework,
        "STICKY_METRICS_PORT": str(port),
        "PYTHONPATH": str(HERE.parent),
    }


def client(url: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def whoami(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get("/whoami") as answer:
        assert answer.status == 200
        return await answer.json()  # type: ignore[no-any-return]


async def scrape(machine: Machine) -> Samples:
    status, _, body = await get(f"http://{machine.host}:{machine.metrics_port}/metrics")
    assert status == 200
    return parse(body)


SESSIONS = 10  # not a multiple of 3: the rotation then lands sessions elsewhere
REQUESTS = 6


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_each_machines_metrics_equal_what_was_sent_and_seen(framework: str) -> None:
    port = free_port()
    async with running(
        SERVE, env=fleet_env(framework, port), cache_rules=CACHE, metrics=Metrics(port)
    ) as (emulator, _):
        fleet = emulator.fleet
        sessions = [client(emulator.url) for _ in range(SESSIONS)]
        try:
            pins: dict[int, str] = {}
            for n, session in enumerate(sessions):
                body = await whoami(session)
                assert body["outcome"] == "stamped"
                pins[n] = body["machine"]
            for _ in range(REQUESTS - 1):
                for n, session in enumerate(sessions):
                    assert (await whoami(session))["machine"] == pins[n]

            scraped = {m.id: await scrape(m) for m in fleet.machines}
            served = stamped = replayed = hits = misses = 0
            for machine in fleet.machines:
                samples = scraped[machine.id]
                decided = value(samples, "flysticky_decisions_total")
                # Every delivery to the machine was decided there, once.
                assert decided == machine.counters.requests, machine.id
                assert (
                    value(samples, "flysticky_decisions_total", outcome="replayed")
                    == machine.counters.replays
                )
                assert (
                    value(samples, "flysticky_replay_cache_arrivals_total", status="hit")
                    == machine.counters.cache_hits
                )
                served += sum(
                    value(samples, "flysticky_decisions_total", outcome=o)
                    for o in ("pinned", "stamped")
                )
                stamped += value(samples, "flysticky_decisions_total", outcome="stamped")
                replayed += value(samples, "flysticky_decisions_total", outcome="replayed")
                hits += value(samples, "flysticky_replay_cache_arrivals_total", status="hit")
                misses += value(samples, "flysticky_replay_cache_arrivals_total", status="miss")
                assert value(samples, "flysticky_decisions_total", outcome="repinned") == 0
            assert served == SESSIONS * REQUESTS
            assert stamped == SESSIONS
            assert misses == replayed  # every replay went through the cache's rule
            assert replayed + hits > 0  # load balancing sent some sessions elsewhere

            # The emulator's endpoint: the same series, with Fly's labels.
            status, _, text = await get(f"{emulator.url}/.fly-emulator/metrics")
            assert status == 200
            fly = parse(text)
            for machine in fleet.machines:
                labels = {"app": fleet.app_name, "region": machine.region, "instance": machine.id}
                assert value(fly, "flysticky_decisions_total", **labels) == value(
                    scraped[machine.id], "flysticky_decisions_total"
                )
                assert value(fly, "fly_emulator_requests_total", **labels) == (
                    machine.counters.requests
                )
                assert value(fly, "fly_emulator_scrape_up", **labels) == 1

            # A machine goes away: each of its sessions is re-pinned once, on a survivor,
            # by Fly's fly-preferred-instance-unavailable.
            victim_id, victims = Counter(pins.values()).most_common(1)[0]
            victim = fleet.get(victim_id)
            assert victim is not None
            survivors = [m for m in fleet.machines if m.id != victim_id]
            before = {m.id: scraped[m.id] for m in survivors}
            await emulator.destroy(victim)
            moved: dict[str, str] = {}
            for n, session in enumerate(sessions):
                body = await whoami(session)
                if pins[n] == victim_id:
                    assert body["outcome"] == "repinned" and body["machine"] != victim_id
                    moved[str(n)] = body["machine"]
            after = {m.id: await scrape(m) for m in survivors}
            repins: dict[str, float] = defaultdict(float)
            for machine in survivors:
                for header in (
                    "fly-preferred-instance-unavailable",
                    "fly-replay-cache-status",
                    "fly-replay-src",
                    "fly-replay-failed",
                ):
                    repins[header] += value(
                        after[machine.id], "flysticky_repins_total", arrived_by=header
                    ) - value(before[machine.id], "flysticky_repins_total", arrived_by=header)
                assert value(
                    after[machine.id], "flysticky_decisions_total", outcome="repinned"
                ) - value(before[machine.id], "flysticky_decisions_total", outcome="repinned") == (
                    sum(1 for m in moved.values() if m == machine.id)
                )
            # The first is replayed to the gone machine and delivered elsewhere by Fly; the
            # replay cache keeps where it went, so the others may get there as cache hits.
            assert sum(repins.values()) == victims
            assert repins["fly-preferred-instance-unavailable"] >= 1
            assert repins["fly-replay-src"] == repins["fly-replay-failed"] == 0
            status, _, text = await get(f"{emulator.url}/.fly-emulator/metrics")
            fly = parse(text)
            assert value(fly, "flysticky_repins_total") == victims
            assert value(fly, "fly_emulator_requests_total", instance=victim_id) == 0

            # A machine crashes: Fly's proxy starts it again for the next request aimed at
            # it, its memory (and so its counts) gone. Its sessions stay pinned to it; its
            # counters start again from 0, which Prometheus's rate() takes as a reset.
            pins.update((int(n), machine) for n, machine in moved.items())
            crashed = next(m for m in survivors if m.id in pins.values())
            mine = sum(1 for machine in pins.values() if machine == crashed.id)
            await emulator.fleet.kill(crashed)
            seen_before = crashed.counters.requests
            for n, session in enumerate(sessions):
                body = await whoami(session)
                assert body["machine"] == pins[n]
                if pins[n] == crashed.id:
                    assert body["outcome"] == "pinned"
            restarted = await scrape(crashed)
            assert value(restarted, "flysticky_decisions_total", outcome="pinned") == mine
            assert value(restarted, "flysticky_decisions_total", outcome="repinned") == 0
            assert value(restarted, "flysticky_repins_total") == 0
            assert value(restarted, "flysticky_decisions_total") == (
                crashed.counters.requests - seen_before
            )
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
