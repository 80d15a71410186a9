"""GCRA limiter behaviour, driven by a fake clock."""

from __future__ import annotations

import pytest

from llm_proxy.proxy.ratelimit import WINDOW_S, Decision, GcraLimiter, Limiter

from ..support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> GcraLimiter:
    return GcraLimiter(clock=clock)


def _burst(limiter: GcraLimiter, key: str, limit: int) -> list[Decision]:
    return [limiter.try_acquire(key, limit) for _ in range(limit)]


def test_gcra_limiter_satisfies_limiter_protocol(limiter: GcraLimiter) -> None:
    seam: Limiter = limiter
    assert seam.try_acquire("k", 1).allowed


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 10, 60, 1000, 3599, 100_000])
def test_ratelimit_allows_whole_allowance_at_once_then_refuses(
    limiter: GcraLimiter, limit: int
) -> None:
    decisions = _burst(limiter, "k", limit)
    assert all(d.allowed for d in decisions)
    refused = limiter.try_acquire("k", limit)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(WINDOW_S / limit)


def test_ratelimit_remaining_counts_down(limiter: GcraLimiter) -> None:
    remaining = [d.remaining for d in _burst(limiter, "k", 5)]
    assert remaining == [4, 3, 2, 1, 0]


def test_ratelimit_frees_one_slot_per_emission_interval(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    _burst(limiter, "k", 4)  # T = 900 s
    clock.advance(899.0)
    early = limiter.try_acquire("k", 4)
    assert not early.allowed
    assert early.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    assert limiter.try_acquire("k", 4).allowed
    assert not limiter.try_acquire("k", 4).allowed


def test_ratelimit_sustained_rate_is_limit_per_hour(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    limit, step = 6, 50.0  # T = 600 s; a request every 50 s for three hours
    start = clock.now
    allowed_at: list[float] = []
    for _ in range(int(3 * WINDOW_S / step)):
        if limiter.try_acquire("k", limit).allowed:
            allowed_at.append(clock.now)
        clock.advance(step)
    for t_index, t in enumerate(allowed_at, start=1):
        assert t_index <= limit + (t - start) / (WINDOW_S / limit) + 1
    assert len(allowed_at) == limit + int(3 * WINDOW_S / (WINDOW_S / limit)) - 1


def test_ratelimit_worst_case_window_holds_twice_limit_minus_one(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    # Documents the GCRA trade-off: full burst, then one per T as slots free.
    limit, interval = 4, 900.0
    allowed = sum(d.allowed for d in _burst(limiter, "k", limit))
    for _ in range(limit - 1):
        clock.advance(interval)
        allowed += limiter.try_acquire("k", limit).allowed
    assert clock.now - 1000.0 < WINDOW_S
    assert allowed == 2 * limit - 1


def test_ratelimit_reset_after_is_time_until_full_allowance(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    first = limiter.try_acquire("k", 4)
    assert first.reset_after_s == pytest.approx(900.0)
    _burst(limiter, "k", 3)
    refused = limiter.try_acquire("k", 4)
    assert refused.reset_after_s == pytest.approx(3600.0)
    clock.advance(3600.0)
    assert _burst(limiter, "k", 4)[-1].allowed


def test_ratelimit_keys_are_independent(limiter: GcraLimiter) -> None:
    _burst(limiter, "a", 2)
    assert not limiter.try_acquire("a", 2).allowed
    assert limiter.try_acquire("b", 2).allowed


def test_ratelimit_raising_limit_frees_the_difference_at_once(
    limiter: GcraLimiter,
) -> None:
    _burst(limiter, "k", 2)
    assert not limiter.try_acquire("k", 2).allowed
    assert [d.allowed for d in _burst(limiter, "k", 3)] == [True, False, False]
    assert [d.allowed for d in _burst(limiter, "k", 5)] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_ratelimit_lowering_limit_never_grants_extra(limiter: GcraLimiter) -> None:
    _burst(limiter, "k", 3)
    lowered = limiter.try_acquire("k", 2)
    assert not lowered.allowed
    assert lowered.limit == 2
    assert lowered.retry_after_s == pytest.approx(1800.0)


def test_ratelimit_lowering_limit_keeps_unspent_allowance(limiter: GcraLimiter) -> None:
    limiter.try_acquire("k", 10)
    assert [d.allowed for d in _burst(limiter, "k", 2)] == [True, False]


@pytest.mark.parametrize("limit", [0, -5])
def test_ratelimit_refuses_everything_below_one_per_hour(
    limiter: GcraLimiter, limit: int
) -> None:
    decision = limiter.try_acquire("k", limit)
    assert decision == Decision(False, 0, 0, WINDOW_S, WINDOW_S)
    assert len(limiter) == 0


def test_ratelimit_prune_drops_only_idle_keys(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    limiter.try_acquire("short", 10)  # back to full after 360 s
    limiter.try_acquire("long", 1)  # back to full after 3600 s
    clock.advance(400.0)
    assert limiter.prune() == 1
    assert len(limiter) == 1
    assert not limiter.try_acquire("long", 1).allowed
    assert limiter.prune(clock.now + WINDOW_S) == 1
    assert len(limiter) == 0


def test_ratelimit_prunes_opportunistically_every_n_calls(clock: FakeClock) -> None:
    limiter = GcraLimiter(clock=clock, prune_every=3)
    limiter.try_acquire("a", 100)
    limiter.try_acquire("b", 100)
    clock.advance(60.0)
    limiter.try_acquire("c", 100)  # third call prunes a and b, then counts c
    assert len(limiter) == 1


def test_ratelimit_idle_key_starts_fresh(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    _burst(limiter, "k", 3)
    clock.advance(2 * WINDOW_S)
    assert [d.remaining for d in _burst(limiter, "k", 3)] == [2, 1, 0]


def test_ratelimit_custom_window(clock: FakeClock) -> None:
    limiter = GcraLimiter(clock=clock, window_s=60.0)
    _burst(limiter, "k", 2)
    assert limiter.try_acquire("k", 2).retry_after_s == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"window_s": 0.0}, "window_s"), ({"prune_every": 0}, "prune_every")],
)
def test_ratelimit_rejects_bad_construction(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GcraLimiter(**kwargs)  # type: ignore[arg-type]


def test_ratelimit_defaults_to_monotonic_clock() -> None:
    assert GcraLimiter().try_acquire("k", 1).allowed


def test_ratelimit_refund_gives_one_slot_back(limiter: GcraLimiter) -> None:
    _burst(limiter, "k", 3)
    assert not limiter.try_acquire("k", 3).allowed
    limiter.refund("k")
    assert limiter.try_acquire("k", 3).allowed
    assert not limiter.try_acquire("k", 3).allowed


def test_ratelimit_refund_of_every_slot_forgets_the_key(limiter: GcraLimiter) -> None:
    _burst(limiter, "k", 2)
    limiter.refund("k")
    limiter.refund("k")
    assert len(limiter) == 0
    assert [d.remaining for d in _burst(limiter, "k", 2)] == [1, 0]


def test_ratelimit_refund_never_grants_more_than_the_allowance(
    limiter: GcraLimiter, clock: FakeClock
) -> None:
    limiter.try_acquire("k", 2)
    clock.advance(WINDOW_S)  # the slot came back by itself
    limiter.refund("k")
    limiter.refund("unknown")
    allowed = [limiter.try_acquire("k", 2).allowed for _ in range(3)]
    assert allowed == [True, True, False]


def test_ratelimit_refund_uses_the_limit_the_slot_was_counted_with(
    limiter: GcraLimiter,
) -> None:
    _burst(limiter, "k", 4)
    limiter.refund("k")
    assert limiter.try_acquire("k", 4).remaining == 0
    assert not limiter.try_acquire("k", 4).allowed
