"""Who runs what where: the validated per-node plan of a multi-node launch (flags, environment, ports).

Everything here is checked before any process starts; a problem raises LaunchError naming the flag or node.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from madakv_sglang.launch import LaunchError
from madakv_sglang.launch.cli import Options, ServerFlags
from madakv_sglang.launch.hosts import check_port, is_loopback, is_this_machine, machine_key, resolvable, split_address
from madakv_sglang.server_process import free_port

# The rendezvous port when node 0 is another machine, where no free port can be looked up from here.
DEFAULT_DIST_PORT = 50000
FORWARDED_PREFIXES = ("SGLANG_", "MADAKV_")
NODE_ENV = {"PYTHONUNBUFFERED": "1"}  # log lines reach the launcher as they are written
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Node:
    """One ``sglang.launch_server`` process tree. ``env`` is what it gets on top of its own environment."""

    rank: int
    host: str
    local: bool  # a child process here, else through the remote prefix
    port: int  # node 0's HTTP port; SGLang's health stub on the others
    argv: tuple[str, ...]
    env: Mapping[str, str]

    @property
    def name(self) -> str:
        return f"node {self.rank} ({self.host}{', local' if self.local else ''})"


@dataclass(frozen=True)
class Plan:
    nodes: tuple[Node, ...]
    dist_init_addr: str
    ready_url: str  # node 0's HTTP server as seen from here
    kv_argv: tuple[str, ...]  # the --kv-* flags, for the preflight
    remote_prefix: str
    remote_python: str
    remote_cwd: str


def forwarded_env(environ: Mapping[str, str], env_flags: Sequence[str]) -> dict[str, str]:
    """The variables every node gets: ``SGLANG_*``, ``MADAKV_*``, ``--env NAME[=VALUE]``, PYTHONUNBUFFERED."""
    env = {name: value for name, value in environ.items() if name.startswith(FORWARDED_PREFIXES)}
    for item in env_flags:
        name, sep, value = item.partition("=")
        if not name.isidentifier():
            raise LaunchError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not sep and name not in environ:
            raise LaunchError(f"--env {name}: not set in this environment; give --env {name}=VALUE")
        env[name] = value if sep else environ[name]
    return dict(sorted({**env, **NODE_ENV}.items()))


def node_env(flags: Sequence[str], nnodes: int) -> dict[int, dict[str, str]]:
    """``--node-env RANK:NAME=VALUE`` entries, by rank."""
    by_rank: dict[int, dict[str, str]] = {}
    for item in flags:
        rank_text, _, assignment = item.partition(":")
        name, sep, value = assignment.partition("=")
        if not rank_text.isdigit() or not sep or not name.isidentifier():
            raise LaunchError(f"--node-env {item!r}: expected RANK:NAME=VALUE")
        if int(rank_text) >= nnodes:
            raise LaunchError(f"--node-env {item!r}: there is no node {rank_text} among {nnodes} nodes")
        by_rank.setdefault(int(rank_text), {})[name] = value
    return by_rank


def local_ranks(choice: str, hosts: Sequence[str]) -> set[int]:
    """The ranks that run here for ``--local-node-rank`` ``auto`` / ``none`` / ``N``."""
    if choice == "auto":
        return {rank for rank, host in enumerate(hosts) if is_this_machine(host)}
    if choice == "none":
        return set()
    if choice.isdigit() and int(choice) < len(hosts):
        return {int(choice)}
    raise LaunchError(f"--local-node-rank {choice!r}: expected auto, none or a rank below {len(hosts)}")


def port_in_use(port: int) -> bool:
    """Something listens on ``port`` here (any interface); TIME_WAIT leftovers do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
        return False


def check_topology(server: ServerFlags, nnodes: int) -> None:
    """The node count against SGLang's own flags: ranks are the launcher's, and tp*pp splits evenly."""
    if server.node_rank is not None:
        raise LaunchError(f"--node-rank {server.node_rank}: the launcher gives each node its rank (host i is node i)")
    if server.nnodes is not None and server.nnodes != nnodes:
        raise LaunchError(f"--nnodes {server.nnodes} conflicts with the {nnodes} nodes given")
    if (server.tp_size * server.pp_size) % nnodes:
        ranks = f"--tp {server.tp_size}" + (f" x --pp-size {server.pp_size}" if server.pp_size != 1 else "")
        raise LaunchError(
            f"{ranks} ranks cannot be split evenly over {nnodes} nodes: SGLang needs "
            f"tp_size * pp_size divisible by the node count"
        )


