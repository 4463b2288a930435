"""Who owns a key: rendezvous (highest random weight) hashing over the app's machines,
and session ids that name their machine.

Every machine computes the same owner from the same set of machines, with no
coordination: each (machine, key) pair gets a score from a keyed hash, and the
machine with the highest score owns the key. When a machine joins or leaves, only the
keys it wins or held change hands (about 1/N of them), where hash-mod-N would move
almost every key and break every session at once.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable
from hashlib import blake2b

# Real machine ids are 14 lowercase hex digits; echofly's tests use ids such as
# "test-machine-123". Nothing outside this grammar ever reaches a header.
_MACHINE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Owners remembered per key: keys are attacker-chosen, so the table is bounded.
_OWNER_CACHE_SIZE = 4096
#: A key longer than this is scored by its digest, so a score stays cheap for any input,
#: and is not remembered, so the table stays small.
_LONG_KEY = 256


def is_machine_id(value: str) -> bool:
    """True when ``value`` is something flysticky will pin to or put in a header."""
    return _MACHINE_ID.fullmatch(value) is not None


def _scorer(member: str) -> blake2b:
    # BLAKE2b keyed by the machine id: the same on every machine and every Python run
    # (unlike hash()), and uniform, so each machine wins about 1/N of the keys. Kept
    # keyed and copied per score: a copy costs less than keying anew.
    return blake2b(digest_size=8, key=member.encode())


class Owners:
    """The machines that own keys, as discovery last saw them, and each key's owner.

    ``members`` is None until discovery has answered (or after it failed for long):
    then no key has an owner, and requests are served where they land.
    """

    def __init__(self, machine_id: str) -> None:
        self.machine_id = machine_id
        self._members: tuple[str, ...] | None = None
        self._scorers: tuple[tuple[str, blake2b], ...] = ()
        self._cache: dict[str, str] = {}

    @property
    def members(self) -> tuple[str, ...] | None:
        return self._members

    def update(self, members: Iterable[str] | None) -> bool:
        """Set the machines that own keys (this one always among them: it is running).
        Returns whether the set changed."""
        if members is None:
            changed = self._members is not None
            self._members, self._scorers = None, ()
        else:
            ids = {m for m in members if _MACHINE_ID.fullmatch(m)}
            ids.add(self.machine_id)
            ordered = tuple(sorted(ids))
            changed = ordered != self._members
            if changed:
                self._members = ordered
                self._scorers = tuple((m, _scorer(m)) for m in ordered)
        if changed:
            self._cache.clear()
        return changed

    def owner(self, key: str) -> str | None:
        """The machine that owns ``key``; None while the machines are unknown."""
        owner = self._cache.get(key)
        if owner is not None:
            return owner
        scorers = self._scorers
        if not scorers:
            return None
        data = key.encode("utf-8", "surrogatepass")
        if len(data) > _LONG_KEY:
            data = blake2b(data, digest_size=32).digest()
        best_score = -1
        for member, scorer in scorers:
            hashed = scorer.copy()
            hashed.update(data)
            score = int.from_bytes(hashed.digest())
            if score > best_score:
                best_score, owner = score, member
        assert owner is not None
        if len(key) <= _LONG_KEY:
            cache = self._cache
            if len(cache) >= _OWNER_CACHE_SIZE:
                cache.clear()
            cache[key] = owner
        return owner


#: A session id is "<machine id>.<random>": "." is in no machine id and in no
#: token_urlsafe output, so the machine is everything before the first ".".
SESSION_ID_SEPARATOR = "."


def new_session_id(machine_id: str | None = None) -> str:
    """A fresh, unguessable session id that names this machine (``FLY_MACHINE_ID``, or
    ``machine_id``): requests that carry it in ``StickyConfig.session_header`` go to that
    machine, with no lookup. Off Fly it names none: just the random part."""
    if machine_id is None:
        machine_id = os.environ.get("FLY_MACHINE_ID") or ""
        if not _MACHINE_ID.fullmatch(machine_id):
            return secrets.token_urlsafe(18)
    elif not _MACHINE_ID.fullmatch(machine_id):
        raise ValueError(f"machine_id={machine_id!r} is not a machine id (1-64 of A-Z a-z 0-9 - _)")
    return f"{machine_id}{SESSION_ID_SEPARATOR}{secrets.token_urlsafe(18)}"


def session_machine(session_id: str) -> str | None:
    """The machine a session id made by ``new_session_id`` names; None for any other
    value (a client's own id, garbage, an attacker's bytes)."""
    machine, separator, rest = session_id.partition(SESSION_ID_SEPARATOR)
    if not separator or not rest or not _MACHINE_ID.fullmatch(machine):
        return None
    return machine
