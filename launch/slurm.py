"""``--slurm FILE``: an sbatch script with one task per node, each running ``sglang.launch_server``.

Slurm numbers the nodes of the allocation: a task's ``$SLURM_NODEID`` is its node rank, and the first host of
``$SLURM_JOB_NODELIST`` (node 0) serves HTTP and hosts the dist-init rendezvous. The per-node values are
expanded inside each task (``bash -c '...'``), not in the batch script, which runs on node 0 only.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from madakv_sglang.launch import LaunchError
from madakv_sglang.launch.cli import Options
from madakv_sglang.launch.commands import SERVER_MODULE, module_command
from madakv_sglang.launch.hosts import check_port, split_address
from madakv_sglang.launch.node_plan import DEFAULT_DIST_PORT, check_topology, forwarded_env

JOB_NAME = "madakv-sglang"


def sbatch_script(options: Options, environ: Mapping[str, str]) -> str:
    """The script for ``options``: ``--nodes`` / ``--hostfile`` pin the hosts, else ``--nnodes`` counts them."""
    server = options.server
    nnodes = len(options.nodes) or server.nnodes or 1
    check_topology(server, nnodes)
    check_port(server.port, "--port")
    if options.node_env:
        raise LaunchError("--node-env is not supported with --slurm: every task runs the same line")
    if server.dist_init_addr is not None:
        split_address(server.dist_init_addr)
        dist = shlex.quote(server.dist_init_addr)
    else:
        dist = f'"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{DEFAULT_DIST_PORT}"'
    command = module_command(options.remote_python, SERVER_MODULE, [*server.argv, "--port", str(server.port)])
    task = (
        f'exec {shlex.join(command)} --nnodes {nnodes} --node-rank "$SLURM_NODEID" --dist-init-addr "$DIST_INIT_ADDR"'
    )
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={JOB_NAME}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --nodelist={','.join(options.nodes)}"] if options.nodes else []),
        *(f"#SBATCH {option}" for option in options.sbatch_options),
        "# Written by `python -m madakv_sglang.launch --slurm`; submit with `sbatch FILE`. One task per node runs",
        f"# sglang.launch_server; node 0 (the first host of the allocation) serves HTTP on port {server.port}.",
        "set -euo pipefail",
        f"cd {shlex.quote(options.remote_cwd)}",
        *(f"export {name}={shlex.quote(value)}" for name, value in forwarded_env(environ, options.env).items()),
        f"export DIST_INIT_ADDR={dist}",
        f"srun --nodes={nnodes} --ntasks-per-node=1 bash -c {shlex.quote(task)}",
    ]
    return "\n".join(lines) + "\n"
