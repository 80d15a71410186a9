"""The one backoff rule: doubling delays, a cap, a jitter band (or none)."""

from __future__ import annotations

import math

from llm_proxy.backoff import NO_JITTER, RetryPolicy


def test_delays_double_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.25, max_s=3.0, jitter=NO_JITTER)
    assert [policy.delay_s(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_default_jitter_keeps_each_delay_between_half_and_all_of_it() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=8.0)
    assert policy.delay_s(2, lambda: 0.0) == 2.0
    assert policy.delay_s(2, lambda: 1.0) == 4.0
    assert all(2.0 <= policy.delay_s(2) <= 4.0 for _ in range(200))


def test_a_custom_jitter_band_scales_the_delay_both_ways() -> None:
    policy = RetryPolicy(base_s=0.05, max_s=math.inf, jitter=(0.5, 1.5))
    assert policy.delay_s(1, lambda: 0.0) == 0.05
    assert policy.delay_s(1, lambda: 1.0) == 0.05 * 2 * 1.5
    assert policy.delay_s(1, lambda: 0.5) == 0.1


def test_an_endless_reconnect_loop_stays_at_the_cap_and_never_overflows() -> None:
    policy = RetryPolicy(base_s=0.1, max_s=2.0, jitter=NO_JITTER)
    assert policy.delay_s(10_000) == 2.0
    assert RetryPolicy(base_s=0.1, max_s=math.inf).delay_s(10_000, lambda: 1.0) > 1e18
