"""Networking helpers for launchers, benchmarks and tests (the bottom layer: standard library only)."""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` now, picked by the OS. Nothing holds it: another process may
    take it before ours binds it (fine for loopback launches and test servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_listener(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:`port` and listening: for servers whose own bind would take
    every interface (torch's TCPStore binds "::" given any host name, but listens on a socket it is
    handed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), None if unknown:
    for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, which otherwise pick the address the host name
    resolves to (a LAN address on many machines)."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1 (a name such as "localhost" is not resolved: False)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
