"""Networking helpers for launchers, benchmarks and tests (the bottom layer: standard library only)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now, picked by the OS. Nothing holds it: another process may
    take it before ours binds it (fine for loopback launches and test servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
