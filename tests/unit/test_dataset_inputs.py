"""Where a task's dataset arguments are read: a local path for workers on the gateway's
machine, the site's Flight endpoint when Ray has other nodes."""

from __future__ import annotations

from core_fakes import book_world, spec

from intertie_gateway.admission import Capacity
from intertie_gateway.book import Task
from intertie_gateway.dispatch import Slots
from intertie_gateway.model import DatasetInput
from intertie_gateway.transfers import Transfers


class LocalStore:
    address = "10.0.0.5:7071"
    # How workers reach the endpoint as the site (address, certificate, secret).
    worker_endpoint = '{"address": "10.0.0.5:7071", "roots": "", "secret": "s"}'

    def location(self, dataset_id: str, owner: str | None = None) -> str | None:
        return f"/var/lib/intertie/datasets/{dataset_id}.arrow"


def inputs_for(capacity: Capacity) -> dict[str, str] | None:
    slots = Slots(capacity)
    book = book_world(release=slots.release).book
    transfers = Transfers(book, slots, LocalStore(), lambda: [], site_id="here",  # type: ignore[arg-type]
                          pull_timeout_s=1.0, spawn=lambda coro: None, done=lambda: None,  # type: ignore[arg-type,return-value]
                          draining=lambda: False)
    task = Task(spec("t", inputs=(DatasetInput("d1", "here", 10),)), 0.0)
    book.admit(task)
    return transfers.inputs_for(task)


def test_workers_on_the_gateway_s_machine_map_the_file() -> None:
    assert inputs_for(Capacity({"CPU": 2.0})) == {"d1": "/var/lib/intertie/datasets/d1.arrow"}


def test_workers_of_a_ray_with_several_nodes_read_over_flight() -> None:
    capacity = Capacity({"CPU": 3.0}, node_max={"CPU": 2.0})
    assert inputs_for(capacity) == {"d1": "flight://" + LocalStore.worker_endpoint}
