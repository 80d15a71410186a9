"""Ids made in more than one place: per-process sequences and process names."""

from __future__ import annotations

import os
import socket

from llm_proxy.ids import id_sequence, process_name


def test_a_sequence_is_a_random_prefix_then_a_fixed_width_hex_counter() -> None:
    next_id = id_sequence(prefix_bytes=6, counter_digits=8)
    first, second = next_id(), next_id()
    assert len(first) == 20 and int(first, 16) >= 0
    assert first[:12] == second[:12]
    assert (first[12:], second[12:]) == ("00000001", "00000002")


def test_two_sequences_do_not_share_a_prefix() -> None:
    prefixes = {id_sequence(8, 16)()[:16] for _ in range(20)}
    assert len(prefixes) == 20


def test_a_process_name_says_host_and_pid_and_differs_per_call() -> None:
    name = process_name()
    host, pid, salt = name.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert len(salt) == 8 and int(salt, 16) >= 0
    assert process_name() != name
