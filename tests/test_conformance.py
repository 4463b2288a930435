"""Every rule of the core issue, run against both adapters through their test clients."""

from __future__ import annotations

import logging
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest

from flysticky import REPLAY_BODY_LIMIT, StickyConfig

from .conftest import MakeHarness
from .harness import HARNESSES, MACHINE, OTHER, all_header_text, request_path

STAMP = f"fly-machine-id={MACHINE}; Max-Age=518400; Path=/; HttpOnly; SameSite=Lax"
ARRIVAL_HEADERS = {
    "fly-replay-src": f"instance={OTHER};region=ams;t=1732840000000000",
    "fly-replay-cache-status": "hit",
    "fly-preferred-instance-unavailable": OTHER,
    "fly-replay-failed": f"instance={OTHER};reason=timeout;elapsed_ms=10000",
}
HOSTILE = [
    "",
    " ",
    '""',
    "abc%3Bapp%3Dinternal-admin",
    "a" * 65,
    "machine id",
    "m\u00e9chine",
    "\u0430bc",  # Cyrillic a
    "x,region=any",
    '"quoted;app=evil"',
    "=",
    "../../etc",
]


def cookie(value: str, name: str = "fly-machine-id") -> dict[str, str]:
    return {"cookie": f"{name}={value}"}


