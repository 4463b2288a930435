"""What flysticky costs, against the same app without it, in one interleaved run.

    python -m bench            # full run (about 18 minutes on 2 cores)
    python -m bench --smoke    # seconds: checks that everything runs; figures meaningless
    python -m bench --only moves rooms   # the core decision and the parts named
    python -m bench --only starlette fastapi   # the ASGI rows (and the core decision)

Servers run pinned to core 0 and wrk to core 1. Each round measures the bare app and
the app with flysticky back to back (alternating which goes first), for each path;
medians over rounds are reported. A third app, flysticky with its metrics on, is measured
on the pinned path in the same rounds. On Starlette and FastAPI the same rounds also measure
the peer: echofly's way written by hand on Starlette's BaseHTTPMiddleware (bench/peer.py),
what users of those frameworks run today. Then the core decision alone (the cookie path and
the key path), the proxy hops per session through the emulator, the keys that move
when a machine joins a fleet, and rooms (key routes) through the emulator. Results are
printed and written to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import aiohttp

from flysticky import Decider, StickyConfig
from flysticky.owners import Owners
from flysticky.proxy import flytoml
from flysticky.proxy.emulator import Emulator
from flysticky.proxy.machines import Counters, Fleet, Machine, free_port

from .keys import ROOMS_PREFIX, room_key

ROOT = Path(__file__).parent.parent
MACHINE = "90801679a10038"
OTHER = "148ed193b04d89"
#: The fleet of the key rows: three machines, ids as Fly makes them (14 lowercase hex).
MEMBERS = (MACHINE, OTHER, "d8dd9e0c5e3e48")
#: Optional parts of the run, by the word --only takes; the core decision always runs.
SECTIONS = {
    "hops": "proxy hops per session (cookie path)",
    "moves": "keys that move when a machine joins",
    "rooms": "rooms through the emulator (key path)",
}
SERVE = [sys.executable, "-m", "flysticky.proxy.serve", "bench.apps:app"]
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "bench.apps:app",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--log-level",
    "warning",
    "--no-access-log",
]
#: name: (BENCH_FRAMEWORK, command, whether the peer (bench/peer.py) runs in its rounds)
SERVERS = {
    "Sanic (own server, 1 worker)": ("sanic", SERVE, False),
    "Quart on Hypercorn": ("quart", SERVE, False),
    "Quart on Uvicorn": ("quart", UVICORN, False),
    "Starlette on Uvicorn": ("starlette", UVICORN, True),
    "FastAPI on Uvicorn": ("fastapi", UVICORN, True),
}
#: What each app of a round runs with (BENCH_STICKY): the twin is a second bare app; the
#: metered app is flysticky with its metrics on (StickyConfig.metrics_port).
VARIANTS = {"bare": "0", "sticky": "1", "metered": "1", "twin": "0", "peer": "peer"}
PATHS = ("pinned", "replay", "first visit")
#: The row of the metered app: the pinned path, every request of every session, counted.
METERED_PATH = "pinned, metrics on"
BROWSER_COOKIES = "_ga=GA1.1.12345.67890; theme=dark; csrftoken=abcdefabcdef0123456789"


def cookie_for(path: str, machine: str) -> str | None:
    if path == "pinned":
        return f"{BROWSER_COOKIES}; fly-machine-id={machine}"
    if path == "replay":
        return f"{BROWSER_COOKIES}; fly-machine-id={OTHER}"
    return BROWSER_COOKIES


@dataclass
class Sample:
    rps: float
    p50_us: float
    p99_us: float


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def _micros(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 1, "ms": 1000, "s": 1e6}[unit]


def wrk(machine: Machine, cookie: str | None, seconds: float, connections: int) -> Sample:
    command = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
    ]
    if cookie:
        command += ["-H", f"Cookie: {cookie}"]
    out = subprocess.run(
        # The machine's own address: with the emulator's private network, each machine
        # listens on a loopback address of its own (127.0.0.2, ...), not on 127.0.0.1.
        [*command, f"http://{machine.host}:{machine.port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _micros(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _micros(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return Sample(rps, p50, p99)


async def start(framework: str, command: list[str], variant: str) -> tuple[Fleet, Machine]:
    # One hash seed for all the apps: dict layouts then differ only by flysticky.
    env = {
        "BENCH_FRAMEWORK": framework,
        "BENCH_STICKY": VARIANTS[variant],
        "PYTHONPATH": str(ROOT),
        "PYTHONHASHSEED": "0",
    }
    if variant == "metered":
        env["BENCH_METRICS_PORT"] = str(free_port())
    fleet = Fleet(["taskset", "-c", "0", *command], env=env, cwd=ROOT)
    return fleet, await fleet.add()


def server_runs(args: argparse.Namespace, name: str) -> tuple[int, float]:
    """Rounds and seconds per sample of a server: the rows with a peer measure four apps
    a round, not three, and take their own (shorter) settings."""
    if SERVERS[name][2]:
        return args.peer_rounds, args.peer_seconds
    return args.rounds, args.seconds


async def server_figures(
    args: argparse.Namespace, names: list[str]
) -> dict[tuple[str, str], dict[str, Series]]:
    """Fresh processes every round, so that one lucky or unlucky process (memory
    layout, what else the VM did meanwhile) cannot bias the ratio."""
    results: dict[tuple[str, str], dict[str, Series]] = {}
    connections = args.connections
    for name in names:
        framework, command, with_peer = SERVERS[name]
        rounds, seconds = server_runs(args, name)
        # A second bare process (the twin): the pinned path's A/A pair, what the noise
        # alone gives. The peer at an end, so that flysticky stays next to its bare app.
        variants = ["bare", "sticky", "metered", "twin", *(["peer"] if with_peer else [])]
        for round_ in range(rounds):
            fleets: list[Fleet] = []
            try:
                apps: dict[str, Machine] = {}
                # Started, warmed and measured in this round's order (reversed every other
                # round): neither an earlier start nor an earlier turn is a steady edge.
                ordered = variants if round_ % 2 == 0 else variants[::-1]
                for variant in ordered:
                    fleet, apps[variant] = await start(framework, command, variant)
                    fleets.append(fleet)
                # The peer reads the cookie as flysticky does, against its own machine id.
                pin = {
                    label: apps[label if label in ("peer", "metered") else "sticky"].id
                    for label in apps
                }
                for label in ordered:  # warm up
                    wrk(apps[label], cookie_for("pinned", pin[label]), 1, connections)
                for path in PATHS:
                    series = results.setdefault((name, path), {v: Series() for v in VARIANTS})
                    # The bare apps get the very same requests; they ignore the cookie.
                    order = [
                        label
                        for label in ordered
                        if path == "pinned" or label not in ("twin", "metered")
                    ]
                    for label in order:
                        cookie = cookie_for(path, pin[label])
                        sample = wrk(apps[label], cookie, seconds, connections)
                        series[label].samples.append(sample)
                    if path == "pinned":
                        results[name, METERED_PATH] = {
                            **series,
                            "sticky": series["metered"],
                            "peer": Series(),
                        }
            finally:
                for fleet in fleets:
                    await fleet.close()
            print(f"  {name}: round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


@dataclass(frozen=True, slots=True)
class TinyRequest:
    """What the key function reads of a request: its path."""

    path: str


def _first_room(owners: Owners, here: bool) -> str:
    """The first "room-<i>" owned by this machine (here) or by another."""
    for i in itertools.count():
        room = f"room-{i}"
        if (owners.owner(room) == owners.machine_id) == here:
            return room
    raise AssertionError("unreachable")


def core_figures(number: int) -> dict[str, float]:
    """ns per decision. Each call gets a freshly built Cookie header, as a server hands
    over a new string per request (its hash is not cached); building it is subtracted.

    The key rows route by ``StickyConfig(key=room_key)`` over MEMBERS, timed the same way
    with the same Cookie header as the cookie path's pinned row: the key function slices a
    fresh key out of the path on every call, as it would out of a server's new string."""
    machine = MACHINE
    decider = Decider(StickyConfig(), machine)
    keyed = Decider(StickyConfig(key=room_key), machine)
    keyed.owners.update(MEMBERS)
    scratch = Owners(machine)
    scratch.update(MEMBERS)
    here, elsewhere = _first_room(scratch, True), _first_room(scratch, False)
    # More keys than Owners remembers (4096), each owned here, taken in turn: every
    # lookup misses and scores the key against every machine.
    cold = []
    for i in itertools.count():
        if len(cold) == 10_000:
            break
        if scratch.owner(f"cold-{i}") == machine:
            cold.append(TinyRequest(f"{ROOMS_PREFIX}cold-{i}"))
    cold_requests = itertools.cycle(cold)
    pinned_tail = f"fly-machine-id={machine}"
    # name: (decider, request, cookie tail, headers)
    cases: dict[str, tuple[Decider, TinyRequest | None, str, dict[str, str]]] = {
        "pinned": (decider, None, pinned_tail, {}),
        "replay": (decider, None, f"fly-machine-id={OTHER}", {}),
        "first visit": (decider, None, "lang=en", {}),
        "re-pin after failover": (
            decider,
            None,
            f"fly-machine-id={OTHER}",
            {"fly-preferred-instance-unavailable": OTHER},
        ),
        "hostile cookie": (decider, None, f"fly-machine-id=abc;app=x{'%' * 100}", {}),
        f"key {here!r}, owner here (pinned)": (
            keyed,
            TinyRequest(ROOMS_PREFIX + here),
            pinned_tail,
            {},
        ),
        f"key {elsewhere!r}, owner elsewhere (replay)": (
            keyed,
            TinyRequest(ROOMS_PREFIX + elsewhere),
            pinned_tail,
            {},
        ),
    }
    prefix = BROWSER_COOKIES + "; "

    def best(call: Callable[[], object]) -> float:
        return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e9

    figures = {}
    for name, (one, request, tail, headers) in cases.items():
        build = best(lambda: prefix + tail)  # noqa: B023
        decide = best(lambda: one.decide(request, prefix + tail, headers, False))  # noqa: B023
        figures[name] = decide - build
    # A new request every call: taking it from the cycle is subtracted too ("and" yields
    # the header, the request being truthy).
    build = best(lambda: next(cold_requests) and prefix + pinned_tail)
    decide = best(lambda: keyed.decide(next(cold_requests), prefix + pinned_tail, {}, False))
    figures[f"key owned here, not remembered ({len(MEMBERS)} machines scored)"] = decide - build
    return figures


