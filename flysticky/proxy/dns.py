"""Fly's internal DNS (``<app>.internal``) for the emulated fleet, on a local port.

On Fly a machine asks ``fdaa::3`` (its /etc/resolv.conf) about the app's machines; here the
machines are told ``FLYSTICKY_RESOLVER=127.0.0.1:<port>`` instead, which flysticky's
discovery reads in place of /etc/resolv.conf. Every answer is built from the machines as
they are at that moment (shared/fly-platform.md, "Private network (6PN) and internal DNS"):

- TXT ``vms.<app>.internal``: ``<id> <region>,<id> <region>...`` of the started machines;
- TXT ``all.vms.<app>.internal``: the same for every machine not destroyed;
- TXT ``regions.<app>.internal`` / ``all.regions.<app>.internal``: their region codes;
- AAAA ``<id>.vm.<app>.internal``: that machine's private address, if it is started;
- AAAA ``<app>.internal`` / ``<region>.<app>.internal``: the started machines' (of that
  region); ``top<N>.nearest.of.<app>.internal``: N of them, nearest first.

Where Fly's documents say nothing, the emulator's choices:

- "not destroyed" is started, stopped, suspended, crashed (to Fly a stopped machine), and
  the moments in between (starting, stopping);
- "nearest" is the primary region's machines first, then the others, each in the order
  they were added: the emulator does not place the asker; records keep that order (they
  are not shuffled), so answers are the same every time;
- a name with no record at the moment (no started machine in that region, a stopped
  machine's ``vm`` name, ``vms`` while none is started) is NXDOMAIN; a name that has
  records, asked for another type, is NOERROR with no answer;
- a name outside ``<app>.internal`` is REFUSED: the emulator serves one app and
  resolves nothing else; malformed packets are dropped;
- TTL 5 s: machines change state in seconds, and Fly's own TTL is not documented.

A TXT string is at most 255 bytes (RFC 1035), so a long list (32 machines: ~600 bytes)
is one record of several character-strings, which clients must join.
UDP answers larger than the asker takes (512 bytes, or its EDNS size) are sent truncated
(TC), and whole over TCP on the same port: 32 machines' AAAA records need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from .routing import State

TTL = 5
#: RFC 1035: one TXT character-string holds at most 255 bytes.
TXT_STRING_BYTES = 255
#: RFC 1035: what a UDP answer may hold for an asker that sent no EDNS size.
UDP_BYTES = 512
TCP_BYTES = 65535
TCP_IDLE_SECONDS = 10.0
_TOP = re.compile(r"top([1-9][0-9]{0,3})")


@dataclass(frozen=True)
class Vm:
    """A machine as the internal DNS sees it."""

    id: str
    region: str
    state: State
    address: IPv6Address


@dataclass(frozen=True)
class Records:
    """What a name has: records of one type (none: the name does not exist now)."""

    rdtype: dns.rdatatype.RdataType
    rdatas: list[dns.rdata.Rdata]


def _txt(items: Iterable[str]) -> Records:
    text = ",".join(items).encode()
    if not text:
        return Records(dns.rdatatype.TXT, [])
    strings = [text[at : at + TXT_STRING_BYTES] for at in range(0, len(text), TXT_STRING_BYTES)]
    return Records(
        dns.rdatatype.TXT,
        [dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)],
    )


def _aaaa(vms: Iterable[Vm]) -> Records:
    return Records(
        dns.rdatatype.AAAA,
        [dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.AAAA, str(vm.address)) for vm in vms],
    )


def _regions(vms: Iterable[Vm]) -> list[str]:
    return list(dict.fromkeys(vm.region for vm in vms))


def records(labels: Sequence[str], vms: Sequence[Vm], primary_region: str) -> Records:
    """The records of the name ``<labels>.<app>.internal``, labels in lower case."""
    started = [vm for vm in vms if vm.state == "started"]
    deployed = [vm for vm in vms if vm.state != "destroyed"]
    match tuple(labels):
        case ():
            return _aaaa(started)
        case ("vms",):
            return _txt(f"{vm.id} {vm.region}" for vm in started)
        case ("all", "vms"):
            return _txt(f"{vm.id} {vm.region}" for vm in deployed)
        case ("regions",):
            return _txt(_regions(started))
        case ("all", "regions"):
            return _txt(_regions(deployed))
        case (machine_id, "vm"):
            return _aaaa(vm for vm in started if vm.id == machine_id)
        case (top, "nearest", "of") if (count := _TOP.fullmatch(top)) is not None:
            nearest = sorted(started, key=lambda vm: vm.region != primary_region)
            return _aaaa(nearest[: int(count[1])])
        case (region,):
            return _aaaa(vm for vm in started if vm.region == region)
    return Records(dns.rdatatype.AAAA, [])


def answer(
    query: dns.message.Message, app: str, primary_region: str, vms: Sequence[Vm]
) -> dns.message.Message:
    """The response to a query; a query that is itself a response raises FormError."""
    response = dns.message.make_response(query)
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    question = query.question[0]
    zone = dns.name.from_text(f"{app}.internal")
    if question.rdclass != dns.rdataclass.IN or not question.name.is_subdomain(zone):
        response.set_rcode(dns.rcode.REFUSED)
        return response
    response.flags |= dns.flags.AA
    relative = question.name.relativize(zone)
    labels = [label.decode(errors="replace").lower() for label in relative.labels]
    found = records(labels, vms, primary_region)
    if not found.rdatas:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif found.rdtype == question.rdtype:
        response.answer.append(dns.rrset.from_rdata_list(question.name, TTL, found.rdatas))
    return response


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: InternalDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.server.reply(data, stream=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error for an earlier reply (the asker left): nothing to do."""


