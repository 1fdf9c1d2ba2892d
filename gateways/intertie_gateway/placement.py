"""Placement: which site should run a task. Pure logic, no I/O, no clocks.

A task's *demand* (resources, constraints, input bytes) is matched against *site views*
(the catalogue as one gateway sees it). Sites that can never run the task are filtered
out with a reason; the rest are scored by estimated completion time:

    queue wait  +  transfer of inputs not at the site  +  run time
                +  price_weight * price  +  carbon_weight * carbon

and the lowest wins. Every decision keeps its reasons (``Decision``) so users can ask why.
Placing a burst is O(log sites) per task after one O(sites) filter per task shape: each
shape keeps a heap of its candidate sites whose keys are refreshed lazily, since a site's
score only grows as tasks are placed on it. A site whose load is refreshed (``Placer.refresh``:
this site's own, or a peer's newer status) may score lower: it is pushed again with its new
key, and its older entries are skipped.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from intertie.spec import SiteScore as Score  # the same record users see in quotes and explain
from intertie_gateway.tenancy import accepted, foreign, owner_here

# Used for a site's task run time until it reports one.
DEFAULT_RUN_S = 0.05
# Used for a site's per-task overhead until it has measured one.
DEFAULT_OVERHEAD_S = 0.002
# Operator labels read by the price and carbon terms.
PRICE_LABEL = "price"    # currency per CPU-hour
CARBON_LABEL = "carbon"  # grams CO2e per kWh
# Power drawn per CPU, to turn carbon intensity into grams per task.
WATTS_PER_CPU = 10.0
# Candidates kept in a decision's record besides the chosen site.
RECORDED_CANDIDATES = 4
# Sites named per rejection reason in a decision's record.
RECORDED_REJECTIONS = 8
# What a site's status says of its load and links: these change its score, never whether
# it can run a task (``rejection`` reads none of them).
LOAD_FIELDS = frozenset({"free", "queued", "running", "mean_run_s", "overhead_s", "rtt_s", "bandwidth", "pending",
                         "resident"})


@dataclass
class SiteView:
    """One site in the catalogue, as the placing gateway sees it."""

    site_id: str
    state: str = "up"  # up, down, draining
    arch: str = ""
    python_version: str = ""
    total: Mapping[str, float] = field(default_factory=dict)
    # The most of each resource one node has; empty: not known (read ``total``).
    node_max: Mapping[str, float] = field(default_factory=dict)
    free: Mapping[str, float] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    mean_run_s: float | None = None
    # What a task costs the site per CPU beyond its run time (admission.Capacity measures
    # it); None until known.
    overhead_s: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    max_payload_bytes: int = 0  # 0: no limit known
    local: bool = False
    rtt_s: float = 0.0  # round trip from the placing gateway
    bandwidth: float = 0.0  # bytes/s from the placing gateway; 0 means "use the default"
    # Tasks this gateway placed here that the site's last status does not show yet.
    pending: int = 0
    # The datasets at this site: id -> owner, as the site itself names the tenant.
    resident: Mapping[str, str] = field(default_factory=dict)
    # The tenants the site serves (its policy), as it names them.
    accepts: tuple[str, ...] = ("*",)

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
    tenant: str = ""  # whose task, as its home names the tenant
    home: str = ""  # the placing site (a peer names the tenant tenant@home)

    def shape(self) -> tuple[object, ...]:
        """Demands of one shape have the same candidates (and the same scores)."""
        return (tuple(sorted(self.resources.items())), self.python_version, self.arch, self.site,
                tuple(sorted(self.labels.items())), self.input_bytes, tuple(sorted(self.inputs.items())),
                tuple(sorted(self.holders.items())), self.exclude, self.run_s, self.tenant, self.home)


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


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """Where a task was sent and why: kept with the task, journaled, shown by ``info``."""

    site: str
    reason: str
    decided_at: float
    candidates: tuple[Score, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    rejected_count: int = 0
    feasible_count: int = 0

    @classmethod
    def of(cls, decision: Decision, reason: str, now: float) -> PlacementRecord:
        return cls(decision.site_id or "", reason, now, decision.candidates, decision.rejected,
                   decision.rejected_count, decision.feasible_count)


def _readable_there(site: SiteView, dataset_id: str, demand: Demand) -> bool:
    """Whether a task's input is at ``site`` for it: where the client said it is, or resident
    there and the task's tenant's. Another tenant's dataset counts as absent, so that no score
    or explanation tells where it lies. A task without a tenant (its home runs without token
    auth) reads anyone's."""
    if demand.holders.get(dataset_id) == site.site_id:
        return True
    owner = site.resident.get(dataset_id)
    if owner is None:
        return False
    if not demand.tenant:
        return True
    return (owner if site.local else owner_here(owner, site.site_id, demand.home)) == demand.tenant


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
    if not site.local and site.accepts != ("*",):
        name = foreign(demand.tenant, demand.home)
        if not accepted(name, site.accepts):
            return f"does not accept tenant {name!r} (its policy)"
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
        largest = site.node_max.get(name, have) if site.node_max else have
        if amount > largest + 1e-9:  # a task runs on one node: the total is spread over several
            return (f"needs {name}={_fmt(amount)} but the site's largest node has {name}={_fmt(largest)} "
                    f"({_fmt(have)} in total over its nodes)")
    if site.max_payload_bytes and demand.input_bytes > site.max_payload_bytes:
        return f"arguments of {demand.input_bytes} bytes exceed the site's limit of {site.max_payload_bytes}"
    return None


