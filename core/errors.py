"""Errors a user can cause. Each carries its HTTP status and an OpenAI-style type/code.

The bus middleware turns these into one readable line and exit code 2 on the CLI; the server
turns them into ``{"error": {...}}`` bodies with ``http_status``. Anything that is not a
``UserError`` is a bug (500 / traceback under ``SPL_TRACE=1``).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done; the message says why and what to do.

    A subclass names what it answers with in its header, e.g. ``class NotFound(UserError,
    http_status=404, error_type="not_found_error", code="not_found")``; what it leaves out it
    inherits."""

    http_status = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init_subclass__(cls, *, http_status: int | None = None, error_type: str | None = None,
                          code: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in (("http_status", http_status), ("error_type", error_type), ("code", code)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(UserError, http_status=400):
    """A value that is out of range, malformed or contradicts another."""


class Unauthorized(UserError, http_status=401, error_type="authentication_error", code="invalid_api_key"):
    """No API key where the server wants one, or the wrong one."""


class NotFound(UserError, http_status=404, error_type="not_found_error", code="not_found"):
    """No session, snapshot, model, workspace or file of that name."""


class Conflict(UserError, http_status=409, error_type="conflict_error", code="conflict"):
    """The request clashes with what exists: an id that is taken, a port, a store or a workspace
    that another process holds."""


class TooLarge(UserError, http_status=400, error_type="invalid_request_error", code="context_length_exceeded"):
    """More tokens than a context (or the memory for one) holds: 400 ``context_length_exceeded``,
    as OpenAI and vLLM answer it, so clients' ``BadRequestError`` fallbacks fire."""


class BodyTooLarge(UserError, http_status=413, error_type="invalid_request_error", code="body_too_large"):
    """A request body (or upload) over the server's byte limit: HTTP 413."""


class Busy(UserError, http_status=429, error_type="rate_limit_error", code="server_busy"):
    """The server already runs or queues as many generations as it takes: try again later."""


class OverBudget(Busy, code="memory_budget_exceeded"):
    """The sessions' memory budget is spent. 429, not 507: the server is healthy and the request
    is fine; it can succeed once sessions are closed, saved or evicted (a 5xx would make load
    balancers and retry logic treat the server as failing)."""


class Unavailable(UserError, http_status=503, error_type="service_unavailable", code="unavailable"):
    """A dependency (server, model hub) cannot be reached."""


class ServerError(UserError, http_status=500, error_type="server_error", code="internal_error"):
    """The other side failed (HTTP 5xx, a bug there): reported as one line like any other error."""


_BY_STATUS: dict[int, type[UserError]] = {400: InvalidRequest, 401: Unauthorized, 404: NotFound, 409: Conflict,
                                          413: BodyTooLarge, 422: InvalidRequest, 429: Busy, 503: Unavailable}
_BY_CODE: dict[str, type[UserError]] = {cls.code: cls for cls in (Unauthorized, NotFound, Conflict, TooLarge,
                                                                   BodyTooLarge, Busy, OverBudget, Unavailable,
                                                                   ServerError)}


def from_openai(error: dict, status: int | None = None) -> UserError:
    """The ``UserError`` an OpenAI-style error object stands for: the inverse of ``to_openai``.
    ``status``: the HTTP status it came with (None: inside a stream that had begun)."""
    code = error.get("code")
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None and status is not None:
        cls = _BY_STATUS.get(status) or (UserError if status < 500 else ServerError)
    if cls is None:
        cls = InvalidRequest if error.get("type") == "invalid_request_error" else ServerError
    return cls(str(error.get("message") or "the request failed"), param=error.get("param"),
               code=code if isinstance(code, str) else None)
