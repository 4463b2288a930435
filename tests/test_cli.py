"""The command line: clear errors, not tracebacks, and every machine stopped."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flysticky.proxy.machines import free_port

from .emulator_fixtures import HERE, assert_all_stopped

CLI = [sys.executable, "-m", "flysticky.cli"]


def run(
    args: list[str], cwd: Path = HERE.parent, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["proxy", "--machines", "1", "--", "no-such-command-xyz"],
            "cannot run 'no-such-command-xyz'",
        ),
        (
            [
                "proxy",
                "--machines",
                "1",
                "--",
                sys.executable,
                "-c",
                "import sys; print('boom'); sys.exit(4)",
            ],
            "exited with code 4",
        ),
        (["proxy", "--machines", "1", "nomodule_xyz:app"], "cannot import 'nomodule_xyz'"),
        (["proxy", "--machines", "0", "app:app"], "must be 1 or more"),
        (["proxy", "--regions", "iad,x", "app:app"], "region codes"),
        (["proxy", "app:app", "--", "python", "x.py"], "not both"),
        (["proxy"], "not both"),
    ],
)
def test_bad_invocations_say_what_is_wrong(args: list[str], message: str) -> None:
    result = run([*args[:1], "--port", str(free_port()), *args[1:]])
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            [
                "proxy",
                "--port",
                str(port),
                "--machines",
                "1",
                "--",
                sys.executable,
                str(HERE / "apps" / "echo_backend.py"),
            ]
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_fly_toml_is_a_clear_error(tmp_path: Path) -> None:
    tmp_path.joinpath("fly.toml").write_text(
        'app = "x"\n[[http_service.http_options.replay_cache]]\n'
        'path_prefix = "/"\nttl_seconds = 5\ntype = "cookie"\nname = "k"\n'
    )
    result = run(["proxy", "--port", str(free_port()), "app:app"], cwd=tmp_path)
    assert result.returncode == 2
    assert "ttl_seconds=5: a whole number of seconds, at least 10" in result.stderr


def test_proxy_serves_counts_and_stops_every_machine(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            *CLI,
            "proxy",
            "--port",
            str(port),
            "--machines",
            "2",
            "--regions",
            "iad,ams",
            "--quiet",
            "--",
            sys.executable,
            str(HERE / "apps" / "echo_backend.py"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/echo", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        assert b'"machine"' in body
        for _ in range(4):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/echo", timeout=5).read()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "machine 1:" in err and "iad" in err and "ams" in err
    assert "total: 5 deliveries, 5 served, 0 replays" in err
    pids = [
        int(p) for p in err.rsplit("stopped machine processes [", 1)[1].split("]")[0].split(",")
    ]
    assert len(pids) == 2
    assert_all_stopped(pids)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    root = HERE.parent
    readme = root.joinpath("README.md").read_text()
    first_screen = readme.split("---", 1)[0]
    commands = [line for line in first_screen.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2  # the demo, the tests
    run_demo, run_tests = commands
    assert run_demo.endswith("flysticky demo")
    assert run_tests.endswith("python -m pytest")
    assert run_tests in root.joinpath(".ci", "run").read_text().splitlines()


async def test_terminal_keys_kill_restart_add_and_quit() -> None:
    import asyncio

    from flysticky.cli import _key

    from .emulator_fixtures import running

    async with running(machines=2) as (emulator, _):
        stop = asyncio.Event()
        first = emulator.fleet.machines[0]
        assert "kill: machine" in await _key(emulator, ["k", "1"], stop)
        assert not first.alive
        assert "restart: machine" in await _key(emulator, ["r", first.id[:6]], stop)
        assert first.alive
        assert "added machine 3" in await _key(emulator, ["a", "ams"], stop)
        assert emulator.fleet.machines[2].region == "ams"
        assert "total:" in await _key(emulator, ["s"], stop)
        assert "no single machine" in await _key(emulator, ["k", "zz"], stop)  # ids are hex
        assert "keys:" in await _key(emulator, ["?"], stop)
        await _key(emulator, ["q"], stop)
        assert stop.is_set()


def test_import_flysticky_needs_neither_framework() -> None:
    code = (
        "import sys; sys.modules['sanic'] = None; sys.modules['quart'] = None\n"
        "import flysticky\n"
        "from flysticky import StickyConfig, Decider\n"
        "print(Decider(StickyConfig(), 'abc').machine_id)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "abc"