async def test_not_on_fly_does_nothing(framework: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_MACHINE_ID", raising=False)
    harness = HARNESSES[framework](None)
    for headers in ({}, cookie(OTHER), cookie(MACHINE)):
        reply = await harness.request("GET", "/", headers)
        assert reply.status == 200
        assert reply.header("set-cookie") is None
        assert reply.header("fly-replay") is None
        assert reply.ran == ["hook", "handler"]
        assert reply.decision == {"outcome": None}


async def test_first_visit_is_served_and_stamped(make: MakeHarness) -> None:
    reply = await make().request("GET", "/")
    assert reply.status == 200
    assert reply.all("set-cookie") == [STAMP]
    assert reply.header("fly-replay") is None
    assert reply.header("cache-control") == "private"
    assert reply.ran == ["hook", "handler"]
    assert reply.decision["outcome"] == "stamped"
    assert reply.decision["machine_id"] == MACHINE


async def test_cookie_naming_this_machine_is_served_untouched(make: MakeHarness) -> None:
    reply = await make().request("GET", "/", cookie(MACHINE))
    assert reply.status == 200
    assert reply.header("set-cookie") is None
    assert reply.header("fly-replay") is None
    assert reply.header("cache-control") is None
    assert reply.ran == ["hook", "handler"]
    assert reply.decision == {
        "outcome": "pinned",
        "machine_id": MACHINE,
        "pinned_to": MACHINE,
        "arrived_by": None,
    }


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT"])
async def test_cookie_naming_another_machine_is_replayed_at_once(
    make: MakeHarness, method: str
) -> None:
    reply = await make().request(method, "/", cookie(OTHER))
    assert reply.status == 307
    assert reply.body == b""
    assert reply.all("fly-replay") == [f"prefer_instance={OTHER}"]
    assert reply.header("set-cookie") is None
    assert reply.ran == []  # neither the app's request hook nor the handler


@pytest.mark.parametrize(
    "header",
    [
        f"fly-machine-id= {MACHINE}",
        f'fly-machine-id="{MACHINE}"',
        f"old-fly-machine-id={MACHINE}; fly-machine-id={MACHINE}",
        f"fly-machine-id={MACHINE}!; fly-machine-id={MACHINE}",
        f"fly-machine-id={OTHER}; fly-machine-id={MACHINE}",
    ],
)
async def test_never_replayed_to_the_machine_that_received_it(
    make: MakeHarness, header: str
) -> None:
    reply = await make().request("GET", "/", {"cookie": header})
    assert (reply.status, reply.header("fly-replay"), reply.header("set-cookie")) == (
        200,
        None,
        None,
    )
    assert reply.decision["outcome"] == "pinned"


async def test_two_values_replay_to_the_last_in_a_form_fly_does_not_cache(
    make: MakeHarness,
) -> None:
    third = "0123456789abcd"
    reply = await make().request(
        "GET", "/", {"cookie": f"fly-machine-id={third}; fly-machine-id={OTHER}"}
    )
    assert reply.status == 307
    assert reply.all("fly-replay") == [f"prefer_instance={OTHER};state=flysticky-duplicate-cookie"]
    assert reply.ran == []


async def test_strict_mode_sends_echoflys_header(make: MakeHarness) -> None:
    reply = await make(StickyConfig(replay_mode="instance")).request("GET", "/", cookie(OTHER))
    assert reply.status == 307
    assert reply.all("fly-replay") == [f"instance={OTHER}"]


@pytest.mark.parametrize("machine", ["test-machine-123", "00bb33ff", "a", "A_b-9" * 12])
async def test_echofly_style_ids_are_valid(make: MakeHarness, machine: str) -> None:
    reply = await make().request("GET", "/", cookie(machine))
    assert reply.status == 307
    assert reply.header("fly-replay") == f"prefer_instance={machine}"


async def test_request_matching_no_route_is_replayed_too(make: MakeHarness) -> None:
    harness = make()
    reply = await harness.request("GET", "/no-such-page", cookie(OTHER))
    if harness.framework == "litestar":
        # Litestar runs middleware only on a matched route (README: Litestar): a path
        # the app does not have is its 404 wherever it lands, and nothing else.
        assert (reply.status, reply.ran, reply.header("fly-replay")) == (404, [], None)
        return
    assert reply.status == 307
    assert reply.header("fly-replay") == f"prefer_instance={OTHER}"
    assert reply.ran == []


async def test_quart_blueprint_hooks_do_not_run_before_a_replay(on_fly: str) -> None:
    harness = HARNESSES["quart"](None)
    reply = await harness.request("GET", "/bp", cookie(OTHER))
    assert (reply.status, reply.ran) == (307, [])
    reply = await harness.request("GET", "/bp", cookie(MACHINE))
    assert (reply.status, reply.ran) == (200, ["hook", "hook", "handler"])


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_cookie_counts_as_none_and_never_reaches_a_header(
    make: MakeHarness, value: str
) -> None:
    # Control characters: test clients refuse to send them; test_real_servers sends
    # them over raw sockets and the core's property tests feed them directly.
    harness = make()
    header = f"fly-machine-id={value}"
    if not header.isascii():
        # Raw UTF-8 bytes on the wire, as a hostile client would send them.
        header = header.encode().decode("latin-1")
    reply = await harness.request("GET", "/", {"cookie": header})
    assert reply.status == 200
    assert reply.all("set-cookie") == [STAMP]
    assert reply.header("fly-replay") is None
    assert reply.decision["outcome"] == "stamped"
    stripped = value.strip().strip('"')
    if len(stripped) > 3:
        for text in all_header_text(reply):
            assert stripped not in text


async def test_semicolon_smuggling_cannot_choose_the_app(make: MakeHarness) -> None:
    reply = await make().request("GET", "/", {"cookie": "fly-machine-id=abc;app=internal-admin"})
    # "abc" is a valid id: it is replayed to machine abc, and nothing else.
    assert reply.all("fly-replay") == ["prefer_instance=abc"]
    assert all("app=" not in text for text in all_header_text(reply))


@pytest.mark.parametrize(
    "header",
    [
        f"session=1; fly-machine-id={OTHER}; theme=dark",
        f"fly-machine-id={OTHER}",
        f'fly-machine-id="{OTHER}"',
        f"fly-machine-id=bad value; fly-machine-id={OTHER}",
        f"a=b;fly-machine-id={OTHER}",
    ],
)
async def test_cookie_is_found_among_others(make: MakeHarness, header: str) -> None:
    reply = await make().request("GET", "/", {"cookie": header})
    # A second value, even an invalid one, makes the replay one Fly does not cache.
    duplicate = ";state=flysticky-duplicate-cookie" if header.count("fly-machine-id") > 1 else ""
    assert reply.header("fly-replay") == f"prefer_instance={OTHER}{duplicate}"


async def test_cookie_split_over_several_headers_is_found(make: MakeHarness) -> None:
    # HTTP/2 clients, and Quart's test client, send one Cookie header per cookie.
    headers = [("cookie", "session=1"), ("cookie", f"fly-machine-id={OTHER}")]
    reply = await make().request("GET", "/", headers)
    assert reply.header("fly-replay") == f"prefer_instance={OTHER}"


@pytest.mark.parametrize(
    "header",
    [f"xfly-machine-id={OTHER}", f"other=fly-machine-id={OTHER}", f"fly-machine-idx={OTHER}"],
)
async def test_look_alike_cookies_are_not_ours(make: MakeHarness, header: str) -> None:
    reply = await make().request("GET", "/", {"cookie": header})
    assert reply.status == 200
    assert reply.decision["outcome"] == "stamped"


@pytest.mark.parametrize("name", sorted(ARRIVAL_HEADERS))
async def test_request_that_arrived_by_replay_is_never_replayed_again(
    make: MakeHarness, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="flysticky"):
        reply = await make().request("GET", "/", {**cookie(OTHER), name: ARRIVAL_HEADERS[name]})
    assert reply.status == 200
    assert reply.header("fly-replay") is None
    assert reply.all("set-cookie") == [STAMP]  # re-pinned to this machine
    assert reply.ran == ["hook", "handler"]
    assert reply.decision == {
        "outcome": "repinned",
        "machine_id": MACHINE,
        "pinned_to": OTHER,
        "arrived_by": name,
    }
    assert any(r.levelno == logging.INFO and "repinned" in r.getMessage() for r in caplog.records)


async def test_replayed_request_for_this_machine_is_just_pinned(make: MakeHarness) -> None:
    headers = {**cookie(MACHINE), "fly-replay-src": ARRIVAL_HEADERS["fly-replay-src"]}
    reply = await make().request("GET", "/", headers)
    assert reply.decision["outcome"] == "pinned"
    assert reply.header("set-cookie") is None


async def test_body_of_exactly_one_mib_is_replayed(make: MakeHarness) -> None:
    body = b"x" * REPLAY_BODY_LIMIT
    reply = await make().request("POST", "/", cookie(OTHER), body)
    assert reply.status == 307
    assert reply.header("fly-replay") == f"prefer_instance={OTHER}"


async def test_body_over_one_mib_is_served_here_and_cookie_kept(make: MakeHarness) -> None:
    body = b"x" * (REPLAY_BODY_LIMIT + 1)
    reply = await make().request("POST", "/", cookie(OTHER), body)
    assert reply.status == 200
    assert reply.header("fly-replay") is None
    assert reply.header("set-cookie") is None
    assert reply.ran == ["hook", "handler"]
    assert reply.decision["outcome"] == "off_pin"
    assert reply.decision["pinned_to"] == OTHER


@pytest.mark.parametrize("proto", ["https", "HTTPS", "https, http"])
async def test_secure_behind_https(make: MakeHarness, proto: str) -> None:
    reply = await make().request("GET", "/", {"x-forwarded-proto": proto})
    assert reply.all("set-cookie") == [STAMP + "; Secure"]


async def test_not_secure_over_plain_http(make: MakeHarness) -> None:
    reply = await make().request("GET", "/", {"x-forwarded-proto": "http"})
    assert reply.all("set-cookie") == [STAMP]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (StickyConfig(secure=True), STAMP + "; Secure"),
        (
            StickyConfig(cookie_name="session-machine", max_age=timedelta(hours=48)),
            f"session-machine={MACHINE}; Max-Age=172800; Path=/; HttpOnly; SameSite=Lax",
        ),
        (
            StickyConfig(max_age=3600),
            f"fly-machine-id={MACHINE}; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax",
        ),
        (
            StickyConfig(max_age=None),
            f"fly-machine-id={MACHINE}; Path=/; HttpOnly; SameSite=Lax",
        ),
        (
            StickyConfig(same_site="strict", http_only=False, path="/app", domain="example.com"),
            f"fly-machine-id={MACHINE}; Max-Age=518400; Path=/app; Domain=example.com;"
            " SameSite=Strict",
        ),
        (
            StickyConfig(same_site="None", secure=True),
            f"fly-machine-id={MACHINE}; Max-Age=518400; Path=/; HttpOnly; SameSite=None; Secure",
        ),
    ],
)
async def test_config_fields_shape_the_cookie(
    make: MakeHarness, config: StickyConfig, expected: str
) -> None:
    reply = await make(config).request("GET", "/", {"x-forwarded-proto": "https"})
    if config.secure is None:
        expected += "; Secure"
    assert reply.all("set-cookie") == [expected]


