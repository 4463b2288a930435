"""StickyConfig: every knob of flysticky, checked once, at construction."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

#: The replay modes. ``prefer_instance`` lets Fly's proxy deliver the request to
#: another machine when the pinned one is gone; ``instance`` is echofly's strict form.
ReplayMode = Literal["prefer_instance", "instance"]
REPLAY_MODES: tuple[str, ...] = ("prefer_instance", "instance")
SAME_SITE_VALUES: tuple[str, ...] = ("Lax", "Strict", "None")

# RFC 6265 cookie-name = token (RFC 9110): visible ASCII minus separators.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A cookie attribute value may hold no control character and no ';' (RFC 6265 4.1.1).
_ATTRIBUTE_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]+")
_DOMAIN = re.compile(
    r"\.?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def _reject(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"StickyConfig.{field}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class StickyConfig:
    """How flysticky pins sessions. The defaults are echofly's.

    ``skipper`` receives the framework's own request object (Sanic ``Request``;
    Quart ``request`` or ``websocket``) and returns True to leave that request alone.
    """

    cookie_name: str = "fly-machine-id"
    max_age: timedelta | int | None = timedelta(days=6)
    skipper: Callable[[Any], bool] | None = None
    secure: bool | None = None
    same_site: str = "Lax"
    http_only: bool = True
    path: str = "/"
    domain: str | None = None
    replay_mode: ReplayMode = "prefer_instance"

    def __post_init__(self) -> None:
        if not isinstance(self.cookie_name, str) or not _TOKEN.fullmatch(self.cookie_name):
            raise _reject(
                "cookie_name",
                self.cookie_name,
                "a non-empty cookie name of ASCII letters, digits and !#$%&'*+-.^_`|~",
            )
        self._check_max_age()
        if self.skipper is not None:
            if not callable(self.skipper):
                raise _reject("skipper", self.skipper, "a function taking the request, or None")
            if inspect.iscoroutinefunction(self.skipper):
                raise _reject(
                    "skipper",
                    self.skipper,
                    "a plain (not async) function returning a bool; it runs on every request",
                )
        if self.secure not in (None, True, False):
            raise _reject("secure", self.secure, "True, False or None (Secure behind https)")
        canonical = {v.lower(): v for v in SAME_SITE_VALUES}.get(str(self.same_site).lower())
        if not isinstance(self.same_site, str) or canonical is None:
            raise _reject("same_site", self.same_site, "one of 'Lax', 'Strict', 'None'")
        object.__setattr__(self, "same_site", canonical)
        if canonical == "None" and self.secure is not True:
            raise _reject(
                "same_site",
                self.same_site,
                "SameSite=None needs secure=True (browsers drop such a cookie without Secure)",
            )
        if not isinstance(self.http_only, bool):
            raise _reject("http_only", self.http_only, "True or False")
        if (
            not isinstance(self.path, str)
            or not self.path.startswith("/")
            or not _ATTRIBUTE_VALUE.fullmatch(self.path)
        ):
            raise _reject("path", self.path, "a path starting with '/', without ';' or spaces")
        if self.domain is not None and (
            not isinstance(self.domain, str) or not _DOMAIN.fullmatch(self.domain)
        ):
            raise _reject("domain", self.domain, "a host name such as 'example.com', or None")
        if self.replay_mode not in REPLAY_MODES:
            raise _reject("replay_mode", self.replay_mode, "'prefer_instance' or 'instance'")

    def _check_max_age(self) -> None:
        value = self.max_age
        if value is None:
            return
        if isinstance(value, timedelta):
            seconds = value.total_seconds()
        elif isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        else:
            raise _reject(
                "max_age",
                value,
                "a timedelta, a whole number of seconds, or None for a session cookie",
            )
        if seconds <= 0 or seconds != int(seconds):
            raise _reject(
                "max_age", value, "a positive whole number of seconds (None for a session cookie)"
            )

    @property
    def max_age_seconds(self) -> int | None:
        """``max_age`` as whole seconds, the unit of the ``Max-Age`` attribute."""
        if isinstance(self.max_age, timedelta):
            return int(self.max_age.total_seconds())
        return self.max_age
