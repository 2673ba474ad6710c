"""What can go wrong in the adapter store, one class per kind of failure.

Each class carries the process exit code `adapterctl` returns for it, so scripts
can tell "your file is bad" from "Redis is down" without parsing messages.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class; the message says what is wrong and where."""

    exit_code = 1


class UsageError(StoreError):
    """A bad name, reference or setting given by the caller."""

    exit_code = 2


class AdapterValidationError(StoreError):
    """An adapter file or directory that must not be stored; `problems` lists every finding."""

    exit_code = 3

    def __init__(self, source: str, problems: list[str] | tuple[str, ...]):
        self.source = source
        self.problems = tuple(problems)
        shown = "\n  - ".join(self.problems[:_SHOWN])
        more = f"\n  ... and {len(self.problems) - _SHOWN} more" if len(self.problems) > _SHOWN else ""
        head = self.problems[0] if len(self.problems) == 1 else f"{len(self.problems)} problems:\n  - {shown}{more}"
        super().__init__(f"{source}: {head}")


_SHOWN = 10


class NotFoundError(StoreError):
    exit_code = 4


class ConflictError(StoreError):
    """The registry's state forbids the change (exists already, still referenced, ...)."""

    exit_code = 5


class BackendUnavailable(StoreError):
    """Redis or the blob store cannot be reached or refused the request; nothing was changed by us."""

    exit_code = 6


class RegistryUnavailable(BackendUnavailable):
    pass


class BlobStoreUnavailable(BackendUnavailable):
    pass


class IntegrityError(StoreError):
    """Stored bytes do not match their sha256: the blob is corrupt or was tampered with."""

    exit_code = 7
