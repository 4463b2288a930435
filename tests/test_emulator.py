"""The local Fly proxy emulator against tiny real backends: each rule of fly-platform.md."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from flysticky.proxy.cache import CacheRule
from flysticky.proxy.emulator import ADMIN_PREFIX, Emulator
from flysticky.proxy.flytoml import AutoStop, Autostop
from flysticky.proxy.machines import MAX_MACHINES, Fleet, Machine, MachineError

from .emulator_fixtures import ECHO, assert_all_stopped, running

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
        await emulator.destroy(target)
        status, echo = await get_json(client, f"/replay?h=prefer_instance={target.id}")
        assert status == 200
        assert echo["machine"] != target.id
        assert echo["headers"]["fly-preferred-instance-unavailable"] == target.id


async def test_instance_to_a_dead_machine_errors_or_falls_back() -> None:
    async with running() as (emulator, client):
        target = emulator.fleet.machines[0]
        await emulator.destroy(target)
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
        await emulator.destroy(target)
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
        # A destroyed target is not served from the cache.
        await emulator.destroy(machines[target])
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


# ---------------------------------------------------------------------- machine states
def process_state(pid: int) -> str:
    """The kernel's state letter for a process: T when stopped by SIGSTOP."""
    text = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    return text.rsplit(")", 1)[1].split()[0]


async def visits(client: aiohttp.ClientSession, machine_id: str) -> dict[str, Any]:
    status, body = await get_json(client, "/count", headers={"fly-force-instance-id": machine_id})
    assert status == 200, body
    return dict(body)


async def test_suspended_machine_is_resumed_with_its_memory() -> None:
    async with running(machines=2) as (emulator, client):
        target = emulator.fleet.machines[1]
        assert (await visits(client, target.id))["visits"] == 1
        pid = target.pid
        assert pid is not None
        await emulator.fleet.suspend(target)
        assert target.facts().state == "suspended" and process_state(pid) == "T"
        for _ in range(4):  # load balancing leaves it alone
            assert (await get_json(client, "/echo"))[1]["machine"] != target.id
        _, echo = await get_json(client, f"/replay?h=prefer_instance={target.id}")
        assert echo["machine"] == target.id
        assert "fly-preferred-instance-unavailable" not in echo["headers"]
        assert target.pid == pid and process_state(pid) != "T"
        assert (await visits(client, target.id))["visits"] == 2  # memory kept


async def test_stopped_machine_is_started_by_a_replay_and_has_lost_its_memory() -> None:
    async with running(machines=2) as (emulator, client):
        target = emulator.fleet.machines[1]
        assert (await visits(client, target.id))["visits"] == 1
        await emulator.fleet.stop(target)
        assert target.facts().state == "stopped"
        _, echo = await get_json(client, f"/replay?h=instance={target.id}")
        assert echo["machine"] == target.id
        assert (await visits(client, target.id))["visits"] == 2 - 1  # a new process
        await emulator.fleet.stop(target)
        after = await visits(client, target.id)  # fly-force-instance-id starts it too
        assert after["visits"] == 1 and after["machine"] == target.id


async def test_crashed_machine_is_restarted_when_a_request_is_aimed_at_it() -> None:
    async with running(machines=2) as (emulator, client):
        target = emulator.fleet.machines[1]
        await emulator.fleet.kill(target)
        assert target.facts().state == "crashed"
        _, echo = await get_json(client, f"/replay?h=prefer_instance={target.id}")
        assert echo["machine"] == target.id
        assert target.facts().state == "started"


async def test_prefer_instance_goes_elsewhere_when_its_machine_cannot_start(tmp_path: Any) -> None:
    broken = tmp_path / "broken"
    async with running(machines=2, env={"FAIL_START_FILE": str(broken)}) as (emulator, client):
        target = emulator.fleet.machines[1]
        await emulator.fleet.kill(target)
        broken.touch()
        status, echo = await get_json(client, f"/replay?h=prefer_instance={target.id}")
        assert status == 200 and echo["machine"] != target.id
        assert echo["headers"]["fly-preferred-instance-unavailable"] == target.id
        status, body = await get_json(client, f"/replay?h=instance={target.id}")
        assert (status, body["error"]) == (502, "no_candidate")


