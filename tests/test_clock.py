"""UTC times as ISO 8601 with a `Z`: the general formatter and the per-event fast path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from llm_proxy.clock import iso_epoch_s, utc_iso, utc_iso_at, utc_now, utc_now_iso

MOMENT = datetime(2025, 3, 1, 12, 0, 5, 123456, tzinfo=UTC)


def test_utc_iso_writes_seconds_by_default_and_any_timespec() -> None:
    assert utc_iso(MOMENT) == "2025-03-01T12:00:05Z"
    assert utc_iso(MOMENT, "milliseconds") == "2025-03-01T12:00:05.123Z"
    assert utc_iso(MOMENT, "microseconds") == "2025-03-01T12:00:05.123456Z"
    assert utc_iso(MOMENT.replace(microsecond=0), "microseconds").endswith(
        ":05.000000Z"
    )


def test_utc_iso_converts_other_offsets_to_utc_and_refuses_a_naive_time() -> None:
    plus_two = MOMENT.astimezone(timezone(timedelta(hours=2)))
    assert utc_iso(plus_two) == "2025-03-01T12:00:05Z"
    assert utc_iso(MOMENT.replace(tzinfo=timezone(timedelta(0)))) == utc_iso(MOMENT)
    with pytest.raises(ValueError, match="timezone-aware"):
        utc_iso(MOMENT.replace(tzinfo=None))


def test_utc_iso_matches_datetime_isoformat_with_the_offset_as_z() -> None:
    for timespec in ("seconds", "milliseconds", "microseconds"):
        expected = MOMENT.isoformat(timespec=timespec).replace("+00:00", "Z")
        assert utc_iso(MOMENT, timespec) == expected


def test_utc_now_is_aware_utc_and_utc_now_iso_has_milliseconds() -> None:
    before = datetime.now(UTC)
    assert before <= utc_now() <= datetime.now(UTC) and utc_now().tzinfo is UTC
    stamp = utc_now_iso()
    assert len(stamp) == 24 and stamp.endswith("Z") and stamp[19] == "."


@pytest.mark.parametrize(
    "now",
    [1_764_500_138.0, 1_764_500_138.9996, 1_764_500_139.5, 946_684_799.001],
)
def test_utc_iso_at_matches_datetime_isoformat(now: float) -> None:
    expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
    assert utc_iso_at(now) == expected.replace("+00:00", "Z")


def test_utc_iso_at_stays_right_across_seconds_and_back_in_time() -> None:
    for now in (100.25, 101.5, 100.75, 86_400.0):
        expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        assert utc_iso_at(now) == expected.replace("+00:00", "Z")


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-27T10:49:19.123Z",
        "2026-11-27T10:49:19Z",
        "2026-11-27T10:49:19.123456+00:00",
        "2026-11-27T12:49:19.5+02:00",
    ],
)
def test_iso_epoch_s_reads_every_iso_form(stamp: str) -> None:
    assert iso_epoch_s(stamp) == pytest.approx(
        datetime.fromisoformat(stamp).timestamp(), abs=1e-6
    )


def test_iso_epoch_s_refuses_what_is_not_a_time() -> None:
    with pytest.raises(ValueError):
        iso_epoch_s("yesterday")
