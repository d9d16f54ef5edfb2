"""``python -m madakv_sglang.launch``: pick the mode (hand-off, print, sbatch script, multi-node) and run it."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from madakv_sglang.launch import LaunchError, cli
from madakv_sglang.launch.checks import plugin_problems
from madakv_sglang.launch.commands import SERVER_MODULE, module_command, shell_line, single_node_line
from madakv_sglang.launch.node_plan import build_plan, forwarded_env


def hand_off(options: cli.Options, environ: Mapping[str, str]) -> NoReturn:
    """Become ``python -m sglang.launch_server <flags>``: same pid, so signals and the exit code are SGLang's."""
    problems = plugin_problems()
    if problems:
        raise LaunchError("cannot serve with the madakv plugin:\n  - " + "\n  - ".join(problems))
    env = {**environ, **forwarded_env(environ, options.env)}
    command = module_command(sys.executable, SERVER_MODULE, options.server.given)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


def run(options: cli.Options, environ: Mapping[str, str]) -> int:
    if options.slurm is not None:
        from madakv_sglang.launch.slurm import sbatch_script

        _check_kv_flags(options)
        options.slurm.write_text(sbatch_script(options, environ))
        print(f"wrote {options.slurm}; submit it with: sbatch {options.slurm}")
        return 0
    if not options.nodes:
        if options.print_commands:
            print(single_node_line(options.server.given, forwarded_env(environ, options.env)))
            return 0
        hand_off(options, environ)
    _check_kv_flags(options)
    plan = build_plan(options, environ, check_in_use=not options.print_commands)
    if options.print_commands:
        for node in plan.nodes:
            print(f"# node {node.rank} on {node.host}{' (this machine)' if node.local else ''}")
            print(shell_line(plan, node))
        return 0
    from madakv_sglang.launch.preflight import check_nodes
    from madakv_sglang.launch.supervise import Supervisor

    print(f"[launch] {len(plan.nodes)} nodes, dist-init {plan.dist_init_addr}; preflight on every node", flush=True)
    check_nodes(plan)
    return Supervisor(plan, options.ready_timeout, options.stop_timeout).run()


def _check_kv_flags(options: cli.Options) -> None:
    """Bad ``--kv-*`` values stop here with the plugin's message (exit 2), before any node is contacted."""
    from madakv_sglang.engine.plugin import config_from_kv_argv, split_kv_argv

    config_from_kv_argv(split_kv_argv(options.server.argv)[0], prog=cli.PROG)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(cli.parse(argv), os.environ)
    except LaunchError as err:
        print(f"{cli.PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the nodes started (the supervisor handles signals itself)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
