"""Circuit breaker state machine, driven by a fake clock."""

from __future__ import annotations

import pytest

from llm_proxy.proxy.breaker import BreakerState, CircuitBreaker

from ..support import FakeClock

Change = tuple[BreakerState, BreakerState]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[Change]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[Change]) -> CircuitBreaker:
    return CircuitBreaker(
        3, 30.0, clock, on_change=lambda old, new: changes.append((old, new))
    )


def _state(breaker: CircuitBreaker) -> BreakerState:
    # A call, not the property: mypy would keep an earlier `assert` narrowing.
    return breaker.state


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(3):
        breaker.record_failure()


def test_breaker_state_values_are_stable_strings() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]
    assert str(BreakerState.HALF_OPEN) == "half_open"


def test_breaker_starts_closed_and_allows(breaker: CircuitBreaker) -> None:
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.retry_after_s() == 0.0


def test_breaker_opens_after_consecutive_failures(
    breaker: CircuitBreaker, changes: list[Change]
) -> None:
    breaker.record_failure()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 2
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert changes == [(BreakerState.CLOSED, BreakerState.OPEN)]


def test_breaker_success_resets_failure_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED


def test_breaker_retry_after_counts_down_but_never_below_one(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    _open(breaker)
    assert breaker.retry_after_s() == pytest.approx(30.0)
    clock.advance(20.0)
    assert breaker.retry_after_s() == pytest.approx(10.0)
    clock.advance(9.5)
    assert breaker.retry_after_s() == 1.0


def test_breaker_lets_exactly_one_probe_through_after_cooldown(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[Change]
) -> None:
    _open(breaker)
    clock.advance(29.9)
    assert not breaker.allow()
    assert _state(breaker) is BreakerState.OPEN
    clock.advance(0.1)
    assert breaker.allow()
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.retry_after_s() == 1.0
    assert changes[-1] == (BreakerState.OPEN, BreakerState.HALF_OPEN)


def test_breaker_probe_success_closes(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[Change]
) -> None:
    _open(breaker)
    clock.advance(30.0)
    assert breaker.allow()
    breaker.record_success()
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.allow()
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_breaker_probe_failure_reopens_with_fresh_cooldown(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[Change]
) -> None:
    _open(breaker)
    clock.advance(30.0)
    assert breaker.allow()
    clock.advance(5.0)
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert breaker.retry_after_s() == pytest.approx(30.0)
    clock.advance(29.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    assert changes[-2:] == [
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
    ]


def test_breaker_ignores_late_results_while_open(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[Change]
) -> None:
    _open(breaker)
    clock.advance(10.0)
    breaker.record_success()  # a request that started before the breaker opened
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert breaker.retry_after_s() == pytest.approx(20.0)
    assert len(changes) == 1


def test_breaker_writes_off_a_probe_that_never_reports(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    _open(breaker)
    clock.advance(30.0)
    assert breaker.allow()
    clock.advance(29.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()
    assert _state(breaker) is BreakerState.HALF_OPEN


def test_breaker_probe_timeout_is_configurable(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 30.0, clock, probe_timeout_s=5.0)
    breaker.record_failure()
    clock.advance(30.0)
    assert breaker.allow()
    clock.advance(5.0)
    assert breaker.allow()


def test_breaker_works_without_callback(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 1.0, clock)
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    clock.advance(1.0)
    assert breaker.allow()
    breaker.record_success()
    assert _state(breaker) is BreakerState.CLOSED


def test_breaker_callback_sees_new_state_in_place(clock: FakeClock) -> None:
    seen: list[BreakerState] = []
    breaker = CircuitBreaker(1, 1.0, clock)
    breaker.on_change = lambda old, new: seen.append(breaker.state)
    breaker.record_failure()
    assert seen == [BreakerState.OPEN]


@pytest.mark.parametrize(
    ("threshold", "cooldown", "message"),
    [(0, 1.0, "failure_threshold"), (1, 0.0, "cooldown_s")],
)
def test_breaker_rejects_bad_construction(
    threshold: int, cooldown: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(threshold, cooldown)


def test_breaker_defaults_to_monotonic_clock() -> None:
    breaker = CircuitBreaker(1, 60.0)
    breaker.record_failure()
    assert not breaker.allow()
    assert 1.0 <= breaker.retry_after_s() <= 60.0
