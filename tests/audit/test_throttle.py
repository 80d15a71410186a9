"""The rate cap on refused sign-ins written to the audit trail (a pure class)."""

from __future__ import annotations

from llm_proxy.audit.throttle import FailureThrottle

from ..support import FakeClock


def test_throttle_records_a_clients_first_refusals_then_counts_the_rest() -> None:
    throttle = FailureThrottle(per_client=3, clock=FakeClock(0.0))
    admitted = [throttle.admit("admin 10.0.0.1") for _ in range(10)]
    assert admitted == [0, 0, 0, None, None, None, None, None, None, None]
    assert throttle.suppressed == 7


def test_throttle_tells_the_next_record_how_many_were_held_back() -> None:
    clock = FakeClock(0.0)
    throttle = FailureThrottle(per_client=1, window_s=60, clock=clock)
    assert throttle.admit("c") == 0
    assert throttle.admit("c") is None
    assert throttle.admit("c") is None
    clock.advance(60)  # the next minute
    assert throttle.admit("c") == 2
    assert throttle.admit("c") is None
    clock.advance(60)
    assert throttle.admit("c") == 1


def test_throttle_caps_every_client_together() -> None:
    throttle = FailureThrottle(per_client=5, total=4, clock=FakeClock(0.0))
    admitted = [throttle.admit(f"management 10.0.0.{n}") for n in range(10)]
    assert admitted.count(0) == 4 and admitted.count(None) == 6
    assert throttle.suppressed == 6


def test_throttle_keeps_clients_apart() -> None:
    throttle = FailureThrottle(per_client=1, clock=FakeClock(0.0))
    assert throttle.admit("admin 10.0.0.1") == 0
    assert throttle.admit("management 10.0.0.1") == 0
    assert throttle.admit("admin 10.0.0.2") == 0
    assert throttle.admit("admin 10.0.0.1") is None


def test_throttle_remembers_a_bounded_number_of_clients() -> None:
    clock = FakeClock(0.0)
    throttle = FailureThrottle(per_client=1, total=10_000, max_clients=3, clock=clock)
    for n in range(100):
        assert throttle.admit(f"c{n}") == 0
    assert len(throttle._clients) == 3  # the least recently seen went first
    assert throttle.admit("c99") is None and throttle.admit("c0") == 0
