"""The local Fly proxy emulator against tiny real backends: each rule of fly-platform.md."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from flysticky.proxy.cache import CacheRule
from flysticky.proxy.emulator import ADMIN_PREFIX
from flysticky.proxy.machines import MachineError

from .emulator_fixtures import ECHO, running

MiB = 1024 * 1024


async def get_json(client: aiohttp.ClientSession, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with client.request(kwargs.pop("method", "GET"), path, **kwargs) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, {
                "error": response.headers.get("x-fly-emulator-error"),
                "text": text,
            }


async def test_edge_headers_and_load_balancing() -> None:
    async with running() as (emulator, client):
        seen = set()
        for _ in range(6):
            status, echo = await get_json(
                client, "/echo", headers={"fly-replay-src": "forged", "x-forwarded-for": "10.9.9.9"}
            )
            assert status == 200
            seen.add(echo["machine"])
        assert seen == {m.id for m in emulator.fleet.machines}
        headers = echo["headers"]
        assert headers["fly-client-ip"] == "127.0.0.1"
        assert headers["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-port"] == str(emulator.port)
        assert headers["fly-forwarded-port"] == str(emulator.port)
        assert headers["x-forwarded-ssl"] == "off"
        assert headers["fly-region"] == "iad"
        assert re.fullmatch(r"[0-9a-f]{26}-iad", headers["fly-request-id"])
        assert headers["via"] == "1.1 fly.io"
        assert "fly-replay-src" not in headers  # a client cannot forge a replay


async def test_instance_replay_resends_the_original_request() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[1]
        status, echo = await get_json(
            client,
            f"/replay?h=instance={target.id};state=from-test",
            method="POST",
            data=b"payload" * 100,
            headers={"x-custom": "kept", "content-type": "application/octet-stream"},
        )
        assert status == 200
        assert echo["machine"] == target.id
        assert echo["method"] == "POST"
        assert echo["body_size"] == 700
        assert echo["headers"]["x-custom"] == "kept"
        src = echo["headers"]["fly-replay-src"]
        match = re.fullmatch(r"instance=([0-9a-f]{14});region=iad;t=(\d+);state=from-test", src)
        assert match
        assert abs(int(match.group(2)) / 1e6 - time.time()) < 30
        assert "fly-replay-cache-status" not in echo["headers"]  # no cache rule here
        origin = emulator.fleet.get(match.group(1))
        assert origin is not None and origin.counters.replays == 1


async def test_prefer_instance_falls_back_to_any_machine_with_a_header() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[2]
        _, echo = await get_json(client, f"/replay?h=prefer_instance={target.id}")
        assert echo["machine"] == target.id
        assert "fly-preferred-instance-unavailable" not in echo["headers"]
        await emulator.fleet.kill(target)
        status, echo = await get_json(client, f"/replay?h=prefer_instance={target.id}")
        assert status == 200
        assert echo["machine"] != target.id
        assert echo["headers"]["fly-preferred-instance-unavailable"] == target.id


async def test_instance_to_a_dead_machine_errors_or_falls_back() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[0]
        await emulator.fleet.kill(target)
        status, body = await get_json(client, f"/replay?h=instance={target.id}")
        assert (status, body["error"]) == (502, "no_candidate")
        status, echo = await get_json(
            client, f"/replay?h={quote(f'instance={target.id};fallback=prefer_self')}"
        )
        assert status == 200
        failed = echo["headers"]["fly-replay-failed"]
        assert f"instance={target.id};" in failed
        assert "reason=no_candidate" in failed
        assert re.search(r"replay_source=[0-9a-f]{14};", failed)
        assert "fly-replay-src" not in echo["headers"]


async def test_regions_lists_aliases_and_elsewhere() -> None:
    async with running(regions=("iad", "ams", "iad")) as (emulator, client):
        ams = [m for m in emulator.fleet.machines if m.region == "ams"]
        for _ in range(4):  # edge region iad: plain traffic never reaches ams
            _, echo = await get_json(client, "/echo")
            assert echo["region"] == "iad"
        _, echo = await get_json(client, "/replay?h=region=ams")
        assert echo["machine"] == ams[0].id
        _, echo = await get_json(client, "/replay?h=" + quote('region="sjc,eu"'))
        assert echo["machine"] == ams[0].id
        _, echo = await get_json(client, "/replay?h=" + quote('region="sjc,any"'))
        assert echo["region"] in ("iad", "ams")
        status, body = await get_json(client, "/replay?h=region=sjc")
        assert (status, body["error"]) == (502, "no_candidate")
        for _ in range(4):
            _, echo = await get_json(client, "/replay?h=elsewhere=true")
            origin = echo["headers"]["fly-replay-src"].split(";")[0].split("=")[1]
            assert echo["machine"] != origin


async def test_app_field_and_bad_replays() -> None:
    async with running(machines=1) as (_, client):
        status, _echo = await get_json(client, "/replay?h=app=sticky-test")
        assert status == 200
        status, body = await get_json(client, "/replay?h=app=internal-admin")
        assert (status, body["error"]) == (502, "no_candidate")
        for bad in ["instance=a;prefer_instance=b", "bogus=1", "fallback=nope;region=any", "junk"]:
            status, body = await get_json(client, "/replay?h=" + quote(bad))
            assert (status, body["error"]) == (502, "invalid_replay"), bad


async def test_json_replay_with_transform() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[1]
        body = {
            "instance": target.id,
            "transform": {
                "path": "/echo?transformed=1",
                "delete_headers": ["x-secret"],
                "set_headers": [{"name": "x-added", "value": "yes"}],
            },
        }
        status, echo = await get_json(
            client, "/json-replay?b=" + quote(json.dumps(body)), headers={"x-secret": "s"}
        )
        assert status == 200
        assert echo["machine"] == target.id
        assert echo["path"] == "/echo?transformed=1"
        assert "x-secret" not in echo["headers"]
        assert echo["headers"]["x-added"] == "yes"


async def test_timeout_with_force_self_fallback() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[1]
        body = {
            "instance": target.id,
            "timeout": "300ms",
            "fallback": "force_self",
            "transform": {"path": "/slow?s=3"},
        }
        began = time.monotonic()
        status, echo = await get_json(client, "/json-replay?b=" + quote(json.dumps(body)))
        assert status == 200
        assert time.monotonic() - began < 2.5
        failed = echo["headers"]["fly-replay-failed"]
        assert "reason=timeout" in failed
        origin = re.search(r"replay_source=([0-9a-f]{14})", failed)
        assert origin and echo["machine"] == origin.group(1)
        body.pop("fallback")
        status, err = await get_json(client, "/json-replay?b=" + quote(json.dumps(body)))
        assert (status, err["error"]) == (504, "timeout")


async def test_body_limit_and_replay_loop() -> None:
    async with running(machines=2) as (emulator, client):
        target = emulator.fleet.machines[1].id
        status, echo = await get_json(
            client, f"/replay?h=instance={target}", method="POST", data=b"x" * MiB
        )
        assert (status, echo["body_size"]) == (200, MiB)
        status, body = await get_json(
            client, f"/replay?h=instance={target}", method="POST", data=b"x" * (MiB + 1)
        )
        assert (status, body["error"]) == (502, "body_too_large")
        status, body = await get_json(client, "/replay-always?h=elsewhere=true")
        assert (status, body["error"]) == (502, "replay_loop")
        status, body = await get_json(
            client, "/replay-always?h=" + quote("instance=gone;fallback=prefer_self")
        )
        assert (status, body["error"]) == (502, "fallback_replayed")


async def test_client_routing_headers() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[2]
        for _ in range(3):
            _, echo = await get_json(client, "/echo", headers={"fly-force-instance-id": target.id})
            assert echo["machine"] == target.id
        _, echo = await get_json(client, "/echo", headers={"fly-prefer-instance-id": target.id})
        assert echo["machine"] == target.id
        await emulator.fleet.kill(target)
        status, body = await get_json(client, "/echo", headers={"fly-force-instance-id": target.id})
        assert (status, body["error"]) == (503, "forced_instance_unavailable")
        status, echo = await get_json(
            client, "/echo", headers={"fly-prefer-instance-id": target.id}
        )
        assert status == 200 and echo["machine"] != target.id
        assert echo["headers"]["fly-preferred-instance-unavailable"] == target.id


async def test_websocket_both_ways_and_handshake_replay() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[1].id
        async with client.ws_connect(f"/ws?h=instance={target}") as ws:
            assert await ws.receive_str() == target
            await ws.send_str("ping")
            assert await ws.receive_str() == f"{target}:ping"
        async with client.ws_connect("/ws") as ws:
            first = await ws.receive_str()
            await ws.send_str("x")
            assert await ws.receive_str() == f"{first}:x"


async def test_session_replay_cache_hits_after_one_replay() -> None:
    rules = [
        CacheRule("/", 300, "cookie", "fly-machine-id"),
        CacheRule("/api", 300, "header", "x-tenant"),
    ]
    async with running(cache_rules=rules) as (emulator, client):
        target = emulator.fleet.machines[1].id
        cookie = {"cookie": f"fly-machine-id={target}"}
        path = f"/replay?h=prefer_instance={target}&only={target}"
        # Make sure the first request lands elsewhere and is replayed.
        first_machine = emulator.fleet.machines[0].id
        _, echo = await get_json(
            client, path, headers={**cookie, "fly-prefer-instance-id": first_machine}
        )
        assert echo["machine"] == target
        assert echo["headers"]["fly-replay-cache-status"] == "miss"
        assert "fly-replay-src" in echo["headers"]
        for _ in range(5):
            _, echo = await get_json(client, path, headers=cookie)
            assert echo["machine"] == target
            assert echo["headers"]["fly-replay-cache-status"] == "hit"
            assert "fly-replay-src" not in echo["headers"]
        machines = {m.id: m for m in emulator.fleet.machines}
        assert machines[target].counters.cache_hits == 5
        assert sum(m.counters.replays for m in machines.values()) == 1
        # Another cookie value is another cache key.
        _, echo = await get_json(client, "/echo", headers={"cookie": "fly-machine-id=other"})
        assert "fly-replay-cache-status" not in echo["headers"]
        # A dead target is not served from the cache.
        await emulator.fleet.kill(machines[target])
        status, echo = await get_json(client, "/echo", headers=cookie)
        assert status == 200 and "fly-replay-cache-status" not in echo["headers"]


async def test_cacheable_replays_only_and_bypass() -> None:
    rules = [CacheRule("/", 300, "cookie", "k", allow_bypass=True)]
    async with running(cache_rules=rules) as (emulator, client):
        target = emulator.fleet.machines[1].id
        path = f"/replay?h={quote(f'instance={target};state=s')}&only={target}"
        await get_json(client, path, headers={"cookie": "k=1"})
        _, echo = await get_json(client, "/echo", headers={"cookie": "k=1"})
        assert "fly-replay-cache-status" not in echo["headers"]  # state= is never cached
        path = f"/replay?h=instance={target}&only={target}"
        await get_json(client, path, headers={"cookie": "k=2"})
        _, echo = await get_json(client, "/echo", headers={"cookie": "k=2"})
        assert echo["headers"]["fly-replay-cache-status"] == "hit"
        _, echo = await get_json(
            client, "/echo", headers={"cookie": "k=2", "fly-replay-cache-control": "skip"}
        )
        assert "fly-replay-cache-status" not in echo["headers"]


async def test_path_replay_cache_and_invalidate() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[2].id
        first = emulator.fleet.machines[0].id
        set_cache = (
            f"/replay?h=instance={target}&only={target}"
            "&x-resp-fly-replay-cache=127.0.0.1/replay*&x-resp-fly-replay-cache-ttl-secs=30"
        )
        await get_json(client, set_cache, headers={"fly-prefer-instance-id": first})
        for _ in range(3):
            _, echo = await get_json(client, f"/replay?h=instance={first}&only={target}")
            assert echo["machine"] == target
            assert echo["headers"]["fly-replay-cache-status"] == "hit"
        await get_json(client, f"/replay?only={target}&h=x&x-resp-fly-replay-cache=invalidate")
        _, echo = await get_json(client, "/echo")
        assert "fly-replay-cache-status" not in echo["headers"]


async def test_admin_kill_restart_add_and_counters() -> None:
    async with running(machines=2) as (_emulator, client):
        status, machines = await get_json(client, ADMIN_PREFIX + "/machines")
        assert status == 200 and len(machines) == 2
        victim = machines[0]["id"]
        status, _ = await get_json(client, f"{ADMIN_PREFIX}/machines/{victim}/kill", method="POST")
        assert status == 200
        for _ in range(4):
            _, echo = await get_json(client, "/echo")
            assert echo["machine"] != victim
        await get_json(client, f"{ADMIN_PREFIX}/machines/{victim}/restart", method="POST")
        status, added = await get_json(client, ADMIN_PREFIX + "/machines", method="POST")
        assert status == 201
        seen = set()
        for _ in range(9):
            _, echo = await get_json(client, "/echo")
            seen.add(echo["machine"])
        assert seen == {victim, machines[1]["id"], added["id"]}
        _, machines = await get_json(client, ADMIN_PREFIX + "/machines")
        assert sum(m["served"] for m in machines) == 13
        assert all(m["state"] == "started" for m in machines)


async def test_machine_that_never_comes_up_is_a_clear_error(tmp_path: Any) -> None:
    crash = tmp_path / "crash.py"
    crash.write_text("import sys; print('missing DATABASE_URL'); sys.exit(3)\n")
    with pytest.raises(MachineError, match=r"exited with code 3.*\n.*missing DATABASE_URL"):
        async with running(command=["python3", str(crash)], machines=1):
            pass
    with pytest.raises(MachineError, match="cannot run 'no-such-command-xyz'"):
        async with running(command=["no-such-command-xyz"], machines=1):
            pass


async def test_port_in_use_is_a_clear_error() -> None:
    from flysticky.proxy.emulator import Emulator
    from flysticky.proxy.machines import Fleet

    async with running(machines=1) as (busy, _):
        emulator = Emulator(Fleet(ECHO), port=busy.port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{busy.port}"):
            await emulator.start(1)
        assert emulator.fleet.machines == []


async def test_concurrent_requests_spread_and_complete() -> None:
    async with running() as (_emulator, client):
        results = await asyncio.gather(*(get_json(client, "/echo") for _ in range(60)))
        assert all(status == 200 for status, _ in results)
        assert len({echo["machine"] for _, echo in results}) == 3


async def test_json_replay_cache_prefix_and_invalidate() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[1].id
        remember = {"instance": target, "cache": {"prefix": "127.0.0.1/echo*", "ttl": 30}}
        await get_json(client, "/json-replay?b=" + quote(json.dumps(remember)))
        for _ in range(3):
            _, echo = await get_json(client, "/echo")
            assert (echo["machine"], echo["headers"]["fly-replay-cache-status"]) == (target, "hit")
        forget = {"instance": target, "cache": {"prefix": "127.0.0.1/echo*", "invalidate": True}}
        await get_json(client, "/json-replay?b=" + quote(json.dumps(forget)))
        _, echo = await get_json(client, "/echo")
        assert "fly-replay-cache-status" not in echo["headers"]
