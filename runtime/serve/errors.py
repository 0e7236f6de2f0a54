"""Errors a request can cause, each with its HTTP status and OpenAI's error type."""

from __future__ import annotations

from runtime.errors import FilaError


class RequestError(FilaError):
    """A client error: the request, not the server, is wrong (4xx, the server keeps serving)."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class ImageTooLarge(RequestError):
    status = 413


class UnknownModel(RequestError):
    status = 404

    def __init__(self, asked: str, served: str) -> None:
        super().__init__(
            f"model {asked!r} is not served here; this server serves {served!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )


class QueueFull(RequestError):
    status = 429
    kind = "rate_limit_error"
