"""StickyConfig: every knob of flysticky, checked once, at construction."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, get_args

#: The replay modes. ``prefer_instance`` lets Fly's proxy deliver the request to
#: another machine when the pinned one is gone; ``instance`` is echofly's strict form.
ReplayMode = Literal["prefer_instance", "instance"]
REPLAY_MODES: tuple[str, ...] = get_args(ReplayMode)
#: Which machines own keys: "all" deployed ones (Fly's ``all.vms.<app>.internal``: a
#: replay wakes a stopped or suspended owner, as it does for a pinned cookie) or only
#: the "started" ones (``vms.<app>.internal``: keys move off a machine that autostop
#: stopped, so it can stay asleep).
OwnerSet = Literal["all", "started"]
OWNER_SETS: tuple[str, ...] = get_args(OwnerSet)
SAME_SITE_VALUES: tuple[str, ...] = ("Lax", "Strict", "None")

# RFC 6265 cookie-name = token (RFC 9110): visible ASCII minus separators. The one
# copy of this grammar: the template's hook asks is_cookie_name() too.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
COOKIE_NAME_ALLOWED = "a non-empty cookie name of ASCII letters, digits and !#$%&'*+-.^_`|~"
# A cookie attribute value may hold no control character and no ';' (RFC 6265 4.1.1).
_ATTRIBUTE_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]+")
_DOMAIN = re.compile(
    r"\.?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def is_cookie_name(value: object) -> bool:
    """Whether ``value`` can name a cookie (an RFC 9110 token)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def _is_async_callable(value: object) -> bool:
    """An ``async def`` function or async generator, a partial of one, or an object whose
    ``__call__`` is one: each returns something truthy that is not the answer."""
    call = getattr(value, "__call__", None)  # noqa: B004 - the method itself is inspected
    return any(
        check(candidate)
        for candidate in (value, call)
        for check in (inspect.iscoroutinefunction, inspect.isasyncgenfunction)
    )


#: Headers that already mean something to HTTP, to Fly's proxy or to flysticky: routing
#: by one of them would be routing by what the client or the proxy put there for
#: another purpose.
_RESERVED_HEADERS = frozenset(
    {"host", "cookie", "content-length", "transfer-encoding", "connection", "upgrade", "te"}
)


def _reserved_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in _RESERVED_HEADERS or lowered.startswith(("fly-", "flysticky-"))


def _check_function(field: str, value: object, allowed: str) -> None:
    if value is None:
        return
    if not callable(value):
        raise _reject(field, value, allowed)
    if _is_async_callable(value):
        raise _reject(
            field, value, "a plain (not async) function; it runs on every request, before any await"
        )


def _needs_prometheus_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ValueError(
            "StickyConfig.metrics_port needs prometheus-client: pip install 'flysticky[metrics]'"
        ) from None


