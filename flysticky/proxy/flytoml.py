"""The parts of an app's fly.toml the emulator honours: the app name, the replay-cache
rules and the autostop settings of ``[http_service]``."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .cache import CacheRule

AutoStop = Literal["off", "stop", "suspend"]
#: Fly app names (fly-platform.md): lowercase letters, digits and dashes, no dash at
#: either end; 63 characters at most, so ``<app>.internal`` labels stay valid DNS.
_APP_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def app_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Fly app's name, or None."""
    if _APP_NAME.fullmatch(name) is None:
        return (
            f"app name {name!r}: lowercase letters, digits and dashes, not starting or "
            "ending with a dash, at most 63 characters, such as my-app"
        )
    return None


class FlyTomlError(ValueError):
    """A fly.toml the emulator cannot use; the message names the key."""


@dataclass(frozen=True)
class Autostop:
    """``auto_stop_machines``, ``auto_start_machines``, ``min_machines_running``.

    Fly's own defaults when the keys are absent: no autostop, autostart on, none kept.
    """

    stop: AutoStop = "off"
    start: bool = True
    min_running: int = 0


@dataclass(frozen=True)
class Metrics:
    """``[metrics]``: where Fly's scraper reads each machine's Prometheus metrics."""

    port: int
    path: str = "/metrics"


@dataclass(frozen=True)
class FlyToml:
    app: str | None = None
    cache_rules: list[CacheRule] = field(default_factory=list)
    autostop: Autostop = Autostop()
    metrics: Metrics | None = None


def _metrics(data: dict[str, Any]) -> Metrics | None:
    value = data.get("metrics")
    if value is None:
        return None
    # [metrics] or [[metrics]] (one per process group): the emulator runs one group.
    entries = value if isinstance(value, list) else [value]
    if not entries:
        return None
    entry = entries[0]
    if not isinstance(entry, dict):
        raise FlyTomlError(f"metrics={value!r}: must be a table ([metrics])")
    port = entry.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise FlyTomlError(f"metrics.port={port!r}: a port from 1 to 65535")
    path = entry.get("path", "/metrics")
    if not isinstance(path, str) or not path.startswith("/"):
        raise FlyTomlError(f"metrics.path={path!r}: a path starting with '/'")
    return Metrics(port, path)


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise FlyTomlError(f"{where}{key}={value!r}: must be a table ([{where}{key}])")
    return value


def _rule(entry: Any, index: int) -> CacheRule:
    where = f"http_service.http_options.replay_cache[{index}]"
    if not isinstance(entry, dict):
        raise FlyTomlError(f"{where} must be a table")
    unknown = set(entry) - {"path_prefix", "ttl_seconds", "type", "name", "allow_bypass"}
    if unknown:
        raise FlyTomlError(f"{where}: unknown keys {sorted(unknown)}")
    prefix = entry.get("path_prefix")
    if not isinstance(prefix, str) or not prefix or ":" in prefix.split("/")[0]:
        raise FlyTomlError(f"{where}.path_prefix={prefix!r}: a path or host/path, with no port")
    ttl = entry.get("ttl_seconds")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 10:
        raise FlyTomlError(f"{where}.ttl_seconds={ttl!r}: a whole number of seconds, at least 10")
    kind = entry.get("type")
    if kind not in ("cookie", "header"):
        raise FlyTomlError(f"{where}.type={kind!r}: 'cookie' or 'header'")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise FlyTomlError(f"{where}.name={name!r}: the cookie or header name")
    bypass = entry.get("allow_bypass", False)
    if not isinstance(bypass, bool):
        raise FlyTomlError(f"{where}.allow_bypass={bypass!r}: true or false")
    return CacheRule(prefix, ttl, kind, name.lower() if kind == "header" else name, bypass)


def _autostop(service: dict[str, Any]) -> Autostop:
    stop = service.get("auto_stop_machines", "off")
    # true/false are the legacy forms flyctl still reads: true means "stop".
    if isinstance(stop, bool):
        stop = "stop" if stop else "off"
    if stop not in ("off", "stop", "suspend"):
        raise FlyTomlError(
            f"http_service.auto_stop_machines={stop!r}: one of 'off', 'stop', 'suspend'"
        )
    start = service.get("auto_start_machines", True)
    if not isinstance(start, bool):
        raise FlyTomlError(f"http_service.auto_start_machines={start!r}: true or false")
    minimum = service.get("min_machines_running", 0)
    if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 0:
        raise FlyTomlError(
            f"http_service.min_machines_running={minimum!r}: a whole number, 0 or more"
        )
    return Autostop(stop, start, minimum)


def load(path: Path) -> FlyToml:
    """Read what the emulator honours from ``path``; anything malformed is a FlyTomlError."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise FlyTomlError(f"cannot read it: {error.strerror or error}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise FlyTomlError(f"cannot read it as TOML: {error}") from None
    app = data.get("app")
    if app is not None and not isinstance(app, str):
        raise FlyTomlError(f"app={app!r}: the app's name, a string")
    if app is not None and (problem := app_name_problem(app)) is not None:
        raise FlyTomlError(f"app={app!r}: {problem}")
    service = _table(data, "http_service", "")
    options = _table(service, "http_options", "http_service.")
    entries = options.get("replay_cache", [])
    if not isinstance(entries, list):
        raise FlyTomlError(
            f"http_service.http_options.replay_cache={entries!r}: must be an array of tables "
            "([[http_service.http_options.replay_cache]])"
        )
    rules = [_rule(entry, i) for i, entry in enumerate(entries)]
    return FlyToml(app, rules, _autostop(service), _metrics(data))