@dataclass
class Moves:
    machines: int  # before the new one joins
    keys: int
    moved: int
    to_new: int


def move_figures(keys: int, sizes: tuple[int, ...] = (3, 10, 50)) -> list[Moves]:
    """Owners of ``keys`` keys before and after one machine joins a fleet of N, by the
    library's own Owners. Seeded ids: the same figures on every run."""
    figures = []
    for n in sizes:
        rng = random.Random(f"flysticky-bench-fleet-{n}")
        ids = [f"{rng.getrandbits(56):014x}" for _ in range(n + 1)]
        assert len(set(ids)) == n + 1
        before, after = Owners(ids[0]), Owners(ids[0])
        before.update(ids[:n])
        after.update(ids)
        newcomer = ids[n]
        moved = to_new = 0
        for i in range(keys):
            key = f"room-{i}"
            old, new = before.owner(key), after.owner(key)
            if old != new:
                moved += 1
                to_new += new == newcomer
        figures.append(Moves(n, keys, moved, to_new))
    return figures


async def hop_figures(
    sessions: int, requests: int, machines: int
) -> dict[str, tuple[float, float]]:
    """Extra proxy hops per request and per session, echofly's way against flysticky's."""
    rules = flytoml.load(ROOT / "fly.toml").cache_rules
    ways = {
        "echofly (instance=, no replay cache)": ("instance", []),
        "flysticky (prefer_instance + replay cache)": ("prefer_instance", rules),
    }
    figures = {}
    for name, (mode, cache_rules) in ways.items():
        fleet = Fleet(
            SERVE,
            env={
                "BENCH_FRAMEWORK": "sanic",
                "BENCH_STICKY": "1",
                "BENCH_MODE": mode,
                "PYTHONPATH": str(ROOT),
            },
            cwd=ROOT,
        )
        emulator = Emulator(fleet, port=0, cache_rules=cache_rules)
        await emulator.start(machines)
        try:

            async def one_session(url: str) -> None:
                jar = aiohttp.CookieJar(unsafe=True)
                async with aiohttp.ClientSession(url, cookie_jar=jar) as client:
                    for _ in range(requests):
                        async with client.get("/") as response:
                            assert response.status == 200, response.status
                            await response.read()

            await asyncio.gather(*(one_session(emulator.url) for _ in range(sessions)))
            total = emulator.totals()
            client_requests = sessions * requests
            extra = total.requests - client_requests
            figures[name] = (extra / client_requests, extra / sessions)
        finally:
            await emulator.close()
    return figures


