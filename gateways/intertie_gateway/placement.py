"""Placement: which site should run a task. Pure logic, no I/O, no clocks.

A task's *demand* (resources, constraints, input bytes) is matched against *site views*
(the catalogue as one gateway sees it). Sites that can never run the task are filtered
out with a reason; the rest are scored by estimated completion time:

    queue wait  +  transfer of inputs not at the site  +  run time
                +  price_weight * price  +  carbon_weight * carbon

and the lowest wins. Every decision keeps its reasons (``Decision``) so users can ask why.
Placing a burst is O(log sites) per task after one O(sites) filter per task shape: each
shape keeps a heap of its candidate sites whose keys are refreshed lazily, since a site's
score only grows as tasks are placed on it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from intertie.spec import SiteScore as Score  # the same record users see in quotes and explain

# Used for a site's task run time until it reports one.
DEFAULT_RUN_S = 0.05
# Operator labels read by the price and carbon terms.
PRICE_LABEL = "price"    # currency per CPU-hour
CARBON_LABEL = "carbon"  # grams CO2e per kWh
# Power drawn per CPU, to turn carbon intensity into grams per task.
WATTS_PER_CPU = 10.0
# Candidates kept in a decision's record besides the chosen site.
RECORDED_CANDIDATES = 4
# Sites named per rejection reason in a decision's record.
RECORDED_REJECTIONS = 8


@dataclass
class SiteView:
    """One site in the catalogue, as the placing gateway sees it."""

    site_id: str
    state: str = "up"  # up, down, draining
    arch: str = ""
    python_version: str = ""
    total: Mapping[str, float] = field(default_factory=dict)
    free: Mapping[str, float] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    mean_run_s: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    max_payload_bytes: int = 0  # 0: no limit known
    local: bool = False
    rtt_s: float = 0.0  # round trip from the placing gateway
    bandwidth: float = 0.0  # bytes/s from the placing gateway; 0 means "use the default"
    # Tasks this gateway placed here that the site's last status does not show yet.
    pending: int = 0
    # Bytes of the task's inputs already at this site (datasets); filled per demand.
    resident: Mapping[str, int] = field(default_factory=dict)

    def price(self) -> float:
        return _number(self.labels.get(PRICE_LABEL))

    def carbon(self) -> float:
        return _number(self.labels.get(CARBON_LABEL))


@dataclass(frozen=True)
class Demand:
    """What a task needs of a site."""

    resources: Mapping[str, float]  # Ray resource names: CPU, GPU, memory, custom
    python_version: str = ""
    arch: str = ""
    site: str = ""  # pinned
    labels: Mapping[str, str] = field(default_factory=dict)
    input_bytes: int = 0  # arguments, carried from the home gateway
    inputs: Mapping[str, int] = field(default_factory=dict)  # dataset id -> bytes
    holders: Mapping[str, str] = field(default_factory=dict)  # dataset id -> the site its ref names
    exclude: frozenset[str] = frozenset()  # sites already tried and refused
    run_s: float | None = None  # expected run time (from earlier runs of the function), if known

    def shape(self) -> tuple[object, ...]:
        """Demands of one shape have the same candidates (and the same scores)."""
        return (tuple(sorted(self.resources.items())), self.python_version, self.arch, self.site,
                tuple(sorted(self.labels.items())), self.input_bytes, tuple(sorted(self.inputs.items())),
                tuple(sorted(self.holders.items())), self.exclude, self.run_s)


@dataclass(frozen=True)
class Weights:
    """How much price and carbon count against time: seconds per currency unit, per gram."""

    price: float = 0.0
    carbon: float = 0.0
    default_bandwidth: float = 100e6  # bytes/s between sites with no configured link


@dataclass(frozen=True)
class Decision:
    """A placement and its reasons."""

    site_id: str | None  # None: no site can run the task
    chosen: Score | None
    candidates: tuple[Score, ...]  # best first, the chosen one included
    rejected: tuple[tuple[str, str], ...]  # (site, reason), a sample per reason
    rejected_count: int
    feasible_count: int

    def why_not(self) -> str:
        """The message of a PlacementError: the constraint no site meets, and the closest sites."""
        if not self.rejected:
            return "there are no sites"
        shown = "; ".join(f"{site}: {reason}" for site, reason in self.rejected[:4])
        return f"no site can run it ({self.rejected_count} rejected): {shown}"


def _number(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        return 0.0
    return number if math.isfinite(number) and number > 0 else 0.0


def _fmt(x: float) -> str:
    return f"{x:g}"


def rejection(site: SiteView, demand: Demand, *, ignore_state: bool = False) -> str | None:
    """Why ``site`` cannot run ``demand`` now (None if it can). With ``ignore_state``, only
    what can never change counts: a site that is down may come back."""
    if demand.site and site.site_id != demand.site:
        return f"task is pinned to site {demand.site!r}"
    if site.state != "up" and not ignore_state:
        return f"site is {site.state}"
    if site.site_id in demand.exclude:
        return "site refused the task before"
    if demand.python_version and site.python_version and site.python_version != demand.python_version:
        return f"runs Python {site.python_version}, the task needs {demand.python_version}"
    if demand.arch and site.arch != demand.arch:
        return f"arch is {site.arch or 'unknown'}, the task needs {demand.arch}"
    for key, value in demand.labels.items():
        label = site.labels.get(key)
        if label != value:
            return f"label {key}={label if label is not None else '(unset)'}, the task needs {key}={value}"
    for name, amount in demand.resources.items():
        have = site.total.get(name, 0.0)
        if amount > have + 1e-9:
            if name.startswith("accelerator_type:"):
                return f"has no accelerator {name.split(':', 1)[1]}"
            return f"needs {name}={_fmt(amount)} but the site has {name}={_fmt(have)} in total"
    if site.max_payload_bytes and demand.input_bytes > site.max_payload_bytes:
        return f"arguments of {demand.input_bytes} bytes exceed the site's limit of {site.max_payload_bytes}"
    return None


def score(site: SiteView, demand: Demand, weights: Weights) -> Score:
    """Estimated completion time of ``demand`` at ``site``, with its terms."""
    cpus = demand.resources.get("CPU", 0.0)
    gpus = demand.resources.get("GPU", 0.0)
    # How many tasks of this shape the site runs at once.
    slots = site.total.get("CPU", 0.0) / cpus if cpus > 0 else float(max(site.total.get("CPU", 1.0), 1.0))
    if gpus > 0:
        slots = min(slots, site.total.get("GPU", 0.0) / gpus)
    slots = max(slots, 1.0)
    # The site's own mean run time describes the work already there; this task's
    # estimate describes it and the tasks this gateway placed there since the last status.
    site_run = site.mean_run_s if site.mean_run_s is not None else DEFAULT_RUN_S
    run_s = demand.run_s if demand.run_s is not None else site_run
    there = site.queued + site.running
    ahead = there + site.pending
    mix = (there * site_run + site.pending * run_s) / ahead if ahead else run_s
    wait_s = max(0.0, ahead + 1 - slots) / slots * mix
    bandwidth = site.bandwidth or weights.default_bandwidth
    missing = sum(n for d, n in demand.inputs.items()
                  if d not in site.resident and demand.holders.get(d) != site.site_id)
    transfer_s = missing / bandwidth
    if not site.local:  # arguments travel from the home gateway, one forwarding round trip
        transfer_s += site.rtt_s + demand.input_bytes / bandwidth
    cpu_hours = max(cpus, 0.0) * run_s / 3600.0
    price = site.price() * cpu_hours
    carbon_g = site.carbon() * cpu_hours * WATTS_PER_CPU / 1000.0
    total = wait_s + transfer_s + run_s + weights.price * price + weights.carbon * carbon_g
    return Score(site.site_id, wait_s, transfer_s, run_s, price, carbon_g, total)


class Placer:
    """Places tasks over a fixed list of site views, counting each placement as load.

    Build one per placement round (e.g. one accepted batch); views are not copied, and
    ``pending`` of the chosen site grows by one per placement.
    """

    def __init__(self, sites: Sequence[SiteView], weights: Weights | None = None, *,
                 ignore_state: bool = False) -> None:
        self.sites = list(sites)
        self.weights = weights or Weights()
        self.ignore_state = ignore_state
        self._shapes: dict[tuple[object, ...], tuple[list[tuple[float, int]], tuple[tuple[str, str], ...], int]] = {}

    def _prepare(self, demand: Demand) -> tuple[list[tuple[float, int]], tuple[tuple[str, str], ...], int]:
        key = demand.shape()
        hit = self._shapes.get(key)
        if hit is not None:
            return hit
        heap: list[tuple[float, int]] = []
        samples: dict[str, list[str]] = {}
        rejected = 0
        for index, site in enumerate(self.sites):
            why = rejection(site, demand, ignore_state=self.ignore_state)
            if why is None:
                heap.append((score(site, demand, self.weights).total, index))
            else:
                rejected += 1
                names = samples.setdefault(why, [])
                if len(names) < RECORDED_REJECTIONS:
                    names.append(site.site_id)
        heapq.heapify(heap)
        # Resource shortfalls first: those name the sites closest to fitting.
        order = sorted(samples, key=lambda r: (not r.startswith(("needs", "has no")), r))
        record = tuple((name, why) for why in order for name in samples[why])
        entry = (heap, record, rejected)
        self._shapes[key] = entry
        return entry

    def place(self, demand: Demand, *, commit: bool = True) -> Decision:
        """The best site for one task. With ``commit`` the site's pending load grows by one."""
        heap, record, rejected = self._prepare(demand)
        while heap:
            stale, index = heap[0]
            current = score(self.sites[index], demand, self.weights)
            if current.total > stale + 1e-12:  # the site got busier since it was pushed
                heapq.heapreplace(heap, (current.total, index))
                continue
            break
        else:
            return Decision(None, None, (), record, rejected, 0)
        site = self.sites[index]
        others = [score(self.sites[i], demand, self.weights)
                  for _, i in heapq.nsmallest(RECORDED_CANDIDATES + 1, heap) if i != index][:RECORDED_CANDIDATES] \
            if len(heap) <= 256 else [score(self.sites[i], demand, self.weights) for _, i in heap[1:3]]
        candidates = tuple(sorted([current, *others], key=lambda s: s.total))
        if commit:
            site.pending += 1
            heapq.heapreplace(heap, (score(site, demand, self.weights).total, index))
        return Decision(site.site_id, current, candidates, record, rejected, len(heap))

    def rank(self, demand: Demand) -> Decision:
        """Every feasible site, best first (for quotes); changes no load."""
        heap, record, rejected = self._prepare(demand)
        scores = sorted((score(self.sites[i], demand, self.weights) for _, i in heap), key=lambda s: s.total)
        best = scores[0] if scores else None
        return Decision(best.site if best else None, best, tuple(scores), record, rejected, len(scores))


def place_all(sites: Sequence[SiteView], demands: Iterable[Demand], weights: Weights | None = None) -> list[Decision]:
    placer = Placer(sites, weights)
    return [placer.place(d) for d in demands]
