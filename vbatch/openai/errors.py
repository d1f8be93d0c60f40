"""OpenAI's error shape: the exception every request check raises, and its JSON body."""
from __future__ import annotations

from typing import Any


class OpenAIRequestError(ValueError):
    """A request the server (or a batch file line) refuses, in OpenAI's terms.

    `status_code` is the HTTP status (400 bad request, 401 no/wrong API key, 404 unknown model
    or route), `error_type` OpenAI's `type` (`invalid_request_error`, `authentication_error`,
    `not_found_error`), `param` the body field at fault (dotted path, or None) and `code` an
    optional machine-readable code. `to_dict()` is the response body OpenAI sends.
    """

    def __init__(self, message: str, *, status_code: int = 400, param: str | None = None,
                 error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.error_type = error_type
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


def not_found(message: str, *, param: str | None = None,
              code: str | None = None) -> OpenAIRequestError:
    """A 404 `not_found_error` (unknown model, unknown route)."""
    return OpenAIRequestError(message, status_code=404, param=param,
                              error_type="not_found_error", code=code)


def unauthorized(message: str) -> OpenAIRequestError:
    """A 401 `authentication_error` (missing or wrong API key)."""
    return OpenAIRequestError(message, status_code=401, error_type="authentication_error",
                              code="invalid_api_key")
