"""flysticky: sticky sessions on Fly.io for Sanic, Quart and any ASGI app, by cookie and
fly-replay.

``import flysticky`` needs no framework; the adapters live in ``flysticky.sanic``,
``flysticky.quart``, ``flysticky.asgi`` (Starlette, FastAPI, any ASGI app) and
``flysticky.litestar``.
"""

from .config import StickyConfig
from .core import (
    REPLAY_BODY_LIMIT,
    Decider,
    Decision,
    Outcome,
    decider_for,
    machine_id_from_env,
)
from .owners import is_machine_id, new_session_id, session_machine

__all__ = [
    "REPLAY_BODY_LIMIT",
    "Decider",
    "Decision",
    "Outcome",
    "StickyConfig",
    "decider_for",
    "is_machine_id",
    "machine_id_from_env",
    "new_session_id",
    "session_machine",
]
__version__ = "0.1.0"
