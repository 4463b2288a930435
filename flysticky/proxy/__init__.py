"""A local emulation of Fly.io's edge proxy, for development and tests.

Needs the ``proxy`` extra (aiohttp). Fly.io stays the production engine.
"""
