"""A real browser on the demo: `flysticky demo` (the README's run command), 3 machines.

Headless Debian chromium driven by Playwright. The screenshots land in artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flysticky.proxy.emulator import ADMIN_PREFIX
from flysticky.proxy.machines import free_port

from .emulator_fixtures import assert_all_stopped

ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("FLYSTICKY_REQUIRE_BROWSER"):
            pytest.fail(f"chromium not found at {CHROMIUM}; .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture(params=["sanic", "quart"])
def demo(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flysticky.cli",
            "demo",
            "--framework",
            request.param,
            "--port",
            str(port),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the demo did not come up in 60 s"
                time.sleep(0.3)
        pids = [m["pid"] for m in admin(url, "/machines")]
        yield url, request.param
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err  # 128 + SIGINT, as a shell reports Ctrl-C
        assert "stopped machine processes" in err
    assert_all_stopped(pids)


def admin(url: str, path: str, method: str = "GET") -> list[dict[str, object]]:
    request = urllib.request.Request(url + ADMIN_PREFIX + path, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_demo_page_sticks_then_heals(browser: object, demo: tuple[str, str]) -> None:
    url, framework = demo
    page = browser.new_page()  # type: ignore[attr-defined]
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.goto(url + "/")
        machines = set()
        for visit in range(1, 11):
            if visit > 1:
                page.reload()
            machines.add(page.text_content("#machine"))
            assert page.text_content("#visits") == str(visit)
        assert len(machines) == 1
        (machine,) = machines
        assert re.fullmatch(r"[0-9a-f]{14}", machine)
        page.wait_for_function(
            "document.getElementById('ws-state').textContent === 'connected'", timeout=15000
        )
        page.wait_for_function(
            f"document.getElementById('ws-machine').textContent.startsWith('{machine}')",
            timeout=15000,
        )
        page.screenshot(path=str(ARTIFACTS / f"demo-{framework}-pinned.png"), full_page=True)

        # Destroyed (a crash would restart it in place): the session must move and re-pin.
        admin(url, f"/machines/{machine}/destroy", method="POST")
        response = page.reload()
        assert response is not None and response.status == 200
        after = page.text_content("#machine")
        assert after != machine and re.fullmatch(r"[0-9a-f]{14}", after or "")
        assert page.text_content("#visits") == "1"
        assert page.text_content("#outcome") in ("repinned", "stamped")
        assert "Sticky sessions on Fly.io" in page.title()
        page.wait_for_function(
            f"document.getElementById('ws-machine').textContent.startsWith('{after}')",
            timeout=20000,
        )
        page.reload()
        assert page.text_content("#machine") == after
        assert page.text_content("#visits") == "2"
        page.screenshot(path=str(ARTIFACTS / f"demo-{framework}-healed.png"), full_page=True)
    finally:
        page.close()
