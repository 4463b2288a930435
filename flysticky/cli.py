"""``flysticky proxy``, ``flysticky demo``, ``flysticky new`` and ``flysticky check``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .check import DEFAULT_TIMEOUT
from .check import run as run_check
from .proxy.flytoml import app_name_problem
from .proxy.machines import MAX_MACHINES
from .regions import region_problem

PACKAGE = Path(__file__).parent
KEYS = (
    "keys (N: a machine's number, 1 to 3 digits, or the first characters of its id, at\n"
    "      least 4 if all digits): k N crashes it (memory lost; restarted when a request\n"
    "      is aimed at it), o N stops it (memory lost), z N suspends it (memory kept),\n"
    "      u N starts or resumes it, r N restarts it, d N destroys it (its sessions move\n"
    "      and re-pin), a [REGION] adds a machine, s shows counters, q quits"
)
#: Up to this many digits, a key's word is a machine's place in the list; longer, or
#: with a letter, it is the start of an id (ids are hex and often start with digits).
NUMBER_DIGITS = 3
#: The template's frameworks (`flysticky demo --framework`), as their names are written.
FRAMEWORKS = {"sanic": "Sanic", "quart": "Quart", "fastapi": "FastAPI"}
#: What a framework's demo runs on beyond the proxy extra (which has Sanic, Quart and
#: Hypercorn): modules that the framework's own extra brings.
DEMO_NEEDS = {"fastapi": ("fastapi", "uvicorn")}
#: Terminal keys and the Fleet/Emulator operations they run.
ACTIONS = {
    "k": "crash",
    "o": "stop",
    "z": "suspend",
    "u": "start",
    "r": "restart",
    "d": "destroy",
}


def template_dir() -> Path:
    """The cookiecutter template: inside an installed wheel, or the checkout's template/."""
    for candidate in (PACKAGE / "template", PACKAGE.parent / "template"):
        if (candidate / "cookiecutter.json").is_file():
            return candidate
    raise SystemExit("error: the flysticky template is missing from this installation")


def _machine_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_MACHINES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be 1 or more, and at most {MAX_MACHINES} (the emulator's cap)"
        )
    return value


def _app_name(text: str) -> str:
    problem = app_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a TCP port, 0 to 65535")
    return value


def _regions(text: str) -> list[str]:
    regions = [r.strip().lower() for r in text.split(",") if r.strip()]
    if not regions:
        raise argparse.ArgumentTypeError(f"{text!r}: region codes such as iad or iad,ams")
    for region in regions:
        problem = region_problem(region)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
    return regions


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds, such as 30 or 0.5")
    return value