async def test_a_machine_that_exits_by_itself_is_crashed_and_its_children_go_too() -> None:
    async with running(machines=1) as (emulator, client):
        machine = emulator.fleet.machines[0]
        _, child = await get_json(client, "/child")
        assert machine.pid is not None
        os.kill(machine.pid, signal.SIGKILL)
        for _ in range(100):
            if machine.facts().state == "crashed" and not pid_alive(child["pid"]):
                break
            await asyncio.sleep(0.05)
        assert machine.facts().state == "crashed"
        assert not pid_alive(child["pid"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return process_state(pid) != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode", ["stop", "suspend"])
async def test_autostop_stops_or_suspends_idle_machines_down_to_min(mode: AutoStop) -> None:
    async with running(machines=3, autostop=Autostop(mode, True, 1), idle_after=0.4) as (
        emulator,
        client,
    ):
        wanted = "stopped" if mode == "stop" else "suspended"
        for _ in range(100):
            states: list[str] = [m.facts().state for m in emulator.fleet.machines]
            if states.count(wanted) == 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(states) == sorted(["started", wanted, wanted])
        asleep = next(m for m in emulator.fleet.machines if m.facts().state == wanted)
        _, echo = await get_json(client, f"/replay?h=instance={asleep.id}")
        assert echo["machine"] == asleep.id


async def test_machines_get_a_loopback_host_of_their_own() -> None:
    async with running(machines=1) as (emulator, client):
        host = (await get_json(client, "/echo"))[1]["host_env"]
        assert host == emulator.fleet.machines[0].host
        assert ipaddress.ip_address(host).is_loopback


async def test_machines_share_one_port_and_each_has_its_own_address() -> None:
    async with running(machines=3) as (emulator, _):
        machines = emulator.fleet.machines
        assert len({m.port for m in machines}) == 1  # Fly's internal_port
        assert len({m.host for m in machines}) == 3


async def test_port_per_machine_for_apps_that_cannot_listen_on_host() -> None:
    async with running(machines=3, private_network=False) as (emulator, client):
        machines = emulator.fleet.machines
        assert {m.host for m in machines} == {"127.0.0.1"}
        assert len({m.port for m in machines}) == 3
        assert (await get_json(client, "/echo"))[0] == 200


async def test_an_app_that_ignores_host_gets_a_clear_error() -> None:
    # Listens on 127.0.0.1 whatever $HOST says: the machines cannot share the port there.
    ignores_host = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    fleet = Fleet(ignores_host, ready_timeout=5)
    emulator = Emulator(fleet, port=0)
    try:
        with pytest.raises(MachineError, match=r"must listen on \$HOST.*--port-per-machine"):
            await emulator.start(2)
    finally:
        await emulator.close()


async def test_overlapping_restarts_leave_no_orphan() -> None:
    async with running(machines=1) as (emulator, _):
        machine = emulator.fleet.machines[0]
        await asyncio.gather(*(emulator.fleet.restart(machine) for _ in range(3)))
        assert processes_of(machine.id) == [machine.pid]


def processes_of(machine_id: str) -> list[int]:
    """Every live process whose environment says it is this machine."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = open(f"/proc/{entry}/environ", "rb").read()  # noqa: SIM115
        except OSError:
            continue
        if f"FLY_MACHINE_ID={machine_id}".encode() in environ.split(b"\0") and pid_alive(
            int(entry)
        ):
            found.append(int(entry))
    return found


# ---------------------------------------------------------------------- bodies and failures
async def test_large_upload_streams_without_buffering() -> None:
    size = 96 * MiB

    async def upload() -> AsyncIterator[bytes]:
        chunk = b"x" * (256 * 1024)
        for _ in range(size // len(chunk)):
            yield chunk

    async with running(machines=1) as (_emulator, client):
        tracemalloc.start()
        try:
            status, echo = await get_json(
                client,
                "/sink",
                method="POST",
                data=upload(),
                headers={"content-length": str(size)},
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (status, echo["body_size"]) == (200, size)
        assert peak < 16 * MiB, f"the proxy held {peak / MiB:.0f} MiB for a {size // MiB} MiB body"


async def test_a_request_whose_machine_died_is_not_sent_again() -> None:
    async with running(machines=3) as (emulator, client):
        status, body = await get_json(client, "/die", method="POST", data=b"charge the card")
        assert (status, body["error"]) == (502, "machine_failed")
        for _ in range(40):  # the process is reaped a moment after its connection drops
            states = [m.facts().state for m in emulator.fleet.machines]
            if "crashed" in states:
                break
            await asyncio.sleep(0.05)
        assert states.count("crashed") == 1, states


async def test_a_long_output_line_does_not_hang_the_machine() -> None:
    async with running(machines=1) as (emulator, client):
        for n in (200_000, *[4000] * 60):
            status, _ = await asyncio.wait_for(get_json(client, f"/shout?n={n}"), 10)
            assert status == 200
        machine = emulator.fleet.machines[0]
        assert any(line.endswith("[line cut at 64 KiB]") for line in machine.output)


# ---------------------------------------------------------------------- bad app answers
@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/json-replay?b=" + quote('{"instance": 5}'), "invalid_replay"),
        (
            "/json-replay?b=" + quote('{"region": "iad", "transform": {"path": "@127.0.0.2:1/x"}}'),
            "invalid_replay",
        ),
        (
            "/json-replay?b="
            + quote('{"region": "iad", "transform": {"set_headers": [{"a": 1}]}}'),
            "invalid_replay",
        ),
        (
            "/replay?h=region=iad&x-resp-fly-replay-cache=127.0.0.1/x*"
            "&x-resp-fly-replay-cache-ttl-secs=soon",
            "invalid_replay",
        ),
    ],
)
async def test_bad_replay_answers_are_a_502_naming_the_problem(path: str, code: str) -> None:
    async with running(machines=1) as (_emulator, client):
        status, body = await get_json(client, path)
        assert (status, body["error"]) == (502, code), body


# ---------------------------------------------------------------------- websockets
async def test_websocket_close_codes_pass_both_ways() -> None:
    async with running(machines=1) as (emulator, client):
        machine = emulator.fleet.machines[0]
        async with client.ws_connect("/ws") as ws:
            assert await ws.receive_str() == machine.id
            await ws.close(code=4001)
            assert ws.close_code == 4001  # the proxy's reply echoes it (RFC 6455 5.5.1)
        for _ in range(50):
            _, stats = await get_json(client, "/ws-stats")
            if stats["last_close"] is not None:
                break
            await asyncio.sleep(0.05)
        assert stats == {"open": 0, "last_close": 4001}
        async with client.ws_connect("/ws") as ws:
            await ws.receive_str()
            await ws.send_str("close 4002")
            message = await ws.receive()
            assert (message.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 4002)


async def test_websocket_to_a_killed_machine_is_not_a_clean_close() -> None:
    async with running(machines=1) as (emulator, client), client.ws_connect("/ws") as ws:
        await ws.receive_str()
        await emulator.fleet.kill(emulator.fleet.machines[0])
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1011


async def test_a_failed_upgrade_leaves_no_socket_open_on_the_machine() -> None:
    async with running(machines=1) as (emulator, client):
        reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"  # no Sec-WebSocket-Key
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 400")
        _, stats = await get_json(client, "/ws-stats")
        assert stats["open"] == 0


async def test_clients_hanging_up_are_not_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    async with running(machines=2) as (emulator, client):
        with caplog.at_level(logging.DEBUG):

            async def hang_up(path: bytes) -> None:
                _, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.transport.abort()

            await asyncio.gather(*(hang_up(b"/slow?s=0.3") for _ in range(40)))
            await asyncio.gather(*(hang_up(b"/shout?n=300000") for _ in range(20)))
            wrk = shutil.which("wrk")
            if wrk is not None:
                process = await asyncio.create_subprocess_exec(
                    wrk,
                    "-t1",
                    "-c200",
                    "-d2s",
                    emulator.url + "/echo",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await asyncio.wait_for(process.wait(), 30)
            await asyncio.sleep(0.5)
            status, _ = await get_json(client, "/echo")
        assert status == 200
        tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]
        assert not tracebacks, [r.getMessage() for r in tracebacks[:3]]


# ---------------------------------------------------------------------- admin API
async def test_admin_api_refuses_cross_site_requests_and_bad_regions() -> None:
    async with running(machines=1) as (emulator, client):
        url = f"{ADMIN_PREFIX}/machines"
        for headers in (
            {"origin": "https://evil.example"},
            {"sec-fetch-site": "cross-site"},
            {"content-type": "application/x-www-form-urlencoded"},
            {"content-type": "text/plain"},
            {"host": "evil.example"},
        ):
            status, body = await get_json(client, url, method="POST", data=b"{}", headers=headers)
            assert status == 403, (headers, body)
        for region in ("zzz", "sea", "../x"):
            status, body = await get_json(client, url, method="POST", json={"region": region})
            assert status == 400, body
            assert "region" in body["error"]
        assert len(emulator.fleet.machines) == 1
        status, added = await get_json(client, url, method="POST", json={"region": "ams"})
        assert status == 201 and added["region"] == "ams"
        status, body = await get_json(client, url, method="POST", headers={"origin": emulator.url})
        assert status == 201
        assert len(emulator.fleet.machines) == 3


async def test_admin_api_takes_its_own_origin_under_every_loopback_name() -> None:
    async with running(machines=1) as (emulator, client):
        url = f"{ADMIN_PREFIX}/machines"
        assert emulator.url.startswith("http://127.0.0.1:")
        port = emulator.port
        for origin in (f"http://localhost:{port}", f"http://[::1]:{port}", emulator.url):
            status, body = await get_json(client, url, headers={"origin": origin})
            assert status == 200, (origin, body)
        for origin in (f"http://localhost:{port + 1}", f"https://localhost:{port}", "null"):
            status, body = await get_json(client, url, headers={"origin": origin})
            assert status == 403, (origin, body)


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "Text/Plain"],
)
async def test_admin_api_refuses_form_types_even_without_a_body(content_type: str) -> None:
    async with running(machines=1) as (emulator, client):
        status, body = await get_json(
            client,
            f"{ADMIN_PREFIX}/machines?region=ams",
            method="POST",
            headers={"content-type": content_type},
        )
        assert status == 403, body
        assert "Content-Type" in body["error"]
        assert len(emulator.fleet.machines) == 1
        status, body = await get_json(client, f"{ADMIN_PREFIX}/machines?region=ams", method="POST")
        assert (status, body["region"]) == (201, "ams")  # bare POST, as curl -X POST sends


def test_url_to_open_is_a_loopback_when_listening_on_every_interface() -> None:
    fleet = Fleet(ECHO)  # nothing started: only the URL is asked for
    for host, url in [
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
        ("localhost", "http://localhost:8080"),
    ]:
        assert Emulator(fleet, host=host, port=8080).url == url


async def test_a_fleet_runs_at_most_max_machines() -> None:
    fleet = Fleet(ECHO)
    fleet.machines = [Machine(f"{i:014x}", "iad", 1) for i in range(MAX_MACHINES)]
    with pytest.raises(ValueError, match=f"at most {MAX_MACHINES} at once"):
        await fleet.add()
    assert len(fleet.machines) == MAX_MACHINES and not any(m.pid for m in fleet.machines)
    fleet.machines[0].state = "destroyed"  # a destroyed one no longer counts
    machine = await fleet.add()
    try:
        assert machine.alive
    finally:
        await fleet.close()
        assert_all_stopped([machine.pid])


async def test_admin_api_changes_machine_states() -> None:
    async with running(machines=2) as (emulator, client):
        machine = emulator.fleet.machines[1].id
        for action, state in [
            ("suspend", "suspended"),
            ("resume", "started"),
            ("stop", "stopped"),
            ("start", "started"),
            ("crash", "crashed"),
            ("restart", "started"),
            ("destroy", "destroyed"),
        ]:
            status, body = await get_json(
                client, f"{ADMIN_PREFIX}/machines/{machine}/{action}", method="POST"
            )
            assert (status, body.get("state")) == (200, state), (action, body)
        status, body = await get_json(
            client, f"{ADMIN_PREFIX}/machines/{machine}/start", method="POST"
        )
        assert status == 404