class InternalDns:
    """Answers ``<app>.internal`` on ``host``, UDP and TCP on one port."""

    def __init__(
        self,
        app: str,
        primary_region: str,
        vms: Callable[[], Sequence[Vm]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.app = app
        self.primary_region = primary_region
        self.vms = vms
        self.host = host
        self.port = port
        self._datagrams: asyncio.DatagramTransport | None = None
        self._stream: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def reply(self, wire: bytes, *, stream: bool) -> bytes | None:
        """The answer's bytes, or None for a packet that is not a query to answer."""
        try:
            query = dns.message.from_wire(wire)
            response = answer(query, self.app, self.primary_region, self.vms())
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return None
        udp = max(UDP_BYTES, query.payload) if query.edns >= 0 else UDP_BYTES
        return response.to_wire(
            max_size=TCP_BYTES if stream else udp, prefer_truncation=True, want_shuffle=False
        )

    async def start(self) -> None:
        """Listen; with port 0, on a port free for both UDP and TCP."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            try:
                transport, _protocol = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self), local_addr=(self.host, self.port)
                )
            except OSError as error:
                reason = error.strerror or str(error)
                raise OSError(f"DNS: cannot listen on {self.host}:{self.port}: {reason}") from None
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._stream = await asyncio.start_server(self._serve_stream, self.host, port)
            except OSError as error:
                transport.close()
                if self.port != 0:
                    reason = error.strerror or str(error)
                    raise OSError(
                        f"DNS: cannot listen on {self.host}:{port} (TCP): {reason}"
                    ) from None
                continue  # that port is taken for TCP: another free UDP port
            self._datagrams, self.port = transport, port
            return
        raise OSError(f"DNS: no port on {self.host} is free for both UDP and TCP")

    async def close(self) -> None:
        if self._datagrams is not None:
            self._datagrams.close()
            self._datagrams = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        # Before Python 3.13 closing a server leaves its connections open.
        for writer in list(self._connections):
            writer.close()

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._connections.add(writer)
        try:
            # RFC 1035 4.2.2: each message is preceded by its length in two bytes.
            with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                while True:
                    async with asyncio.timeout(TCP_IDLE_SECONDS):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        wire = await reader.readexactly(size)
                    reply = self.reply(wire, stream=True)
                    if reply is None:
                        return
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        finally:
            self._connections.discard(writer)
            writer.close()
