"""Single- and multi-node launcher for SGLang with the MadaKV plugin (installed as ``madakv_sglang.launch``).

``python -m madakv_sglang.launch [launcher flags] <sglang.launch_server flags, --kv-* included>``

- **One node** (no ``--nodes`` / ``--hostfile``): checks that SGLang is the pinned version and that the
  ``sglang.srt.plugins`` entry point ``madakv`` loads, then execs ``python -m sglang.launch_server <flags>``
  (same process: signals and the exit code are SGLang's own).
- **Several nodes** (``--nodes h0,h1`` or ``--hostfile FILE``, one host per line, ``#`` comments; host i is node
  rank i): validates ports, addresses and ``--tp``, runs a preflight on every node
  (``python -m madakv_sglang.launch.preflight``: package versions, the policy configuration the node resolves,
  the plugin check) and refuses to start, naming the node and the item, if the nodes differ. Then it starts one
  ``sglang.launch_server`` per node with ``--nnodes N --node-rank i --dist-init-addr ADDR:PORT``, streams each
  node's log as ``[node<i>] ...``, prints ``[launch] ready: URL`` once node 0 answers ``/health_generate``, and
  supervises until a signal or a node's death.
- ``--print-commands`` prints the per-node shell lines and exits; ``--slurm FILE`` writes an sbatch script.

Which node runs here (``--local-node-rank``): ``auto`` (default) runs as local child processes the nodes whose
host names this machine (``localhost``, a loopback address, its hostname, FQDN or one of its addresses); ``N``
runs only node N here and every other node through the remote prefix, even one on this machine; ``none``
starts every node through the remote prefix (a launcher on a login node).

Remote nodes: ``--remote-prefix`` (default ``ssh -tt -o BatchMode=yes {host}``; ``{host}`` is replaced, or the
host is appended when the template has none) followed by one shell line,
``cd CWD && exec env VAR=... PYTHON -m sglang.launch_server ...``, with ``PYTHON`` = ``--remote-python`` (default:
this interpreter's path) and ``CWD`` = ``--remote-cwd`` (default: this directory): the usual shared-filesystem
cluster. Environment sent to every node: every ``SGLANG_*`` and ``MADAKV_*`` variable of the launcher,
``--env NAME[=VALUE]`` and ``PYTHONUNBUFFERED=1``; ``--node-env RANK:NAME=VALUE`` adds to one node (e.g. a
different ``SGLANG_CPU_OMP_THREADS_BIND`` per node on one CPU machine). The line is visible in ``ps`` on the
node, so pass no secrets with ``--env``.

Ports: ``--port`` is node 0's HTTP port; the other nodes run SGLang's health stub on it, or on ``--port + k`` for
the k-th further node on the same host. Without ``--dist-init-addr`` the rendezvous is node 0's host, on a free
port (``MADAKV_PORT_RANGE`` respected) when node 0 is this machine, else on :data:`plan.DEFAULT_DIST_PORT`.

Stopping: SIGINT / SIGTERM (or a node's death) first sends SIGTERM to node 0's server process only: SGLang's
graceful path, where node 0 drains and tells the other nodes' schedulers to stop (they ignore SIGTERM
themselves, and a SIGTERM to node 0's whole process group kills its scheduler before that message, so the others
crash on a closed connection). Nodes still running after ``--stop-timeout`` get SIGTERM, then SIGKILL, on their
process group: the local server tree, or the remote prefix (ssh), which closes the session. ssh stops the remote
processes then only with a terminal (``-tt``, in the default prefix), whose hangup reaches them. A second
signal skips the wait.

Exit codes: 0 after a requested stop (SIGINT or SIGTERM to the launcher), with every node stopped; 1 when a node
exits on its own (its last log lines are printed) or node 0 is not ready within ``--ready-timeout``; 2 when
nothing was started (bad flags, validation, preflight refusal, plugin missing); 130 for Ctrl-C before the nodes
start (during the preflight).
"""

from __future__ import annotations


class LaunchError(Exception):
    """A launch refused before anything starts; the message names the flag, the node or the item."""