async def test_secure_false_never_sets_secure(make: MakeHarness) -> None:
    reply = await make(StickyConfig(secure=False)).request(
        "GET", "/", {"x-forwarded-proto": "https"}
    )
    assert reply.all("set-cookie") == [STAMP]


async def test_custom_cookie_name_is_the_one_read(make: MakeHarness) -> None:
    harness = make(StickyConfig(cookie_name="session-machine"))
    reply = await harness.request("GET", "/", cookie(OTHER))  # the default name: not ours
    assert reply.decision["outcome"] == "stamped"
    reply = await harness.request("GET", "/", cookie(OTHER, "session-machine"))
    assert reply.header("fly-replay") == f"prefer_instance={OTHER}"


async def test_skipper_gets_the_framework_request_and_skips(make: MakeHarness) -> None:
    seen: list[Any] = []

    def skip_health(request: Any) -> bool:
        seen.append(request)
        return request_path(request) == "/health"

    harness = make(StickyConfig(skipper=skip_health))
    reply = await harness.request("GET", "/health", cookie(OTHER))
    assert reply.status == 200
    assert reply.header("fly-replay") is None
    assert reply.header("set-cookie") is None
    assert reply.decision["outcome"] == "skipped"
    reply = await harness.request("GET", "/health")
    assert reply.header("set-cookie") is None
    reply = await harness.request("GET", "/", cookie(OTHER))
    assert reply.status == 307
    if harness.framework == "sanic":
        from sanic import Request

        assert isinstance(seen[0], Request)
    elif harness.framework == "quart":
        from quart.wrappers import Request as QuartRequest

        assert isinstance(seen[0], QuartRequest)
    elif harness.framework == "litestar":
        from litestar import Request as LitestarRequest

        assert isinstance(seen[0], LitestarRequest)
    else:  # Starlette and FastAPI
        from starlette.requests import Request as StarletteRequest

        assert isinstance(seen[0], StarletteRequest)