def _reject(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"StickyConfig.{field}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class StickyConfig:
    """How flysticky pins sessions. The defaults are echofly's.

    ``skipper`` and ``key`` receive the framework's own request object (Sanic
    ``Request``; Quart ``request`` or ``websocket``).
    """

    #: The cookie holding the pinned machine id (also the replay cache's key in fly.toml).
    cookie_name: str = "fly-machine-id"
    #: Cookie lifetime: a timedelta or whole seconds; None makes a browser-session cookie.
    max_age: timedelta | int | None = timedelta(days=6)
    #: ``f(request) -> bool``, a plain function; True leaves that request alone.
    skipper: Callable[[Any], bool] | None = None
    #: ``Secure``: None adds it when X-Forwarded-Proto says https (TLS ends at Fly's edge).
    secure: bool | None = None
    #: ``SameSite``: "Lax", "Strict" or "None" (which needs secure=True).
    same_site: str = "Lax"
    #: ``HttpOnly``: page scripts have no business reading the pin.
    http_only: bool = True
    #: Cookie ``Path``.
    path: str = "/"
    #: Cookie ``Domain``; None keeps the cookie to the host that set it.
    domain: str | None = None
    #: The fly-replay field: "prefer_instance" heals when the machine is gone,
    #: "instance" is echofly's strict form.
    replay_mode: ReplayMode = "prefer_instance"
    #: ``f(request) -> str | None``, a plain function naming the request's affinity key (a
    #: room, a document): every request with that key goes to the machine that owns it.
    #: None for a request: the visitor cookie decides, as without ``key``.
    key: Callable[[Any], str | None] | None = None
    #: A request header carrying session ids made by ``flysticky.new_session_id()``
    #: (``"mcp-session-id"``, say): a request carrying one goes to the machine it names.
    session_header: str | None = None
    #: Which machines own keys (see OwnerSet): "all" keeps a key's owner while autostop
    #: stops or suspends it; "started" moves its keys to running machines.
    owners: OwnerSet = "all"
    #: How often the app's machines are looked up in Fly's internal DNS, in seconds.
    refresh_seconds: float = 5.0
    #: A body too big to replay (over 1 MiB) is forwarded over Fly's private network to
    #: the machine it belongs to, when that machine resolves; else it is served here.
    forward_large_bodies: bool = True
    #: The port the app listens on at every machine (fly.toml's internal_port); None
    #: reads ``PORT``, else 8080.
    forward_port: int | None = None
    #: The port flysticky serves its Prometheus metrics on, for Fly's scraper (fly.toml's
    #: ``[metrics] port``); None serves none and counts nothing. Needs the ``metrics``
    #: extra (prometheus-client). Not the app's own port: a port of its own.
    metrics_port: int | None = None
    #: The path of the metrics (fly.toml's ``[metrics] path``).
    metrics_path: str = "/metrics"

    def __post_init__(self) -> None:
        if not is_cookie_name(self.cookie_name):
            raise _reject("cookie_name", self.cookie_name, COOKIE_NAME_ALLOWED)
        max_age = self.max_age
        if max_age is not None:
            if isinstance(max_age, timedelta):
                seconds = max_age.total_seconds()
            elif isinstance(max_age, int) and not isinstance(max_age, bool):
                seconds = max_age
            else:
                raise _reject(
                    "max_age", max_age, "a timedelta, whole seconds, or None for a session cookie"
                )
            if seconds <= 0 or seconds != int(seconds):
                raise _reject("max_age", max_age, "a positive whole number of seconds, or None")
        _check_function("skipper", self.skipper, "a function taking the request, or None")
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
        _check_function("key", self.key, "a plain function taking the request, or None")
        if self.session_header is not None:
            header = self.session_header
            if not is_cookie_name(header) or _reserved_header(header):  # a token too
                raise _reject(
                    "session_header",
                    header,
                    "a header name of your own such as 'mcp-session-id' (not a fly- or "
                    "flysticky- header, nor one HTTP or the cookie path gives a meaning)",
                )
            object.__setattr__(self, "session_header", header.lower())
        if self.owners not in OWNER_SETS:
            raise _reject("owners", self.owners, "'all' or 'started'")
        refresh = self.refresh_seconds
        if (
            isinstance(refresh, bool)
            or not isinstance(refresh, int | float)
            or not 0.1 <= refresh <= 3600
        ):
            raise _reject("refresh_seconds", refresh, "a number of seconds from 0.1 to 3600")
        if not isinstance(self.forward_large_bodies, bool):
            raise _reject("forward_large_bodies", self.forward_large_bodies, "True or False")
        port = self.forward_port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
        ):
            raise _reject("forward_port", port, "a port from 1 to 65535, or None to read PORT")
        port = self.metrics_port
        if port is not None:
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise _reject("metrics_port", port, "a port from 1 to 65535, or None (no metrics)")
            if port == self.forward_port:
                raise _reject(
                    "metrics_port", port, "a port of its own, not forward_port (the app's port)"
                )
            _needs_prometheus_client()
        if (
            not isinstance(self.metrics_path, str)
            or not self.metrics_path.startswith("/")
            or not _ATTRIBUTE_VALUE.fullmatch(self.metrics_path)
        ):
            raise _reject(
                "metrics_path", self.metrics_path, "a path starting with '/', without spaces"
            )

    @property
    def max_age_seconds(self) -> int | None:
        """``max_age`` as whole seconds, the unit of the ``Max-Age`` attribute."""
        if isinstance(self.max_age, timedelta):
            return int(self.max_age.total_seconds())
        return self.max_age
