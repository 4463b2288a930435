"""The emulator's internal DNS against fly-platform.md's "Private network (6PN) and internal
DNS": every name follows the machines' states, and each machine is reachable on its own
private address and the fleet's one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv6Address

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from flysticky.proxy import machines as machines_module
from flysticky.proxy.dns import TTL, InternalDns, Vm, answer
from flysticky.proxy.machines import MAX_MACHINES, Machine, address_text, free_port

from .emulator_fixtures import ECHO, HERE, running

APP = "sticky-test"


def resolver_for(address: tuple[str, int]) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [address[0]]
    resolver.port = address[1]
    resolver.lifetime = 5
    return resolver


async def txt(resolver: dns.asyncresolver.Resolver, name: str) -> str | None:
    """The TXT record's strings joined (a long one comes in pieces), None for NXDOMAIN."""
    try:
        found = await resolver.resolve(name, "TXT")
    except dns.resolver.NXDOMAIN:
        return None
    assert found.rrset is not None and len(found.rrset) == 1
    assert found.rrset.ttl == TTL
    return b"".join(found.rrset[0].strings).decode()


async def aaaa(resolver: dns.asyncresolver.Resolver, name: str) -> list[IPv6Address] | None:
    try:
        found = await resolver.resolve(name, "AAAA")
    except dns.resolver.NXDOMAIN:
        return None
    assert found.rrset is not None and found.rrset.ttl == TTL
    return [IPv6Address(record.address) for record in found.rrset]


async def rcode(address: tuple[str, int], name: str, rdtype: str = "TXT") -> dns.rcode.Rcode:
    query = dns.message.make_query(name, rdtype)
    response = await dns.asyncquery.udp(query, address[0], port=address[1], timeout=5)
    return response.rcode()


def listing(machines: list[Machine]) -> str:
    return ",".join(f"{m.id} {m.region}" for m in machines)


async def test_every_name_answers_for_started_machines() -> None:
    async with running(machines=3, regions=("iad", "ams")) as (emulator, _):
        iad1, ams, iad2 = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        assert await txt(resolver, f"vms.{APP}.internal") == listing([iad1, ams, iad2])
        assert await txt(resolver, f"all.vms.{APP}.internal") == listing([iad1, ams, iad2])
        assert await txt(resolver, f"regions.{APP}.internal") == "iad,ams"
        assert await txt(resolver, f"all.regions.{APP}.internal") == "iad,ams"
        for machine in (iad1, ams, iad2):
            assert await aaaa(resolver, f"{machine.id}.vm.{APP}.internal") == [machine.private_ip]
        assert await aaaa(resolver, f"{APP}.internal") == [
            iad1.private_ip,
            ams.private_ip,
            iad2.private_ip,
        ]
        assert await aaaa(resolver, f"iad.{APP}.internal") == [iad1.private_ip, iad2.private_ip]
        assert await aaaa(resolver, f"ams.{APP}.internal") == [ams.private_ip]
        assert await aaaa(resolver, f"fra.{APP}.internal") is None
        # Nearest: the primary region (iad) first.
        assert await aaaa(resolver, f"top2.nearest.of.{APP}.internal") == [
            iad1.private_ip,
            iad2.private_ip,
        ]
        assert await aaaa(resolver, f"top9.nearest.of.{APP}.internal") == [
            iad1.private_ip,
            iad2.private_ip,
            ams.private_ip,
        ]
        assert await aaaa(resolver, f"top0.nearest.of.{APP}.internal") is None


@pytest.mark.parametrize("change", ["stop", "suspend", "kill"])
async def test_a_machine_not_started_leaves_vms_and_keeps_all_vms(change: str) -> None:
    async with running(machines=2, regions=("iad", "ams")) as (emulator, _):
        iad, ams = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        await getattr(emulator.fleet, change)(ams)
        assert await txt(resolver, f"vms.{APP}.internal") == listing([iad])
        assert await txt(resolver, f"all.vms.{APP}.internal") == listing([iad, ams])
        assert await txt(resolver, f"regions.{APP}.internal") == "iad"
        assert await txt(resolver, f"all.regions.{APP}.internal") == "iad,ams"
        assert await aaaa(resolver, f"{ams.id}.vm.{APP}.internal") is None
        assert await aaaa(resolver, f"ams.{APP}.internal") is None
        assert await aaaa(resolver, f"{APP}.internal") == [iad.private_ip]
        # Started again: back, at the same address.
        address = ams.private_ip
        await emulator.fleet.start(ams)
        assert await txt(resolver, f"vms.{APP}.internal") == listing([iad, ams])
        assert await aaaa(resolver, f"{ams.id}.vm.{APP}.internal") == [address]


async def test_a_machine_that_dies_on_its_own_leaves_vms() -> None:
    async with running(machines=2) as (emulator, _):
        first, second = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        assert second.pid is not None
        os.kill(second.pid, signal.SIGKILL)
        while second.facts().state != "crashed":
            await asyncio.sleep(0.02)
        assert await txt(resolver, f"vms.{APP}.internal") == listing([first])
        assert await txt(resolver, f"all.vms.{APP}.internal") == listing([first, second])