@dataclass
class Phase:
    requests: int  # the clients'
    deliveries: int  # to machines, replays included
    replays: int
    cache_hits: int
    by_owner: int | None = None  # room requests served by the room's owner

    @property
    def hops(self) -> int:
        return self.deliveries - self.requests


async def _agreed_owners(fleet: Fleet, rooms: list[str], timeout: float = 30) -> dict[str, str]:
    """Each room's owner once every machine names the same one (discovery refreshes
    every few seconds: the first machines started before the others existed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as client:
        while True:
            views = []
            for machine in fleet.live():
                view = {}
                for room in rooms:
                    url = f"http://{machine.host}:{machine.port}/owner/{room}"
                    async with client.get(url) as response:
                        view[room] = await response.text()
                views.append(view)
            ids = {m.id for m in fleet.live()}
            if all(v == views[0] for v in views) and set(views[0].values()) <= ids:
                return views[0]
            if loop.time() > deadline:
                raise RuntimeError(f"the machines do not agree on the owners: {views}")
            await asyncio.sleep(0.2)


async def room_figures(users: int, rooms: int, requests: int, machines: int) -> dict[str, Phase]:
    """Users with a cookie jar each: a first visit to "/" (the cookie path), then
    ``requests`` requests to their room (the key path), through the emulator with the
    replay cache fly.toml configures (cookie-keyed, on "/")."""
    rules = flytoml.load(ROOT / "fly.toml").cache_rules
    fleet = Fleet(
        SERVE,
        env={
            "BENCH_FRAMEWORK": "sanic",
            "BENCH_STICKY": "1",
            "BENCH_ROOMS": "1",
            "PYTHONPATH": str(ROOT),
        },
        cwd=ROOT,
    )
    emulator = Emulator(fleet, port=0, cache_rules=rules)
    await emulator.start(machines)
    names = [f"room-{r}" for r in range(rooms)]
    try:
        owners = await _agreed_owners(fleet, names)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    aiohttp.ClientSession(emulator.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
                )
                for _ in range(users)
            ]

            async def get(client: aiohttp.ClientSession, path: str) -> str:
                async with client.get(path) as response:
                    assert response.status == 200, response.status
                    return await response.text()

            async def in_room(client: aiohttp.ClientSession, room: str) -> int:
                served_by_owner = 0
                for _ in range(requests):
                    served_by_owner += await get(client, ROOMS_PREFIX + room) == owners[room]
                return served_by_owner

            start = emulator.totals()
            await asyncio.gather(*(get(client, "/") for client in clients))
            visited = emulator.totals()
            by_owner = await asyncio.gather(
                *(in_room(client, names[u % rooms]) for u, client in enumerate(clients))
            )
            end = emulator.totals()
    finally:
        await emulator.close()

    def phase(a: Counters, b: Counters, count: int) -> Phase:
        return Phase(
            count, b.requests - a.requests, b.replays - a.replays, b.cache_hits - a.cache_hits
        )

    first = phase(start, visited, users)
    in_rooms = phase(visited, end, users * requests)
    in_rooms.by_owner = sum(by_owner)
    overall = phase(start, end, users * (1 + requests))
    return {'first visit "/"': first, "room requests": in_rooms, "all": overall}


def environment() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = "no wrk"
    if shutil.which("wrk") is not None:
        wrk_run = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        wrk_version = wrk_run.stdout.split("\n")[0]
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}; "
        f"Python {platform.python_version()}; sanic {version('sanic')}, quart {version('quart')}, "
        f"hypercorn {version('hypercorn')}, uvicorn {version('uvicorn')}, "
        f"starlette {version('starlette')}, fastapi {version('fastapi')}; {wrk_version.strip()}"
    )


def report(
    args: argparse.Namespace,
    servers: dict[tuple[str, str], dict[str, Series]],
    core: dict[str, float],
    hops: dict[str, tuple[float, float]],
    moves: list[Moves],
    rooms: dict[str, Phase],
) -> str:
    lines = [
        f"# flysticky benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {environment()}",
        f"Command: `{' '.join(['python -m bench', *args.argv])}`",
    ]
    if servers:
        names = list(dict.fromkeys(name for name, _ in servers))
        runs: dict[tuple[int, float], list[str]] = {}
        for name in names:
            runs.setdefault(server_runs(args, name), []).append(name)
        settings = "; ".join(
            f"{rounds} rounds x {seconds}s per sample"
            + (f" ({', '.join(which)})" if len(runs) > 1 else "")
            for (rounds, seconds), which in runs.items()
        )
        with_peer = any(SERVERS[name][2] for name in names)
        lines[-1] += (
            f" ({settings}; wrk -t1 -c{args.connections}, server on core 0, wrk on core 1, "
            f"bare and flysticky{' (and the peer)' if with_peer else ''} interleaved; medians)"
        )
        lines += _server_lines(servers, with_peer)
    lines += [
        "",
        "## The core decision alone (best of 5)",
        "",
        f"Key rows: `StickyConfig(key=...)` over {len(MEMBERS)} machines, a key function "
        f"reading `{ROOMS_PREFIX}<room>` off a tiny request, with the same Cookie header as "
        "the pinned row.",
        "",
        "| path | ns per call |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ns:,.0f} |" for name, ns in core.items()]
    if hops:
        lines += [
            "",
            f"## Proxy hops: {args.sessions} sessions x {args.requests} requests over "
            f"{args.machines} machines (local emulator)",
            "",
            "| way | extra hops per request | extra hops per session |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {per_req:.3f} | {per_session:.2f} |"
            for name, (per_req, per_session) in hops.items()
        ]
    if moves:
        lines += [
            "",
            f"## Keys that move when one machine joins a fleet of N ({moves[0].keys:,} keys, "
            "rendezvous hashing, seeded machine ids)",
            "",
            "| N | keys moved | moved fraction | 1/(N+1) | hash mod N would move "
            "| moved to the new machine |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {m.machines} | {m.moved:,} | {m.moved / m.keys:.4f} | {1 / (m.machines + 1):.4f} "
            f"| {m.machines / (m.machines + 1):.4f} | {m.to_new:,} of {m.moved:,}"
            f"{' (all)' if m.to_new == m.moved else ''} |"
            for m in moves
        ]
    if rooms:
        lines += [
            "",
            f"## Rooms through the emulator: {args.users} users in {args.rooms} rooms over "
            f"{args.machines} machines, each a first visit to / then {args.room_requests} "
            "requests to its room",
            "",
            "Replay cache as fly.toml (the template) configures it: on the "
            "fly-machine-id cookie, at /. A key's replay carries `state` (Fly does not cache "
            f"it), so a room request is replayed when it lands off its owner: "
            f"{(args.machines - 1) / args.machines:.3f} expected.",
            "",
            "| requests | count | extra hops | hops per request | replays | cache hits "
            "| served by the room's owner |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {p.requests:,} | {p.hops:,} | {p.hops / p.requests:.3f} | "
            f"{p.replays:,} | {p.cache_hits:,} | "
            f"{'-' if p.by_owner is None else f'{p.by_owner:,} of {p.requests:,}'} |"
            for name, p in rooms.items()
        ]
    return "\n".join(lines) + "\n"


def _ratio(of: Series, to: Series) -> str:
    """The median of each round's of/to pair, and the range, or "-" without samples."""
    if not of.samples:
        return "-"
    pairs = [a.rps / b.rps for a, b in zip(of.samples, to.samples, strict=True)]
    return f"{statistics.median(pairs):.3f} [{min(pairs):.2f}-{max(pairs):.2f}]"


