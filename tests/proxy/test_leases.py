"""Lease arithmetic of the fleet limits: sizes, near-limit shrinking, refusals. Pure."""

from __future__ import annotations

import pytest

from llm_proxy.proxy.leases import (
    LEASE_FLOOR,
    REFUSAL_CACHE_S,
    Grant,
    Lease,
    lease_size,
    next_size,
)


def grant(
    granted: int,
    rate_room: int,
    quota_room: int | None = None,
    holders: int = 1,
    retry_after_s: float = 0.0,
) -> Grant:
    return Grant(granted, rate_room, quota_room, holders, retry_after_s, 3600.0)


@pytest.mark.parametrize(
    ("room", "holders", "expected"),
    [
        (10_000, 1, 20),  # far from the limit: the cap
        (10_000, 8, 20),
        (80, 2, 20),  # 80 / (2*2) = 20: still the cap
        (40, 2, 10),  # shrinking: half of an equal share
        (7, 2, 1),
        (3, 1, 1),
        (1, 5, 1),  # one left: leases of one
        (0, 3, 1),  # nothing left: ask for one, the answer says no
        (50, 0, 20),  # no holder known yet counts as one
    ],
)
def test_lease_size_shrinks_to_one_near_the_limit(
    room: int, holders: int, expected: int
) -> None:
    assert lease_size(room, holders, lease_max=20) == expected


def test_lease_size_never_exceeds_half_of_an_equal_share() -> None:
    for room in range(0, 500):
        for holders in range(1, 9):
            size = lease_size(room, holders, 20)
            assert 1 <= size <= 20
            if room >= 2 * holders:
                assert size * 2 * holders <= room


def script_grant(room: int, holders: int, demand: int = 0) -> int:
    """What the lease script grants (it mirrors `lease_size`)."""
    return min(room, max(demand, lease_size(room, holders, 20))) if room > 0 else 0


def test_sum_of_policy_grants_never_exceeds_the_cap() -> None:
    """Processes taking policy-sized leases in turn: grants total exactly the cap."""
    cap, holders, granted = 50, 3, 0
    leases = [Lease(1000, cap) for _ in range(holders)]
    turn = 0
    while True:
        lease = leases[turn % holders]
        room = cap - granted
        g = script_grant(room, holders)
        granted += g
        lease.apply(grant(g, 1000, room - g, holders), 0.0, 20)
        turn += 1
        if room - g == 0:
            break
    assert granted == cap
    assert sum(lease.units for lease in leases) == cap
    # the last grants were leases of one: nobody hoarded the tail
    assert all(lease.size == 1 for lease in leases)


def test_lease_take_give_back_and_empty() -> None:
    lease = Lease(100, None)
    assert not lease.take(1.0)
    lease.apply(grant(3, 97), 1.0, 20)
    assert [lease.take(2.0) for _ in range(4)] == [True, True, True, False]
    assert lease.last_used == 2.0
    lease.give_back()
    assert lease.take(3.0)


def test_lease_wants_prefetch_once_half_of_its_size_is_spent() -> None:
    lease = Lease(10_000, None)
    lease.apply(grant(20, 9_980, holders=1), 0.0, 256)
    assert lease.size == 20 and lease.low_water == 10
    while lease.units > 10:
        assert not lease.wants_prefetch()
        lease.take(0.0)
    assert lease.wants_prefetch()
    assert lease.want(256) == 20  # a whole lease more
    assert lease.want(25) == 15  # never holding more than FLEET_LEASE_MAX


@pytest.mark.parametrize(
    ("size", "in_flight", "share", "expected"),
    [
        (20, 0, 10**6, (LEASE_FLOOR, 10)),  # a quiet token: the floor, asked at half
        (20, 64, 10**6, (256, 128)),  # 64 spent in flight: four times that
        (400, 64, 10**6, (256, 128)),  # never above FLEET_LEASE_MAX
        (256, 0, 10**6, (240, 120)),  # less demand: a sixteenth less per refill
        (256, 10, 10**6, (240, 120)),
        (21, 0, 10**6, (LEASE_FLOOR, 10)),
        (20, 64, 100, (100, 0)),  # the fair share caps it: asked again when empty
        (20, 3, 0, (1, 0)),  # near the limit: one
    ],
)
def test_next_size_follows_the_demand_in_flight(
    size: int, in_flight: int, share: int, expected: tuple[int, int]
) -> None:
    assert next_size(size, in_flight, share, lease_max=256) == expected