async def test_no_started_machine_leaves_the_started_names_empty() -> None:
    async with running(machines=1) as (emulator, _):
        (machine,) = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        await emulator.fleet.stop(machine)
        assert await txt(resolver, f"vms.{APP}.internal") is None
        assert await txt(resolver, f"regions.{APP}.internal") is None
        assert await aaaa(resolver, f"{APP}.internal") is None
        assert await txt(resolver, f"all.vms.{APP}.internal") == listing([machine])


async def test_destroyed_and_added_machines() -> None:
    async with running(machines=2, regions=("iad", "ams")) as (emulator, _):
        iad, ams = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        await emulator.destroy(ams)
        assert await txt(resolver, f"vms.{APP}.internal") == listing([iad])
        assert await txt(resolver, f"all.vms.{APP}.internal") == listing([iad])
        assert await txt(resolver, f"all.regions.{APP}.internal") == "iad"
        assert await aaaa(resolver, f"{ams.id}.vm.{APP}.internal") is None
        added = await emulator.fleet.add("fra")
        assert await txt(resolver, f"vms.{APP}.internal") == listing([iad, added])
        assert await txt(resolver, f"all.regions.{APP}.internal") == "iad,fra"
        # A new machine gets a new address, not the destroyed one's.
        assert added.private_ip not in (iad.private_ip, ams.private_ip)
        assert await aaaa(resolver, f"{added.id}.vm.{APP}.internal") == [added.private_ip]


async def test_each_machine_listens_on_its_own_address_and_the_fleets_port() -> None:
    async with running(machines=3) as (emulator, client):
        machines = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        host, port = emulator.dns_address
        assert len({m.port for m in machines}) == 1
        assert len({m.host for m in machines}) == 3
        for machine in machines:
            (address,) = await aaaa(resolver, f"{machine.id}.vm.{APP}.internal") or []
            async with client.get(f"http://[{address}]:{machine.port}/echo") as response:
                echo = await response.json()
            assert echo["machine"] == machine.id
            assert echo["host_env"] == machine.host
            assert IPv6Address(echo["private_ip"]) == address
            assert echo["private_ip"] == f"::ffff:{machine.host}"
            assert echo["resolver"] == f"{host}:{port}"
        # The admin API lists them too.
        listed = {m["id"]: (m["host"], m["port"], m["private_ip"]) for m in emulator.describe()}
        assert listed == {m.id: (m.host, m.port, address_text(m.private_ip)) for m in machines}


async def test_a_restarted_machine_keeps_its_address_and_port() -> None:
    async with running(machines=1) as (emulator, client):
        (machine,) = emulator.fleet.machines
        before = (machine.host, machine.port, machine.private_ip, machine.pid)
        await emulator.fleet.restart(machine)
        assert (machine.host, machine.port, machine.private_ip) == before[:3]
        assert machine.pid != before[3]
        async with client.get(f"http://[{machine.private_ip}]:{machine.port}/echo") as response:
            assert (await response.json())["pid"] == machine.pid


async def test_names_are_case_insensitive() -> None:
    async with running(machines=1) as (emulator, _):
        (machine,) = emulator.fleet.machines
        resolver = resolver_for(emulator.dns_address)
        assert await txt(resolver, "VMS.Sticky-Test.INTERNAL") == listing([machine])
        assert await aaaa(resolver, f"{machine.id.upper()}.VM.{APP.upper()}.Internal") == [
            machine.private_ip
        ]
        found = await resolver.resolve("Vms.Sticky-Test.Internal", "TXT")
        assert found.rrset is not None and found.rrset.name.to_text() == "Vms.Sticky-Test.Internal."


async def test_existing_names_asked_for_another_type_have_no_answer() -> None:
    async with running(machines=1) as (emulator, _):
        (machine,) = emulator.fleet.machines
        address = emulator.dns_address
        assert await rcode(address, f"{machine.id}.vm.{APP}.internal", "A") == dns.rcode.NOERROR
        assert await rcode(address, f"vms.{APP}.internal", "AAAA") == dns.rcode.NOERROR
        assert await rcode(address, f"{APP}.internal", "TXT") == dns.rcode.NOERROR
        resolver = resolver_for(address)
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve(f"{machine.id}.vm.{APP}.internal", "A")
        for name in (f"nothing.{APP}.internal", f"x.vms.{APP}.internal", f"0bad.vm.{APP}.internal"):
            assert await rcode(address, name) == dns.rcode.NXDOMAIN, name


async def test_names_outside_the_app_are_refused() -> None:
    async with running(machines=1) as (emulator, _):
        address = emulator.dns_address
        for name in ("example.com", "internal", "other-app.internal", f"{APP}.internal.example"):
            assert await rcode(address, name) == dns.rcode.REFUSED, name
        query = dns.message.make_query(f"vms.{APP}.internal", "TXT", rdclass="CH")
        response = await dns.asyncquery.udp(query, address[0], port=address[1], timeout=5)
        assert response.rcode() == dns.rcode.REFUSED


