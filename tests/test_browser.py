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


@pytest.fixture(params=["sanic", "quart", "fastapi"])
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


# --- Rooms: two browsers, one room, one machine --------------------------------------------


def room_view(page: object) -> dict[str, str]:
    """What a page's room panel shows: state, serving machine, whether it owns the room,
    and flysticky's decision on the room's websocket there."""
    return page.evaluate(  # type: ignore[attr-defined,no-any-return]
        """() => ({
            state: document.getElementById('room-state').textContent,
            machine: document.getElementById('room-machine').dataset.machine || '',
            owner: document.getElementById('room-owner').dataset.owner || '',
            outcome: document.getElementById('room-machine').dataset.outcome || '',
        })"""
    )


def settle_in_room(pages: list[object], not_on: str | None = None, timeout: float = 60) -> str:
    """Wait until every page is connected to the same machine, which says it owns the
    room (and is not ``not_on``), for two looks in a row more than a rebalance apart;
    returns that machine."""
    deadline = time.monotonic() + timeout
    settled = None
    while True:
        views = [room_view(page) for page in pages]
        machines = {view["machine"] for view in views}
        ok = (
            all(view["state"] == "connected" and view["owner"] == "yes" for view in views)
            and len(machines) == 1
            and not_on not in machines
        )
        if ok and settled == machines:
            (machine,) = machines
            return machine
        settled = machines if ok else None
        assert time.monotonic() < deadline, f"the pages did not settle in one room: {views}"
        time.sleep(1.5)


def say_and_hear(speaker: object, listener: object, text: str) -> None:
    speaker.fill("#room-text", text)  # type: ignore[attr-defined]
    speaker.click("#room-send button")  # type: ignore[attr-defined]
    for page in (speaker, listener):
        page.wait_for_function(  # type: ignore[attr-defined]
            """text => [...document.querySelectorAll('#room-messages li')]
                .some(item => item.lastChild.textContent === text)""",
            arg=text,
            timeout=10000,
        )


def test_two_browsers_share_a_room_and_follow_it_to_its_new_owner(
    browser: object, demo: tuple[str, str]
) -> None:
    url, framework = demo
    machines = [str(m["id"]) for m in admin(url, "/machines")]
    room = f"browsers-{framework}"
    # Two visitors pinned to two different machines: the room, not the pin, decides.
    contexts = [browser.new_context() for _ in range(2)]  # type: ignore[attr-defined]
    for context, pin in zip(contexts, machines, strict=False):
        context.add_cookies([{"name": "fly-machine-id", "value": pin, "url": url}])
    pages = [context.new_page() for context in contexts]
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        for page in pages:
            page.goto(url + "/")
            page.fill("#room-name", "Not A Room")
            page.click("#room-join button")
            assert "lowercase letters" in (page.text_content("#room-problem") or "")
            page.fill("#room-name", room)
            page.click("#room-join button")
        assert {page.text_content("#machine") for page in pages} == set(machines[:2])
        owner = settle_in_room(pages)
        say_and_hear(pages[0], pages[1], "<b>hello</b> from the first browser")
        say_and_hear(pages[1], pages[0], "and back from the second")
        assert pages[1].locator("#room-messages b").count() == 0  # text, never markup
        pages[0].screenshot(path=str(ARTIFACTS / f"demo-{framework}-room.png"), full_page=True)

        # The owner is destroyed: the room moves to ONE new owner, and both pages follow.
        admin(url, f"/machines/{owner}/destroy", method="POST")
        new_owner = settle_in_room(pages, not_on=owner)
        assert new_owner in machines
        say_and_hear(pages[1], pages[0], "still together after the move")
        say_and_hear(pages[0], pages[1], "yes, on " + new_owner)
        pages[1].screenshot(
            path=str(ARTIFACTS / f"demo-{framework}-room-moved.png"), full_page=True
        )
    finally:
        for context in contexts:
            context.close()
