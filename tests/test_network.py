"""flysticky.network's parsing and its failure paths that need no fleet."""

from __future__ import annotations

import logging

import dns.asyncresolver
import dns.resolver
import pytest

from flysticky import Decider, StickyConfig
from flysticky.network import PrivateNetwork, _parse_resolver, make_resolver, parse_vms

HERE = "90801679a10038"


def test_vms_answers_are_joined_and_checked() -> None:
    # One TXT string cut at 255 bytes by DNS: the pieces are one list.
    text = ",".join(f"{n:014x} iad" for n in range(40)).encode()
    pieces = [text[i : i + 255] for i in range(0, len(text), 255)]
    assert parse_vms(pieces) == [f"{n:014x}" for n in range(40)]
    assert parse_vms([b"a;b iad, ,ok-1 ams,\xff\xfe iad"]) == ["ok-1"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[fdaa::3]:53", ("fdaa::3", 53)),
        ("fdaa::3", ("fdaa::3", 53)),
    ],
)
def test_resolver_addresses(value: str, expected: tuple[str, int]) -> None:
    assert _parse_resolver(value) == expected


@pytest.mark.parametrize("value", ["host:0", "host:99999", ":53", "host:x", "[::1]:x"])
def test_a_bad_resolver_address_is_a_clear_error(value: str) -> None:
    with pytest.raises(ValueError, match=r"FLYSTICKY_RESOLVER=.*host:port"):
        make_resolver({"FLYSTICKY_RESOLVER": value}.get)


def test_an_image_without_resolv_conf_still_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(self: object, filename: str) -> None:
        raise dns.resolver.NoResolverConfiguration(f"cannot open {filename}")

    monkeypatch.setattr(dns.asyncresolver.Resolver, "read_resolv_conf", missing)
    config = StickyConfig(key=lambda request: None)
    with caplog.at_level(logging.WARNING, "flysticky"):
        network = PrivateNetwork.for_decider(
            config, Decider(config, HERE), {"FLY_APP_NAME": "a"}.get
        )
    assert network is None
    assert "no DNS resolver" in caplog.text


def test_no_network_off_fly_or_without_an_app_name(caplog: pytest.LogCaptureFixture) -> None:
    config = StickyConfig(key=lambda request: None)
    assert PrivateNetwork.for_decider(config, None, {}.get) is None
    with caplog.at_level(logging.WARNING, "flysticky"):
        assert PrivateNetwork.for_decider(config, Decider(config, HERE), {}.get) is None
    assert "FLY_APP_NAME is unset" in caplog.text
