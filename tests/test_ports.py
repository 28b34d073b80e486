"""The test harness's port helpers (conftest): planned ports cannot be ports the kernel picks."""

from __future__ import annotations

import socket

import pytest

from conftest import HOST, _ephemeral_range, free_port_offset, free_ports, refusing_port


def test_planned_ports_are_below_the_ephemeral_range_and_never_repeat() -> None:
    lo, _ = _ephemeral_range()
    first, second = free_ports(40), free_ports(40)
    assert len(set(first + second)) == 80
    assert all(p < lo for p in first + second)
    offset = free_port_offset(3)
    planned = {base + offset + i for base in (7000, 9000, 8080) for i in range(3)}
    assert all(p < lo for p in planned) and not planned & set(first + second)


def test_refusing_port_refuses() -> None:
    port = refusing_port()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect((HOST, port))
    with socket.socket() as s, pytest.raises(OSError):
        s.bind((HOST, port))  # nobody else can take it
