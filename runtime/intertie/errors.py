"""One error hierarchy for everything a user of Intertie can see.

A raw ``grpc.RpcError`` never reaches a user: :func:`intertie._rpc.translate` maps
transport failures onto these classes, and task failures arrive as
:class:`~intertie.v1.common_pb2.Error` messages that :func:`from_wire` turns into
exceptions.
"""

from __future__ import annotations

import sys
from typing import Any


class IntertieError(Exception):
    """Root of every error Intertie raises."""


class SiteUnavailableError(IntertieError):
    """The gateway (or the site behind it) could not be reached."""


class PlacementError(IntertieError):
    """No site can ever run the task; the message names the constraint."""


class AuthenticationError(IntertieError):
    """The gateway did not accept the client's credentials."""


class PermissionDeniedError(IntertieError):
    """The caller may not do this at this site."""


class QuotaExceededError(IntertieError):
    """Over one of the tenant's quotas at the site (queued tasks, dataset bytes, submission
    rate). Unlike a payload that is too large, the same request may succeed later."""


class PayloadTooLargeError(IntertieError):
    """Function, arguments or result are over the site's payload limit."""


class TaskCancelledError(IntertieError):
    """The task was cancelled before it finished."""


class TaskTimeoutError(IntertieError):
    """The task ran longer than its ``timeout`` and was stopped."""


class TaskNotFoundError(IntertieError, KeyError):
    """The gateway knows no task with this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(IntertieError, KeyError):
    """No dataset with that id or name at the site asked."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidRequestError(IntertieError, ValueError):
    """The request was malformed or had values of the wrong kind."""


class SerializationError(IntertieError):
    """A function, its arguments or its result could not be (un)pickled."""


class SiteFailureError(IntertieError):
    """The worker or site running the task died and no retries were left."""


class LedgerVerificationError(IntertieError):
    """A site's usage ledger did not check out: its key changed, a signature or a proof failed,
    or its history does not extend what this client verified before. The message names which."""


class RemoteTaskError(IntertieError):
    """The user function raised at the site.

    When the original exception class can be subclassed, the raised object is an
    instance of both ``RemoteTaskError`` and that class, so ``except ValueError``
    around ``fut.result()`` works as it would locally.
    """

    message: str
    remote_type: str
    remote_traceback: str
    cause: BaseException | None

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "",
                 cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.cause = cause

    def __str__(self) -> str:
        text = self.message if self.cause is None else str(self.cause)
        if self.remote_traceback:
            return f"{text}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return str(text)

    def __reduce__(self) -> Any:
        return (_rebuild_remote_error, (self.message, self.remote_type, self.remote_traceback, self.cause))


def _rebuild_remote_error(message: str, remote_type: str, remote_traceback: str,
                          cause: BaseException | None) -> RemoteTaskError:
    return make_remote_error(message, remote_type, remote_traceback, cause)


_dual_classes: dict[type, type] = {}


def make_remote_error(message: str, remote_type: str, remote_traceback: str,
                      cause: BaseException | None) -> RemoteTaskError:
    """Builds a RemoteTaskError that is also an instance of ``type(cause)`` when possible."""
    cls: type = RemoteTaskError
    if cause is not None and not isinstance(cause, RemoteTaskError):
        cls = _dual_class(type(cause))
    # The original's args, so that e.g. KeyError("k").args survives the trip.
    args = cause.args if cause is not None else (message,)
    try:
        # Bypass the base class's __init__: its signature is the user's, not ours.
        err = cls.__new__(cls, *args)
        BaseException.__init__(err, *args)
    except Exception:
        cls = RemoteTaskError
        err = RemoteTaskError.__new__(RemoteTaskError, *args)
        BaseException.__init__(err, *args)
    err.message = message
    err.remote_type = remote_type
    err.remote_traceback = remote_traceback
    err.cause = cause
    if cause is not None and cls is not RemoteTaskError:
        for key, value in getattr(cause, "__dict__", {}).items():  # user attributes, e.g. .code
            if not hasattr(err, key):
                try:
                    setattr(err, key, value)
                except Exception:
                    pass
    return err


def _dual_class(base: type) -> type:
    cached = _dual_classes.get(base)
    if cached is not None:
        return cached
    cls: type
    try:
        cls = type(f"RemoteTaskError[{base.__name__}]", (RemoteTaskError, base),
                   {"__module__": __name__, "__str__": RemoteTaskError.__str__,
                    "__reduce__": RemoteTaskError.__reduce__})
    except TypeError:  # final classes, or layouts that cannot be combined
        cls = RemoteTaskError
    _dual_classes[base] = cls
    return cls


def resolve_class(qualified: str) -> type | None:
    """``"pkg.mod.Name"`` -> the class, when its module is already imported here.

    The name comes from a remote site: importing whatever module it names would let a
    site run a module's import-time code on the client, so only loaded modules are looked in."""
    module, _, name = qualified.rpartition(".")
    obj: Any = sys.modules.get(module) if module else None
    if obj is None:
        return None
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None
