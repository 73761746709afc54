"""Errors of the Kubernetes client.

`ApiError` is the server's answer: a Kubernetes `Status` object (code, reason, message). The local
API server raises the very same classes, so a Status travels unchanged from the store to a client:
`ApiError.from_status(error.status)` rebuilds the subclass on the other side.

`ApiConnectionError` (cannot reach the server, or the connection dropped) and `ApiProtocolError`
(the peer does not speak the wire protocol) are local to the client and carry no Status.
"""

from __future__ import annotations

from typing import Any

from meshcore import errors


class KubeError(errors.MeshError):
    """Root of every error raised by meshcore.kube."""


class KubeConfigError(KubeError, ValueError):
    """A server address or option is unusable (our misuse, found before any I/O)."""


class ApiConnectionError(KubeError, ConnectionError):
    """The API server cannot be reached, or it closed the connection mid-answer."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"cannot talk to the Kubernetes API at {address}: {detail}")
        self.address = address
        self.detail = detail


class ApiProtocolError(KubeError):
    """The server answered with something that is not the Kubernetes HTTP/JSON protocol."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"bad answer from the Kubernetes API at {address}: {detail}")
        self.address = address
        self.detail = detail


def build_status(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A failure `Status` object as the Kubernetes API server writes it."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        status["details"] = details
    return status


class ApiError(KubeError):
    """A `Status` failure from the API server. `str()` is the server's message."""

    default_code = 500
    default_reason = "InternalError"

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        status: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code if code is not None else self.default_code
        self.reason = reason if reason is not None else self.default_reason
        self.message = message
        self.status = (
            status if status is not None else build_status(self.code, self.reason, message, details)
        )

    @property
    def details(self) -> dict[str, Any]:
        details = self.status.get("details")
        return details if isinstance(details, dict) else {}

    @staticmethod
    def from_status(status: dict[str, Any], http_code: int | None = None) -> ApiError:
        """The error subclass for a `Status` body (`http_code` fills a missing `code`)."""
        code = status.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = http_code if http_code is not None else 500
        reason = status.get("reason")
        if not isinstance(reason, str) or not reason:
            reason = _REASON_BY_CODE.get(code, "Unknown")
        message = status.get("message")
        if not isinstance(message, str) or not message:
            message = f"the server answered {code} {reason}"
        cls = _CLASS_BY_REASON.get(reason) or _CLASS_BY_CODE.get(code, ApiError)
        return cls(message, code=code, reason=reason, status=status)


class BadRequestError(ApiError):
    default_code = 400
    default_reason = "BadRequest"


class ForbiddenError(ApiError):
    default_code = 403
    default_reason = "Forbidden"


class NotFoundError(ApiError):
    default_code = 404
    default_reason = "NotFound"


class MethodNotAllowedError(ApiError):
    default_code = 405
    default_reason = "MethodNotAllowed"


class AlreadyExistsError(ApiError):
    default_code = 409
    default_reason = "AlreadyExists"


class ConflictError(ApiError):
    default_code = 409
    default_reason = "Conflict"


class GoneError(ApiError):
    """The resourceVersion a watch asked for is no longer in the server's history: relist."""

    default_code = 410
    default_reason = "Gone"


class RequestEntityTooLargeError(ApiError):
    default_code = 413
    default_reason = "RequestEntityTooLarge"


class UnsupportedMediaTypeError(ApiError):
    default_code = 415
    default_reason = "UnsupportedMediaType"


class InvalidError(ApiError):
    """The object failed validation; `details["causes"]` lists each field at fault."""

    default_code = 422
    default_reason = "Invalid"


class UnknownKindError(ApiError):
    """Discovery does not know the kind: `no matches for kind "Foo" in version "v1"`."""

    default_code = 404
    default_reason = "NotFound"

    def __init__(self, api_version: str, kind: str) -> None:
        super().__init__(
            f'no matches for kind "{kind}" in version "{api_version}"',
            details={"kind": kind, "group": api_version},
        )
        self.api_version = api_version
        self.kind = kind


class SelectorError(BadRequestError):
    """A label or field selector does not parse; the server answers it as 400 BadRequest."""


_CLASS_BY_REASON: dict[str, type[ApiError]] = {
    "BadRequest": BadRequestError,
    "Forbidden": ForbiddenError,
    "NotFound": NotFoundError,
    "MethodNotAllowed": MethodNotAllowedError,
    "AlreadyExists": AlreadyExistsError,
    "Conflict": ConflictError,
    "Gone": GoneError,
    "Expired": GoneError,
    "RequestEntityTooLarge": RequestEntityTooLargeError,
    "UnsupportedMediaType": UnsupportedMediaTypeError,
    "Invalid": InvalidError,
}
_CLASS_BY_CODE: dict[int, type[ApiError]] = {
    400: BadRequestError,
    403: ForbiddenError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    410: GoneError,
    413: RequestEntityTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidError,
}
_REASON_BY_CODE = {cls.default_code: reason for reason, cls in _CLASS_BY_REASON.items()} | {
    409: "Conflict",
    410: "Gone",
    500: "InternalError",
}