def _free_dist_port(environ: Mapping[str, str], taken: Sequence[int]) -> int:
    for _ in range(100):
        try:
            port = free_port(environ)
        except (RuntimeError, ValueError) as err:
            raise LaunchError(f"no dist-init port: {err}; give --dist-init-addr HOST:PORT") from None
        if port not in taken:
            return port
    raise LaunchError("no free dist-init port besides the HTTP ports; give --dist-init-addr HOST:PORT")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_plan(options: Options, environ: Mapping[str, str], check_in_use: bool) -> Plan:
    """Validate ``options`` (several nodes) and lay out every node; ``check_in_use`` also refuses ports that
    something here already listens on (for a launch; a printed command may run later)."""
    from madakv_sglang.engine.plugin import split_kv_argv

    hosts, server = options.nodes, options.server
    nnodes = len(hosts)
    unresolved = [f"node {rank} ({host})" for rank, host in enumerate(hosts) if not resolvable(host)]
    if unresolved:
        raise LaunchError(f"cannot resolve the host of {', '.join(unresolved)}")
    check_topology(server, nnodes)
    check_port(server.port, "--port")
    on_machine: dict[str, int] = {}
    ports = []
    for rank, host in enumerate(hosts):  # the k-th further node on one machine takes --port + k
        key = machine_key(host)
        ports.append(server.port + on_machine.get(key, 0))
        on_machine[key] = on_machine.get(key, 0) + 1
        check_port(ports[-1], f"--port {server.port} + {ports[-1] - server.port} for node {rank} ({host})")

    if server.dist_init_addr is not None:
        dist_host, dist_port = split_address(server.dist_init_addr)
        if not resolvable(dist_host):
            raise LaunchError(f"--dist-init-addr {server.dist_init_addr}: cannot resolve {dist_host}")
    else:
        dist_host = hosts[0]
        dist_port = DEFAULT_DIST_PORT
        if is_this_machine(dist_host):
            dist_port = _free_dist_port(environ, ports)
    clash = [
        rank
        for rank, host in enumerate(hosts)
        if ports[rank] == dist_port and machine_key(host) == machine_key(dist_host)
    ]
    if clash:
        raise LaunchError(
            f"the dist-init port {dist_port} is also node {clash[0]}'s HTTP port (--port); "
            "choose another --port or --dist-init-addr"
        )
    away = [f"node {rank} ({host})" for rank, host in enumerate(hosts) if not is_this_machine(host)]
    if is_loopback(dist_host) and away:
        raise LaunchError(
            f"the dist-init address {dist_host}:{dist_port} is loopback, which {', '.join(away)} "
            "cannot reach; name node 0 by a routable host, or give --dist-init-addr"
        )
    if check_in_use:
        busy = [
            f"{ports[rank]} (node {rank}'s HTTP port)"
            for rank, host in enumerate(hosts)
            if is_this_machine(host) and port_in_use(ports[rank])
        ]
        if is_this_machine(dist_host) and port_in_use(dist_port):
            busy.append(f"{dist_port} (the dist-init port)")
        if busy:
            raise LaunchError(f"port {', '.join(busy)} already in use on this machine")

    if not is_this_machine(hosts[0]) and is_loopback(server.host):
        raise LaunchError(
            f"node 0 ({hosts[0]}) is another machine and its HTTP server would listen on "
            f"{server.host} (--host), which the launcher cannot reach; pass --host 0.0.0.0"
        )
    ready_host = (
        server.host if server.host not in WILDCARD_HOSTS else ("127.0.0.1" if is_this_machine(hosts[0]) else hosts[0])
    )
    dist_init_addr = f"{_url_host(dist_host)}:{dist_port}"

    here = local_ranks(options.local_node_rank, hosts)
    common_env = forwarded_env(environ, options.env)
    extra_env = node_env(options.node_env, nnodes)
    nodes = tuple(
        Node(
            rank=rank,
            host=host,
            local=rank in here,
            port=ports[rank],
            argv=(
                *server.argv,
                "--port",
                str(ports[rank]),
                "--nnodes",
                str(nnodes),
                "--node-rank",
                str(rank),
                "--dist-init-addr",
                dist_init_addr,
            ),
            env={**common_env, **extra_env.get(rank, {})},
        )
        for rank, host in enumerate(hosts)
    )
    return Plan(
        nodes=nodes,
        dist_init_addr=dist_init_addr,
        ready_url=f"http://{_url_host(ready_host)}:{ports[0]}",
        kv_argv=tuple(split_kv_argv(server.argv)[0]),
        remote_prefix=options.remote_prefix,
        remote_python=options.remote_python,
        remote_cwd=options.remote_cwd,
    )
