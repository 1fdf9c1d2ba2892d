"""Conversions between wire messages and the exceptions users see.

Only modules that talk gRPC import this one.
"""

from __future__ import annotations

import logging

import cloudpickle

from intertie import errors
from intertie.v1 import common_pb2

logger = logging.getLogger(__name__)

ErrorKind = common_pb2.ErrorKind

_KIND_TO_CLASS: dict[int, type[errors.IntertieError]] = {
    ErrorKind.ERROR_KIND_CANCELLED: errors.TaskCancelledError,
    ErrorKind.ERROR_KIND_TIMEOUT: errors.TaskTimeoutError,
    ErrorKind.ERROR_KIND_PLACEMENT: errors.PlacementError,
    ErrorKind.ERROR_KIND_PAYLOAD_TOO_LARGE: errors.PayloadTooLargeError,
    ErrorKind.ERROR_KIND_NOT_FOUND: errors.TaskNotFoundError,
    ErrorKind.ERROR_KIND_DATASET_NOT_FOUND: errors.DatasetNotFoundError,
    ErrorKind.ERROR_KIND_INVALID_ARGUMENT: errors.InvalidRequestError,
    ErrorKind.ERROR_KIND_SERIALIZATION: errors.SerializationError,
    ErrorKind.ERROR_KIND_SITE_FAILURE: errors.SiteFailureError,
    ErrorKind.ERROR_KIND_UNAUTHENTICATED: errors.AuthenticationError,
    ErrorKind.ERROR_KIND_PERMISSION_DENIED: errors.PermissionDeniedError,
    ErrorKind.ERROR_KIND_QUOTA_EXCEEDED: errors.QuotaExceededError,
}


def error_class(kind: int) -> type[errors.IntertieError] | None:
    """The exception class of an ErrorKind (one table for errors in results and in statuses)."""
    return _KIND_TO_CLASS.get(kind)


def error_from_wire(err: common_pb2.Error) -> errors.IntertieError:
    """Turns a wire Error into the exception a future raises."""
    if err.kind == ErrorKind.ERROR_KIND_REMOTE:
        cause: BaseException | None = None
        if err.exception:
            try:
                # The client is the one party that may unpickle what a worker produced.
                cause = _rebuild_exception(*cloudpickle.loads(err.exception))
            except Exception as exc:  # the class may not exist on the client
                logger.debug("could not unpickle remote %s: %s", err.exception_type, exc)
        if cause is None:
            cls = errors.resolve_class(err.exception_type)
            if cls is not None and issubclass(cls, BaseException):
                try:
                    cause = cls(err.message)
                except Exception:
                    cause = None
        return errors.make_remote_error(err.message, err.exception_type, err.traceback, cause)
    cls = _KIND_TO_CLASS.get(err.kind, errors.IntertieError)
    return cls(err.message or ErrorKind.Name(err.kind))


def _rebuild_exception(cls: type, args: tuple[object, ...], attrs: dict[str, object]) -> BaseException | None:
    """An instance of ``cls`` with the remote args and attributes, without running its __init__."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return None
    exc = cls.__new__(cls, *args)
    BaseException.__init__(exc, *args)
    if attrs and hasattr(exc, "__dict__"):
        exc.__dict__.update(attrs)
    return exc
