"""The serving process tunes the garbage collector once it has started."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from llm_proxy.server import (
    GC_GEN0_THRESHOLD,
    SWITCH_INTERVAL_S,
    tune_gc,
    tune_switch_interval,
)


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


def test_the_loop_thread_takes_the_gil_back_within_a_millisecond() -> None:
    before = sys.getswitchinterval()
    try:
        tune_switch_interval()
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S < before
    finally:
        sys.setswitchinterval(before)
