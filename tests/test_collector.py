"""`hub serve` sets the collector up for many long-lived connections (hub.collector)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from hub.collector import YOUNG_THRESHOLD, tune_collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_collector")
def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    _, middle, old = gc.get_threshold()
    tune_collector()
    assert gc.get_freeze_count() > 0  # modules, classes: out of every full collection
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
    # in flight, and not yet looked at: tune_collector's own collection reset the count
    young: list[list[int]] = [[] for _ in range(YOUNG_THRESHOLD // 2)]
    assert gc.get_count()[0] >= len(young)
