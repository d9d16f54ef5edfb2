"""SGLang plugin entry point (``[project.entry-points."sglang.srt.plugins"] madakv``).

SGLang calls :func:`register` in every process it starts (launcher, schedulers, detokenizer, DP controller),
before any server argument is parsed there. It stays cheap and imports nothing of ours that loads kernels.
What it wires, all through SGLang's extension points (no file of SGLang is patched):

- ``--attention-backend madakv``: a choice and a lazily imported factory (``backend.create_backend``).
- ``--kv-*`` flags: shown in ``python -m sglang.launch_server --help`` (AFTER hook on ``ServerArgs.add_cli_args``),
  parsed, validated and stripped by an AROUND hook on ``prepare_server_args``, and handed to every process as
  ``MADAKV_KV_*`` environment variables (``environment``). ``sglang serve --help`` prints before plugins load, so it
  does not list them; ``sglang serve`` itself accepts them.
- Three resolution hooks (``sglang/srt/arg_groups/pipeline.py``), which run in the launching process for
  ``launch_server``, ``sglang serve`` and ``sglang.Engine`` alike, before anything is spawned:
  ``handle_deprecated_dp_attention`` (the first step, before the model path is even looked at) refuses what
  cannot run compressed; ``handle_attention_backend_compatibility`` (the step where SGLang settles the attention
  backend) records the base backend and forces the settings a compressing policy needs, one log line each;
  ``validate_deepep_v2_dispatch_token_budget`` (the last step) checks that no later step undid them, and that a
  token budget is not above the model's context length (``ModelConfig``, which the backend step has built).
  A refusal exits 2 with the message on stderr for the command line, and raises ConfigError for ``Engine``.
- Per-request checks: AFTER hooks on ``SamplingParams.verify`` (``custom_params`` ``kv_*`` keys) and on
  ``TokenizerManager._validate_one_request`` (sessions, empty prompts, token budgets against ``context_len``),
  whose ValueErrors SGLang returns as HTTP 400. A streamed request reaches them only after SGLang has answered
  200 and opened the stream, so in the HTTP server's process the same checks also run before that:
  an AROUND hook on ``http_server.serve_generate_request`` (``/generate``) and AFTER hooks on the OpenAI chat and
  completions ``_convert_to_internal_request``, which SGLang calls before it builds the StreamingResponse.
- With a compressing policy configured, the scheduler-side hooks of ``reclaim``.

With ``--kv-policy full`` (the default) every hook passes straight through: SGLang resolves and runs stock.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from madakv_sglang.config import ConfigError, PolicyConfig
from madakv_sglang.engine import environment
from madakv_sglang.settings import add_setting_arguments, flag_name, parse_settings, setting_names

logger = logging.getLogger(__name__)

BACKEND_NAME = "madakv"
FLAG_PREFIX = "kv-"
# Dense base backends the madakv backend may delegate prefill to: those that run with page_size 1.
BASE_BACKENDS: tuple[str, ...] = ("torch_native", "intel_amx", "triton", "flashinfer", "fa3")

# The resolution steps wrapped, in pipeline order (names from sglang/srt/arg_groups/resolution_hooks.py).
FIRST_STEP = "handle_deprecated_dp_attention"
BACKEND_STEP = "handle_attention_backend_compatibility"
LAST_STEP = "validate_deepep_v2_dispatch_token_budget"
SOURCE = "madakv_sglang"  # the source of our declarations in ServerArgs' resolution record

HTTP_SERVER = "sglang.srt.entrypoints.http_server"
OPENAI_CONVERTERS = (
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request",
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._convert_to_internal_request",
)

# Bookkeeping attributes on a ServerArgs record (underscored non-fields ride along to subprocesses).
_CLI_MARK = "_madakv_from_cli"
_REQUESTED_MARK = "_madakv_backend_requested"

_registered = False
_scheduler_hooks_error: str | None = None


def register() -> None:
    """Wire the plugin into this SGLang process (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(_create_backend)

    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _around_prepare_server_args, HookType.AROUND)
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify", _after_verify, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        _after_validate_one_request,
        HookType.AFTER,
    )
    register_resolution_hook(FIRST_STEP)(_refuse_unsupported)
    register_resolution_hook(BACKEND_STEP)(_force_settings)
    register_resolution_hook(LAST_STEP)(_check_final)

    if not _spawned_by_sglang():  # the HTTP server runs in the launching process; schedulers need not import it
        HookRegistry.register(f"{HTTP_SERVER}.serve_generate_request", _around_serve_generate_request, HookType.AROUND)
        for target in OPENAI_CONVERTERS:
            HookRegistry.register(target, _after_convert_to_internal_request, HookType.AFTER)

    if environment.env_may_compress():
        _install_scheduler_hooks()


