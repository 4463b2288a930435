"""Start the emulator in-process over real machine processes, and stop them all by pid."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from flysticky.proxy.cache import CacheRule
from flysticky.proxy.emulator import Emulator
from flysticky.proxy.flytoml import Autostop, Metrics
from flysticky.proxy.machines import Fleet

HERE = Path(__file__).parent

#: tests/apps/sticky.py's frameworks: the Sanic plugin, the Quart extension, and the ASGI
#: middleware under Starlette, FastAPI and Litestar (served by Hypercorn).
FRAMEWORKS = ["sanic", "quart", "starlette", "fastapi", "litestar"]
ECHO = [sys.executable, str(HERE / "apps" / "echo_backend.py")]


def assert_all_stopped(pids: Sequence[int | None]) -> None:
    for pid in pids:
        if pid is None:  # never spawned (a command that does not exist)
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"machine process {pid} is still running")


@asynccontextmanager
async def running(
    command: Sequence[str] = ECHO,
    machines: int = 3,
    regions: Sequence[str] = ("iad",),
    cache_rules: list[CacheRule] | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    autostop: Autostop | None = None,
    idle_after: float = 60.0,
    private_network: bool | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[tuple[Emulator, aiohttp.ClientSession]]:
    fleet = Fleet(
        command,
        app_name="sticky-test",
        regions=regions,
        cwd=cwd,
        env=env,
        private_network=private_network,
        metrics=metrics,
    )
    emulator = Emulator(
        fleet, port=0, cache_rules=cache_rules, autostop=autostop, idle_after=idle_after
    )
    pids: list[int | None] = []
    try:
        await emulator.start(machines)
        async with aiohttp.ClientSession(
            base_url=emulator.url, cookie_jar=aiohttp.DummyCookieJar()
        ) as client:
            yield emulator, client
    finally:
        pids = [m.pid for m in fleet.machines]
        await emulator.close()
        assert_all_stopped(pids)
