"""How a node's command is spelled: a local argv, the remote prefix plus one shell line, or a printable line.

A remote node gets ``cd CWD && exec env VAR=... PYTHON -m MODULE ARGS`` as one argument after the prefix: ssh
hands it to the remote shell, and ``exec`` makes the server the process the session's hangup reaches.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from madakv_sglang.launch import LaunchError
from madakv_sglang.launch.node_plan import Node, Plan

SERVER_MODULE = "sglang.launch_server"
PREFLIGHT_MODULE = "madakv_sglang.launch.preflight"


def module_command(python: str, module: str, argv: Sequence[str]) -> list[str]:
    return [python, "-m", module, *argv]


def _with_env(command: Sequence[str], env: Mapping[str, str]) -> list[str]:
    return ["env", *(f"{name}={value}" for name, value in env.items()), *command] if env else list(command)


def remote_line(command: Sequence[str], env: Mapping[str, str], cwd: str) -> str:
    return f"cd {shlex.quote(cwd)} && exec {shlex.join(_with_env(command, env))}"


def prefix_argv(template: str, host: str) -> list[str]:
    """``--remote-prefix`` for one host: ``{host}`` replaced, or the host appended when the template has none."""
    try:
        words = shlex.split(template)
    except ValueError as err:
        raise LaunchError(f"--remote-prefix {template!r}: {err}") from None
    if not words:
        raise LaunchError("--remote-prefix is empty")
    if not any("{host}" in word for word in words):
        words.append("{host}")
    return [word.replace("{host}", host) for word in words]


def node_command(plan: Plan, node: Node, module: str = SERVER_MODULE, argv: Sequence[str] | None = None) -> list[str]:
    """What the launcher runs for ``node``: this python here, or the remote prefix and one shell line.
    A local node's environment is this one plus ``node.env`` (:func:`local_env`)."""
    argv = node.argv if argv is None else argv
    if node.local:
        return module_command(sys.executable, module, argv)
    line = remote_line(module_command(plan.remote_python, module, argv), node.env, plan.remote_cwd)
    return [*prefix_argv(plan.remote_prefix, node.host), line]


def local_env(node: Node) -> dict[str, str]:
    return {**os.environ, **node.env}


def shell_line(plan: Plan, node: Node) -> str:
    """A line to paste into a shell here that starts ``node`` as the launcher would."""
    if not node.local:
        return shlex.join(node_command(plan, node))
    command = _with_env(module_command(sys.executable, SERVER_MODULE, node.argv), node.env)
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}"


def single_node_line(argv: Sequence[str], env: Mapping[str, str]) -> str:
    return shlex.join(_with_env(module_command(sys.executable, SERVER_MODULE, argv), env))
