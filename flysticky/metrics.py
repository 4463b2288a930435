"""Prometheus metrics of what flysticky decided, served where Fly's scraper reads them.

``StickyConfig(metrics_port=9091)`` and fly.toml's ``[metrics] port = 9091`` are all it
takes (the ``metrics`` extra brings prometheus-client). The counters are plain ints the
core keeps (flysticky.core.Tally); they become metric families only when scraped, so the
pinned path pays one integer increment and, on a request that carries it, the count of
Fly's replay-cache status.

The endpoint also serves prometheus-client's default registry: the process's own
metrics, and any the app registered there. One process per machine is the setup
flysticky is built for (the cookie names a machine, not a process); a second process on
the same machine finds the port taken, says so once, and serves no metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import __version__
from .core import Decider, Outcome, Tally

log = logging.getLogger("flysticky")

__all__ = ["MetricsServer", "TallyCollector"]

#: Prometheus's text format (what prometheus-client's generate_latest writes).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
#: A scrape request's head may be no larger, nor take longer to arrive.
_HEAD_LIMIT = 16 * 1024
_HEAD_SECONDS = 10.0
#: Connections served at once; more are closed at once (a scraper needs one or two).
_MAX_CONNECTIONS = 32

_OUTCOMES = tuple(o.value for o in Outcome if o is not Outcome.FORWARDED)
_ROUTES = ("cookie", "key", "session")


class TallyCollector(Collector):
    """The metric families of one app's Tally, and of what its discovery knows.

    Every outcome appears from the first scrape, at 0, so a dashboard's rates are
    defined before the first replay (Prometheus's advice for counters with labels).
    """

    def __init__(self, tally: Tally, decider: Callable[[], Decider | None]) -> None:
        self._tally = tally
        self._decider = decider

    def collect(self) -> Iterable[Metric]:
        tally = self._tally
        decisions = CounterMetricFamily(
            "flysticky_decisions",
            "Requests decided, by outcome and by what routed them (cookie, key, session).",
            labels=("outcome", "routed_by"),
        )
        counts = dict(tally.decisions)
        counts["pinned", "cookie"] = counts.get(("pinned", "cookie"), 0) + tally.pinned
        for outcome in _OUTCOMES:
            for route in _ROUTES:
                decisions.add_metric((outcome, route), counts.get((outcome, route), 0))
        yield decisions
        yield _counter(
            "flysticky_repins",
            "Sessions re-pinned to this machine, by the Fly header that brought them here.",
            "arrived_by",
            tally.repins,
            ("fly-replay-src", "fly-preferred-instance-unavailable", "fly-replay-failed"),
        )
        yield _counter(
            "flysticky_replay_cache_arrivals",
            "Requests that arrived with fly-replay-cache-status, by its value.",
            "status",
            tally.cache_arrivals,
            ("hit", "miss", "bypass"),
        )
        yield _counter(
            "flysticky_forwards",
            "Bodies over 1 MiB for another machine: forwarded over the private network, "
            "failed after it took them, or served here.",
            "result",
            tally.forwards,
            ("forwarded", "failed", "served_here"),
        )
        decider = self._decider()
        members = decider.owners.members if decider is not None else None
        if members is not None:
            yield GaugeMetricFamily(
                "flysticky_machines",
                "Machines of this app that flysticky's discovery knows (they own keys).",
                value=len(members),
            )
        info = GaugeMetricFamily(
            "flysticky_build_info", "The flysticky version serving.", labels=("version",)
        )
        info.add_metric((__version__,), 1)
        yield info


def _counter(
    name: str, documentation: str, label: str, counts: dict[str, int], always: Iterable[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=(label,))
    values = dict.fromkeys(always, 0)
    values.update(counts)
    for value, count in sorted(values.items()):
        family.add_metric((value,), count)
    return family


class MetricsServer:
    """A plain HTTP/1.1 endpoint on a port of its own, in the app's event loop: GET or
    HEAD of the path gets the metrics, anything else 404 or 405, and the connection is
    closed after each answer (Prometheus opens one per scrape anyway)."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self._registry = registry
        self._path = path.encode("ascii")
        self._server: asyncio.Server | None = None
        self._open = 0

    @classmethod
    async def start(
        cls, collector: Collector, port: int, path: str, host: str | None = None
    ) -> MetricsServer | None:
        """Listening on ``host`` (None: every address, IPv6 and IPv4, as Fly's scraper
        reaches the machine over its private IPv6 network), or None when the port is
        taken, with a warning. The local emulator sets FLYSTICKY_METRICS_HOST (each
        machine's own loopback address) and, where machines cannot share a port,
        FLYSTICKY_METRICS_PORT; on Fly neither is set."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server = cls(registry, path)
        host = host if host is not None else os.environ.get("FLYSTICKY_METRICS_HOST") or None
        value = os.environ.get("FLYSTICKY_METRICS_PORT", "")
        if value.isascii() and value.isdigit() and 0 < int(value) < 65536:
            port = int(value)
        try:
            server._server = await asyncio.start_server(
                server._answer, host, port, limit=_HEAD_LIMIT
            )
        except OSError as error:
            log.warning(
                "flysticky metrics not served: port %d is taken (%s). Is a second process of "
                "this app running on this machine? Run one per machine: sessions live in "
                "one process's memory.",
                port,
                error.strerror or error,
            )
            return None
        log.info("flysticky metrics on port %d at %s", port, path)
        return server

    def addresses(self) -> list[tuple[str, int]]:
        """Where it listens: (host, port) of each socket."""
        server = self._server
        return [s.getsockname()[:2] for s in server.sockets] if server is not None else []

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def body(self) -> bytes:
        return generate_latest(self._registry) + generate_latest(REGISTRY)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > _MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0].partition(b"?")[0]
            if target != self._path:
                status, body = b"404 Not Found", b"not found\n"
            elif method not in (b"GET", b"HEAD"):
                status, body = b"405 Method Not Allowed", b"GET or HEAD\n"
            else:
                status, body = b"200 OK", self.body()
            content_type = CONTENT_TYPE if status == b"200 OK" else b"text/plain"
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (status, content_type, len(body))
            )
            if method != b"HEAD":
                writer.write(body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