def _install_scheduler_hooks() -> None:
    """Register reclaim's hooks. A failure cannot stop SGLang here (load_plugins logs and goes on), so it is
    kept and raised by the backend factory, which fails the scheduler's start with the message."""
    global _scheduler_hooks_error
    try:
        config = environment.server_config()
    except ConfigError:
        return  # the launcher's resolution step refuses this configuration with the message
    if not environment.is_compressing(config):
        return
    if not os.environ.get(environment.BASE_BACKEND_ENV) and _spawned_by_sglang():
        logger.warning(
            "madakv: %s=%s is set, but these server arguments were not resolved with the madakv plugin loaded "
            "(e.g. a benchmark script that parses ServerArgs before loading plugins); SGLang runs stock here",
            environment.env_name("policy"),
            config.policy,
        )
    try:
        from madakv_sglang.engine.reclaim import install_hooks
    except ImportError as err:
        _scheduler_hooks_error = (
            f"madakv: --kv-policy {config.policy} needs the scheduler hooks of madakv_sglang.engine.reclaim, which "
            f"failed to import ({err}); reinstall madakv-sglang"
        )
        logger.error(_scheduler_hooks_error)
        return
    try:
        install_hooks()
    except Exception as err:  # a half-installed set of hooks must not serve: the backend factory raises this
        _scheduler_hooks_error = f"madakv: installing the scheduler hooks failed: {type(err).__name__}: {err}"
        logger.exception(_scheduler_hooks_error)


def _spawned_by_sglang() -> bool:
    """True in the processes SGLang starts (schedulers, detokenizer): their arguments were resolved upstream."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


def _create_backend(model_runner: Any) -> Any:
    """``ATTENTION_BACKENDS["madakv"]``: imported on first use so that register() stays light."""
    if _scheduler_hooks_error is not None:
        raise RuntimeError(_scheduler_hooks_error)
    from madakv_sglang.engine.backend import create_backend

    return create_backend(model_runner)


# ---- command-line flags ----


def add_kv_arguments(parser: Any) -> None:
    """The ``--kv-*`` flags on an argparse parser or group; every default is None ("not given")."""
    choices = environment.servable_policy_names()
    parser.add_argument(
        flag_name("policy", FLAG_PREFIX),
        dest=FLAG_PREFIX.replace("-", "_") + "policy",
        default=None,
        metavar="{" + ",".join(choices) + "}",
        help="KV-cache eviction policy; 'full' keeps every token and runs stock SGLang (default: full). "
        "The other --kv-* flags apply to the compressing policies.",
    )
    add_setting_arguments(parser, prefix=FLAG_PREFIX, names=tuple(n for n in setting_names() if n != "policy"))


def _after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    if any(action.dest == "kv_policy" for action in parser._actions):
        return
    add_kv_arguments(parser.add_argument_group("KV-cache eviction (madakv-sglang plugin)"))


def split_kv_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into our ``--kv-*`` flags (with their values) and the rest, both in order.

    Accepts ``--kv-budget 0.1``, ``--kv-budget=0.1`` and the underscore spelling (``--kv_budget``) that SGLang's
    ``--config`` YAML merge produces. A following token that starts with ``--`` is not taken as a value, so
    argparse reports the missing value.
    """
    flags = {flag_name(name, FLAG_PREFIX) for name in setting_names()}
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        flag = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
        if flag not in flags:
            rest.append(arg)
            i += 1
        elif eq:
            ours.append(f"{flag}={value}")
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            ours += [flag, argv[i + 1]]
            i += 2
        else:
            ours.append(flag)
            i += 1
    return ours, rest


