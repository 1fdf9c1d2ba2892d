"""``@intertie.remote``: a function with task options that can be submitted."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, overload

from intertie import serialization
from intertie._submitter import current
from intertie.errors import PlacementError
from intertie.spec import Quote, Resources, TaskOptions

if TYPE_CHECKING:
    from intertie._submitter import Submitter
    from intertie.futures import TaskFuture


class RemoteFunction:
    """A function plus the options its tasks run with.

    ``f(x)`` calls it here; ``f.submit(x)`` runs it in the federation and returns a
    :class:`~intertie.TaskFuture`; ``f.options(cpus=2)`` is a copy with other options.
    """

    def __init__(self, fn: Callable[..., Any], options: TaskOptions) -> None:
        if not callable(fn):
            raise TypeError(f"@intertie.remote needs a callable, got {type(fn).__name__}")
        self._fn = fn
        self._options = options
        self._resources_proto = options.resources.to_proto()  # built once, sent with every task
        self._constraints_proto = options.constraints()
        functools.update_wrapper(self, fn)

    @property
    def function(self) -> Callable[..., Any]:
        return self._fn

    @property
    def task_options(self) -> TaskOptions:
        return self._options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def options(self, **changes: Any) -> RemoteFunction:
        """A copy with changed options (same keywords as ``@intertie.remote``)."""
        return RemoteFunction(self._fn, self._options.replace(**changes))

    def submit(self, *args: Any, **kwargs: Any) -> TaskFuture:
        """Runs the function in the federation. ``quote=q`` (from ``fed.quote``) commits
        to the best quoted site."""
        return self.submit_to(current(), args, kwargs)

    def submit_to(self, fed: Submitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskFuture:
        quote = kwargs.get("quote")
        if isinstance(quote, Quote):
            del kwargs["quote"]
            if not quote:
                raise PlacementError(f"the quote has no site that can run the task: "
                                     f"{quote.placement.rejected[:3]}")
            return self.options(site=quote[0].site).submit_to(fed, args, kwargs)
        from intertie.datasets import refs_in

        future: TaskFuture = fed._submit(serialization.pickle_function(self._fn), self._options,
                                         serialization.dumps_call(args, kwargs), batch=False,
                                         resources=self._resources_proto, constraints=self._constraints_proto,
                                         inputs=refs_in(args, kwargs))
        return future

    def __repr__(self) -> str:
        return f"<RemoteFunction {serialization.function_name(self._fn)} {self._options}>"


def make_options(cpus: float | None = None, gpus: float = 0.0, memory: int = 0,
                 resources: Mapping[str, float] | None = None, max_retries: int | None = None,
                 timeout: float | None = None, name: str | None = None, accelerator: str | None = None,
                 arch: str | None = None, site: str | None = None,
                 labels: Mapping[str, str] | None = None, returns: str = "value") -> TaskOptions:
    res = Resources(cpus=Resources.cpus if cpus is None else cpus, gpus=gpus, memory=memory,
                    custom=dict(resources or {}))
    base = TaskOptions()
    return TaskOptions(resources=res, max_retries=base.max_retries if max_retries is None else max_retries,
                       timeout=timeout, name=name, accelerator=accelerator, arch=arch, site=site,
                       labels=dict(labels or {}), returns=returns)


@overload
def remote(fn: Callable[..., Any], /) -> RemoteFunction: ...
@overload
def remote(*, cpus: float | None = ..., gpus: float = ..., memory: int = ...,
           resources: Mapping[str, float] | None = ..., max_retries: int | None = ...,
           timeout: float | None = ..., name: str | None = ..., accelerator: str | None = ...,
           arch: str | None = ..., site: str | None = ...,
           labels: Mapping[str, str] | None = ..., returns: str = ...) -> Callable[[Callable[..., Any]], RemoteFunction]: ...


def remote(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Marks a function to run in the federation.

    ``@intertie.remote`` or ``@intertie.remote(cpus=, gpus=, memory=, resources=,
    max_retries=, timeout=, accelerator=, arch=, site=, labels=, returns=)``. ``memory`` is in
    bytes; ``resources`` are custom Ray resources; ``timeout`` is seconds of running
    time; ``max_retries`` counts reruns after a worker or site failure (an exception
    raised by the function is not retried). ``accelerator`` is a Ray accelerator type
    (e.g. "T4"), ``arch`` a machine architecture (e.g. "x86_64"), ``site`` pins a site,
    and ``labels`` are operator labels that must all match. ``returns="dataset"``: the
    function returns a pyarrow.Table that stays at the site where it ran, and the future's
    result is a :class:`~intertie.DatasetRef` to it (pass that to the next task, which then
    runs where the data is).
    """
    if fn is not None:
        if options:
            raise TypeError("use @intertie.remote or @intertie.remote(**options), not both")
        return RemoteFunction(fn, make_options())
    opts = make_options(**options)
    return lambda f: RemoteFunction(f, opts)
