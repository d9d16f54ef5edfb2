"""The launcher's command line: its own flags, and the few SGLang flags it reads (all others pass through).

The launcher's flags have names SGLang does not use, so one ``parse_known_args`` splits them from the server's.
The SGLang flags it needs (node count, ports, addresses, ``--tp``) are read with SGLang's own spellings and
aliases; ``--tp`` is the one abbreviation accepted, as the SGLang docs use it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from madakv_sglang.launch import LaunchError
from madakv_sglang.launch.hosts import parse_hostfile, parse_nodes

DEFAULT_REMOTE_PREFIX = "ssh -tt -o BatchMode=yes {host}"
PROG = "python -m madakv_sglang.launch"


@dataclass(frozen=True)
class ServerFlags:
    """The SGLang flags the launcher reads, and the server argv without the ones it sets per node."""

    given: tuple[str, ...]  # as the user wrote them: what a single-node hand-off passes on
    argv: tuple[str, ...]  # without --port, --nnodes, --node-rank and --dist-init-addr (set per node)
    port: int
    host: str
    tp_size: int
    pp_size: int
    nnodes: int | None
    node_rank: int | None
    dist_init_addr: str | None


@dataclass(frozen=True)
class Options:
    """Everything the launcher was asked; ``nodes`` is empty for a single-node hand-off."""

    nodes: tuple[str, ...]
    server: ServerFlags
    remote_prefix: str
    remote_python: str
    remote_cwd: str
    local_node_rank: str  # "auto", "none" or a rank
    env: tuple[str, ...]  # NAME or NAME=VALUE
    node_env: tuple[str, ...]  # RANK:NAME=VALUE
    print_commands: bool
    slurm: Path | None
    sbatch_options: tuple[str, ...]
    ready_timeout: float | None
    stop_timeout: float


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        usage=f"{PROG} [launcher flags] <python -m sglang.launch_server flags, --kv-* included>",
        description="Start SGLang with the madakv plugin on one node or several (module docstring: "
        "python -c 'import madakv_sglang.launch as l; help(l)').",
        epilog="Every other flag goes to sglang.launch_server unchanged; python -m sglang.launch_server --help lists "
        "them. Exit codes: 0 stopped on request, 1 a node died or was not ready in time, 2 nothing was started.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nodes", help="comma-separated hosts; host i runs node rank i (node 0 serves HTTP)")
    where.add_argument("--hostfile", type=Path, help="one host per line (first field), '#' starts a comment")
    remote = parser.add_argument_group("remote nodes")
    remote.add_argument(
        "--remote-prefix",
        default=None,
        help=f"command that runs one shell line on {{host}} (default: {DEFAULT_REMOTE_PREFIX!r})",
    )
    remote.add_argument("--remote-python", default=None, help="python on the nodes (default: this interpreter)")
    remote.add_argument("--remote-cwd", default=None, help="directory on the nodes (default: this directory)")
    remote.add_argument(
        "--local-node-rank",
        default=None,
        help="'auto' (default: the nodes whose host is this machine), a rank, or 'none'",
    )
    remote.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="also send this variable to every node (value: this environment's, when omitted)",
    )
    remote.add_argument(
        "--node-env", action="append", default=[], metavar="RANK:NAME=VALUE", help="set a variable on one node only"
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--print-commands", action="store_true", help="print each node's shell line and exit")
    modes.add_argument("--slurm", type=Path, metavar="FILE", help="write an sbatch script to FILE and exit")
    parser.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPT",
        help="an '#SBATCH OPT' line for --slurm, e.g. --sbatch-option=--partition=gpu",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        help="seconds for node 0 to answer /health_generate (default: no limit)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds for a graceful stop before the nodes are signalled directly (default: 30)",
    )
    return parser


def _server_parser(read_only: bool) -> argparse.ArgumentParser:
    """SGLang's spellings and defaults; ``read_only`` adds the flags that are read but stay in the argv."""
    parser = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--nnodes", type=int, default=None)
    parser.add_argument("--node-rank", type=int, default=None)
    parser.add_argument("--dist-init-addr", "--nccl-init-addr", dest="dist_init_addr", default=None)
    if read_only:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--tp-size", "--tensor-parallel-size", "--tp", dest="tp_size", type=int, default=1)
        parser.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=1)
    return parser


def parse_server_flags(argv: Sequence[str]) -> ServerFlags:
    """Read the flags the launcher needs; the per-node ones leave ``argv``, the rest stay as the user wrote them."""
    values, _ = _server_parser(read_only=True).parse_known_args(list(argv))  # a bad value: argparse exits 2
    _, kept = _server_parser(read_only=False).parse_known_args(list(argv))
    return ServerFlags(
        given=tuple(argv),
        argv=tuple(kept),
        port=values.port,
        host=values.host,
        tp_size=values.tp_size,
        pp_size=values.pp_size,
        nnodes=values.nnodes,
        node_rank=values.node_rank,
        dist_init_addr=values.dist_init_addr,
    )


def parse(argv: Sequence[str] | None = None) -> Options:
    """Parse the launcher's command line; argparse exits 2 on its own errors, LaunchError covers the rest."""
    parser = _launcher_parser()
    namespace, server_argv = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if namespace.hostfile is not None:
        try:
            nodes = parse_hostfile(namespace.hostfile.read_text())
        except OSError as err:
            raise LaunchError(f"--hostfile {namespace.hostfile}: {err.strerror}") from None
        if not nodes:
            raise LaunchError(f"--hostfile {namespace.hostfile} names no host")
    else:
        nodes = parse_nodes(namespace.nodes) if namespace.nodes is not None else []
    if not nodes:
        multi_only = {
            "--remote-prefix": namespace.remote_prefix,
            "--remote-python": namespace.remote_python,
            "--remote-cwd": namespace.remote_cwd,
            "--local-node-rank": namespace.local_node_rank,
            "--node-env": namespace.node_env or None,
        }
        given = [flag for flag, value in multi_only.items() if value is not None]
        if given:
            raise LaunchError(f"{', '.join(given)} need --nodes or --hostfile")
    if namespace.sbatch_option and namespace.slurm is None:
        raise LaunchError("--sbatch-option needs --slurm")
    return Options(
        nodes=tuple(nodes),
        server=parse_server_flags(server_argv),
        remote_prefix=namespace.remote_prefix or DEFAULT_REMOTE_PREFIX,
        remote_python=namespace.remote_python or sys.executable,
        remote_cwd=namespace.remote_cwd or os.getcwd(),
        local_node_rank=namespace.local_node_rank or "auto",
        env=tuple(namespace.env),
        node_env=tuple(namespace.node_env),
        print_commands=namespace.print_commands,
        slurm=namespace.slurm,
        sbatch_options=tuple(namespace.sbatch_option),
        ready_timeout=namespace.ready_timeout,
        stop_timeout=namespace.stop_timeout,
    )
