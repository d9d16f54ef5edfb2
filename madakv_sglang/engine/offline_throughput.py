"""SGLang's offline throughput benchmark with the ``--kv-*`` flags:

    python -m madakv_sglang.engine.offline_throughput --model-path MODEL --kv-policy madakv --kv-budget 0.1 \\
        --dataset-name random --num-prompts 200 [any flag of python -m sglang.benchmark.offline_throughput]

SGLang's script (``sglang.benchmark.offline_throughput``) builds its parser before any plugin is loaded and
turns it into ``ServerArgs`` without ``prepare_server_args``, the step where ``sglang serve`` hands our flags
over. Run directly, it rejects ``--kv-policy``. This wrapper loads the plugins first, so ``--help`` lists the
flags. It then takes and validates the ``--kv-*`` flags as ``sglang serve`` does (a bad value exits 2 with a
message), and hands them to the engine's processes in the ``MADAKV_KV_*`` variables. SGLang's script then runs
unchanged on the rest of the command line. A configuration the plugin refuses at resolution (for example
``--enable-mixed-chunk``) also exits 2 with its message.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "python -m madakv_sglang.engine.offline_throughput"


def main(argv: Sequence[str] | None = None) -> int:
    from sglang.srt.plugins import load_plugins

    from madakv_sglang.config import ConfigError
    from madakv_sglang.engine import environment
    from madakv_sglang.engine.plugin import config_from_kv_argv, split_kv_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    load_plugins()  # registers the add_cli_args hook, so SGLang's --help lists the --kv-* flags
    if "-h" not in argv and "--help" not in argv:
        kv_argv, argv = split_kv_argv(argv)
        config = config_from_kv_argv(kv_argv, prog=PROG)
        if config is not None:
            environment.config_to_env(config)
    from sglang.benchmark import offline_throughput

    sys.argv = [PROG, *argv]
    try:
        offline_throughput.cli_main()
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
