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
import dataclasses
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
from yarl import URL

from .config import StickyConfig
from .core import FORWARDED_HEADER, Decider, Decision, Outcome
from .owners import Owners, is_machine_id

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
#: After a change in the machines, discovery asks again this soon, then twice as late
#: each time, up to refresh_seconds.
SETTLE_FIRST = 0.25
#: A forwarded body that sends nothing for this long is given up (the client gets 502):
#: a stalled upload must not hold a connection to the other machine for ever.
BODY_IDLE_TIMEOUT = 60.0
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

    async def keep_current(self, owners: Owners, interval: float) -> None:
        """Keep ``owners`` current, forever. After a change (and at start) it asks again
        soon, then every ``interval`` seconds: machines that start together find each other
        within a second, not an interval. Failures keep the last answer for a while (a
        resolver hiccup must not move every key), then drop it; so does an answer that does
        not list this machine (a resolver that is not Fly's, another app's machines):
        unknown owners mean requests are served where they land."""
        last_answer = 0.0
        trouble: str | None = None  # what went wrong last, logged once per streak
        delay = min(SETTLE_FIRST, interval)
        while True:
            problem: str | None = None
            try:
                ids = await self.members()
            except (dns.exception.DNSException, OSError) as error:
                problem = f"{self.members_name} failed: {error}"
                stale = (
                    last_answer
                    and time.monotonic() - last_answer > interval * STALE_AFTER_INTERVALS
                )
                if stale and owners.update(None):
                    log.warning("flysticky discovery: no answer for long; keys served here")
            else:
                if owners.machine_id not in ids:
                    problem = (
                        f"{self.members_name} does not list this machine ({owners.machine_id}); "
                        "keys served here"
                    )
                    changed = owners.update(None)
                else:
                    last_answer = time.monotonic()
                    changed = owners.update(ids)
                    if changed:
                        log.info("flysticky discovery: machines %s", ", ".join(sorted(ids)))
                delay = min(SETTLE_FIRST, interval) if changed else min(delay * 2, interval)
            if problem != trouble:
                if problem is not None:
                    log.warning("flysticky discovery: %s", problem)
                else:
                    log.info("flysticky discovery: %s answers again", self.members_name)
                trouble = problem
            await asyncio.sleep(delay)


@dataclass
class Forwarded:
    """The answer of the machine a request was forwarded to, streamed, and the decision
    the handlers' side records for it (outcome FORWARDED)."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    decision: Decision
    #: The other machine may have the request, but its answer did not come back: the
    #: 502 is this machine's.
    failed: bool = False


async def _idle_limited(body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The request body as it arrives, given up after BODY_IDLE_TIMEOUT without a byte."""
    chunks = aiter(body)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), BODY_IDLE_TIMEOUT)
        except StopAsyncIteration:
            return
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
        try:
            resolver = make_resolver(environ)
        except dns.resolver.NoResolverConfiguration as error:
            # Every Fly machine has /etc/resolv.conf; an image without one still serves.
            log.warning("no DNS resolver (%s): flysticky cannot reach the other machines", error)
            return None
        return cls(config, decider, app_name, port, resolver)

    async def start(self) -> None:
        if self.forwards:
            self._session = aiohttp.ClientSession(
                # No pool limit: one slow upload must not make others wait for a connection
                # (and be served off their machine); each ends within BODY_IDLE_TIMEOUT.
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                auto_decompress=False,
                # Uploads may take long; a machine that does not answer the connection
                # at once is treated as gone.
                timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=300.0),
            )
        if self.routes:
            owners = self.decider.owners
            self._task = asyncio.create_task(
                self.discovery.keep_current(owners, self.config.refresh_seconds)
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

    def takes(self, decision: Decision) -> bool:
        """Whether ``decision`` is a request this network sends to its machine: a body
        too big to replay, not forwarded here already, with a machine to go to."""
        return (
            self.forwards
            and decision.outcome is Outcome.OFF_PIN
            and decision.arrived_by is None
            and decision.pinned_to is not None
        )

    async def forward(
        self,
        decision: Decision,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes],
    ) -> Forwarded | None:
        """Send a request ``takes`` to its machine over the private network and stream
        its answer back. None, with the body untouched, when that machine has no address
        or does not take the connection: the caller serves the request itself."""
        forwarded = await self._forward(decision, method, target, headers, body)
        tally = self.decider.tally
        if tally is not None:
            if forwarded is None:
                tally.forwarded("served_here")
            else:
                tally.forwarded("failed" if forwarded.failed else "forwarded")
        return forwarded

    async def _forward(
        self,
        decision: Decision,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes],
    ) -> Forwarded | None:
        session = self._session
        machine_id = decision.pinned_to
        if session is None or machine_id is None:
            return None
        forwarded = dataclasses.replace(decision, outcome=Outcome.FORWARDED)
        if not target.startswith("/"):
            return None  # an absolute-form or asterisk target: nothing to forward
        address = await self.discovery.address(machine_id)
        if address is None:
            return None
        host = f"[{address}]" if ":" in address else address
        # encoded: the target goes as it came, never normalised ("/a/../b" stays), so the
        # other machine routes the very path this one routed by.
        url = URL(f"http://{host}:{self.port}{target}", encoded=True)
        pairs = list(headers)
        listed = {
            name.strip().lower()
            for key, value in pairs
            if key.lower() == "connection"
            for name in value.split(",")
        }
        sent = CIMultiDict(
            (k, v) for k, v in pairs if k.lower() not in _HOP_BY_HOP and k.lower() not in listed
        )
        sent[FORWARDED_HEADER] = self.decider.machine_id
        try:
            response = await session.request(
                method,
                url,
                headers=sent,
                data=body if isinstance(body, bytes) else _idle_limited(body),
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            # Nothing was sent: the request can still be served here.
            log.info("forward to %s failed, serving here: %s", machine_id, error)
            return None
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            # The other machine may have the request, and may have acted on it: running it
            # here too could do it twice.
            log.warning("forward to %s failed mid-request: %s", machine_id, error)
            return Forwarded(
                502, [("content-type", "text/plain")], _one(b"bad gateway\n"), forwarded, True
            )
        log.info("forwarded: %s %s to %s over the private network", method, target, machine_id)
        answer = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP]
        return Forwarded(response.status, answer, _stream(response), forwarded)


async def _stream(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    finally:
        response.release()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
