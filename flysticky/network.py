"""Fly's private network (6PN): the app's machines from its internal DNS, and requests
forwarded to a machine directly when Fly cannot replay them.

Discovery reads TXT ``all.vms.<app>.internal`` (or ``vms.<app>.internal``, see
``StickyConfig.owners``) in the background and keeps the Decider's ``Owners`` current;
nothing here is looked up on a request's path, except the address of the machine a
body over 1 MiB is forwarded to (the only way such a request can reach it). Fly's
resolver is the one ``/etc/resolv.conf`` names (fdaa::3); ``FLYSTICKY_RESOLVER=host:port``
names another (the local emulator's, or one a developer runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from multidict import CIMultiDict

from .config import StickyConfig
from .core import FORWARDED_HEADER, Decider
from .owners import is_machine_id

log = logging.getLogger("flysticky")

#: The variable naming a resolver other than /etc/resolv.conf's, as ``host:port``.
RESOLVER_ENV = "FLYSTICKY_RESOLVER"
#: How long a server start waits for discovery's first answer, so that its first
#: requests are routed; it serves them here if none comes in time.
FIRST_ANSWER_WAIT = 1.0
#: A DNS question's whole budget: a stuck resolver must not stall a forward for long.
DNS_LIFETIME = 2.0
#: Discovery keeps its last answer through failures this many intervals long, then
#: forgets it (every key is then served where it lands).
STALE_AFTER_INTERVALS = 6
#: Headers that belong to one connection, never forwarded (RFC 9110 7.6.1). Host is
#: kept: the machine answers for the app's name, not for its private address.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _parse_resolver(value: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, "53"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{RESOLVER_ENV}={value!r} is not host:port (such as 127.0.0.1:5353)")
    return host, int(port)


def make_resolver(
    environ: Callable[[str], str | None] = os.environ.get,
) -> dns.asyncresolver.Resolver:
    """The resolver discovery asks: ``FLYSTICKY_RESOLVER``'s, else /etc/resolv.conf's."""
    named = environ(RESOLVER_ENV)
    if named:
        host, port = _parse_resolver(named)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = DNS_LIFETIME
    resolver.timeout = DNS_LIFETIME / 2
    return resolver


def parse_vms(strings: Iterable[bytes]) -> list[str]:
    """Machine ids from a ``vms`` TXT answer: ``<id> <region>`` pairs, comma-separated,
    in one TXT string that DNS may have cut into pieces of 255 bytes (joined here)."""
    text = b"".join(strings).decode("ascii", "replace")
    ids = []
    for entry in text.split(","):
        fields = entry.split()
        if fields and is_machine_id(fields[0]):
            ids.append(fields[0])
    return ids


class Discovery:
    """The app's machines and their private addresses, from Fly's internal DNS."""

    def __init__(self, app_name: str, owners: str, resolver: dns.asyncresolver.Resolver) -> None:
        self.app_name = app_name
        prefix = "all.vms" if owners == "all" else "vms"
        self.members_name = f"{prefix}.{app_name}.internal"
        self.resolver = resolver

    async def members(self) -> list[str]:
        """One lookup of the machines that own keys. No answer at all (NXDOMAIN) means
        none; a failure to ask raises dns.exception.DNSException."""
        try:
            answer = await self.resolver.resolve(self.members_name, dns.rdatatype.TXT)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        ids: list[str] = []
        for record in answer:
            ids.extend(parse_vms(record.strings))
        return ids

    async def address(self, machine_id: str) -> str | None:
        """The private address of a started machine; None when it has none (stopped,
        suspended, gone) or DNS does not answer."""
        try:
            answer = await self.resolver.resolve(
                f"{machine_id}.vm.{self.app_name}.internal", dns.rdatatype.AAAA
            )
        except (dns.exception.DNSException, OSError) as error:
            log.info("no private address for machine %s: %s", machine_id, error)
            return None
        for record in answer:
            return str(record)
        return None

    async def keep_current(
        self, owners_update: Callable[[list[str] | None], bool], interval: float
    ) -> None:
        """Refresh the owners every ``interval`` seconds, forever. Failures keep the
        last answer for a while (a resolver hiccup must not move every key), then drop
        it: unknown owners mean requests are served where they land."""
        last_answer = 0.0
        failing = False
        while True:
            try:
                ids = await self.members()
            except (dns.exception.DNSException, OSError) as error:
                if not failing:
                    log.warning("flysticky discovery: %s failed: %s", self.members_name, error)
                    failing = True
                stale = (
                    last_answer
                    and time.monotonic() - last_answer > interval * STALE_AFTER_INTERVALS
                )
                if stale and owners_update(None):
                    log.warning("flysticky discovery: no answer for long; keys served here")
            else:
                if failing:
                    log.info("flysticky discovery: %s answers again", self.members_name)
                    failing = False
                last_answer = time.monotonic()
                if owners_update(ids):
                    log.info("flysticky discovery: machines %s", ", ".join(sorted(ids)) or "-")
            await asyncio.sleep(interval)


@dataclass
class Forwarded:
    """The answer of the machine a request was forwarded to, streamed."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]


