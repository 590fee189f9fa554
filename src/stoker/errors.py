"""One error hierarchy for the CLI and the daemon.

Every class carries a stable code that travels over RPC unchanged, and every
message should tell the user what to do next.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # no `typing` import at start-up

if TYPE_CHECKING:
    from typing import ClassVar

# code -> class. Every class that sets its own `code` joins on definition (see
# `StokerError.__init_subclass__`), so a leaf package's errors need no entry here.
ERROR_CLASSES: dict[str, type[StokerError]] = {}

# Modules that define leaf error classes. The CLI never imports them up front (start-up
# time); `error_from_code` imports them only when a wire code is not registered yet.
# A unit test checks that every class with a code in src/ is reachable this way.
LEAF_ERROR_MODULES: tuple[str, ...] = (
    "stoker.helper.client",
    "stoker.daemon.oci.errors",
    "stoker.daemon.catalog.errors",
    "stoker.daemon.guestssh.client",
)


class StokerError(Exception):
    """Base of every error stoker reports to a user."""

    code: ClassVar[str] = "internal"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is None:
            return  # inherits its parent's code (e.g. DaemonNotRunning is "unavailable")
        other = ERROR_CLASSES.get(code)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(
                f"error code {code!r} of {cls.__module__}.{cls.__qualname__} is already "
                f"used by {other.__module__}.{other.__qualname__}: codes must be unique"
            )
        ERROR_CLASSES[code] = cls

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


class TooManyConnections(Unavailable):
    """The daemon is at its connection cap; it read nothing, so the request may be resent."""

    code = "too_many_connections"


class Timeout(StokerError):
    """An operation ran past its deadline."""

    code = "timeout"


class Cancelled(StokerError):
    """The request was cancelled."""

    code = "cancelled"


class CommandFailed(StokerError):
    """An external command exited non-zero.

    Raised by `Runner.run` with the command's `argv`, `returncode` (negative: killed by that
    signal) and `stderr` (decoded); code that raises it for other failures may leave them
    empty. Only the message travels over RPC."""

    code = "command_failed"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        argv: tuple[str, ...] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message, detail=detail)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class ConfigError(StokerError):
    """The configuration file is invalid."""

    code = "config_error"


class StateError(StokerError):
    """The state store cannot be opened or is from an incompatible version."""

    code = "state_error"


class StoreBusy(StateError):
    """Another writer held the state store's lock past the busy timeout."""

    code = "store_busy"


ERROR_CLASSES[StokerError.code] = StokerError


def error_from_code(code: str, message: str, detail: str | None = None) -> StokerError:
    """Rebuild a typed error on the client side from its wire form.

    An unknown code (a newer daemon) still keeps its code on the instance, so a script
    reading `--json` output sees what the daemon said, never a made-up "internal".
    """
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        for mod in LEAF_ERROR_MODULES:
            try:
                importlib.import_module(mod)
            except ImportError:
                continue
            cls = ERROR_CLASSES.get(code)
            if cls is not None:
                break
    if cls is None:
        err = StokerError(message, detail=detail)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, detail=detail)
