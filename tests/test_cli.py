"""The command line: clear errors, not tracebacks, and every machine stopped."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flysticky.proxy.machines import free_port

from .emulator_fixtures import ECHO, HERE, assert_all_stopped

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
        (["proxy", "--regions", "iad,x", "app:app"], "'x' is not a Fly.io region"),
        (["proxy", "--regions", "sea", "app:app"], "region 'sea' is retired on Fly.io: use 'sjc'"),
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
    assert process.returncode == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    assert "machine 1:" in err and "iad" in err and "ams" in err
    assert "total: 5 deliveries, 5 served, 0 replays" in err
    pids = [
        int(p) for p in err.rsplit("stopped machine processes [", 1)[1].split("]")[0].split(",")
    ]
    assert len(pids) == 2
    assert_all_stopped(pids)


@pytest.mark.parametrize("framework", ["sanic", "quart", "fastapi"])
def test_demo_serves_each_framework_and_stops_every_machine(framework: str) -> None:
    """`flysticky demo --framework X`: the template rendered for X, run as its Dockerfile
    runs it, on each machine. (tests/test_browser.py drives the page itself.)"""
    port = free_port()
    args = ["demo", "--framework", framework, "--port", str(port), "--machines", "2", "--quiet"]
    process = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = machine_pids(port, 2, time.monotonic() + 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            page = response.read().decode()
            cookies = response.headers.get_all("set-cookie")
        assert "Visits this session" in page
        (pin,) = [c.split(";")[0].split("=")[1] for c in cookies if c.startswith("fly-machine-id=")]
        assert pin in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/rooms/lobby", timeout=10) as room:
            assert json.loads(room.read())["room"] == "lobby"
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    names = {"sanic": "Sanic", "quart": "Quart", "fastapi": "FastAPI"}
    assert f"flysticky demo: 2 {names[framework]} machines" in err
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert_all_stopped(pids)


def test_demo_without_its_framework_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from flysticky.cli import main\n"
        "sys.exit(main(['demo', '--framework', 'fastapi', '--port', '0']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "error: this needs fastapi: pip install 'flysticky[fastapi]'\n"
    result = run(["demo", "--framework", "django"])
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert "sanic, quart, fastapi" in result.stderr.replace("'", "")


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


async def test_terminal_keys_change_machine_states() -> None:
    import asyncio

    from flysticky.cli import _key

    from .emulator_fixtures import running

    async with running(machines=3) as (emulator, _):
        stop = asyncio.Event()
        first, second, third = emulator.fleet.machines
        assert "crash: machine" in await _key(emulator, ["k", "1"], stop)
        assert first.facts().state == "crashed"
        assert "restart: machine" in await _key(emulator, ["r", first.id[:6]], stop)
        assert first.alive
        suspended = await _key(emulator, ["z", "2"], stop)
        assert suspended == f"suspend: machine {second.id} is suspended"
        assert await _key(emulator, ["u", "2"], stop) == f"start: machine {second.id} is started"
        assert await _key(emulator, ["o", "3"], stop) == f"stop: machine {third.id} is stopped"
        assert "error: machine" in await _key(emulator, ["z", "3"], stop)  # not started
        assert await _key(emulator, ["d", "3"], stop) == f"destroy: machine {third.id} is destroyed"
        assert "added machine 4" in await _key(emulator, ["a", "ams"], stop)
        assert emulator.fleet.machines[3].region == "ams"
        assert "retired" in await _key(emulator, ["a", "sea"], stop)
        assert len(emulator.fleet.machines) == 4
        assert "total:" in await _key(emulator, ["s"], stop)
        assert "no machine's id starts with 'zz'" in await _key(emulator, ["k", "zz"], stop)
        assert "keys" in await _key(emulator, ["?"], stop)
        await _key(emulator, ["q"], stop)
        assert stop.is_set()


async def test_a_number_out_of_range_is_an_error_not_an_id_prefix() -> None:
    import asyncio

    from flysticky.cli import _key

    from .emulator_fixtures import running

    async with running(machines=3) as (emulator, _):
        # Only the third id starts with 9 (ids are random: set them all): "k 9" must not
        # reach it.
        for machine, first in zip(emulator.fleet.machines, "ab9", strict=True):
            machine.id = first + machine.id[1:]
        answer = await _key(emulator, ["k", "9"], asyncio.Event())
        assert answer == (
            "error: no machine number 9: there are 3 (1-3); "
            "9 starts the id of machine 3: to mean an id, give at least 4 characters"
        )
        assert all(m.alive for m in emulator.fleet.machines)


async def test_up_to_3_digits_is_a_number_and_longer_words_are_id_prefixes() -> None:
    import asyncio

    from flysticky.cli import _key

    from .emulator_fixtures import running

    async with running(machines=3) as (emulator, _):
        first, second, third = emulator.fleet.machines
        first.id, second.id, third.id = "8512aaaaaaaaaa", "851bbbbbbbbbbb", "abc0000000000c"
        stop = asyncio.Event()
        answer = await _key(emulator, ["o", "85"], stop)  # a number, though ids start with 85
        assert answer == (
            "error: no machine number 85: there are 3 (1-3); "
            "85 starts the id of machine 1, 2: to mean an id, give at least 4 characters"
        )
        answer = await _key(emulator, ["o", "851"], stop)
        assert answer.startswith("error: no machine number 851: there are 3 (1-3); 851 starts")
        assert all(m.alive for m in emulator.fleet.machines)
        assert await _key(emulator, ["o", "8512"], stop) == f"stop: machine {first.id} is stopped"
        assert await _key(emulator, ["o", "851B"], stop) == f"stop: machine {second.id} is stopped"
        assert await _key(emulator, ["o", "3"], stop) == f"stop: machine {third.id} is stopped"
        assert await _key(emulator, ["u", "abc"], stop) == f"start: machine {third.id} is started"
        answer = await _key(emulator, ["u", "85b"], stop)
        assert answer == (
            "error: no machine's id starts with '85b': give its number (1-3) "
            "or the first characters of its id"
        )
        third.id = "851ccccccccccc"
        answer = await _key(emulator, ["u", "851c"], stop)
        assert answer == f"start: machine {third.id} is started"
        second.id = "851cdddddddddd"
        answer = await _key(emulator, ["u", "851c"], stop)
        assert answer == (
            f"error: '851c' starts the ids of machines 2 ({second.id}), 3 ({third.id}): "
            "give more characters"
        )


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


@pytest.mark.parametrize(
    ("fly_toml", "message"),
    [
        ("x = [", "fly.toml: cannot read it as TOML: "),
        ("app = 5", "app=5: the app's name, a string"),
        ("http_service = 5", "http_service=5: must be a table"),
        ("[http_service]\nhttp_options = 3", "http_service.http_options=3: must be a table"),
        ("[http_service.http_options]\nreplay_cache = 3", "replay_cache=3: must be an array"),
        ("[[http_service.http_options.replay_cache]]\npath_prefix = 5", "path_prefix=5: a path"),
        ('[http_service]\nauto_stop_machines = "later"', "auto_stop_machines='later': one of"),
        ('[http_service]\nauto_start_machines = "yes"', "auto_start_machines='yes': true or"),
        ("[http_service]\nmin_machines_running = -1", "min_machines_running=-1: a whole"),
    ],
)
def test_each_malformed_fly_toml_is_one_line(tmp_path: Path, fly_toml: str, message: str) -> None:
    tmp_path.joinpath("fly.toml").write_text(fly_toml + "\n")
    result = run(["proxy", "--port", str(free_port()), "app:app"], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unresolvable_host_is_one_line() -> None:
    result = run(["proxy", "--host", "no-such-host.invalid", "--machines", "1", "app:app"])
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot listen on no-such-host.invalid:8080: ")
    assert "Unknown error" not in result.stderr  # the resolver's own words, not an errno
    assert result.stderr.count("\n") == 1


def test_new_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    unwritable = Path("/proc/no-such-dir") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        unwritable.mkdir(mode=0o555)
    for output in (a_file, unwritable):
        result = run(["new", "--no-input", "--output-dir", str(output)], timeout=120)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    result = run(["new", "--no-input", f"--output-dir={tmp_path}", "primary_region=sea"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "use 'sjc'" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("framwork=quart", "unknown key 'framwork' in 'framwork=quart': the keys are "),
        ("nonsense=1", "unknown key 'nonsense' in 'nonsense=1': the keys are "),
        ("_copy_without_render=x", "unknown key '_copy_without_render'"),  # private keys too
        ("=x", "'=x': expected KEY=VALUE, such as framework=quart; the keys are "),
        ("framework", "'framework': expected KEY=VALUE, such as framework=quart; the keys are "),
        ("framework=django", "framework='django': one of sanic, quart, fastapi"),
        ("project_name={{x}}", "project_name='{{x}}': '{{', '{%', '{#' are not allowed"),
        ("project_name={% if %}", "project_name='{% if %}': '{{', '{%', '{#' are not allowed"),
        ("cookie_name=a{#b", "cookie_name='a{#b': '{{', '{%', '{#' are not allowed"),
    ],
)
def test_new_refuses_unknown_keys_and_bad_words_in_one_line(
    tmp_path: Path, word: str, message: str
) -> None:
    result = run(["new", "--no-input", f"--output-dir={tmp_path}", "primary_region=ams", word])
    assert result.returncode == 2
    assert result.stderr == f"error: {result.stderr[7:]}" and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    if "the keys are" in message:
        assert "framework, primary_region" in result.stderr
        assert "_copy_without_render," not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_cookiecutter_errors_are_short_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cookiecutter.exceptions import UndefinedVariableInTemplate
    from jinja2.exceptions import UndefinedError

    from flysticky.cli import main

    tmp_path.joinpath("sticky_demo").mkdir()
    result = run(["new", "--no-input", f"--output-dir={tmp_path}"])
    assert result.returncode == 1
    assert result.stderr == f'error: "{tmp_path / "sticky_demo"}" directory already exists\n'

    def undefined(*_: object, **__: object) -> None:
        context = {"cookiecutter": {"project_name": "x" * 5000}}
        raise UndefinedVariableInTemplate(
            "Unable to render variable 'project_name'", UndefinedError("'x' is undefined"), context
        )

    monkeypatch.setattr("cookiecutter.main.cookiecutter", undefined)
    assert main(["new", "--no-input", f"--output-dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err == "error: Unable to render variable 'project_name': 'x' is undefined\n"


def machine_pids(port: int, count: int, deadline: float) -> list[int]:
    """The pids of the proxy's machines, once ``count`` of them are started."""
    while True:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/.fly-emulator/machines", timeout=2
            ) as response:
                machines = json.loads(response.read())
            if [m["state"] for m in machines] == ["started"] * count:
                return [m["pid"] for m in machines]
        except OSError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_proxy_killed_by_sigkill_takes_its_machines_with_it() -> None:
    port = free_port()
    process = subprocess.Popen(
        [*CLI, "proxy", "--port", str(port), "--machines", "2", "--quiet", "--", *ECHO],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pids = machine_pids(port, 2, time.monotonic() + 30)
    finally:
        process.kill()
        process.wait(10)
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_all_stopped([pid for pid in pids if alive(pid)])


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_during_start_up_stops_everything_at_once(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    never_listens = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    command = [sys.executable, "-c", never_listens]
    process = subprocess.Popen(
        [*CLI, "proxy", "--port", str(free_port()), "--machines", "1", "--quiet", "--", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    machine = int(pid_file.read_text())
    process.send_signal(signal.SIGINT)
    began = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - began < 2, err
    assert "Traceback" not in err
    assert process.returncode == 130
    assert not alive(machine)


def start_proxy(stdin: int | None = subprocess.DEVNULL) -> tuple[subprocess.Popen[str], list[int]]:
    """A proxy with two started machines, and their pids."""
    port = free_port()
    process = subprocess.Popen(
        [*CLI, "proxy", "--port", str(port), "--machines", "2", "--quiet", "--", *ECHO],
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        return process, machine_pids(port, 2, time.monotonic() + 30)
    except BaseException:
        process.kill()
        process.communicate(timeout=10)
        raise


def test_sigterm_exits_143_and_q_exits_0() -> None:
    process, pids = start_proxy()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143, err
    assert_all_stopped(pids)
    # The keys are read only from a terminal: give it one.
    controller, terminal = pty.openpty()
    try:
        process, pids = start_proxy(stdin=terminal)
        os.write(controller, b"q\n")
        _, err = process.communicate(timeout=30)
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == 0, err
    assert "stopping" in err
    assert_all_stopped(pids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--machines", "100000"], "'100000': must be 1 or more, and at most 32"),
        (["--app-name", "Bad App"], "app name 'Bad App': lowercase letters, digits and dashes"),
        (["--app-name=-app"], "app name '-app'"),
        (["--app-name", "app-"], "app name 'app-'"),
        (["--app-name", "a" * 64], "at most 63 characters"),
    ],
)
def test_proxy_options_are_checked(args: list[str], message: str) -> None:
    result = run(["proxy", "--port", str(free_port()), *args, "app:app"])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_fly_toml_app_name_is_checked(tmp_path: Path) -> None:
    tmp_path.joinpath("fly.toml").write_text('app = "My_App"\n')
    result = run(["proxy", "--port", str(free_port()), "app:app"], cwd=tmp_path)
    assert result.returncode == 2
    assert "app='My_App': app name 'My_App': lowercase letters" in result.stderr
