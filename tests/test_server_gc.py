"""The serving process tunes the garbage collector once it has started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from llm_proxy.server import GC_GEN0_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_startup_objects_and_raises_gen0_threshold() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    long_lived = [object() for _ in range(1000)]

    tune_gc()

    assert gc.get_freeze_count() >= len(long_lived)
    assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD > 700
    assert gc.isenabled()  # reference cycles are still collected