def _add_proxy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machines", type=_machine_count, default=3, help="how many (default 3)")
    parser.add_argument("--port", type=_port, default=8080, help="proxy port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="proxy address (default 127.0.0.1)")
    parser.add_argument(
        "--dns-port",
        type=_port,
        default=0,
        help="port of the machines' internal DNS on 127.0.0.1, UDP and TCP (default: a free one)",
    )
    parser.add_argument(
        "--regions", type=_regions, default=["iad"], help="machine regions, spread: iad,ams"
    )
    parser.add_argument(
        "--forwarded-proto",
        choices=("http", "https"),
        default="http",
        help="X-Forwarded-Proto to send, as if TLS ended at the edge (default http)",
    )
    parser.add_argument(
        "--port-per-machine",
        action="store_true",
        help="for an app that cannot listen on $HOST: each machine on 127.0.0.1 with a port of "
        "its own (then the private network, <id>.vm.<app>.internal, reaches nothing)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the machines' output")
    parser.add_argument(
        "--idle-after",
        type=_seconds,
        default=60.0,
        help="with fly.toml's auto_stop_machines, stop or suspend a machine idle this many "
        "seconds (Fly: a few minutes; default 60)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flysticky", description="Sticky sessions on Fly.io for Sanic, Quart and any ASGI app."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser(
        "proxy",
        help="run N local machines of an app behind a local Fly proxy emulator",
        description="Run N machines of an app, each its own process with its own "
        "FLY_MACHINE_ID and PORT, behind a local emulation of Fly's edge proxy. "
        "Give an app as module:attr, or a command after --.",
        epilog="examples: flysticky proxy app:app | flysticky proxy --machines 3 -- python app.py",
    )
    _add_proxy_options(proxy)
    proxy.add_argument("--app-name", type=_app_name, help="FLY_APP_NAME (default: fly.toml's app)")
    proxy.add_argument(
        "--fly-toml", type=Path, help="read replay_cache rules from it (default ./fly.toml)"
    )
    proxy.add_argument("app", nargs="?", help="module:attr of a Sanic or ASGI app")
    demo = commands.add_parser(
        "demo", help="the demo app on 3 local machines behind the local Fly proxy"
    )
    _add_proxy_options(demo)
    demo.add_argument(
        "--framework", choices=tuple(FRAMEWORKS), default="sanic", help="default sanic"
    )
    new = commands.add_parser(
        "new",
        help="generate a ready-to-deploy Fly.io app from the bundled template",
        description="Runs the cookiecutter template bundled with flysticky.",
    )
    new.add_argument("--output-dir", type=Path, default=Path("."))
    new.add_argument("--no-input", action="store_true", help="use defaults and KEY=VALUE only")
    new.add_argument("context", nargs="*", metavar="KEY=VALUE", help="e.g. framework=quart")
    check = commands.add_parser(
        "check",
        help="check a project's fly.toml, Dockerfile and StickyConfig against Fly's rules",
        description="Read fly.toml, the Dockerfile (and Procfile) and the app's StickyConfig "
        "(by importing the app's module in a subprocess, never running its server) and report "
        "what keeps sessions from sticking. Exit status: 0 without errors, 1 with errors (or "
        "warnings, with --strict), 2 when PATH is not a Fly project.",
        epilog="a warning can be accepted in fly.toml: # flysticky: accept <id>",
    )
    check.add_argument(
        "path", nargs="?", type=Path, default=Path("."), metavar="PATH", help="default: ."
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--strict", action="store_true", help="warnings fail too (exit status 1)")
    check.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds the app's module may take to import (default {DEFAULT_TIMEOUT:g})",
    )
    return parser


def _needs(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise SystemExit(f"error: this needs {module}: pip install 'flysticky[{extra}]'") from None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args_list:
        at = args_list.index("--")
        args_list, command = args_list[:at], args_list[at + 1 :]
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "check":
        return run_check(args.path, as_json=args.json, strict=args.strict, timeout=args.timeout)
    if args.command in ("new", "demo"):
        _needs("cookiecutter", "template")
    if args.command in ("proxy", "demo"):
        _needs("aiohttp", "proxy")
    if args.command == "demo":
        for module in DEMO_NEEDS.get(args.framework, ()):
            _needs(module, args.framework)
    if args.command == "new":
        return _new(args)
    try:
        if args.command == "demo":
            return _demo(args)
        return _proxy(args, command, parser)
    except KeyboardInterrupt:
        return 130


#: Jinja's delimiters: cookiecutter renders a KEY=VALUE value as a template, so a value
#: holding one would run as template code (or fail with the whole context in the error).
TEMPLATE_MARKS = ("{{", "{%", "{#")


def _answers(words: list[str]) -> tuple[dict[str, str], str | None]:
    """The template answers in ``KEY=VALUE`` words, or why they cannot be used.

    Only the template's public keys may be given: private ones (``_copy_without_render``
    and the like) are how the template works, not answers.
    """
    spec = json.loads((template_dir() / "cookiecutter.json").read_text())
    keys = [key for key in spec if not key.startswith("_")]
    valid = f"the keys are {', '.join(keys)}"
    answers: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            return {}, f"{word!r}: expected KEY=VALUE, such as framework=quart; {valid}"
        if key not in keys:
            return {}, f"unknown key {key!r} in {word!r}: {valid}"
        choices = spec[key]
        if isinstance(choices, list) and value not in choices:
            return {}, f"{key}={value!r}: one of {', '.join(choices)}"
        if any(mark in value for mark in TEMPLATE_MARKS):
            marks = ", ".join(map(repr, TEMPLATE_MARKS))
            return {}, f"{key}={value!r}: {marks} are not allowed (template code to cookiecutter)"
        answers[key] = value
    return answers, None


def _new(args: argparse.Namespace) -> int:
    from cookiecutter.exceptions import (
        CookiecutterException,
        FailedHookException,
        UndefinedVariableInTemplate,
    )
    from cookiecutter.main import cookiecutter

    # cookiecutter logs a failed hook with its traceback; the hook has said what was
    # wrong, and every other failure is printed below as one line.
    logging.getLogger("cookiecutter").addHandler(logging.NullHandler())
    context, problem = _answers(args.context)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        path = cookiecutter(
            str(template_dir()),
            no_input=args.no_input,
            extra_context=context,
            output_dir=str(args.output_dir),
        )
    except FailedHookException:
        return 1  # the hook has said what was wrong
    except UndefinedVariableInTemplate as error:
        # Its own str() appends the whole template context.
        print(f"error: {_one_line(error.message)}: {_one_line(error.error)}", file=sys.stderr)
        return 1
    except (CookiecutterException, ValueError, OSError) as error:
        # ValueError: cookiecutter's own refusal of a value outside a choice list;
        # OSError: an output directory that is a file, or that cannot be written.
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    print(f"created {path}")
    return 0


def _one_line(error: BaseException | str) -> str:
    text = str(error) or type(error).__name__
    # cookiecutter starts some messages with its own "Error: ".
    return " ".join(text.removeprefix("Error: ").split())


def _proxy(args: argparse.Namespace, command: list[str], parser: argparse.ArgumentParser) -> int:
    if bool(args.app) == bool(command):
        parser.error("give an app as module:attr, or a command after --, not both")
    if args.app:
        command = [sys.executable, "-m", "flysticky.proxy.serve", args.app]
    fly_toml = args.fly_toml or (Path("fly.toml") if Path("fly.toml").is_file() else None)
    return _run(args, command, Path.cwd(), fly_toml, args.app_name, banner=None)


def _demo(args: argparse.Namespace) -> int:
    from cookiecutter.main import cookiecutter

    with tempfile.TemporaryDirectory(prefix="flysticky-demo-") as tmp:
        project = Path(
            cookiecutter(
                str(template_dir()),
                no_input=True,
                output_dir=tmp,
                extra_context={
                    "project_name": "flysticky demo",
                    "framework": args.framework,
                    "flysticky_requirement": "flysticky",
                },
            )
        )
        banner = f"flysticky demo: {args.machines} {FRAMEWORKS[args.framework]} machines"
        return _run(
            args, [sys.executable, "app.py"], project, project / "fly.toml", None, banner=banner
        )


def _run(
    args: argparse.Namespace,
    command: list[str],
    cwd: Path,
    fly_toml: Path | None,
    app_name: str | None,
    banner: str | None,
) -> int:
    from .proxy.flytoml import FlyToml, FlyTomlError, load
    from .proxy.machines import MachineError

    config = FlyToml()
    if fly_toml is not None:
        try:
            config = load(fly_toml)
        except FlyTomlError as error:
            print(f"error: {fly_toml}: {error}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_serve(args, command, cwd, config, app_name or config.app, banner))
    except (MachineError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


async def _serve(
    args: argparse.Namespace,
    command: list[str],
    cwd: Path,
    config: Any,
    app_name: str | None,
    banner: str | None,
) -> int:
    """Serve until ``q`` (exit status 0) or a signal (128 + its number, as a shell has it)."""
    from .proxy.emulator import ADMIN_PREFIX, Emulator
    from .proxy.machines import Fleet, MachineError

    app_name = app_name or "flysticky-local"
    fleet = Fleet(
        command,
        app_name=app_name,
        regions=args.regions,
        cwd=cwd,
        echo=not args.quiet,
        private_network=False if args.port_per_machine else None,
        metrics=config.metrics,
    )
    emulator = Emulator(
        fleet,
        host=args.host,
        port=args.port,
        cache_rules=config.cache_rules,
        forwarded_proto=args.forwarded_proto,
        autostop=config.autostop,
        idle_after=args.idle_after,
        dns_port=args.dns_port,
    )
    stop = asyncio.Event()
    stopped_by: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        # Ctrl-C while machines start must not wait for them to come up.
        starting = asyncio.create_task(emulator.start(args.machines))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return 128 + stopped_by[0]
        starting.result()
        autostop = config.autostop
        say(
            f"{banner or 'flysticky proxy'} behind a local Fly proxy emulator "
            f"(app {app_name}, {len(config.cache_rules)} replay-cache rule(s), "
            f"auto_stop_machines={autostop.stop!r}"
            + (f" after {args.idle_after:g}s idle" if autostop.stop != "off" else "")
            + f", auto_start_machines={str(autostop.start).lower()}, "
            f"min_machines_running={autostop.min_running})\n"
            f"  open  {emulator.url}/\n"
            + "".join(
                f"  machine {i}: {m.id} {m.region} pid {m.pid} on {m.host}:{m.port}\n"
                for i, m in enumerate(fleet.machines, 1)
            )
            + _dns_lines(emulator)
            + (
                f"  metrics (fly.toml [metrics], as Fly's Prometheus holds them): "
                f"curl {emulator.url}{ADMIN_PREFIX}/metrics\n"
                if config.metrics is not None
                else ""
            )
            + f"  {KEYS}\n"
            f"  or:   curl -X POST {emulator.url}{ADMIN_PREFIX}/machines/<id>/"
            "crash|stop|suspend|start|restart|destroy\n"
            "  Ctrl-C stops the proxy and every machine it started."
        )
        tasks = [asyncio.create_task(_show_counters(emulator, stop))]
        if sys.stdin is not None and sys.stdin.isatty():
            tasks.append(asyncio.create_task(_read_keys(emulator, stop)))
        await stop.wait()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MachineError):
                await task
        return 128 + stopped_by[0] if stopped_by else 0
    finally:
        pids = [m.pid for m in fleet.machines if m.pid]
        await emulator.close()
        if pids:
            say(_summary(emulator) + f"\nstopped machine processes {pids}")


def _dns_lines(emulator: Any) -> str:
    host, port = emulator.dns_address
    app = emulator.fleet.app_name
    return (
        f"  internal DNS {host}:{port} (the machines' FLYSTICKY_RESOLVER): vms.{app}.internal, "
        f"all.vms.{app}.internal, <id>.vm.{app}.internal, ...\n"
        f"  ask it: dig @{host} -p {port} +short TXT vms.{app}.internal\n"
        f"  or run a process of yours with it: "
        f"FLYSTICKY_RESOLVER={host}:{port} FLY_APP_NAME={app} python app.py\n"
    )


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _table(emulator: Any) -> str:
    rows = [("#", "machine", "region", "state", "requests", "served", "replays", "hits", "errors")]
    for i, m in enumerate(emulator.describe(), 1):
        rows.append(
            (
                str(i),
                m["id"],
                m["region"],
                m["state"],
                *(str(m[k]) for k in ("requests", "served", "replays", "cache_hits", "errors")),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def _summary(emulator: Any) -> str:
    total = emulator.totals()
    return (
        f"{_table(emulator)}\n"
        f"total: {total.requests} deliveries, {total.served} served, {total.replays} replays, "
        f"{total.cache_hits} replay-cache hits, {total.errors} errors, "
        f"{emulator.stats.proxy_errors} proxy errors"
    )


async def _show_counters(emulator: Any, stop: asyncio.Event) -> None:
    last = None
    while not stop.is_set():
        await asyncio.sleep(2)
        line = " | ".join(
            f"{m['id'][:6]} {m['state'][:4]} {m['served']}s/{m['replays']}r/{m['cache_hits']}h"
            for m in emulator.describe()
        )
        if line != last:
            say(f"[proxy] {line}")
            last = line


async def _read_keys(emulator: Any, stop: asyncio.Event) -> None:
    from .proxy.machines import MachineError

    loop = asyncio.get_running_loop()
    while not stop.is_set():
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            message = await _key(emulator, line.split(), stop)
        except MachineError as error:
            message = f"error: {error}"
        if message:
            say(message)


def _machine(emulator: Any, word: str) -> tuple[Any, str]:
    """The machine a key names: its number in the list (1 to 3 digits), or else the start
    of its id, which must match exactly one machine."""
    machines = emulator.fleet.machines
    word = word.lower()
    starting = [(i, m) for i, m in enumerate(machines, 1) if m.id.startswith(word)]
    if word.isdigit() and len(word) <= NUMBER_DIGITS:
        if 1 <= int(word) <= len(machines):
            return machines[int(word) - 1], ""
        problem = f"no machine number {word}: there are {len(machines)} (1-{len(machines)})"
        if starting:
            # The likely intent; an id is taken only from 4 characters on.
            which = ", ".join(str(i) for i, _ in starting)
            problem += (
                f"; {word} starts the id of machine {which}: to mean an id, "
                f"give at least {NUMBER_DIGITS + 1} characters"
            )
        return None, problem
    if not starting:
        return None, (
            f"no machine's id starts with {word!r}: give its number "
            f"(1-{len(machines)}) or the first characters of its id"
        )
    if len(starting) > 1:
        candidates = ", ".join(f"{i} ({m.id})" for i, m in starting)
        return None, f"{word!r} starts the ids of machines {candidates}: give more characters"
    return starting[0][1], ""


async def _key(emulator: Any, words: list[str], stop: asyncio.Event) -> str:
    from .proxy.machines import MachineError

    if not words:
        return ""
    key, rest = words[0].lower(), words[1:]
    if key == "q":
        stop.set()
        return "stopping"
    if key == "s":
        return _summary(emulator)
    if key == "a":
        try:
            machine = await emulator.fleet.add(rest[0] if rest else None)
        except ValueError as error:
            return f"error: {error}"
        return f"added machine {len(emulator.fleet.machines)}: {machine.id} {machine.region}"
    if key in ACTIONS and rest:
        machine, problem = _machine(emulator, rest[0])
        if machine is None:
            return f"error: {problem}"
        action = ACTIONS[key]
        operations = {
            "crash": emulator.fleet.kill,
            "stop": emulator.fleet.stop,
            "suspend": emulator.fleet.suspend,
            "start": emulator.fleet.start,
            "restart": emulator.fleet.restart,
            "destroy": emulator.destroy,
        }
        try:
            await operations[action](machine)
        except MachineError as error:
            return f"error: {error}"
        return f"{action}: machine {machine.id} is {machine.facts().state}"
    return KEYS


if __name__ == "__main__":
    raise SystemExit(main())
