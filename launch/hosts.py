"""Host names: the node list (``--nodes`` / ``--hostfile``), ``HOST:PORT`` addresses, and which hosts are
this machine."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket

from madakv_sglang.launch import LaunchError


def parse_nodes(value: str) -> list[str]:
    """``"h0, h1"`` -> ``["h0", "h1"]``; an empty entry is an error (a stray comma would shift the ranks)."""
    hosts = [part.strip() for part in value.split(",")]
    if not any(hosts):
        raise LaunchError("--nodes names no host")
    if not all(hosts):
        raise LaunchError(f"--nodes {value!r} has an empty entry")
    return hosts


def parse_hostfile(text: str) -> list[str]:
    """One host per line, in rank order: the first field counts (so MPI's ``host slots=8`` lines work), ``#``
    starts a comment, blank lines are skipped."""
    hosts = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            hosts.append(fields[0])
    return hosts


def split_address(address: str, flag: str = "--dist-init-addr") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port), the port checked to be in 1..65535."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise LaunchError(f"{flag} {address!r}: expected HOST:PORT")
    return host, check_port(int(port_text), flag)


def check_port(port: int, what: str) -> int:
    if not 1 <= port <= 65535:
        raise LaunchError(f"{what}: port {port} is outside 1..65535")
    return port


def resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


@functools.cache
def _this_machine() -> frozenset[str]:
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return frozenset(name.lower() for name in names)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_this_machine(host: str) -> bool:
    """True for localhost, loopback addresses, this hostname / FQDN and this host's own addresses."""
    return is_loopback(host) or host.lower() in _this_machine()


def machine_key(host: str) -> str:
    """Hosts with the same key are one machine (their nodes need distinct ports)."""
    return "" if is_this_machine(host) else host.lower()
