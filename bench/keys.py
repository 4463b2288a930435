"""The affinity key of the benchmark's rooms: the app's ``StickyConfig(key=...)`` and
the core figures use the same function."""

from __future__ import annotations

from typing import Any

ROOMS_PREFIX = "/rooms/"


def room_key(request: Any) -> str | None:
    """``"room-17"`` for a request to ``/rooms/room-17``; None (the visitor cookie
    decides) for any other path."""
    path: str = request.path
    if path.startswith(ROOMS_PREFIX):
        return path[len(ROOMS_PREFIX) :] or None
    return None
