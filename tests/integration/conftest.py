from __future__ import annotations

import cloudpickle
import pytest


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # Test modules are not installed where Ray workers run; ship their functions by value,
    # as a user does for a module that exists only on the client.
    for item in items:
        module = getattr(item, "module", None)
        if module is not None:
            cloudpickle.register_pickle_by_value(module)
        item.add_marker(pytest.mark.integration)
