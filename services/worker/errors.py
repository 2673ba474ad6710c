"""What went wrong on a replica, as a gRPC status code and a one-line message."""

from __future__ import annotations

import grpc

from adapters_store.errors import AdapterValidationError, BackendUnavailable, IntegrityError, NotFoundError


def status_for(error: Exception, ref: str) -> tuple[grpc.StatusCode, str]:
    """The status a request gets for `error`; `ref` names its adapter ("" for the base model)."""
    match error:
        case BackendUnavailable():
            return grpc.StatusCode.UNAVAILABLE, f"adapter {ref} cannot be fetched now: {error}"
        case IntegrityError() | NotFoundError():
            return grpc.StatusCode.UNAVAILABLE, f"adapter {ref} is not readable from the blob store: {error}"
        case AdapterValidationError():
            return grpc.StatusCode.FAILED_PRECONDITION, f"adapter {ref} does not load: {error}"
        case ValueError():  # the engine's checks: prompt vs context, sampling values, adapter targets
            return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, f"worker error: {type(error).__name__}: {error}"
