"""``flysticky proxy``, ``flysticky demo`` and ``flysticky new``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).parent
KEYS = (
    "keys: k N kills machine N (a crash: its sessions move and re-pin), r N restarts it,\n"
    "      d N destroys it, a [REGION] adds a machine, s shows counters, q quits"
)


def template_dir() -> Path:
    """The cookiecutter template: inside an installed wheel, or the checkout's template/."""
    for candidate in (PACKAGE / "template", PACKAGE.parent / "template"):
        if (candidate / "cookiecutter.json").is_file():
            return candidate
    raise SystemExit("error: the flysticky template is missing from this installation")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a TCP port, 0 to 65535")
    return value


def _regions(text: str) -> list[str]:
    regions = [r.strip().lower() for r in text.split(",") if r.strip()]
    if not regions or not all(r.isalpha() and len(r) == 3 for r in regions):
        raise argparse.ArgumentTypeError(f"{text!r}: region codes such as iad or iad,ams")
    return regions


def _add_proxy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--machines", type=_positive, default=3, help="how many (default 3)")
    parser.add_argument("--port", type=_port, default=8080, help="proxy port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="proxy address (default 127.0.0.1)")
    parser.add_argument(
        "--regions", type=_regions, default=["iad"], help="machine regions, spread: iad,ams"
    )
    parser.add_argument(
        "--forwarded-proto",
        choices=("http", "https"),
        default="http",
        help="X-Forwarded-Proto to send, as if TLS ended at the edge (default http)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the machines' output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flysticky", description="Sticky sessions on Fly.io for Sanic and Quart."
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
    proxy.add_argument("--app-name", help="FLY_APP_NAME (default: fly.toml's app)")
    proxy.add_argument(
        "--fly-toml", type=Path, help="read replay_cache rules from it (default ./fly.toml)"
    )
    proxy.add_argument("app", nargs="?", help="module:attr of a Sanic or ASGI app")
    demo = commands.add_parser(
        "demo", help="the demo app on 3 local machines behind the local Fly proxy"
    )
    _add_proxy_options(demo)
    demo.add_argument("--framework", choices=("sanic", "quart"), default="sanic")
    new = commands.add_parser(
        "new",
        help="generate a ready-to-deploy Fly.io app from the bundled template",
        description="Runs the cookiecutter template bundled with flysticky.",
    )
    new.add_argument("--output-dir", type=Path, default=Path("."))
    new.add_argument("--no-input", action="store_true", help="use defaults and KEY=VALUE only")
    new.add_argument("context", nargs="*", metavar="KEY=VALUE", help="e.g. framework=quart")
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
    if args.command in ("new", "demo"):
        _needs("cookiecutter", "template")
    if args.command in ("proxy", "demo"):
        _needs("aiohttp", "proxy")
    if args.command == "new":
        return _new(args, parser)
    try:
        if args.command == "demo":
            return _demo(args)
        return _proxy(args, command, parser)
    except KeyboardInterrupt:
        return 130


def _new(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cookiecutter.exceptions import CookiecutterException, FailedHookException
    from cookiecutter.main import cookiecutter

    context: dict[str, Any] = {}
    for item in args.context:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected KEY=VALUE, such as framework=quart")
        context[key] = value
    try:
        path = cookiecutter(
            str(template_dir()),
            no_input=args.no_input,
            extra_context=context,
            output_dir=str(args.output_dir),
        )
    except FailedHookException:
        return 1  # the hook has said what was wrong
    except (CookiecutterException, ValueError) as error:
        # ValueError: cookiecutter's own refusal of a value outside a choice list.
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"created {path}")
    return 0


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
        banner = f"flysticky demo: {args.machines} {args.framework.title()} machines"
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
    from .proxy.cache import FlyTomlError, load_rules
    from .proxy.machines import MachineError

    rules = []
    if fly_toml is not None:
        try:
            rules = load_rules(fly_toml)
            app_name = app_name or tomllib.loads(fly_toml.read_text()).get("app")
        except FlyTomlError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        asyncio.run(_serve(args, command, cwd, rules, app_name or "flysticky-local", banner))
    except (MachineError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


async def _serve(
    args: argparse.Namespace,
    command: list[str],
    cwd: Path,
    rules: list[Any],
    app_name: str,
    banner: str | None,
) -> None:
    from .proxy.emulator import ADMIN_PREFIX, Emulator
    from .proxy.machines import Fleet, MachineError

    fleet = Fleet(command, app_name=app_name, regions=args.regions, cwd=cwd, echo=not args.quiet)
    emulator = Emulator(
        fleet,
        host=args.host,
        port=args.port,
        cache_rules=rules,
        forwarded_proto=args.forwarded_proto,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await emulator.start(args.machines)
        say(
            f"{banner or 'flysticky proxy'} behind a local Fly proxy emulator "
            f"(app {app_name}, {len(rules)} replay-cache rule(s))\n"
            f"  open  {emulator.url}/\n"
            + "".join(
                f"  machine {i}: {m.id} {m.region} pid {m.pid}\n"
                for i, m in enumerate(fleet.machines, 1)
            )
            + f"  {KEYS}\n"
            f"  or:   curl -X POST {emulator.url}{ADMIN_PREFIX}/machines/<id>/kill\n"
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
    finally:
        pids = [m.pid for m in fleet.machines if m.pid]
        await emulator.close()
        if pids:
            say(_summary(emulator) + f"\nstopped machine processes {pids}")


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


async def _key(emulator: Any, words: list[str], stop: asyncio.Event) -> str:
    if not words:
        return ""
    key, rest = words[0].lower(), words[1:]
    if key == "q":
        stop.set()
        return "stopping"
    if key == "s":
        return _summary(emulator)
    if key == "a":
        machine = await emulator.fleet.add(rest[0] if rest else None)
        return f"added machine {len(emulator.fleet.machines)}: {machine.id} {machine.region}"
    actions = {"k": "kill", "r": "restart", "d": "destroy"}
    if key in actions and rest:
        machines = emulator.fleet.machines
        word = rest[0]
        # A number is a machine's place in the list; anything else, a prefix of its id.
        if word.isdigit() and 1 <= int(word) <= len(machines):
            chosen = [machines[int(word) - 1]]
        else:
            chosen = [m for m in machines if m.id.startswith(word)]
        if len(chosen) != 1:
            return f"no single machine {word!r}: give its number (1-{len(machines)}) or id"
        await getattr(emulator.fleet, actions[key])(chosen[0])
        return f"{actions[key]}: machine {chosen[0].id} is {chosen[0].state}"
    return KEYS


if __name__ == "__main__":
    raise SystemExit(main())