def score(site: SiteView, demand: Demand, weights: Weights, links: Mapping[str, float] | None = None) -> Score:
    """Estimated completion time of ``demand`` at ``site``, with its terms.

    ``links`` is the round trip from the placing gateway to each site (a placer passes its
    views'): a dataset the site lacks is fetched from the site its ref names, which costs a
    round trip there besides its bytes. Forwarding a task costs a round trip too, so a slow
    or noisy link to the holder counts on both sides rather than pushing work off the data.
    A site's own link to the holder is not known here; the placing gateway's stands in."""
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
    # Each task ahead holds its worker for its run time and the site's per-task overhead
    # (dispatch, Ray's round trip, its result): for tasks of a few milliseconds the
    # overhead is most of it, and run times alone made a burst look several times faster.
    overhead = site.overhead_s if site.overhead_s is not None else DEFAULT_OVERHEAD_S
    wait_s = max(0.0, ahead + 1 - slots) / slots * (mix + overhead)
    bandwidth = site.bandwidth or weights.default_bandwidth
    transfer_s = 0.0
    if demand.inputs:
        missing = [d for d in demand.inputs if not _readable_there(site, d, demand)]
        transfer_s = sum(demand.inputs[d] for d in missing) / bandwidth
        if links:
            transfer_s += sum(links.get(demand.holders.get(d, ""), 0.0) for d in missing)
    if not site.local:  # arguments travel from the home gateway, one forwarding round trip
        transfer_s += site.rtt_s + demand.input_bytes / bandwidth
    cpu_hours = max(cpus, 0.0) * run_s / 3600.0
    price = site.price() * cpu_hours
    carbon_g = site.carbon() * cpu_hours * WATTS_PER_CPU / 1000.0
    total = wait_s + transfer_s + run_s + weights.price * price + weights.carbon * carbon_g
    return Score(site.site_id, wait_s, transfer_s, run_s, price, carbon_g, total)


class _Shape:
    """The candidates of one task shape: a heap of (score when pushed, site index, site
    version), its feasible sites, and the record of the rest."""

    __slots__ = ("demand", "heap", "feasible", "record", "rejected")

    def __init__(self, demand: Demand, heap: list[tuple[float, int, int]], feasible: set[int],
                 record: tuple[tuple[str, str], ...], rejected: int) -> None:
        self.demand = demand  # one of the shape (all of one shape score alike)
        self.heap = heap
        self.feasible = feasible
        self.record = record
        self.rejected = rejected