def _server_lines(servers: dict[tuple[str, str], dict[str, Series]], with_peer: bool) -> list[str]:
    lines = [
        "",
        "## Through each server: app with flysticky against the same app without it",
        "",
        "Ratios are medians of each round's flysticky/bare pair (the range in brackets),",
        "so that the VM's drift between rounds cancels out; pooled is all rounds' flysticky",
        "requests over all rounds' bare ones. A/A is a second bare process against the",
        "first, on the pinned path, in the same rounds: the noise a ratio carries.",
        f'"{METERED_PATH}" is a third app, flysticky with StickyConfig.metrics_port set',
        "(decisions counted, the endpoint served), against the same bare app, same rounds.",
    ]
    if with_peer:
        lines += [
            "The peer is echofly's way written by hand on Starlette's BaseHTTPMiddleware",
            "(bench/peer.py), in the same rounds: its ratio is peer/bare, the same way.",
        ]
    peer_head = ("| peer ratio [range] ", "---:|") if with_peer else ("", "")
    lines += [
        "",
        "| server | path | req/s bare | req/s flysticky | ratio [range] | pooled "
        f"{peer_head[0]}| A/A [range] | p50 us bare / fs | p99 us bare / fs | p99 ratio |",
        f"|---|---|---:|---:|---:|---:|{peer_head[1]}---:|---:|---:|---:|",
    ]
    for (name, path), series in servers.items():
        bare, sticky = series["bare"], series["sticky"]
        pooled = sum(s.rps for s in sticky.samples) / sum(b.rps for b in bare.samples)
        peer = f"{_ratio(series['peer'], bare)} | " if with_peer else ""
        lines.append(
            f"| {name} | {path} | {bare.median('rps'):,.0f} | {sticky.median('rps'):,.0f} | "
            f"{_ratio(sticky, bare)} | {pooled:.3f} | {peer}{_ratio(series['twin'], bare)} | "
            f"{bare.median('p50_us'):,.0f} / {sticky.median('p50_us'):,.0f} | "
            f"{bare.median('p99_us'):,.0f} / {sticky.median('p99_us'):,.0f} | "
            f"{sticky.median('p99_us') / bare.median('p99_us'):.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, figures meaningless")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3)
    # The servers measured with the peer run four apps a round, not three: shorter samples
    # keep their rows at about 3 minutes each (4 warm-ups + 10 samples a round).
    parser.add_argument(
        "--peer-rounds",
        type=int,
        default=None,
        help="rounds of the servers with the peer (Starlette, FastAPI); default: --rounds",
    )
    parser.add_argument(
        "--peer-seconds", type=float, default=2, help="seconds per sample of those servers"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--machines", type=int, default=3)
    parser.add_argument("--keys", type=int, default=100_000, help="keys of the moves table")
    parser.add_argument("--users", type=int, default=200, help="users of the rooms table")
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument(
        "--room-requests", type=int, default=10, help="requests per user to its room"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="servers whose name has one of these words, and the parts named: "
        + ", ".join(f"{word} ({what})" for word, what in SECTIONS.items())
        + "; the core decision always runs",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.peer_rounds is None:
        args.peer_rounds = args.rounds
    if args.smoke:
        args.rounds, args.seconds, args.sessions, args.requests = 1, 1, 6, 4
        args.peer_rounds, args.peer_seconds = 1, 1
        args.keys, args.users, args.rooms, args.room_requests = 10_000, 12, 4, 3
    only = [word.lower() for word in args.only]
    servers_wanted = [
        name for name in SERVERS if not only or any(word in name.lower() for word in only)
    ]
    unknown = [
        w for w in only if w not in SECTIONS and not any(w in name.lower() for name in SERVERS)
    ]
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: names no server and no part of the run")
    wanted = {section for section in SECTIONS if not only or section in only}
    tools = ("wrk", "taskset") if servers_wanted else ()
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"error: {tool} is needed (Debian: apt-get install {tool})", file=sys.stderr)
            return 2
    began = time.monotonic()
    print("core decision...", file=sys.stderr)
    core = core_figures(20_000 if args.smoke else 200_000)
    servers = {}
    if servers_wanted:
        print("servers (wrk)...", file=sys.stderr)
        servers = asyncio.run(server_figures(args, servers_wanted))
    hops = {}
    if "hops" in wanted:
        print("proxy hops...", file=sys.stderr)
        hops = asyncio.run(hop_figures(args.sessions, args.requests, args.machines))
    moves = []
    if "moves" in wanted:
        print("keys moved by a new machine...", file=sys.stderr)
        moves = move_figures(args.keys)
    rooms = {}
    if "rooms" in wanted:
        print("rooms through the emulator...", file=sys.stderr)
        rooms = asyncio.run(room_figures(args.users, args.rooms, args.room_requests, args.machines))
    text = report(args, servers, core, hops, moves, rooms)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output} in {time.monotonic() - began:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