def test_lease_grows_with_the_requests_spent_while_its_refill_flew() -> None:
    lease = Lease(10**9, None)
    lease.apply(grant(20, 10**6), 0.0, 256)
    lease.asked_at = lease.taken
    for _ in range(20):
        lease.take(0.0)  # a burst: the lease runs dry before the refill lands
    lease.waiting = 30
    lease.apply(grant(50, 10**6), 0.0, 256)
    assert lease.size == 4 * (20 + 30)
    assert lease.low_water == 100


def test_refilled_units_are_set_aside_for_the_waiting_requests() -> None:
    lease = Lease(10**9, None)
    lease.waiting = 3
    lease.apply(grant(5, 10**6), 0.0, 256)
    assert (lease.units, lease.reserved) == (2, 3)
    assert lease.take(1.0) and lease.take(1.0) and not lease.take(1.0)
    assert lease.claim(1.0)  # a waiter's unit is still there
    lease.stop_waiting()
    lease.stop_waiting()  # left before its turn: its unit goes back to the lease
    assert (lease.units, lease.reserved, lease.waiting) == (1, 1, 1)
    assert lease.claim(2.0) and not lease.claim(2.0)
    lease.stop_waiting()
    assert (lease.units, lease.reserved, lease.waiting) == (1, 0, 0)
    assert lease.taken == 4


def test_lease_with_no_room_left_does_not_prefetch_and_refuses_from_cache() -> None:
    lease = Lease(10, None)
    lease.apply(grant(2, 0, retry_after_s=360.0), 100.0, 20)
    lease.take(100.0)
    lease.take(100.0)
    assert not lease.wants_prefetch()
    refusal = lease.cached_refusal(100.5)
    assert refusal is not None and refusal.limit == "rate"
    assert refusal.retry_after_s(100.5) == pytest.approx(359.5)
    # trusted for at most REFUSAL_CACHE_S: releases elsewhere become visible
    assert lease.cached_refusal(100.0 + REFUSAL_CACHE_S) is None


def test_lease_refusal_names_the_lifetime_cap_when_it_is_spent() -> None:
    lease = Lease(1000, 5)
    lease.apply(grant(0, 900, quota_room=0), 0.0, 20)
    refusal = lease.cached_refusal(0.1)
    assert refusal is not None and refusal.limit == "quota"
    assert refusal.retry_after_s(0.1) == float("inf")


def test_a_grant_covers_every_waiting_request_even_near_the_limit() -> None:
    assert script_grant(room=9, holders=2) == 2
    assert script_grant(room=9, holders=2, demand=7) == 7  # all spent at once
    assert script_grant(room=3, holders=2, demand=7) == 3
    assert script_grant(room=0, holders=2, demand=7) == 0


def test_lease_forgets_what_redis_said_after_an_outage() -> None:
    lease = Lease(10, None)
    lease.apply(grant(0, 0, retry_after_s=30.0), 0.0, 20)
    assert lease.cached_refusal(0.0) is not None
    lease.forget_room()
    assert lease.cached_refusal(0.0) is None and lease.room == 1


def test_grant_reads_the_script_reply() -> None:
    reply = [4, 10, -1, 2, 0, 1_500_000]
    parsed = Grant.from_reply(reply)
    assert parsed == Grant(4, 10, None, 2, 0.0, 1.5)
    assert parsed.room == 10 and parsed.limited_by == "rate"
    capped = Grant.from_reply([1, 10, 0, 1, 0, 0])
    assert capped.room == 0 and capped.limited_by == "quota"