async def test_malformed_packets_are_dropped_and_the_server_goes_on() -> None:
    async with running(machines=1) as (emulator, _):
        host, port = emulator.dns_address
        reply = dns.message.make_response(dns.message.make_query(f"vms.{APP}.internal", "TXT"))
        garbage = [
            b"",
            b"\x00",
            b"\xff" * 11,  # shorter than a header
            b"\x12\x34" + b"\xff" * 40,  # counts that promise what is not there
            dns.message.make_query(f"vms.{APP}.internal", "TXT").to_wire() + b"junk",
            reply.to_wire(),  # a response, not a query: never answered (no loops)
        ]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((host, port))
            for packet in garbage:
                await loop.sock_sendall(sock, packet)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await loop.sock_recv(sock, 4096)
        # Over TCP a malformed message ends the connection.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(len(b"\xff" * 11).to_bytes(2, "big") + b"\xff" * 11)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert await txt(resolver_for((host, port)), f"vms.{APP}.internal") is not None


def fleet_of(count: int) -> list[Vm]:
    return [
        Vm(
            f"{n:014x}",
            ("iad", "ams", "fra", "nrt")[n % 4],
            "started" if n % 3 else "stopped",
            IPv6Address(f"::ffff:127.0.1.{n}"),
        )
        for n in range(count)
    ]


def test_a_fleet_of_32_fits_in_one_txt_record_of_several_strings() -> None:
    vms = fleet_of(MAX_MACHINES)
    query = dns.message.make_query(f"all.vms.{APP}.internal", "TXT")
    (rrset,) = answer(query, APP, "iad", vms).answer
    (record,) = rrset
    assert len(record.strings) == 3
    assert all(len(string) <= 255 for string in record.strings)
    assert b"".join(record.strings).decode() == ",".join(f"{vm.id} {vm.region}" for vm in vms)


async def serve(vms: list[Vm], check: Callable[[tuple[str, int]], Awaitable[None]]) -> None:
    server = InternalDns(APP, "iad", lambda: vms)
    await server.start()
    try:
        await check(server.address)
    finally:
        await server.close()


async def test_answers_too_big_for_udp_come_whole_over_tcp() -> None:
    vms = fleet_of(MAX_MACHINES)
    started = [vm for vm in vms if vm.state == "started"]

    async def check(address: tuple[str, int]) -> None:
        query = dns.message.make_query(f"{APP}.internal", "AAAA")
        truncated = await dns.asyncquery.udp(query, address[0], port=address[1], timeout=5)
        assert truncated.flags & dns.flags.TC and not truncated.answer
        # dnspython's resolver retries over TCP on its own.
        resolver = resolver_for(address)
        assert await aaaa(resolver, f"{APP}.internal") == [vm.address for vm in started]
        assert await txt(resolver, f"all.vms.{APP}.internal") == ",".join(
            f"{vm.id} {vm.region}" for vm in vms
        )
        # An asker that takes more over UDP (EDNS) gets it whole.
        query = dns.message.make_query(f"{APP}.internal", "AAAA", use_edns=0, payload=4096)
        whole = await dns.asyncquery.udp(query, address[0], port=address[1], timeout=5)
        assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == len(started)

    await serve(vms, check)


async def test_without_own_loopback_addresses_machines_share_127_0_0_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(machines_module, "own_loopback_addresses", lambda: False)
    with caplog.at_level(logging.WARNING, logger=machines_module.__name__):
        async with running(machines=2) as (emulator, client):
            first, second = emulator.fleet.machines
            assert not emulator.fleet.private_network
            assert first.host == second.host == "127.0.0.1"
            assert first.port != second.port
            assert first.private_ip != second.private_ip
            resolver = resolver_for(emulator.dns_address)
            assert await aaaa(resolver, f"{second.id}.vm.{APP}.internal") == [second.private_ip]
            async with client.get("/echo", headers={"fly-force-instance-id": second.id}) as r:
                assert (await r.json())["machine"] == second.id
    (warning,) = [r for r in caplog.records if r.name == machines_module.__name__]
    assert "private network" in warning.getMessage()


def free_dns_port() -> int:
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free for both UDP and TCP")


async def test_the_proxy_banner_gives_the_resolver_to_copy() -> None:
    dns_port = free_dns_port()
    process = subprocess.Popen(
        [
            *[sys.executable, "-m", "flysticky.cli"],
            *["proxy", "--port", str(free_port()), "--dns-port", str(dns_port)],
            *["--app-name", APP, "--machines", "1", "--quiet", "--", *ECHO],
        ],
        cwd=HERE.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        resolver = resolver_for(("127.0.0.1", dns_port))
        resolver.lifetime = 0.5
        deadline = time.monotonic() + 30
        while True:
            # Until the proxy listens: no answer (a timeout), or NXDOMAIN (none started).
            with contextlib.suppress(dns.exception.DNSException):
                if await txt(resolver, f"vms.{APP}.internal"):
                    break
            assert time.monotonic() < deadline and process.poll() is None
            await asyncio.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert f"FLYSTICKY_RESOLVER=127.0.0.1:{dns_port} FLY_APP_NAME={APP}" in err, err
    assert f"dig @127.0.0.1 -p {dns_port} +short TXT vms.{APP}.internal" in err
