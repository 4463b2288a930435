"""What flyctl accepts in fly.toml, for the sections flysticky's files use.

Key names are read from flyctl's internal/appconfig (Config, HTTPService,
ServiceHTTPCheck, Compute) and fly-go's machine_types.go (HTTPOptions, ReplayCache,
MachineServiceConcurrency, MachineGuest), as of August 2026.
"""

from __future__ import annotations

import re
from typing import Any

TOP = {
    "app",
    "build",
    "checks",
    "console_command",
    "container",
    "deploy",
    "env",
    "experimental",
    "files",
    "host_dedication_id",
    "http_service",
    "kill_signal",
    "kill_timeout",
    "machine_checks",
    "machine_config",
    "metrics",
    "mounts",
    "primary_region",
    "processes",
    "restart",
    "services",
    "statics",
    "swap_size_mb",
    "vm",
}
BUILD = {
    "builder",
    "args",
    "buildpacks",
    "image",
    "settings",
    "builtin",
    "dockerfile",
    "ignorefile",
    "build-target",
    "compose",
    "compression",
    "compression_level",
}
HTTP_SERVICE = {
    "internal_port",
    "force_https",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "processes",
    "concurrency",
    "tls_options",
    "http_options",
    "checks",
    "machine_checks",
}
CONCURRENCY = {"type", "hard_limit", "soft_limit"}
DEPLOY = {
    "release_command",
    "release_command_timeout",
    "release_command_vm",
    "strategy",
    "max_unavailable",
    "wait_timeout",
}
RESTART = {"policy", "retries", "processes"}
HTTP_CHECK = {
    "interval",
    "timeout",
    "grace_period",
    "method",
    "path",
    "protocol",
    "tls_skip_verify",
    "tls_server_name",
    "headers",
}
HTTP_OPTIONS = {
    "compress",
    "response",
    "h2_backend",
    "idle_timeout",
    "headers_read_timeout",
    "replay_cache",
}
REPLAY_CACHE = {"path_prefix", "ttl_seconds", "type", "name", "allow_bypass"}
VM = {
    "size",
    "memory",
    "processes",
    "cpu_kind",
    "cpus",
    "memory_mb",
    "max_memory_mb",
    "gpus",
    "gpu_kind",
    "host_dedication_id",
    "persist_rootfs",
    "kernel_args",
}
DURATION = re.compile(r"(\d+(ms|s|m|h))+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> float | None:
    """A Go-style duration such as "10s" or "1m30s" in seconds; None if it is not one."""
    if not DURATION.fullmatch(text):
        return None
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in re.findall(r"(\d+)(ms|s|m|h)", text))


def _keys(where: str, table: Any, known: set[str], problems: list[str]) -> None:
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table")
        return
    for key in sorted(set(table) - known):
        problems.append(f"{where}.{key} is not a key flyctl knows")


def problems(config: dict[str, Any]) -> list[str]:
    """Every way ``config`` departs from what flyctl and Fly accept; [] when none."""
    found: list[str] = []
    _keys("(top)", config, TOP, found)
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", str(config.get("app", ""))):
        found.append(f"app={config.get('app')!r}: lowercase letters, digits and dashes")
    if not re.fullmatch(r"[a-z]{3}", str(config.get("primary_region", ""))):
        found.append("primary_region: a 3-letter region code")
    _keys("build", config.get("build", {}), BUILD, found)
    deploy = config.get("deploy", {})
    _keys("deploy", deploy, DEPLOY, found)
    if deploy.get("strategy", "rolling") not in ("rolling", "immediate", "canary", "bluegreen"):
        found.append("deploy.strategy: rolling, immediate, canary or bluegreen")
    for i, restart in enumerate(config.get("restart", [])):
        _keys(f"restart[{i}]", restart, RESTART, found)
        if restart.get("policy") not in ("always", "never", "on-failure"):
            found.append(f"restart[{i}].policy: always, never or on-failure")
    if "kill_timeout" in config:
        timeout = config["kill_timeout"]
        seconds = timeout if isinstance(timeout, int) else duration_seconds(str(timeout))
        if seconds is None or not 1 <= seconds <= 300:
            found.append(f"kill_timeout={timeout!r}: 1 to 300 seconds (Fly's maximum)")
    env = config.get("env", {})
    if not all(isinstance(v, str) for v in env.values()):
        found.append("env values must be strings")
    service = config.get("http_service")
    if not isinstance(service, dict):
        return [*found, "http_service is missing"]
    _keys("http_service", service, HTTP_SERVICE, found)
    port = service.get("internal_port")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        found.append(f"http_service.internal_port={port!r}: a TCP port")
    if "PORT" in env and env["PORT"] != str(port):
        found.append(f"env.PORT={env['PORT']} differs from internal_port={port}")
    if service.get("auto_stop_machines") not in ("off", "stop", "suspend", True, False):
        found.append("http_service.auto_stop_machines: off, stop or suspend")
    if not isinstance(service.get("auto_start_machines"), bool):
        found.append("http_service.auto_start_machines: true or false")
    concurrency = service.get("concurrency", {})
    _keys("http_service.concurrency", concurrency, CONCURRENCY, found)
    if concurrency.get("type") not in ("connections", "requests"):
        found.append("http_service.concurrency.type: connections or requests")
    if concurrency.get("soft_limit", 0) > concurrency.get("hard_limit", 0):
        found.append("http_service.concurrency: soft_limit above hard_limit")
    for i, check in enumerate(service.get("checks", [])):
        _keys(f"http_service.checks[{i}]", check, HTTP_CHECK, found)
        for key in ("interval", "timeout", "grace_period"):
            if key in check and not DURATION.fullmatch(str(check[key])):
                found.append(f"http_service.checks[{i}].{key}={check[key]!r}: a duration")
        if not str(check.get("path", "/")).startswith("/"):
            found.append(f"http_service.checks[{i}].path must start with /")
    options = service.get("http_options", {})
    _keys("http_service.http_options", options, HTTP_OPTIONS, found)
    for i, rule in enumerate(options.get("replay_cache", [])):
        where = f"http_service.http_options.replay_cache[{i}]"
        _keys(where, rule, REPLAY_CACHE, found)
        if not isinstance(rule.get("ttl_seconds"), int) or rule["ttl_seconds"] < 10:
            found.append(f"{where}.ttl_seconds: at least 10")
        if rule.get("type") not in ("cookie", "header"):
            found.append(f"{where}.type: cookie or header")
        if not rule.get("name") or not rule.get("path_prefix"):
            found.append(f"{where}: name and path_prefix are required")
    for i, vm in enumerate(config.get("vm", [])):
        _keys(f"vm[{i}]", vm, VM, found)
        if vm.get("cpu_kind") not in ("shared", "performance"):
            found.append(f"vm[{i}].cpu_kind: shared or performance")
        if not re.fullmatch(r"\d+(mb|gb)", str(vm.get("memory", "256mb"))):
            found.append(f"vm[{i}].memory: such as 512mb or 1gb")
        memory = re.fullmatch(r"(\d+)(mb|gb)", str(vm.get("memory", "256mb")))
        megabytes = int(memory[1]) * (1024 if memory[2] == "gb" else 1) if memory else 0
        if service.get("auto_stop_machines") == "suspend" and megabytes > 2048:
            found.append(f"vm[{i}].memory: suspend needs 2 GB or less")
    if service.get("auto_stop_machines") == "suspend" and config.get("swap_size_mb"):
        found.append("swap_size_mb: suspend needs no swap")
    return found
