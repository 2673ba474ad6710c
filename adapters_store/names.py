"""Tenant and adapter names, and references to stored versions.

Names become parts of Redis keys, S3-free file names (`download`) and metrics
labels, so they are restricted to a safe alphabet: letters, digits, `.`, `_`,
`-`, starting with a letter or digit, at most 64 characters. That rules out path
separators, `:` (the Redis key separator), `/` and `@` (the reference syntax),
whitespace and control characters.

A reference names what a command acts on:

  TENANT                  the tenant's current adapter (its alias)
  TENANT/ADAPTER          the newest live version of that adapter
  TENANT/ADAPTER@VERSION  one version
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from adapters_store.errors import UsageError

MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, what: str = "tenant") -> str:
    """`name` if it is a valid tenant/adapter name, else a UsageError saying which character is wrong."""
    if not name:
        raise UsageError(f"{what} name is empty")
    if len(name) > MAX_NAME:
        raise UsageError(f"{what} name {name[:MAX_NAME]!r}... is {len(name)} characters, the limit is {MAX_NAME}")
    if _NAME.fullmatch(name) is None:
        raise UsageError(f"{what} name {name!r} {_first_bad(name)}; use letters, digits, '.', '_' and '-'")
    return name


def _first_bad(name: str) -> str:
    for i, ch in enumerate(name):
        if ch in "/\\":
            return f"contains a path separator {ch!r} at position {i}"
        if unicodedata.category(ch).startswith("C"):
            return f"contains control character U+{ord(ch):04X} at position {i}"
        allowed = ch.isascii() and (ch.isalnum() or (i > 0 and ch in "._-"))
        if not allowed:
            return f"has {ch!r} at position {i}, which is not allowed there"
    return "is not allowed"


@dataclass(frozen=True)
class AdapterRef:
    tenant: str
    name: str | None = None  # None: the tenant's current adapter
    version: int | None = None  # None: the newest live version

    @staticmethod
    def parse(text: str) -> "AdapterRef":
        tenant, slash, rest = text.partition("/")
        if not slash:
            return AdapterRef(check_name(tenant))
        name, at, version = rest.partition("@")
        if at and not version.isdigit():
            raise UsageError(f"reference {text!r}: version {version!r} must be a positive integer (TENANT/ADAPTER@VERSION)")
        return AdapterRef(check_name(tenant), check_name(name, "adapter"), int(version) if at else None)

    def __str__(self) -> str:
        text = self.tenant if self.name is None else f"{self.tenant}/{self.name}"
        return text if self.version is None else f"{text}@{self.version}"
