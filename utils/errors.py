"""The error any layer raises to answer a request with `{"error": {"code", "message"}}`."""

from __future__ import annotations


class ApiError(Exception):
    """An HTTP error with a stable machine-readable `code` and optional response headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class ServiceUnavailable(RuntimeError):
    """Something the request needs is not ready or not reachable: answered 503 with Retry-After."""

    code = "service_unavailable"
    retry_after = "5"