def program_name() -> str:
    """The command the user ran, for argparse's ``PROG: error:`` line: ``python -m sglang.launch_server``,
    ``sglang serve``, ``python -m madakv_sglang.engine.offline_throughput``, ... (argparse's own default is the
    file name, ``launch_server.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # run with -m
        return "python -m " + spec.name.removesuffix(".__main__")
    argv = sys.argv or [""]
    name = os.path.basename(argv[0])
    if name == "sglang" and len(argv) > 1 and not argv[1].startswith("-"):  # the console script's subcommand
        return f"sglang {argv[1]}"
    if name in ("", "-c"):
        return "python"
    return name


def config_from_kv_argv(kv_argv: Sequence[str], prog: str | None = None) -> PolicyConfig | None:
    """Validate the ``--kv-*`` flags into a PolicyConfig (None when there are none); a bad value exits 2 with
    argparse's usage line and a message naming the flag. Flags override ``MADAKV_KV_*`` variables. ``prog``
    labels the error (default: :func:`program_name`)."""
    if not kv_argv:
        return None
    parser = argparse.ArgumentParser(prog=prog or program_name(), add_help=False, allow_abbrev=False)
    add_kv_arguments(parser)
    namespace = parser.parse_args(list(kv_argv))
    policy = namespace.kv_policy
    servable = environment.servable_policy_names()
    if policy is not None and policy not in servable:
        if policy in environment.HF_ONLY_POLICIES:
            parser.error(
                f"argument --kv-policy: {policy!r} needs the attention of every prompt query, which a serving "
                f"prefill does not compute; it runs in the HF path only (madakv_sglang.hf). Choose one of "
                f"{', '.join(servable)}"
            )
        parser.error(f"argument --kv-policy: invalid choice: {policy!r} (choose from {', '.join(servable)})")
    try:
        base = environment.server_config()
    except ConfigError as err:
        parser.error(str(err))
    values = {name: getattr(namespace, "kv_" + name) for name in setting_names()}
    try:
        config = parse_settings(values, base=base)
        environment.check_servable(config)
    except ConfigError as err:
        parser.error(_flag_message(str(err)))
    if not environment.is_compressing(config) and policy is None:
        given = sorted({arg.split("=")[0] for arg in kv_argv if arg.startswith("--")})
        parser.error(
            f"{', '.join(given)} set the compressing policies' knobs, but no --kv-policy is given and the default "
            f"'full' keeps every token; add --kv-policy {{{','.join(p for p in servable if p != 'full')}}}"
        )
    return config


def _flag_message(message: str) -> str:
    """``budget: ...`` -> ``argument --kv-budget: ...``."""
    head, sep, rest = message.partition(":")
    if sep and head in setting_names():
        return f"argument {flag_name(head, FLAG_PREFIX)}:{rest}"
    return message


def _around_prepare_server_args(original: Callable[..., Any], argv: Sequence[str], *args: Any, **kwargs: Any) -> Any:
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        return original(argv, *args, **kwargs)  # the help lists our flags through the add_cli_args hook
    if "--config" in argv:
        argv = _merge_config_file(argv)
    kv_argv, rest = split_kv_argv(argv)
    config = config_from_kv_argv(kv_argv)
    server_args = original(rest, *args, **kwargs)
    if config is not None:
        environment.config_to_env(config)
    setattr(server_args, _CLI_MARK, True)
    return server_args


def _merge_config_file(argv: list[str]) -> list[str]:
    """Expand ``--config file.yaml`` as SGLang does, so ``kv-policy:`` keys in the file are ours to take."""
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    parser = argparse.ArgumentParser(prog=program_name())
    ServerArgs.add_cli_args(parser)
    merged: list[str] = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    return merged


# ---- resolution hooks ----


def _refuse(server_args: Any, problems: Sequence[str]) -> NoReturn:
    """Stop start-up: exit 2 with the message on stderr from the command line, ConfigError from Engine."""
    if len(problems) == 1:
        message = f"madakv: {problems[0]}"
    else:
        message = "madakv: this configuration cannot run:\n  - " + "\n  - ".join(problems)
    if getattr(server_args, _CLI_MARK, False):
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    raise ConfigError(message)


def _configured(server_args: Any) -> PolicyConfig:
    try:
        return environment.server_config()
    except ConfigError as err:
        _refuse(server_args, [str(err)])


def _uses_our_backend(cfg: Any) -> bool:
    return BACKEND_NAME in (cfg.attention_backend, cfg.prefill_attention_backend, cfg.decode_attention_backend)


def unsupported_settings(cfg: Any, config: PolicyConfig) -> list[str]:
    """Why ``cfg`` (a resolving view of ServerArgs) cannot run ``config``; empty when it can (docs/design.md §7)."""
    policy = f"--kv-policy {config.policy}"
    problems = []

    def refuse(condition: bool, what: str, why: str) -> None:
        if condition:
            problems.append(f"{what} is not supported with {policy}: {why}")

    refuse(
        bool(cfg.enable_mixed_chunk),
        "--enable-mixed-chunk",
        "prompts are compressed after their last prefill chunk, which a mixed prefill/decode batch interleaves "
        "with decoding",
    )
    refuse(
        cfg.attn_dp_size > 1,
        f"DP attention (--attn-dp-size {cfg.attn_dp_size} / --enable-dp-attention)",
        "the packed KV layout assumes every attention rank holds every request",
    )
    refuse(
        cfg.pp_size > 1,
        f"pipeline parallelism (--pp-size {cfg.pp_size})",
        "the per-layer budgets need every layer's demand on one rank",
    )
    refuse(
        cfg.attn_cp_size > 1 or cfg.dcp_size > 1,
        "context parallelism (--attn-cp-size / --dcp-size)",
        "the window scores need the whole prompt's keys on each rank",
    )
    refuse(
        cfg.kv_cache_dtype not in ("auto", "bf16", "bfloat16"),
        f"--kv-cache-dtype {cfg.kv_cache_dtype}",
        "the packed cells and the head-wise decode handle unquantized KV only; use auto or bf16",
    )
    refuse(
        cfg.speculative_algorithm is not None,
        f"speculative decoding ({cfg.speculative_algorithm})",
        "draft and verify passes would read evicted positions",
    )
    refuse(
        cfg.disaggregation_mode != "null",
        f"PD disaggregation (--disaggregation-mode {cfg.disaggregation_mode})",
        "the KV transfer sends whole prompts, not packed cells",
    )
    refuse(
        bool(cfg.enable_hierarchical_cache),
        "HiCache (--enable-hierarchical-cache)",
        "it offloads and restores the radix tree's KV, which compression takes out of the tree",
    )
    external = [
        flag
        for flag, on in (
            (f"--radix-cache-backend {cfg.radix_cache_backend}", cfg.radix_cache_backend is not None),
            ("--enable-lmcache", bool(cfg.enable_lmcache)),
            ("--enable-flexkv", bool(cfg.enable_flexkv)),
        )
        if on
    ]
    refuse(
        bool(external),
        " and ".join(external),
        "it replaces or extends SGLang's radix tree, on which madakv's prefix cache (--kv-radix) is built",
    )
    refuse(
        bool(cfg.enable_streaming_session),
        "--enable-streaming-session",
        "a session extends a previous request's KV, which compression has packed",
    )
    refuse(
        cfg.tokenizer_worker_num > 1,
        f"--tokenizer-worker-num {cfg.tokenizer_worker_num}",
        "SGLang's extra tokenizer workers do not load plugins, so per-request overrides would reach the "
        "scheduler unchecked",
    )
    page_size = cfg.page_size
    refuse(
        page_size is not None and page_size > 1,
        f"--page-size {page_size}",
        "packed cells need one token per page; leave --page-size unset (madakv uses 1)",
    )
    split = [
        f"--{name.replace('_', '-')} {getattr(cfg, name)}"
        for name in ("prefill_attention_backend", "decode_attention_backend")
        if getattr(cfg, name) is not None
    ]
    refuse(
        bool(split),
        " and ".join(split),
        "madakv runs one backend for prefill and decode; choose its dense base with --attention-backend",
    )
    return problems


def _refuse_unsupported(server_args: Any, previous: Callable[[Any], None]) -> None:
    """First pipeline step: refuse before the model path is looked at (nothing is loaded or spawned yet)."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    previous(server_args)  # turns the deprecated --enable-dp-attention into attn_dp_size first
    config = _configured(server_args)
    cfg = resolving_view(server_args)
    if not environment.is_compressing(config):
        os.environ.pop(environment.BASE_BACKEND_ENV, None)
        if _uses_our_backend(cfg):
            choices = ",".join(p for p in environment.servable_policy_names() if p != "full")
            _refuse(
                server_args,
                [
                    f"--attention-backend {BACKEND_NAME} needs a compressing policy: add "
                    f"--kv-policy {{{choices}}} (the default 'full' runs SGLang's own backends)"
                ],
            )
        return
    problems = unsupported_settings(cfg, config)
    if problems:
        _refuse(server_args, problems)
    if cfg.attention_backend == BACKEND_NAME:
        # Let SGLang pick the platform's backend as if none were given; it becomes our dense base.
        setattr(server_args, _REQUESTED_MARK, True)
        declare_resolution(server_args, SOURCE, attention_backend=None)


