"""``madakv_sglang.server_process.free_port``: where a server's port comes from."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from madakv_sglang import server_process
from madakv_sglang.server_process import FIRST_PORT, PORT_RANGE_ENV, free_port


def test_a_port_without_a_range_is_below_the_ephemeral_range() -> None:
    """Ephemeral ports are what client sockets (our own health probes among them) bind to: one of them taking the
    server's port before the server binds it leaves the server hung."""
    low = server_process._ephemeral_low()
    ports = {free_port({}) for _ in range(20)}
    assert all(FIRST_PORT <= port < low for port in ports)
    assert len(ports) > 1  # spread, so that concurrent runs do not race for one port


def test_the_ephemeral_range_is_read_from_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("40000\t60999\n")
    assert server_process._ephemeral_low(tmp_path / "range") == 40000
    assert server_process._ephemeral_low(tmp_path / "missing") == 32768


def test_a_range_is_kept_and_a_taken_one_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"no free port in {PORT_RANGE_ENV}={port}-{port}"):
            free_port({PORT_RANGE_ENV: f"{port}-{port}"})
    assert free_port({PORT_RANGE_ENV: f"{port}-{port}"}) == port


def test_a_malformed_range_is_refused() -> None:
    with pytest.raises(ValueError, match="expected LOW-HIGH"):
        free_port({PORT_RANGE_ENV: "33000-"})