class _Consumed:
    """A request body that says whether forwarding began reading it (then the request
    can no longer be served here)."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._body:
            yield chunk


class PrivateNetwork:
    """What one machine's adapter starts with its server: discovery, when the config
    routes by key or session id, and forwarding of bodies too big to replay."""

    def __init__(
        self,
        config: StickyConfig,
        decider: Decider,
        app_name: str,
        port: int,
        resolver: dns.asyncresolver.Resolver,
    ) -> None:
        self.config = config
        self.decider = decider
        self.port = port
        self.discovery = Discovery(app_name, config.owners, resolver)
        self.routes = config.key is not None or config.session_header is not None
        self.forwards = config.forward_large_bodies
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_decider(
        cls,
        config: StickyConfig,
        decider: Decider | None,
        environ: Callable[[str], str | None] = os.environ.get,
    ) -> PrivateNetwork | None:
        """The private network of this machine; None off Fly, when nothing in the config
        needs it, or without ``FLY_APP_NAME`` (then keys are served where they land and
        big bodies here, as a warning says)."""
        if decider is None:
            return None
        if config.key is None and config.session_header is None and not config.forward_large_bodies:
            return None
        app_name = environ("FLY_APP_NAME")
        if not app_name:
            # Fly always sets it; a test or a hand-run app may not.
            routes = config.key is not None or config.session_header is not None
            log.log(
                logging.WARNING if routes else logging.DEBUG,
                "FLY_APP_NAME is unset: flysticky cannot reach the app's other machines",
            )
            return None
        port = config.forward_port
        if port is None:
            value = environ("PORT") or ""
            port = int(value) if value.isdigit() and 0 < int(value) < 65536 else 8080
        return cls(config, decider, app_name, port, make_resolver(environ))

    async def start(self) -> None:
        if self.forwards:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                # Uploads may take long; a machine that does not answer the connection
                # at once is treated as gone.
                timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=300.0),
            )
        if self.routes:
            owners = self.decider.owners
            self._task = asyncio.create_task(
                self.discovery.keep_current(owners.update, self.config.refresh_seconds)
            )
            # The server is not serving yet: waiting here delays no request, and its
            # first requests then find their owners.
            deadline = time.monotonic() + FIRST_ANSWER_WAIT
            while owners.members is None and time.monotonic() < deadline and not self._task.done():
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self,
        machine_id: str,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes],
    ) -> Forwarded | None:
        """Send a request to ``machine_id`` over the private network and stream its
        answer back. None, with the body untouched, when that machine has no address or
        does not take the connection: the caller serves the request itself."""
        session = self._session
        if session is None:
            return None
        address = await self.discovery.address(machine_id)
        if address is None:
            return None
        host = f"[{address}]" if ":" in address else address
        sent = CIMultiDict((k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP)
        sent[FORWARDED_HEADER] = self.decider.machine_id
        consumed = None if isinstance(body, bytes) else _Consumed(body)
        try:
            response = await session.request(
                method,
                f"http://{host}:{self.port}{target}",
                headers=sent,
                data=body if consumed is None else consumed.chunks(),
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            if consumed is not None and consumed.started:
                log.warning("forward to %s failed mid-request: %s", machine_id, error)
                return Forwarded(502, [("content-type", "text/plain")], _one(b"bad gateway\n"))
            log.info("forward to %s failed, serving here: %s", machine_id, error)
            return None
        log.info("forwarded: %s %s to %s over the private network", method, target, machine_id)
        answer = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP]
        return Forwarded(response.status, answer, _stream(response))


async def _stream(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    finally:
        response.release()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
