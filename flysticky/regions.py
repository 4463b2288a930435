"""Fly.io's regions: the one list in the project (the template's hook, the CLI and the
emulator all read it). Source: Fly's regions page, as summarised in shared/fly-platform.md.
"""

from __future__ import annotations

#: Regions a machine can be created in today.
LIVE_REGIONS: frozenset[str] = frozenset(
    {
        "ams", "arn", "bom", "cdg", "dfw", "ewr", "fra", "gru", "iad",
        "jnb", "lax", "lhr", "nrt", "ord", "sin", "sjc", "syd", "yyz",
    }
)  # fmt: skip

#: Retired region codes, each with the nearest live region to use instead
#: (flyctl silently maps some of them to a neighbour; we say it out loud).
RETIRED_REGIONS: dict[str, str] = {
    "atl": "iad",
    "bog": "gru",
    "bos": "ewr",
    "den": "dfw",
    "dxb": "bom",
    "eze": "gru",
    "gdl": "dfw",
    "gig": "gru",
    "hkg": "sin",
    "ist": "fra",
    "mad": "cdg",
    "mel": "syd",
    "mia": "iad",
    "otp": "fra",
    "phx": "lax",
    "qro": "dfw",
    "scl": "gru",
    "sea": "sjc",
    "waw": "arn",
    "yul": "yyz",
}

#: Aliases Fly accepts in a replay's ``region=`` field, as groups of live regions.
REGION_ALIASES: dict[str, frozenset[str]] = {
    "us": frozenset({"dfw", "ewr", "iad", "lax", "ord", "sjc"}),
    "na": frozenset({"dfw", "ewr", "iad", "lax", "ord", "sjc", "yyz"}),
    "eu": frozenset({"ams", "arn", "cdg", "fra", "lhr"}),
    "sa": frozenset({"gru"}),
    "apac": frozenset({"bom", "nrt", "sin", "syd"}),
    "any": LIVE_REGIONS,
}


def region_problem(code: str) -> str | None:
    """Why ``code`` is not a usable region, naming what to use instead; None when it is."""
    if code in LIVE_REGIONS:
        return None
    replacement = RETIRED_REGIONS.get(code.lower()) if isinstance(code, str) else None
    if replacement is not None:
        return f"region {code!r} is retired on Fly.io: use {replacement!r} instead"
    return f"{code!r} is not a Fly.io region; live regions: {', '.join(sorted(LIVE_REGIONS))}"
