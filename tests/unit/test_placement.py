"""Placement: filters with reasons, one case per scoring term, bursts, and the lazy heap."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from intertie_gateway.admission import Capacity
from intertie_gateway.placement import (
    DEFAULT_OVERHEAD_S,
    Demand,
    Placer,
    SiteView,
    Weights,
    place_all,
    rejection,
    score,
)

CPU1 = {"CPU": 1.0}


def site(name: str, cpus: float = 4, **kw: object) -> SiteView:
    kw.setdefault("python_version", "3.11")
    kw.setdefault("arch", "x86_64")
    return SiteView(site_id=name, total={"CPU": cpus, **kw.pop("extra", {})}, mean_run_s=1.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("view, demand, reason", [
    (site("a"), Demand(CPU1, site="b"), "pinned to site 'b'"),
    (site("a", state="down"), Demand(CPU1), "site is down"),
    (site("a", state="draining"), Demand(CPU1), "site is draining"),
    (site("a"), Demand(CPU1, python_version="3.12"), "runs Python 3.11, the task needs 3.12"),
    (site("a"), Demand(CPU1, arch="aarch64"), "arch is x86_64, the task needs aarch64"),
    (site("a", labels={"region": "eu"}), Demand(CPU1, labels={"region": "us"}), "label region=eu, the task needs region=us"),
    (site("a"), Demand(CPU1, labels={"tier": "gold"}), "label tier=(unset)"),
    (site("a", cpus=2), Demand({"CPU": 8.0}), "needs CPU=8 but the site has CPU=2 in total"),
    (site("a", cpus=3, node_max={"CPU": 2.0}), Demand({"CPU": 3.0}),
     "needs CPU=3 but the site's largest node has CPU=2 (3 in total over its nodes)"),
    (site("a"), Demand({"CPU": 1.0, "accelerator_type:A100": 0.001}), "has no accelerator A100"),
    (site("a", max_payload_bytes=10), Demand(CPU1, input_bytes=11), "exceed the site's limit of 10"),
    (site("a"), Demand(CPU1, exclude=frozenset({"a"})), "refused the task before"),
    (site("a", accepts=("acme@home", "*@elsewhere")), Demand(CPU1, tenant="globex", home="home"),
     "does not accept tenant 'globex@home' (its policy)"),
])
def test_filters_give_a_reason(view: SiteView, demand: Demand, reason: str) -> None:
    why = rejection(view, demand)
    assert why is not None and reason in why


def test_a_site_serves_the_tenants_its_policy_names_as_it_names_them() -> None:
    demand = Demand(CPU1, tenant="acme", home="home")
    assert rejection(site("a", accepts=("acme@home",)), demand) is None
    assert rejection(site("a", accepts=("*@home",)), demand) is None
    assert rejection(site("a", accepts=("acme",)), demand) is not None  # a's own acme is another tenant
    assert rejection(site("here", accepts=("nobody",), local=True), demand) is None  # the home checked at intake


def test_a_site_that_fits_is_not_rejected() -> None:
    view = site("a", labels={"region": "eu"}, extra={"GPU": 1.0, "accelerator_type:T4": 1.0})
    demand = Demand({"CPU": 1.0, "GPU": 1.0, "accelerator_type:T4": 0.001}, python_version="3.11",
                    arch="x86_64", site="a", labels={"region": "eu"})
    assert rejection(view, demand) is None


def test_queue_wait_term_prefers_the_less_loaded_site() -> None:
    busy, idle = site("busy", queued=20), site("idle")
    assert score(busy, Demand(CPU1), Weights()).wait_s > 0
    assert score(idle, Demand(CPU1), Weights()).wait_s == 0
    assert place_all([busy, idle], [Demand(CPU1)])[0].site_id == "idle"


def test_transfer_term_prefers_the_site_holding_the_inputs() -> None:
    holder = site("holder", rtt_s=0.001, resident={"ds1": ""})
    other = site("other", rtt_s=0.001)
    demand = Demand(CPU1, inputs={"ds1": 10**9})
    assert score(other, demand, Weights(default_bandwidth=1e8)).transfer_s == pytest.approx(10.001)
    assert place_all([other, holder], [demand], Weights(default_bandwidth=1e8))[0].site_id == "holder"


def test_transfer_term_counts_arguments_and_round_trip_for_remote_sites() -> None:
    local, remote = site("home", local=True), site("peer", rtt_s=0.002, bandwidth=1e6)
    demand = Demand(CPU1, input_bytes=1_000_000)
    assert score(local, demand, Weights()).transfer_s == 0
    assert score(remote, demand, Weights()).transfer_s == pytest.approx(1.002)
    assert place_all([remote, local], [demand])[0].site_id == "home"


def test_another_tenants_dataset_counts_as_absent() -> None:
    # Peer "holder" names alpha's tenant acme "acme@alpha" and its own tenants plainly.
    holder = site("holder", rtt_s=0.001, resident={"mine": "acme@alpha", "theirs": "globex@alpha",
                                                   "local": "acme"})
    weights = Weights(default_bandwidth=1e8)

    def transfer(dataset_id: str, tenant: str) -> float:
        demand = Demand(CPU1, inputs={dataset_id: 10**9}, tenant=tenant, home="alpha")
        return score(holder, demand, weights).transfer_s

    assert transfer("mine", "acme") == pytest.approx(0.001)  # acme's own: resident
    assert transfer("theirs", "acme") == pytest.approx(10.001)  # globex's: as if it were not there
    assert transfer("local", "acme") == pytest.approx(10.001)  # holder's own tenant acme is not alpha's acme
    assert transfer("theirs", "") == pytest.approx(0.001)  # a home without token auth reads anyone's
    # At the site itself, owners are named as its tenants are.
    here = site("alpha", local=True, resident={"mine": "acme", "theirs": "globex"})
    assert score(here, Demand(CPU1, inputs={"theirs": 10**9}, tenant="acme", home="alpha"), weights).transfer_s > 1
    assert score(here, Demand(CPU1, inputs={"mine": 10**9}, tenant="acme", home="alpha"), weights).transfer_s == 0


def test_transfer_can_be_outweighed_by_a_long_queue() -> None:
    holder = site("holder", queued=400, resident={"ds": ""})
    other = site("other")
    assert place_all([holder, other], [Demand(CPU1, inputs={"ds": 10**8})])[0].site_id == "other"


def test_price_term_counts_only_with_a_weight() -> None:
    cheap, dear = site("cheap", labels={"price": "0.01"}), site("dear", labels={"price": "5"})
    demand = Demand(CPU1)
    assert score(dear, demand, Weights()).price == pytest.approx(5 / 3600)
    decision = place_all([dear, cheap], [demand], Weights(price=10_000))[0]
    assert decision.site_id == "cheap"
    assert decision.chosen is not None and decision.chosen.price == pytest.approx(0.01 / 3600)


def test_carbon_term_prefers_green_power_with_a_weight() -> None:
    coal, wind = site("coal", labels={"carbon": "800"}), site("wind", labels={"carbon": "20"})
    assert place_all([coal, wind], [Demand(CPU1)], Weights(carbon=1000))[0].site_id == "wind"


def test_unparsable_labels_count_as_zero() -> None:
    assert site("a", labels={"price": "free", "carbon": "-3"}).price() == 0
    assert site("a", labels={"carbon": "nan"}).carbon() == 0


def test_burst_spreads_in_proportion_to_capacity() -> None:
    sites = [site("small", cpus=2, local=True), site("mid", cpus=4, rtt_s=0.001), site("big", cpus=8, rtt_s=0.001)]
    counts = Counter(d.site_id for d in place_all(sites, [Demand(CPU1)] * 1400))
    assert set(counts) == {"small", "mid", "big"}
    assert counts["big"] > counts["mid"] > counts["small"]
    assert counts["big"] == pytest.approx(800, rel=0.05)


def test_no_site_names_the_constraint_and_closest_sites() -> None:
    sites = [site("a", cpus=2), site("b", cpus=4), site("c", state="down")]
    decision = place_all(sites, [Demand({"CPU": 16.0})])[0]
    assert decision.site_id is None and decision.rejected_count == 3
    message = decision.why_not()
    assert "needs CPU=16 but the site has CPU=2" in message and "b:" in message
    assert message.index("a:") < message.index("c: site is down")  # resource shortfalls first


def test_decision_records_candidates_best_first() -> None:
    sites = [site(f"s{i}", queued=i) for i in range(10)]
    decision = Placer(sites).place(Demand(CPU1))
    assert decision.site_id == "s0" and decision.feasible_count == 10
    totals = [c.total for c in decision.candidates]
    assert totals == sorted(totals) and decision.candidates[0].site == "s0"
    assert len(decision.candidates) == 5


def test_rank_changes_no_load() -> None:
    sites = [site("a"), site("b", queued=3)]
    placer = Placer(sites)
    ranked = placer.rank(Demand(CPU1))
    assert [s.site for s in ranked.candidates] == ["a", "b"]
    assert sites[0].pending == 0


def test_lazy_heap_matches_brute_force() -> None:
    rng = random.Random(7)
    sites = [site(f"s{i}", cpus=rng.choice([1, 2, 4, 8]), queued=rng.randrange(20), rtt_s=rng.random() / 100)
             for i in range(60)]
    twins = [SiteView(**{**s.__dict__}) for s in sites]
    demands = [Demand({"CPU": rng.choice([1.0, 2.0])}) for _ in range(500)]
    placer = Placer(sites)
    for demand in demands:
        chosen = placer.place(demand).site_id
        best = min(twins, key=lambda s: score(s, demand, Weights()).total if rejection(s, demand) is None else 1e18)
        assert score(next(s for s in twins if s.site_id == chosen), demand, Weights()).total == \
            pytest.approx(score(best, demand, Weights()).total)
        next(s for s in twins if s.site_id == chosen).pending += 1


def test_tasks_placed_this_round_count_with_their_own_run_time() -> None:
    # A site whose past work was tiny must not soak up a burst of long tasks.
    quick_past = SiteView("quick", total={"CPU": 2.0}, mean_run_s=0.001, python_version="3.11")
    slow_past = SiteView("slow", total={"CPU": 2.0}, mean_run_s=1.0, python_version="3.11")
    counts = Counter(d.site_id for d in place_all([quick_past, slow_past], [Demand(CPU1, run_s=1.0)] * 100))
    assert counts["quick"] == pytest.approx(50, abs=2)
    assert score(quick_past, Demand(CPU1, run_s=2.0), Weights()).run_s == 2.0
    assert score(quick_past, Demand(CPU1), Weights()).run_s == 0.001  # no estimate: the site's own


def test_the_site_a_ref_names_counts_as_holding_it_before_the_catalogue_says_so() -> None:
    holder, other = site("holder", rtt_s=0.001), site("other", rtt_s=0.001)
    demand = Demand(CPU1, inputs={"ds": 10**9}, holders={"ds": "holder"})
    assert score(holder, demand, Weights()).transfer_s < 0.01
    assert place_all([other, holder], [demand])[0].site_id == "holder"


# The federation of tests/integration/test_federation.py as the home (alpha) saw it under load,
# with figures from its log: a 32 MB dataset at beta, read by a function with no run estimate.
def alpha(**kw: object) -> SiteView:
    return SiteView("alpha", total={"CPU": 2.0}, mean_run_s=0.0085, local=True, python_version="3.11", **kw)  # type: ignore[arg-type]


def beta(**kw: object) -> SiteView:
    kw = {"mean_run_s": 0.0094, "rtt_s": 0.0033, **kw}
    return SiteView("beta", total={"CPU": 4.0}, python_version="3.11", **kw)  # type: ignore[arg-type]


def gamma(**kw: object) -> SiteView:
    kw = {"mean_run_s": 0.017, "rtt_s": 0.0032, **kw}
    return SiteView("gamma", total={"CPU": 2.0, "GPU": 1.0}, python_version="3.11", **kw)  # type: ignore[arg-type]


AT_BETA = Demand(CPU1, input_bytes=600, inputs={"big": 32_000_000}, holders={"big": "beta"})


def test_a_slow_link_to_the_holder_counts_on_both_sides() -> None:
    # One heartbeat to beta took 0.61 s (both gateways busy). Forwarding the task there costs
    # that round trip, and so does fetching the data from there: the link must not push the
    # task off its data (it did: 0.61 + 0.01 at beta against 0.32 + 0.01 at alpha).
    sites = [alpha(), beta(rtt_s=0.6088), gamma()]
    decision = Placer(sites).place(AT_BETA)
    assert decision.site_id == "beta", decision.candidates
    by_site = {c.site: c for c in decision.candidates}
    assert by_site["alpha"].transfer_s == pytest.approx(0.32 + 0.6088)
    assert by_site["gamma"].transfer_s == pytest.approx(0.0032 + 0.32 + 0.6088 + 600 / 100e6)
    # score() alone knows one site: the fetch is its bytes only.
    assert score(sites[0], AT_BETA, Weights()).transfer_s == pytest.approx(0.32)


def test_a_kept_placer_takes_the_holders_newer_status() -> None:
    # A placer built from beta's status in the middle of a burst (187 queued, 27 running),
    # kept for the next task: beta's drained status from the next heartbeat must count.
    placer = Placer([alpha(), beta(queued=187, running=27, mean_run_s=0.0099, rtt_s=0.0009), gamma()])
    stale = placer.place(AT_BETA, commit=False)
    assert stale.site_id == "alpha"  # right for what the placer was told: a 0.52 s queue at beta
    assert {c.site: c.wait_s for c in stale.candidates}["beta"] == \
        pytest.approx((187 + 27 + 1 - 4) / 4 * (0.0099 + DEFAULT_OVERHEAD_S))
    placer.refresh([beta()])
    decision = placer.place(AT_BETA)
    assert decision.site_id == "beta" and decision.chosen is not None and decision.chosen.wait_s == 0


def test_a_refresh_replaces_the_pending_count_of_tasks_that_finished_since() -> None:
    # A chain of steps, each on a 24 MB dataset the previous step left at gamma and each
    # finished before the next is submitted: the placer's own count says 3 are pending at
    # gamma (a 0.27 s wait, more than moving 24 MB), gamma's newer status says none.
    steps = [Demand(CPU1, inputs={f"step{i}": 24_000_000}, holders={f"step{i}": "gamma"}, run_s=0.268)
             for i in range(4)]
    placer = Placer([alpha(), beta(), gamma()])
    assert [placer.place(step).site_id for step in steps[:3]] == ["gamma"] * 3
    assert placer.place(steps[3], commit=False).site_id == "alpha"  # the phantom queue
    placer.refresh([gamma(pending=0)])
    assert placer.place(steps[3]).site_id == "gamma"


def test_a_site_whose_load_fell_is_found_again_by_a_kept_shape() -> None:
    # The lazy heap holds the busy site under its old, higher score; after a refresh it must
    # not wait behind sites that only look better than that stale score.
    home, peer = site("home", local=True, queued=40), site("peer", rtt_s=0.01)
    placer = Placer([home, peer])
    assert placer.place(Demand(CPU1)).site_id == "peer"
    placer.refresh([site("home", local=True)])
    assert placer.place(Demand(CPU1)).site_id == "home"


def test_a_refresh_that_changes_what_a_site_can_run_filters_again() -> None:
    placer = Placer([site("a"), site("b", queued=8)])
    assert placer.place(Demand(CPU1), commit=False).site_id == "a"
    placer.refresh([site("a", state="down")])
    decision = placer.place(Demand(CPU1), commit=False)
    assert decision.site_id == "b" and ("a", "site is down") in decision.rejected
    placer.refresh([site("a")])
    assert placer.place(Demand(CPU1), commit=False).site_id == "a"
    placer.refresh([site("unknown")])  # not one of the placer's sites: ignored
    assert [s.site_id for s in placer.sites] == ["a", "b"]


def test_lazy_heap_matches_brute_force_with_refreshes_up_and_down() -> None:
    rng = random.Random(11)
    names = [f"s{i}" for i in range(40)]
    cpus = {name: rng.choice([1, 2, 4, 8]) for name in names}

    def view(name: str) -> SiteView:
        return site(name, cpus=cpus[name], queued=rng.randrange(30), rtt_s=rng.random() / 100)

    twins = {name: view(name) for name in names}
    placer = Placer([SiteView(**{**v.__dict__}) for v in twins.values()])
    shapes = [Demand({"CPU": 1.0}), Demand({"CPU": 2.0}), Demand({"CPU": 1.0}, run_s=0.3)]
    for step in range(600):
        if step % 7 == 0:  # new statuses of a few sites, their load up or down
            fresh = [view(name) for name in rng.sample(names, 3)]
            for v in fresh:
                twins[v.site_id] = SiteView(**{**v.__dict__})
            placer.refresh(fresh)
        demand = rng.choice(shapes)
        chosen = placer.place(demand).site_id
        assert chosen is not None
        best = min(score(t, demand, Weights()).total for t in twins.values() if rejection(t, demand) is None)
        assert score(twins[chosen], demand, Weights()).total == pytest.approx(best)
        twins[chosen].pending += 1
    assert all(len(s.heap) <= 2 * len(s.feasible) + 8 for s in placer._shapes.values())


def test_the_largest_node_bounds_a_request_not_the_total() -> None:
    """Two nodes of 2 and 1 CPUs: 3 CPUs in total, but no node holds a task of 3."""
    cluster = site("cluster", cpus=3, node_max={"CPU": 2.0, "memory": 8e9}, extra={"memory": 12e9})
    assert rejection(cluster, Demand({"CPU": 2.0})) is None
    assert rejection(cluster, Demand({"CPU": 1.0, "memory": 9e9})) is not None
    assert rejection(site("old", cpus=3), Demand({"CPU": 3.0})) is None  # no node_max (an older peer): the total
    decision = Placer([cluster], ignore_state=True).place(Demand({"CPU": 3.0}), commit=False)
    assert decision.site_id is None and "largest node has CPU=2" in decision.why_not()


def test_capacity_never_fits_names_the_largest_node() -> None:
    cap = Capacity({"CPU": 3.0}, node_max={"CPU": 2.0})
    assert cap.never_fits({"CPU": 2.0}) is None
    assert cap.never_fits({"CPU": 3.0}, "site 'x'") == (
        "needs CPU=3 but the largest node of site 'x' has CPU=2 (3 in total over its nodes; a task runs on one node)")
    cap.update_total({"CPU": 5.0}, {"CPU": 4.0})  # a node of 4 joined
    assert cap.never_fits({"CPU": 3.0}) is None


def test_a_burst_s_wait_counts_each_task_s_overhead_as_measured() -> None:
    """examples/federated_map.py: 600 tasks of ~3 ms over 8 CPUs drained in ~0.8 s, while
    the wait term, counting run times alone, said 600 * 3 ms / 8 = 0.23 s; the sites measured
    ~3 ms of overhead per task besides (admission.Capacity), and with it the estimate is the
    drain time they showed."""
    run_s, overhead_s = 0.003, 0.0028
    sites = [SiteView("alpha", total={"CPU": 2.0}, mean_run_s=run_s, overhead_s=overhead_s, local=True),
             SiteView("beta", total={"CPU": 4.0}, mean_run_s=run_s, overhead_s=overhead_s, rtt_s=0.001),
             SiteView("gamma", total={"CPU": 2.0}, mean_run_s=run_s, overhead_s=overhead_s, rtt_s=0.001)]
    decisions = place_all(sites, [Demand(CPU1, run_s=run_s)] * 600)
    last = decisions[-1].chosen
    assert last is not None
    drained_s = 0.8  # what the sites did
    assert drained_s / 2 <= last.wait_s + last.run_s <= drained_s * 2, last
    without = place_all([SiteView(s.site_id, total=s.total, mean_run_s=run_s, overhead_s=0.0, local=s.local)
                         for s in sites], [Demand(CPU1, run_s=run_s)] * 600)[-1].chosen
    assert without is not None and without.wait_s < drained_s / 3  # the old term: run times alone


def test_capacity_measures_the_overhead_only_while_every_cpu_is_busy() -> None:
    now = [0.0]
    cap = Capacity({"CPU": 2.0}, overcommit=32.0, clock=lambda: now[0])
    for _ in range(8):
        cap.acquire(CPU1)
    # 200 tasks of 3 ms finish at one every 3 ms with 2 CPUs busy: 3 ms of overhead each.
    for _ in range(200):
        now[0] += 0.003
        cap.observe(0.003)
        cap.release(CPU1)
        cap.acquire(CPU1)
    assert cap.overhead_s == pytest.approx(0.003, rel=0.05)
    # A site that runs one task at a time on its 2 CPUs says nothing of its overhead: the
    # gaps between finishes are the wait for work, not its cost.
    idle = Capacity({"CPU": 2.0}, clock=lambda: now[0])
    for _ in range(200):
        idle.acquire(CPU1)
        now[0] += 1.0
        idle.observe(0.003)
        idle.release(CPU1)
    assert idle.overhead_s is None
