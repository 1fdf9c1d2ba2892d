"""Who may see whose task: the rule behind every read, follow and cancel."""

from __future__ import annotations

from intertie_gateway.tenancy import ANONYMOUS, Caller, foreign, may_see


def test_a_tenant_sees_only_its_own_tasks_of_this_home_and_a_peer_only_what_it_forwarded() -> None:
    acme, globex, alpha = Caller(tenant="acme"), Caller(tenant="globex"), Caller(peer="alpha")
    assert may_see("acme", "", acme, isolated=True)
    assert not may_see("acme", "", globex, isolated=True)
    assert not may_see("acme", "", ANONYMOUS, isolated=True)
    # A task alpha forwarded here belongs to "acme@alpha": neither a local "acme" nor another peer sees it.
    assert not may_see(foreign("acme", "alpha"), "alpha", acme, isolated=True)
    assert may_see(foreign("acme", "alpha"), "alpha", alpha, isolated=True)
    assert not may_see(foreign("acme", "beta"), "beta", alpha, isolated=True)
    assert not may_see("acme", "", alpha, isolated=True)
    # Without token auth there is one anonymous tenant and no isolation; peers still see only theirs.
    assert may_see("acme", "", ANONYMOUS, isolated=False) and may_see("", "alpha", ANONYMOUS, isolated=False)
    assert not may_see("", "beta", alpha, isolated=False)


def test_a_forwarded_tasks_tenant_is_qualified_by_its_home() -> None:
    assert foreign("acme", "alpha") == "acme@alpha"
    assert foreign("", "alpha") == "anonymous@alpha"
