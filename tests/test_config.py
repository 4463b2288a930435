"""StickyConfig: defaults are echofly's, bad values fail at construction with a clear message."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

import pytest

from flysticky import StickyConfig
from flysticky.config import REPLAY_MODES, is_cookie_name


def test_defaults_are_echoflys() -> None:
    config = StickyConfig()
    assert config.cookie_name == "fly-machine-id"
    assert config.max_age == timedelta(days=6)
    assert config.max_age_seconds == 518400
    assert config.skipper is None
    assert config.secure is None
    assert config.same_site == "Lax"
    assert config.http_only is True
    assert config.path == "/"
    assert config.domain is None
    assert config.replay_mode == "prefer_instance"


def test_is_frozen() -> None:
    config = StickyConfig()
    with pytest.raises(AttributeError):
        config.cookie_name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"cookie_name": ""}, "cookie_name", "''"),
        ({"cookie_name": "a b"}, "cookie_name", "'a b'"),
        ({"cookie_name": "a;b"}, "cookie_name", "'a;b'"),
        ({"cookie_name": "a=b"}, "cookie_name", "'a=b'"),
        ({"cookie_name": "caf\u00e9"}, "cookie_name", "'caf\u00e9'"),
        ({"cookie_name": 7}, "cookie_name", "7"),
        ({"max_age": -1}, "max_age", "-1"),
        ({"max_age": 0}, "max_age", "0"),
        ({"max_age": timedelta(seconds=-5)}, "max_age", "datetime.timedelta"),
        ({"max_age": timedelta(milliseconds=1500)}, "max_age", "datetime.timedelta"),
        ({"max_age": 1.5}, "max_age", "1.5"),
        ({"max_age": True}, "max_age", "True"),
        ({"max_age": "6d"}, "max_age", "'6d'"),
        ({"same_site": "lenient"}, "same_site", "'lenient'"),
        ({"same_site": None}, "same_site", "None"),
        ({"same_site": "None"}, "same_site", "'None'"),
        ({"same_site": "None", "secure": False}, "same_site", "'None'"),
        ({"secure": "yes"}, "secure", "'yes'"),
        ({"http_only": 1}, "http_only", "1"),
        ({"path": "app"}, "path", "'app'"),
        ({"path": "/a;b"}, "path", "'/a;b'"),
        ({"path": "/a b"}, "path", "'/a b'"),
        ({"domain": "exa mple.com"}, "domain", "'exa mple.com'"),
        ({"domain": "a;b"}, "domain", "'a;b'"),
        ({"domain": ""}, "domain", "''"),
        ({"replay_mode": "region"}, "replay_mode", "'region'"),
        ({"skipper": "not callable"}, "skipper", "'not callable'"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(
    kwargs: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(ValueError) as error:
        StickyConfig(**kwargs)
    message = str(error.value)
    assert f"StickyConfig.{field}=" in message
    assert value in message
    assert "allowed" in message


class _AsyncCallable:
    async def __call__(self, request: Any) -> bool:
        return True


async def _async_skipper(request: Any) -> bool:
    return True


async def _async_generator_skipper(request: Any) -> Any:
    yield True


@pytest.mark.parametrize(
    "skipper",
    [
        _async_skipper,
        _AsyncCallable(),
        functools.partial(_async_skipper),
        _async_generator_skipper,
    ],
    ids=["async def", "object with async __call__", "partial of async def", "async generator"],
)
def test_async_skipper_is_refused(skipper: Any) -> None:
    with pytest.raises(ValueError, match=r"skipper=.*plain"):
        StickyConfig(skipper=skipper)


def test_replay_modes_follow_the_literal() -> None:
    assert REPLAY_MODES == ("prefer_instance", "instance")
    assert is_cookie_name("fly-machine-id") and not is_cookie_name("a b")


@pytest.mark.parametrize(
    ("kwargs", "attribute", "expected"),
    [
        ({"same_site": "strict"}, "same_site", "Strict"),
        ({"same_site": "NONE", "secure": True}, "same_site", "None"),
        ({"max_age": timedelta(hours=48)}, "max_age_seconds", 172800),
        ({"max_age": 60}, "max_age_seconds", 60),
        ({"max_age": None}, "max_age_seconds", None),
        ({"domain": ".example.com"}, "domain", ".example.com"),
        ({"cookie_name": "__Host-pin"}, "cookie_name", "__Host-pin"),
    ],
)
def test_good_values(kwargs: dict[str, Any], attribute: str, expected: Any) -> None:
    assert getattr(StickyConfig(**kwargs), attribute) == expected
