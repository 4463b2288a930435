"""What Fly's Prometheus would hold for the local fleet, at ``/.fly-emulator/metrics``.

Two parts: the emulator's own counters (the live table's and the exit table's columns,
per machine), and, as Fly's scraper does with fly.toml's ``[metrics]``, every started
machine's own metrics endpoint, read now, each series given the ``app``, ``region``
and ``instance`` labels Fly adds. Stopped and suspended machines are not scraped (on
Fly they serve nothing either); a machine that does not answer within the timeout is
left out, and ``fly_emulator_scrape_up`` says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .machines import Fleet, Machine

#: Prometheus's text format, as prometheus-client writes it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How long one machine's scrape may take (Fly's scraper gives up too).
SCRAPE_TIMEOUT = 2.0
#: The labels Fly's scraper adds to every series of a machine.
FLY_LABELS = ("app", "region", "instance")
_COUNTERS = ("requests", "served", "replays", "cache_hits", "errors")


@dataclass
class Scrape:
    """One machine's metrics as read now: None when it did not answer."""

    machine: Machine
    families: list[Metric] | None


async def scrape(session: aiohttp.ClientSession, machine: Machine, path: str) -> Scrape:
    if machine.metrics_port is None or not machine.alive:
        return Scrape(machine, None)
    url = f"http://{machine.host}:{machine.metrics_port}{path}"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)) as answer:
            if answer.status != 200:
                return Scrape(machine, None)
            text = await answer.text()
        return Scrape(machine, list(text_string_to_metric_families(text)))
    except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError):
        return Scrape(machine, None)


async def scrape_fleet(session: aiohttp.ClientSession, fleet: Fleet) -> list[Scrape]:
    path = fleet.metrics.path if fleet.metrics is not None else "/metrics"
    machines = [m for m in fleet.machines if m.state != "destroyed"]
    return list(await asyncio.gather(*(scrape(session, m, path) for m in machines)))


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet, scrapes: Sequence[Scrape], proxy_errors: int) -> None:
        self._fleet = fleet
        self._scrapes = scrapes
        self._proxy_errors = proxy_errors

    def _labels(self, machine: Machine) -> tuple[str, str, str]:
        return (self._fleet.app_name, machine.region, machine.id)

    def collect(self) -> Iterable[Metric]:
        machines = [m for m in self._fleet.machines if m.state != "destroyed"]
        for name in _COUNTERS:
            family = CounterMetricFamily(
                f"fly_emulator_{name}",
                f"The emulator's per-machine count of {name.replace('_', ' ')}.",
                labels=FLY_LABELS,
            )
            for machine in machines:
                family.add_metric(self._labels(machine), getattr(machine.counters, name))
            yield family
        states = GaugeMetricFamily(
            "fly_emulator_machine_state",
            "1 for each machine's current state.",
            labels=(*FLY_LABELS, "state"),
        )
        for machine in machines:
            states.add_metric((*self._labels(machine), machine.facts().state), 1)
        yield states
        yield CounterMetricFamily(
            "fly_emulator_proxy_errors",
            "Answers the emulator gave itself (no machine could).",
            value=self._proxy_errors,
        )
        up = GaugeMetricFamily(
            "fly_emulator_scrape_up",
            "1 when the machine's metrics endpoint answered this scrape.",
            labels=FLY_LABELS,
        )
        for each in self._scrapes:
            up.add_metric(self._labels(each.machine), 1 if each.families is not None else 0)
        yield up
        yield from self._machines_families()

    def _machines_families(self) -> Iterable[Metric]:
        """The machines' own series, merged by family, with Fly's labels added."""
        merged: dict[str, Metric] = {}
        for each in self._scrapes:
            labels = dict(zip(FLY_LABELS, self._labels(each.machine), strict=True))
            for family in each.families or ():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    into.add_sample(
                        sample.name, {**sample.labels, **labels}, sample.value, sample.timestamp
                    )
        yield from merged.values()


def exposition(fleet: Fleet, scrapes: Sequence[Scrape], proxy_errors: int) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, scrapes, proxy_errors))
    return generate_latest(registry)