class Placer:
    """Places tasks over a fixed list of site views, counting each placement as load.

    Build one per placement round (e.g. one accepted batch); views are not copied, and
    ``pending`` of the chosen site grows by one per placement. A placer kept across rounds
    must be told of newer load with :meth:`refresh`; a view changed behind its back may be
    overlooked when its score fell.
    """

    def __init__(self, sites: Sequence[SiteView], weights: Weights | None = None, *,
                 ignore_state: bool = False) -> None:
        self.sites = list(sites)
        self.weights = weights or Weights()
        self.ignore_state = ignore_state
        self._shapes: dict[tuple[object, ...], _Shape] = {}
        self._index = {site.site_id: i for i, site in enumerate(self.sites)}
        self._versions = [0] * len(self.sites)  # bumped by each refresh of the site
        self._links = {site.site_id: site.rtt_s for site in self.sites}

    def _score(self, index: int, demand: Demand) -> Score:
        return score(self.sites[index], demand, self.weights, self._links)

    def _prepare(self, demand: Demand) -> _Shape:
        key = demand.shape()
        hit = self._shapes.get(key)
        if hit is not None:
            return hit
        heap: list[tuple[float, int, int]] = []
        feasible: set[int] = set()
        samples: dict[str, list[str]] = {}
        rejected = 0
        for index, site in enumerate(self.sites):
            why = rejection(site, demand, ignore_state=self.ignore_state)
            if why is None:
                heap.append((self._score(index, demand).total, index, self._versions[index]))
                feasible.add(index)
            else:
                rejected += 1
                names = samples.setdefault(why, [])
                if len(names) < RECORDED_REJECTIONS:
                    names.append(site.site_id)
        heapq.heapify(heap)
        # Resource shortfalls first: those name the sites closest to fitting.
        order = sorted(samples, key=lambda r: (not r.startswith(("needs", "has no")), r))
        record = tuple((name, why) for why in order for name in samples[why])
        entry = self._shapes[key] = _Shape(demand, heap, feasible, record, rejected)
        return entry

    def refresh(self, views: Iterable[SiteView]) -> None:
        """Takes newer views of known sites (matched by ``site_id``): this site's own load,
        known exactly, or a peer's from a status newer than the placer. Their ``pending``
        replaces the placer's count, so a view must count what was placed on the site since
        the load it reports. A site whose score fell is found again at once; one whose
        feasibility changed (state, labels, resources...) makes every shape filter afresh.
        Unknown sites are ignored: a site joining calls for a new placer."""
        changed: list[int] = []
        refilter = False
        for view in views:
            index = self._index.get(view.site_id)
            if index is None:
                continue
            old = self.sites[index]
            if old is not view and not refilter:
                refilter = any(getattr(old, f.name) != getattr(view, f.name)
                               for f in fields(SiteView) if f.name not in LOAD_FIELDS)
            self.sites[index] = view
            self._links[view.site_id] = view.rtt_s
            self._versions[index] += 1
            changed.append(index)
        if refilter:
            self._shapes.clear()
            return
        if not changed:
            return
        versions = self._versions
        for shape in self._shapes.values():
            for index in changed:
                if index in shape.feasible:  # its older entries are skipped when they come to the top
                    heapq.heappush(shape.heap, (self._score(index, shape.demand).total, index, versions[index]))
            if len(shape.heap) > 2 * len(shape.feasible) + 8:  # drop the superseded entries
                shape.heap = [e for e in shape.heap if e[2] == versions[e[1]]]
                heapq.heapify(shape.heap)

    def _top(self, shape: _Shape, demand: Demand) -> tuple[int, Score] | None:
        """The best feasible site for the shape and its current score."""
        heap, versions = shape.heap, self._versions
        while heap:
            stale, index, version = heap[0]
            if version != versions[index]:  # superseded by a refresh of the site
                heapq.heappop(heap)
                continue
            current = self._score(index, demand)
            if current.total > stale + 1e-12:  # the site got busier since it was pushed
                heapq.heapreplace(heap, (current.total, index, version))
                continue
            return index, current
        return None

    def place(self, demand: Demand, *, commit: bool = True) -> Decision:
        """The best site for one task. With ``commit`` the site's pending load grows by one."""
        shape = self._prepare(demand)
        top = self._top(shape, demand)
        if top is None:
            return Decision(None, None, (), shape.record, shape.rejected, 0)
        index, current = top
        heap, versions = shape.heap, self._versions
        if len(heap) <= 256:
            live = (e for e in heap if e[2] == versions[e[1]] and e[1] != index)
            others = [self._score(i, demand) for _, i, _ in heapq.nsmallest(RECORDED_CANDIDATES, live)]
        else:
            others = [self._score(i, demand) for _, i, v in heap[1:5] if v == versions[i] and i != index][:2]
        candidates = tuple(sorted([current, *others], key=lambda s: s.total))
        if commit:
            self.sites[index].pending += 1
            heapq.heapreplace(heap, (self._score(index, demand).total, index, versions[index]))
        return Decision(self.sites[index].site_id, current, candidates, shape.record, shape.rejected,
                        len(shape.feasible))

    def rank(self, demand: Demand) -> Decision:
        """Every feasible site, best first (for quotes); changes no load."""
        shape = self._prepare(demand)
        scores = sorted((self._score(i, demand) for i in shape.feasible), key=lambda s: s.total)
        best = scores[0] if scores else None
        return Decision(best.site if best else None, best, tuple(scores), shape.record, shape.rejected, len(scores))


def place_all(sites: Sequence[SiteView], demands: Iterable[Demand], weights: Weights | None = None) -> list[Decision]:
    placer = Placer(sites, weights)
    return [placer.place(d) for d in demands]
