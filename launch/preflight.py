"""Preflight: what a node would serve with, and the launcher's refusal to start nodes that disagree.

On a node: ``python -m madakv_sglang.launch.preflight [--json] [--kv-* flags]`` prints the versions of
:data:`PACKAGES`, the policy configuration the node resolves from those flags and its ``MADAKV_KV_*``
environment (the plugin's own parsing, so exactly what its server would run), and the plugin check. Nodes that
resolved different budgets, or run another SGLang, would fail in a collective or, worse, serve inconsistently.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from madakv_sglang.launch import LaunchError
from madakv_sglang.launch.checks import package_version, plugin_problems

if TYPE_CHECKING:
    from madakv_sglang.launch.node_plan import Plan

PACKAGES = ("madakv-sglang", "sglang", "torch", "transformers")
TIMEOUT = 120.0  # seconds per node: a remote prefix's connection plus importing torch
PROG = "python -m madakv_sglang.launch.preflight"


def node_report(kv_argv: Sequence[str]) -> dict[str, Any]:
    """``{"versions": {package: version}, "policy": {field: text}, "plugin": [problem, ...]}`` for this node.
    Bad ``--kv-*`` values exit 2 with the plugin's message."""
    from madakv_sglang.engine import environment
    from madakv_sglang.engine.plugin import config_from_kv_argv

    config = config_from_kv_argv(kv_argv, prog=PROG) or environment.server_config()
    return {
        "versions": {name: package_version(name) for name in PACKAGES},
        "policy": config.to_strings(),
        "plugin": plugin_problems(),
    }


def differences(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """One line per node and item that differs from node 0's report, plus each node's plugin problems."""
    from madakv_sglang.settings import flag_name

    lines = [f"{name}: {problem}" for name, report in zip(names, reports, strict=True) for problem in report["plugin"]]
    first = reports[0]
    for name, report in zip(names[1:], reports[1:], strict=True):
        items = [(f"{package} version", "versions", package) for package in PACKAGES]
        items += [(flag_name(field, "kv-"), "policy", field) for field in first["policy"]]
        for label, section, key in items:
            want, got = first[section].get(key), report[section].get(key)
            if got != want:
                lines.append(f"{name} has {label} {got}, {names[0]} has {want}")
    return lines


def _parse(output: str) -> dict[str, Any] | None:
    """The report line: the last line that is a JSON object (a remote prefix may print banners first)."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def check_nodes(plan: Plan) -> None:
    """Run the preflight on every node of ``plan`` at once (through the remote prefix for remote nodes) and
    raise LaunchError naming each node and item that fails or differs."""
    from madakv_sglang.launch.commands import PREFLIGHT_MODULE, local_env, node_command
    from madakv_sglang.launch.supervise import signal_group

    argv = ["--json", *plan.kv_argv]
    commands = [node_command(plan, node, PREFLIGHT_MODULE, argv) for node in plan.nodes]  # all spelled first
    processes = []
    for node, command in zip(plan.nodes, commands, strict=True):
        try:
            processes.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    env=local_env(node) if node.local else None,
                    start_new_session=True,
                )
            )
        except OSError as err:
            raise LaunchError(f"{node.name}: cannot run {command[0]}: {err.strerror}") from None
    reports: list[dict[str, Any]] = []
    failures = []
    for node, process in zip(plan.nodes, processes, strict=True):
        try:
            output, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            failures.append(f"{node.name}: the preflight did not finish in {TIMEOUT:.0f} s")
            continue
        report = _parse(output) if process.returncode == 0 else None
        if report is None:
            tail = "\n    ".join(output.strip().splitlines()[-15:])
            failures.append(f"{node.name}: the preflight failed (exit {process.returncode}):\n    {tail}")
        else:
            reports.append(report)
    if failures:
        raise LaunchError("preflight failed, nothing was started:\n  - " + "\n  - ".join(failures))
    problems = differences(reports, [node.name for node in plan.nodes])
    if problems:
        raise LaunchError(
            "refusing to start, the nodes differ (the preflight of each node):\n  - " + "\n  - ".join(problems)
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    namespace, kv_argv = parser.parse_known_args(argv)
    report = node_report(kv_argv)
    if namespace.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for name, found in report["versions"].items():
            print(f"{name} {found}")
        print("policy " + " ".join(f"{field}={value}" for field, value in report["policy"].items()))
        print("plugin " + ("; ".join(report["plugin"]) or "ok"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
