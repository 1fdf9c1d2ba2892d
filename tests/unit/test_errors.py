from __future__ import annotations

import pickle

import cloudpickle
import pytest

import intertie
from intertie import errors
from intertie._wire import error_from_wire
from intertie.v1 import common_pb2

K = common_pb2.ErrorKind


class Final(Exception):
    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("final")


def test_remote_error_is_also_the_original_class() -> None:
    err = errors.make_remote_error("boom", "builtins.ValueError", "tb", ValueError("boom"))
    assert isinstance(err, ValueError) and isinstance(err, intertie.RemoteTaskError)
    assert err.args == ("boom",) and err.remote_traceback == "tb"
    assert str(err).startswith("boom") and "Remote traceback" in str(err)


def test_unsubclassable_class_falls_back_to_remote_task_error() -> None:
    err = errors.make_remote_error("no", "x.Final", "", Final("no"))
    assert type(err) is intertie.RemoteTaskError
    assert err.cause is not None and isinstance(err.cause, Final)


def test_remote_error_pickles() -> None:
    err = errors.make_remote_error("boom", "builtins.KeyError", "tb", KeyError("k"))
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, KeyError) and again.remote_traceback == "tb"


def test_error_from_wire_rebuilds_class_args_and_attributes() -> None:
    class Coded(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(f"code {code}")
            self.code = code

    exc = Coded(3)
    wire = common_pb2.Error(kind=K.ERROR_KIND_REMOTE, message=str(exc), exception_type="m.Coded",
                            exception=cloudpickle.dumps((Coded, exc.args, vars(exc))), traceback="tb")
    err = error_from_wire(wire)
    assert isinstance(err, Coded) and err.code == 3 and err.args == ("code 3",)


def test_error_from_wire_without_pickle_uses_importable_class() -> None:
    wire = common_pb2.Error(kind=K.ERROR_KIND_REMOTE, message="m", exception_type="builtins.OSError")
    assert isinstance(error_from_wire(wire), OSError)
    wire = common_pb2.Error(kind=K.ERROR_KIND_REMOTE, message="m", exception_type="nowhere.Gone")
    assert type(error_from_wire(wire)) is intertie.RemoteTaskError


@pytest.mark.parametrize("kind,cls", [
    (K.ERROR_KIND_CANCELLED, intertie.TaskCancelledError),
    (K.ERROR_KIND_TIMEOUT, intertie.TaskTimeoutError),
    (K.ERROR_KIND_PLACEMENT, intertie.PlacementError),
    (K.ERROR_KIND_PAYLOAD_TOO_LARGE, intertie.PayloadTooLargeError),
    (K.ERROR_KIND_NOT_FOUND, intertie.TaskNotFoundError),
    (K.ERROR_KIND_INVALID_ARGUMENT, intertie.InvalidRequestError),
    (K.ERROR_KIND_SERIALIZATION, intertie.SerializationError),
    (K.ERROR_KIND_SITE_FAILURE, intertie.SiteFailureError),
    (K.ERROR_KIND_INTERNAL, intertie.IntertieError),
])
def test_each_kind_maps_to_its_class(kind: int, cls: type) -> None:
    err = error_from_wire(common_pb2.Error(kind=kind, message="why"))
    assert type(err) is cls and "why" in str(err)


def test_every_error_is_an_intertie_error() -> None:
    for name in intertie.__all__:
        obj = getattr(intertie, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, intertie.IntertieError), name


def test_a_remote_class_name_never_imports_a_module() -> None:
    import sys

    from intertie import errors

    assert errors.resolve_class("builtins.KeyError") is KeyError
    assert errors.resolve_class("collections.OrderedDict") is not None  # loaded already
    assert "antigravity" not in sys.modules
    assert errors.resolve_class("antigravity.Anything") is None  # a site names it: not imported
    assert "antigravity" not in sys.modules
    assert errors.resolve_class("builtins.no_such.Thing") is None and errors.resolve_class("NoModule") is None
