"""What flysticky costs, against the same app without it, in one interleaved run.

    python -m bench            # full run (about 10 minutes on 2 cores)
    python -m bench --smoke    # seconds: checks that everything runs; figures mean nothing

Servers run pinned to core 0 and wrk to core 1. Each round measures the bare app and
the app with flysticky back to back (alternating which goes first), for each path;
medians over rounds are reported. Results are printed and written to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
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
from flysticky.proxy import flytoml
from flysticky.proxy.emulator import Emulator
from flysticky.proxy.machines import Fleet, Machine

ROOT = Path(__file__).parent.parent
OTHER = "148ed193b04d89"
SERVE = [sys.executable, "-m", "flysticky.proxy.serve", "bench.apps:app"]
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "bench.apps:app",
    "--port",
    "{port}",
    "--log-level",
    "warning",
    "--no-access-log",
]
SERVERS = {
    "Sanic (own server, 1 worker)": ("sanic", SERVE),
    "Quart on Hypercorn": ("quart", SERVE),
    "Quart on Uvicorn": ("quart", UVICORN),
}
PATHS = ("pinned", "replay", "first visit")
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


def wrk(port: int, cookie: str | None, seconds: float, connections: int) -> Sample:
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
        [*command, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _micros(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _micros(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return Sample(rps, p50, p99)


async def start(framework: str, command: list[str], sticky: bool) -> tuple[Fleet, Machine]:
    fleet = Fleet(
        ["taskset", "-c", "0", *command],
        # One hash seed for both apps: dict layouts then differ only by flysticky.
        env={
            "BENCH_FRAMEWORK": framework,
            "BENCH_STICKY": "1" if sticky else "0",
            "PYTHONPATH": str(ROOT),
            "PYTHONHASHSEED": "0",
        },
        cwd=ROOT,
    )
    return fleet, await fleet.add()


async def server_figures(
    rounds: int, seconds: float, connections: int, only: list[str]
) -> dict[tuple[str, str], dict[str, Series]]:
    """Fresh processes every round, so that one lucky or unlucky process (memory
    layout, what else the VM did meanwhile) cannot bias the ratio."""
    results: dict[tuple[str, str], dict[str, Series]] = {}
    for name, (framework, command) in SERVERS.items():
        if only and not any(word.lower() in name.lower() for word in only):
            continue
        for round_ in range(rounds):
            bare_fleet, bare = await start(framework, command, sticky=False)
            sticky_fleet, sticky = await start(framework, command, sticky=True)
            # A second bare process: the pinned path's A/A pair, what the noise alone gives.
            twin_fleet, twin = await start(framework, command, sticky=False)
            try:
                for machine in (bare, sticky, twin):  # warm up
                    wrk(machine.port, cookie_for("pinned", sticky.id), 1, connections)
                for path in PATHS:
                    series = results.setdefault(
                        (name, path), {"bare": Series(), "sticky": Series(), "twin": Series()}
                    )
                    # The bare app gets the very same requests; it ignores the cookie.
                    cookie = cookie_for(path, sticky.id)
                    order = [("bare", bare), ("sticky", sticky)]
                    if path == "pinned":
                        order.append(("twin", twin))
                    for label, machine in order if round_ % 2 == 0 else order[::-1]:
                        series[label].samples.append(
                            wrk(machine.port, cookie, seconds, connections)
                        )
            finally:
                for fleet in (bare_fleet, sticky_fleet, twin_fleet):
                    await fleet.close()
            print(f"  {name}: round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


def core_figures(number: int) -> dict[str, float]:
    """ns per decision. Each call gets a freshly built Cookie header, as a server hands
    over a new string per request (its hash is not cached); building it is subtracted."""
    machine = "90801679a10038"
    decider = Decider(StickyConfig(), machine)
    cases = {
        "pinned": (f"fly-machine-id={machine}", {}),
        "replay": (f"fly-machine-id={OTHER}", {}),
        "first visit": ("lang=en", {}),
        "re-pin after failover": (
            f"fly-machine-id={OTHER}",
            {"fly-preferred-instance-unavailable": OTHER},
        ),
        "hostile cookie": (f"fly-machine-id=abc;app=x{'%' * 100}", {}),
    }
    prefix = BROWSER_COOKIES + "; "

    def best(call: Callable[[], object]) -> float:
        return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e9

    figures = {}
    for name, (tail, headers) in cases.items():
        build = best(lambda: prefix + tail)  # noqa: B023
        decide = best(lambda: decider.decide(None, prefix + tail, headers, False))  # noqa: B023
        figures[name] = decide - build
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


def environment() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[
        0
    ]
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}; "
        f"Python {platform.python_version()}; sanic {version('sanic')}, quart {version('quart')}, "
        f"hypercorn {version('hypercorn')}, uvicorn {version('uvicorn')}; {wrk_version.strip()}"
    )


def report(
    args: argparse.Namespace,
    servers: dict[tuple[str, str], dict[str, Series]],
    core: dict[str, float],
    hops: dict[str, tuple[float, float]],
) -> str:
    lines = [
        f"# flysticky benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {environment()}",
        f"Command: `python -m bench{' --smoke' if args.smoke else ''}` "
        f"({args.rounds} rounds x {args.seconds}s per sample, wrk -t1 -c{args.connections}, "
        "server on core 0, wrk on core 1, bare and flysticky interleaved; medians)",
        "",
        "## Through each server: app with flysticky against the same app without it",
        "",
        "Ratios are medians of each round's flysticky/bare pair (the range in brackets),",
        "so that the VM's drift between rounds cancels out; pooled is all rounds' flysticky",
        "requests over all rounds' bare ones. A/A is a second bare process against the",
        "first, on the pinned path, in the same rounds: the noise a ratio carries.",
        "",
        "| server | path | req/s bare | req/s flysticky | ratio [range] | pooled "
        "| A/A [range] | p50 us bare / fs | p99 us bare / fs | p99 ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, path), series in servers.items():
        bare, sticky, twin = series["bare"], series["sticky"], series["twin"]
        pairs = [s.rps / b.rps for s, b in zip(sticky.samples, bare.samples, strict=True)]
        pooled = sum(s.rps for s in sticky.samples) / sum(b.rps for b in bare.samples)
        aa = "-"
        if twin.samples:
            twins = [t.rps / b.rps for t, b in zip(twin.samples, bare.samples, strict=True)]
            aa = f"{statistics.median(twins):.3f} [{min(twins):.2f}-{max(twins):.2f}]"
        lines.append(
            f"| {name} | {path} | {bare.median('rps'):,.0f} | {sticky.median('rps'):,.0f} | "
            f"{statistics.median(pairs):.3f} [{min(pairs):.2f}-{max(pairs):.2f}] | "
            f"{pooled:.3f} | {aa} | "
            f"{bare.median('p50_us'):,.0f} / {sticky.median('p50_us'):,.0f} | "
            f"{bare.median('p99_us'):,.0f} / {sticky.median('p99_us'):,.0f} | "
            f"{sticky.median('p99_us') / bare.median('p99_us'):.3f} |"
        )
    lines += [
        "",
        "## The core decision alone (best of 5)",
        "",
        "| path | ns per call |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ns:,.0f} |" for name, ns in core.items()]
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, figures meaningless")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--machines", type=int, default=3)
    parser.add_argument(
        "--only", nargs="*", default=[], help="servers whose name has one of these words"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.sessions, args.requests = 1, 1, 6, 4
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is needed (Debian: apt-get install {tool})", file=sys.stderr)
            return 2
    began = time.monotonic()
    print("core decision...", file=sys.stderr)
    core = core_figures(20_000 if args.smoke else 200_000)
    print("servers (wrk)...", file=sys.stderr)
    servers = asyncio.run(server_figures(args.rounds, args.seconds, args.connections, args.only))
    hops = {}
    if not args.only:
        print("proxy hops...", file=sys.stderr)
        hops = asyncio.run(hop_figures(args.sessions, args.requests, args.machines))
    text = report(args, servers, core, hops)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output} in {time.monotonic() - began:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