def _force_settings(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Where SGLang settles the attention backend: take it as the base, then force what madakv needs."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolved_view, use_mla_backend
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    previous(server_args)
    config = _configured(server_args)
    if not environment.is_compressing(config):
        return
    view = resolved_view(server_args)
    if use_mla_backend(view):
        _refuse(
            server_args,
            [
                f"--kv-policy {config.policy} does not support MLA models (one latent KV head "
                "per layer leaves nothing to select per head)"
            ],
        )
    base = view.attention_backend
    requested = getattr(server_args, _REQUESTED_MARK, False)
    if base not in BASE_BACKENDS:
        user_chose = not requested and (getattr(server_args, "_raw_input", None) or {}).get("attention_backend") == base
        if user_chose:
            _refuse(
                server_args,
                [
                    f"--attention-backend {base} cannot be the dense base of {BACKEND_NAME} (it "
                    f"needs page_size > 1 or is not supported); use one of {', '.join(BASE_BACKENDS)}"
                ],
            )
        from sglang.srt.runtime_context import get_platform

        fallback = "flashinfer" if get_platform().has_flashinfer else "triton"
        logger.info("madakv: dense prefill through %s (the platform default %s needs page_size > 1)", fallback, base)
        base = fallback
    elif requested:
        logger.info("madakv: dense prefill through %s (the platform default)", base)
    os.environ[environment.BASE_BACKEND_ENV] = base

    def force(field: str, value: Any, was: Any, why: str) -> None:
        if was == value:
            return
        declare_resolution(server_args, SOURCE, **{field: value})
        if was is not None and not (field == "attention_backend" and requested):  # None: SGLang's default is ours
            logger.info("madakv: forcing %s=%s (was %s): %s", field, value, was, why)

    force(
        "attention_backend",
        BACKEND_NAME,
        base,
        f"--kv-policy {config.policy} compresses the KV cache in the "
        f"{BACKEND_NAME} backend, which runs {base} for dense prefill",
    )
    force("page_size", 1, view.page_size, "packed cells need one token per page")
    radix, why_off = _prefix_cache_resolution(view, config)
    setattr(server_args, _RADIX_MARK, radix)
    if radix:
        logger.info(
            "madakv: prefix cache on: prompts share their dense prefix through SGLang's radix tree, and each "
            "compresses its own copy into fresh slots"
        )
    else:
        force("disable_radix_cache", True, view.disable_radix_cache, why_off)
    force(
        "disable_overlap_schedule",
        True,
        view.disable_overlap_schedule,
        "evicted slots are freed when a prefill batch's result is processed, which the overlap scheduler "
        "runs one batch late",
    )
    graphs = view.cuda_graph_config
    if graphs is not None:
        was = {phase: getattr(graphs, phase).backend for phase in Phase.ALL}
        if any(backend != Backend.DISABLED for backend in was.values()):
            for phase in Phase.ALL:
                graphs = with_phase(graphs, phase, backend=Backend.DISABLED)
            declare_resolution(server_args, SOURCE, cuda_graph_config=graphs)
            logger.info(
                "madakv: forcing CUDA graphs off (was %s): the head-wise decode builds per-request index tables "
                "on the host every step",
                ", ".join(f"{phase}={backend}" for phase, backend in was.items()),
            )


_RADIX_MARK = "_madakv_radix"  # what _force_settings resolved for the prefix cache


def _prefix_cache_resolution(view: Any, config: PolicyConfig) -> tuple[bool, str]:
    """Whether the radix tree runs with ``config`` (``--kv-radix``), and why not when it does not. ``on`` with a
    setting that rules it out is refused later (:func:`_radix_problems`); ``auto`` gives way to it."""
    if config.radix == "off":
        return False, "--kv-radix off"
    blocker = _radix_blocker(view, config)
    if blocker is not None:
        return False, blocker
    return True, ""


def _radix_blocker(view: Any, config: PolicyConfig) -> str | None:
    if config.prefill_evict == "chunk":
        return "--kv-prefill-evict chunk frees prompt slots between chunks, which the tree would share"
    if view.disable_radix_cache:
        return "SGLang's settings turn the radix cache off (--disable-radix-cache, or a setting that needs it off)"
    return None


def _radix_problems(cfg: Any, config: PolicyConfig, resolved: bool | None) -> list[str]:
    """``--kv-radix on`` that cannot run, and a later SGLang step that undid the resolution."""
    problems = []
    if config.radix == "on":
        blocker = _radix_blocker(cfg, config)
        if blocker is not None:
            problems.append(f"--kv-radix on cannot run: {blocker}; use --kv-radix auto or off")
    if resolved is False and not cfg.disable_radix_cache:
        problems.append("disable_radix_cache ended up False after madakv set it to True")
    return problems


def _final_problems(cfg: Any) -> list[str]:
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase

    expected = {
        "attention_backend": BACKEND_NAME,
        "page_size": 1,
        "disable_overlap_schedule": True,
    }
    problems = [
        f"{field} ended up {getattr(cfg, field)!r} after madakv set it to {value!r}"
        for field, value in expected.items()
        if getattr(cfg, field) != value
    ]
    graphs = cfg.cuda_graph_config
    if graphs is not None:
        problems += [
            f"CUDA graphs for {phase} ended up {getattr(graphs, phase).backend!r}"
            for phase in Phase.ALL
            if getattr(graphs, phase).backend != Backend.DISABLED
        ]
    return problems


def _check_final(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Last pipeline step: a later SGLang step must not have undone or contradicted what madakv needs."""
    from sglang.srt.arg_groups.overrides import resolving_view

    previous(server_args)
    config = _configured(server_args)
    if not environment.is_compressing(config):
        return
    cfg = resolving_view(server_args)
    problems = unsupported_settings(cfg, config) + _final_problems(cfg) + _budget_problems(server_args, config)
    problems += _radix_problems(cfg, config, getattr(server_args, _RADIX_MARK, None))
    problems += _prefill_evict_problems(cfg, config)
    if problems:
        _refuse(server_args, problems)


def _prefill_evict_problems(cfg: Any, config: PolicyConfig) -> list[str]:
    """``--kv-prefill-evict chunk`` cuts between prefill chunks, so it needs SGLang to chunk prompts."""
    size = cfg.chunked_prefill_size
    if config.prefill_evict != "chunk" or (size is not None and size > 0):
        return []
    return [
        f"--kv-prefill-evict chunk cuts a prompt between its prefill chunks, but chunked prefill is off "
        f"(--chunked-prefill-size {size}); set --chunked-prefill-size (e.g. 512) or use --kv-prefill-evict off"
    ]


def _budget_problems(server_args: Any, config: PolicyConfig) -> list[str]:
    """A token budget above the context length (``--context-length`` or the model's); ratios always fit."""
    if config.budget.tokens is None:
        return []
    from sglang.srt.arg_groups.overrides import model_config_of

    from madakv_sglang.engine.requests import check_token_budget

    try:  # memoized: the backend step built it for use_mla_backend
        check_token_budget(config, model_config_of(server_args).context_len, flag_name("budget", FLAG_PREFIX))
    except ConfigError as err:
        return [str(err)]
    return []


# ---- per-request checks (tokenizer process; SGLang answers their ValueErrors with HTTP 400) ----


def _after_verify(result: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> None:
    from madakv_sglang.engine.requests import override_keys, request_config

    custom_params = getattr(sampling_params, "custom_params", None)
    if override_keys(custom_params):
        request_config(custom_params, environment.server_config())


def _after_validate_one_request(
    result: Any, tokenizer_manager: Any, obj: Any, input_ids: Any = None, *args: Any, **kwargs: Any
) -> None:
    """Sessions, empty prompts (after tokenizing: chats and image requests included) and token budgets."""
    from madakv_sglang.engine.requests import check_prompt_tokens, check_request

    if not environment.env_may_compress():
        return
    config = environment.server_config()
    if not environment.is_compressing(config):
        return
    if getattr(obj, "session_id", None) is not None or getattr(obj, "session_params", None) is not None:
        raise ValueError(
            f"madakv: sessions are not supported with --kv-policy {config.policy}: a session extends the previous "
            "request's KV, which compression has packed; send the whole conversation as one request"
        )
    if getattr(obj, "input_embeds", None) is None:
        check_prompt_tokens(input_ids)
    sampling_params = getattr(obj, "sampling_params", None)
    if isinstance(sampling_params, Mapping):  # one request here: a batch is validated item by item
        check_request(sampling_params.get("custom_params"), config, getattr(tokenizer_manager, "context_len", None))


# ---- the same checks before a stream opens (HTTP server process) ----


def _check_generate_input(obj: Any, context_len: int | None) -> None:
    from madakv_sglang.engine.requests import check_generate_input

    check_generate_input(obj, environment.server_config(), context_len)


async def _around_serve_generate_request(
    original: Callable[..., Any], obj: Any, request: Any, *args: Any, **kwargs: Any
) -> Any:
    """``/generate``: answer a request the tokenizer hooks would refuse with the 400 SGLang gives a non-streamed
    one (``_create_error_response``), before ``original`` may open a stream."""
    from sglang.srt.entrypoints import http_server

    try:
        _check_generate_input(obj, http_server.get_global_state().tokenizer_manager.context_len)
    except ValueError as err:
        return http_server._create_error_response(err)
    return await original(obj, request, *args, **kwargs)


def _after_convert_to_internal_request(result: Any, serving: Any, *args: Any, **kwargs: Any) -> None:
    """OpenAI chat and completions: SGLang's ``handle_request`` answers a ValueError raised here with HTTP 400,
    before it picks the streaming or the non-streaming handler."""
    adapted = result[0] if isinstance(result, tuple) else result
    _check_generate_input(adapted, getattr(serving.tokenizer_manager, "context_len", None))
