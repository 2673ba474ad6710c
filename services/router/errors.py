"""A failed request: a gRPC status code and a one-line message for the client."""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class QuotaExceeded(GatewayError):
    """RESOURCE_EXHAUSTED: the tenant is over `limit` (requests_per_minute, tokens_per_minute, concurrent_requests)."""

    def __init__(self, limit: str, message: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.limit = limit


def invalid(field: str, problem: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")