async def test_stamp_makes_a_public_response_private(make: MakeHarness) -> None:
    reply = await make().request("GET", "/cached")
    assert reply.header("cache-control") == "private, max-age=60"
    reply = await make().request("GET", "/cached", cookie(MACHINE))
    assert reply.header("cache-control") == "public, max-age=60"


async def test_decision_logs_at_debug(make: MakeHarness, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="flysticky"):
        await make().request("GET", "/", cookie(OTHER))
    assert any(
        r.levelno == logging.DEBUG and re.search(r"replayed.*" + OTHER, r.getMessage())
        for r in caplog.records
    )


async def test_the_same_app_follows_the_machine_id_it_starts_with(
    make: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = make()
    assert (await harness.request("GET", "/", cookie(OTHER))).status == 307
    monkeypatch.setenv("FLY_MACHINE_ID", OTHER)
    reply = await harness.request("GET", "/", cookie(OTHER))
    assert reply.decision["outcome"] == "pinned"
    monkeypatch.delenv("FLY_MACHINE_ID")
    reply = await harness.request("GET", "/", cookie(MACHINE))
    assert (reply.status, reply.decision) == (200, {"outcome": None})


@pytest.mark.parametrize("bad", ["", "bad id", "x" * 65, "id;app=evil"])
async def test_malformed_machine_id_turns_flysticky_off(
    framework: str, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("FLY_MACHINE_ID", bad)
    reply = await HARNESSES[framework](None).request("GET", "/", cookie(OTHER))
    assert reply.status == 200
    assert reply.header("set-cookie") is None
    assert reply.header("fly-replay") is None


async def test_a_malformed_machine_id_warns_once_under_the_test_client(
    framework: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Both test clients make the adapter read FLY_MACHINE_ID per request.
    value = f"not an id {uuid.uuid4().hex}"
    monkeypatch.setenv("FLY_MACHINE_ID", value)
    harness = HARNESSES[framework](None)
    for _ in range(3):
        reply = await harness.request("GET", "/", {"cookie": f"fly-machine-id={OTHER}"})
        assert reply.status == 200  # flysticky stays off
    warnings = [r for r in caplog.records if value in r.getMessage()]
    assert [r.levelname for r in warnings] == ["WARNING"]
