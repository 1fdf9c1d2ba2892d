"""Pickling on the client side: functions by content digest, arguments as one blob."""

from __future__ import annotations

import hashlib
import pickle
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from intertie.errors import SerializationError


@dataclass(frozen=True)
class PickledFunction:
    digest: str
    payload: bytes
    name: str


def function_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


# Pickling a function is done once per function object, not once per task.
_cache: weakref.WeakKeyDictionary[Any, PickledFunction] = weakref.WeakKeyDictionary()
_by_id: dict[int, tuple[Any, PickledFunction]] = {}
_lock = threading.Lock()


def pickle_function(fn: Callable[..., Any]) -> PickledFunction:
    try:
        return _cache[fn]
    except (KeyError, TypeError):
        pass
    with _lock:
        hit = _by_id.get(id(fn))
        if hit is not None and hit[0] is fn:
            return hit[1]
    try:
        payload = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot pickle function {function_name(fn)}: {exc}") from exc
    pickled = PickledFunction(hashlib.sha256(payload).hexdigest(), payload, function_name(fn))
    try:
        _cache[fn] = pickled
    except TypeError:  # not weak-referenceable (e.g. some builtins): keep it alive instead
        with _lock:
            _by_id[id(fn)] = (fn, pickled)
    return pickled


def dumps_call(args: Sequence[Any], kwargs: dict[str, Any]) -> bytes:
    try:
        return cloudpickle.dumps((tuple(args), kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot pickle task arguments: {exc}") from exc


def dumps_calls(calls: Sequence[tuple[Sequence[Any], dict[str, Any]]]) -> bytes:
    try:
        return cloudpickle.dumps([(tuple(a), k) for a, k in calls], protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot pickle task arguments: {exc}") from exc


def loads_result(data: bytes) -> Any:
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"cannot unpickle the task's result on the client: {exc}") from exc
