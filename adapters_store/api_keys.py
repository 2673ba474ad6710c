"""Tenant API keys: random tokens shown once, stored only as their sha256.

A token has 256 bits of entropy, so a plain sha256 is enough (no salt or slow
hash needed: there is nothing to brute-force), and routers can authenticate
with one Redis lookup by hash.
"""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "flk_"  # recognisable in logs and secret scanners


def new_api_key() -> tuple[str, str]:
    """(token, sha256 hex): give the token to the tenant, store the hash."""
    token = PREFIX + secrets.token_urlsafe(32)
    return token, hash_api_key(token)


def hash_api_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
