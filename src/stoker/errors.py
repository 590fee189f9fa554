"""One error hierarchy for the CLI and the daemon.

Every class carries a stable code that travels over RPC unchanged, and every
message should tell the user what to do next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import ClassVar


class StokerError(Exception):
    """Base of every error stoker reports to a user."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class InvalidRequest(StokerError):
    """The bytes on the wire were not a well-formed request."""

    code = "invalid_request"


class RequestTooLarge(StokerError):
    """A request exceeded the server's size limit."""

    code = "request_too_large"


class MethodNotFound(StokerError):
    """No RPC method with that name."""

    code = "method_not_found"


class InvalidParams(StokerError):
    """Parameters did not validate against the method's schema."""

    code = "invalid_params"


class InvalidArgument(StokerError):
    """A user-supplied value is wrong (name, size, path...)."""

    code = "invalid_argument"


class NotFound(StokerError):
    """The named VM, image, kernel or operation does not exist."""

    code = "not_found"


class AlreadyExists(StokerError):
    """The name is already taken."""

    code = "already_exists"


class Conflict(StokerError):
    """The object is in a state that forbids the operation."""

    code = "conflict"


class Ambiguous(StokerError):
    """A reference matched more than one object."""

    code = "ambiguous"


class PermissionDenied(StokerError):
    """The caller may not use this daemon."""

    code = "permission_denied"


class Unavailable(StokerError):
    """A host resource or external service is missing or not answering."""

    code = "unavailable"


class Timeout(StokerError):
    """An operation ran past its deadline."""

    code = "timeout"


class Cancelled(StokerError):
    """The request was cancelled."""

    code = "cancelled"


class CommandFailed(StokerError):
    """An external command exited non-zero."""

    code = "command_failed"


class ConfigError(StokerError):
    """The configuration file is invalid."""

    code = "config_error"


class StateError(StokerError):
    """The state store cannot be opened or is from an incompatible version."""

    code = "state_error"


ERROR_CLASSES: dict[str, type[StokerError]] = {
    cls.code: cls
    for cls in (
        StokerError,
        InvalidRequest,
        RequestTooLarge,
        MethodNotFound,
        InvalidParams,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Conflict,
        Ambiguous,
        PermissionDenied,
        Unavailable,
        Timeout,
        Cancelled,
        CommandFailed,
        ConfigError,
        StateError,
    )
}


def error_from_code(code: str, message: str, detail: str | None = None) -> StokerError:
    """Rebuild a typed error on the client side from its wire form."""
    cls = ERROR_CLASSES.get(code, StokerError)
    err = cls(message, detail=detail)
    return err
