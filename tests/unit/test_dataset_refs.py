"""The one rule for where a task's DatasetRefs are found: the SDK collects them with it
(``refs_in``), and a worker replaces them by their tables with it (``map_refs``)."""

from __future__ import annotations

from collections import OrderedDict

from intertie.datasets import DatasetRef, map_refs, refs_in


def ref(name: str) -> DatasetRef:
    return DatasetRef(id=f"id-{name}", name=name, site="alpha", num_rows=1, num_bytes=8, schema_ipc=b"")


def test_refs_are_mapped_at_the_top_level_and_one_level_inside_containers() -> None:
    a, b, c, d, e, deep = ref("a"), ref("b"), ref("c"), ref("d"), ref("e"), ref("deep")
    args = (a, [1, b], (c, "x"), {"k": d, "n": 2}, [[deep]], "plain")
    kwargs = {"e": e, "nested": {"inner": [deep]}}
    seen: list[str] = []

    def table(r: DatasetRef) -> str:
        seen.append(r.name)
        return f"table {r.name}"

    new_args, new_kwargs = map_refs(args, kwargs, table)
    assert new_args == ("table a", [1, "table b"], ("table c", "x"), {"k": "table d", "n": 2}, [[deep]], "plain")
    assert new_kwargs == {"e": "table e", "nested": {"inner": [deep]}}  # two levels down: left alone
    assert seen == ["a", "b", "c", "d", "e"]  # in argument order
    assert args[1] == [1, b] and kwargs["e"] is e  # the call itself is not changed


def test_containers_come_back_as_plain_lists_tuples_and_dicts() -> None:
    a = ref("a")
    new_args, _ = map_refs((OrderedDict(k=a),), {}, lambda r: r.name)
    assert type(new_args[0]) is dict and new_args[0] == {"k": "a"}


def test_refs_in_finds_each_dataset_once_in_the_same_places() -> None:
    a, b, deep = ref("a"), ref("b"), ref("deep")
    assert refs_in((a, [b, a], {"x": (deep,)}), {"k": {"v": b}}) == [a, b]
    assert refs_in((), {}) == []


def test_a_dataset_ref_reads_short_and_a_list_of_them_is_one_table() -> None:
    from intertie.display import Listing

    ref = DatasetRef("0123456789abcdef0123", "trips<2024>", "alpha", 1_234_567, 48_000_000, b"", origin="beta")
    assert repr(ref) == "<DatasetRef 'trips<2024>' at alpha: 1234567 rows, 45.8 MiB, id 01234567, replica of beta>"
    html = Listing([ref, ref])._repr_html_()
    assert html is not None and html.count("<tr>") == 3 and "trips&lt;2024&gt;" in html and "<2024>" not in html
