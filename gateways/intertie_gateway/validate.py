"""Checks on incoming task specs, before anything is journaled. Pure: no I/O, no Ray."""

from __future__ import annotations

import math
import re

from intertie.v1 import common_pb2, tasks_pb2

K = common_pb2.ErrorKind

# A client's id, or the id a site files it under ("tenant~id", tenancy.scope).
_TASK_ID = re.compile(r"^[A-Za-z0-9._:~-]{1,200}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESOURCE = re.compile(r"^[!-~]{1,128}$")  # Ray resource names: printable ASCII, e.g. accelerator_type:T4
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_PYTHON = re.compile(r"^[0-9]{1,2}\.[0-9]{1,3}$")
MAX_LABEL_CHARS = 128
MAX_INPUTS = 1000
MAX_RETRIES_LIMIT = 100
MAX_TIMEOUT_S = 365 * 24 * 3600.0
# A task's or function's display name.
MAX_NAME_CHARS = 256


# Ids and names from the network are quoted in messages at most this many UTF-8 bytes: an
# error travels back in gRPC metadata (8 KiB by default, non-ASCII bytes sent as %XX), and
# a 10 MB id repeated per task would make a reply nobody can send.
MAX_QUOTE_BYTES = 140


def clip(text: str, limit: int = MAX_QUOTE_BYTES) -> str:
    """``text`` for a message: as it is when short, else its first ``limit`` bytes and its length."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return f"{data[:limit].decode('utf-8', 'ignore')}...({len(text)} chars)"


def _bad_number(value: float) -> bool:
    return math.isnan(value) or math.isinf(value) or value < 0


def check_spec(spec: tasks_pb2.TaskSpec, *, max_payload_bytes: int, python_version: str,
               site_id: str) -> common_pb2.Error | None:
    """The first thing wrong with ``spec``, as a wire Error, or None."""
    def err(kind: common_pb2.ErrorKind, message: str) -> common_pb2.Error:
        return common_pb2.Error(kind=kind, message=f"task {clip(spec.task_id) or '?'}: {message}")

    if not _TASK_ID.match(spec.task_id):
        return err(K.ERROR_KIND_INVALID_ARGUMENT,
                   "task_id must be 1-200 characters of letters, digits, '.', '_', ':', '~' or '-'")
    if len(spec.name) > MAX_NAME_CHARS:
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"name is {len(spec.name)} characters, over {MAX_NAME_CHARS}")
    if not _DIGEST.match(spec.function_digest):
        return err(K.ERROR_KIND_INVALID_ARGUMENT, "function_digest must be a lowercase hex sha256")
    if len(spec.args) > max_payload_bytes:
        return err(K.ERROR_KIND_PAYLOAD_TOO_LARGE,
                   f"arguments are {len(spec.args)} bytes, over this site's limit of {max_payload_bytes} bytes")
    res = spec.resources
    for name, value in (("cpus", res.cpus), ("gpus", res.gpus)):
        if _bad_number(value):
            return err(K.ERROR_KIND_INVALID_ARGUMENT, f"resources.{name} must be a finite number >= 0, got {value}")
    if res.memory_bytes < 0:
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"resources.memory must be >= 0, got {res.memory_bytes}")
    for name, value in res.custom.items():
        if not _RESOURCE.match(name) or _bad_number(value):
            return err(K.ERROR_KIND_INVALID_ARGUMENT, f"resources[{clip(name)!r}] must be named with 1-128 printable "
                       "characters and be a finite number >= 0")
    if not 0 <= spec.max_retries <= MAX_RETRIES_LIMIT:
        return err(K.ERROR_KIND_INVALID_ARGUMENT,
                   f"max_retries must be between 0 and {MAX_RETRIES_LIMIT}, got {spec.max_retries}")
    if _bad_number(spec.timeout_s) or spec.timeout_s > MAX_TIMEOUT_S:
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"timeout must be between 0 and one year, got {spec.timeout_s}")
    c = spec.constraints
    if c.accelerator and not _NAME.match(c.accelerator):
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"accelerator {clip(c.accelerator)!r} is not a valid accelerator type")
    if c.site and not _NAME.match(c.site):
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"site {clip(c.site)!r} is not a valid site id")
    if c.arch and not _NAME.match(c.arch):
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"arch {clip(c.arch)!r} is not a valid architecture name")
    if any(not _LABEL_KEY.match(key) or len(value) > MAX_LABEL_CHARS for key, value in c.labels.items()):
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"label constraints need keys of 1-{MAX_LABEL_CHARS} letters, "
                   f"digits, '.', '_', '/' or '-' and values of at most {MAX_LABEL_CHARS} characters")
    if spec.python_version and not _PYTHON.match(spec.python_version):
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"python_version {clip(spec.python_version)!r} is not MAJOR.MINOR")
    if len(spec.inputs) > MAX_INPUTS:
        return err(K.ERROR_KIND_INVALID_ARGUMENT, f"at most {MAX_INPUTS} dataset arguments, got {len(spec.inputs)}")
    for item in spec.inputs:
        if not _DATASET_ID.match(item.id) or not _NAME.match(item.site) or item.num_bytes < 0:
            return err(K.ERROR_KIND_INVALID_ARGUMENT,
                       f"dataset input {clip(item.id)!r} at {clip(item.site)!r} ({item.num_bytes} bytes) is not a "
                       "valid dataset reference")
    if python_version and spec.python_version and spec.python_version != python_version:
        return err(K.ERROR_KIND_PLACEMENT,
                   f"needs Python {spec.python_version} but site {site_id!r} runs Python {python_version} "
                   "(pickled functions do not cross Python minor versions)")
    return None
