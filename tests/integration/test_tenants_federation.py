"""Two tenants on a secure 3-site federation (TLS, mutual TLS between sites, token auth) cannot
see each other's work, at their home or at the peers their tasks were forwarded to."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from operator_cli import token_for

import intertie
from intertie.embedded import LocalFederation

# Peers hear of each other within a few heartbeats of all serving.
PEERS_UP_S = 60.0



def where(x: int) -> int:
    return x + 1


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(3, base_dir=tmp_path_factory.mktemp("tenants-fed"), heartbeat_s=0.5,
                         object_store_memory=100 << 20) as local:
        with intertie.connect(local) as fed:
            deadline = time.monotonic() + PEERS_UP_S
            while sum(s.state == "up" for s in fed.sites()) < 3:
                assert time.monotonic() < deadline, f"the sites never all came up: {fed.sites()}"
                time.sleep(0.1)
        yield local


def test_two_tenants_of_one_home_cannot_see_each_others_tasks_anywhere(federation: LocalFederation) -> None:
    alpha = federation.site("alpha")
    tokens = {t: token_for(t, alpha.state_dir) for t in ("acme", "globex")}  # taken by the running site
    feds = {t: intertie.connect(alpha.address, token=tok, tls_ca=federation.tls_ca) for t, tok in tokens.items()}
    try:
        mine = {t: [intertie.remote(where).options(site=s).submit_to(fed, (i,), {})
                    for i, s in enumerate(("alpha", "beta", "gamma"))] for t, fed in feds.items()}
        for tenant, futures in mine.items():
            assert [f.result(timeout=120) for f in futures] == [1, 2, 3]
            infos = [feds[tenant].task(f.task_id) for f in futures]
            assert [(i.site, i.home, i.tenant) for i in infos] == [
                ("alpha", "alpha", tenant), ("beta", "alpha", tenant), ("gamma", "alpha", tenant)]
        for tenant, other in (("acme", "globex"), ("globex", "acme")):
            for future in mine[other]:
                with pytest.raises(intertie.TaskNotFoundError):
                    feds[tenant].task(future.task_id)
                with pytest.raises(intertie.TaskNotFoundError):
                    feds[tenant].future(future.task_id).result(timeout=30)
                assert feds[tenant].cancel([future.task_id]) == []
        # At the peer, a task alpha forwarded belongs to "acme@alpha": beta's own tenant cannot see it.
        with intertie.connect(federation.site("beta")) as beta_local:
            for future in mine["acme"][1:]:
                with pytest.raises(intertie.TaskNotFoundError):
                    beta_local.task(future.task_id)
    finally:
        for fed in feds.values():
            fed.close()
