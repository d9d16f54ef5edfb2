"""Policy configuration: one frozen, self-validating dataclass shared by the CLI, the engine and the HF path.

Every knob the paper leaves open (window, theta, pooling, floors, head split, GQA reduction) is a field here, with
the defaults we chose (docs/design.md §8). A knob of one policy family (the seed of ``random``, PyramidKV's beta,
AdaKV's safeguard) is a :class:`PolicyOption` declared beside its policy; the config carries its value without
knowing it. This module is a leaf: it imports nothing of the package and no torch, so building a config is cheap
everywhere. Policy names and options are checked at the edges (``madakv_sglang.settings``), where the registry is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

HccMode = Literal["global", "paper", "off"]
HeadSplit = Literal["uniform", "demand"]
Pooling = Literal["none", "max", "avg"]
GqaReduce = Literal["mean", "max"]
Layout = Literal["shared", "per-layer"]
PrefillEvict = Literal["off", "chunk"]
Radix = Literal["auto", "on", "off"]
PrefillSplit = Literal["modality", "none"]

HCC_MODES: tuple[str, ...] = ("global", "paper", "off")
HEAD_SPLITS: tuple[str, ...] = ("uniform", "demand")
POOLINGS: tuple[str, ...] = ("none", "max", "avg")
GQA_REDUCES: tuple[str, ...] = ("mean", "max")
LAYOUTS: tuple[str, ...] = ("shared", "per-layer")
PREFILL_EVICTS: tuple[str, ...] = ("off", "chunk")
RADIX_MODES: tuple[str, ...] = ("auto", "on", "off")
PREFILL_SPLITS: tuple[str, ...] = ("modality", "none")


class ConfigError(ValueError):
    """A policy setting is invalid; the message names the setting and the accepted values."""


@dataclass(frozen=True)
class PolicyOption:
    """A setting of one policy family, declared next to the policy and registered with it.

    Attributes:
        name: the setting's name (``--kv-<name>`` on a server, ``kv_<name>`` in ``custom_params``).
        default: the value a config without this option means.
        parse: text (or a Python value) -> value; raises ValueError or ConfigError on bad input.
        problem: the value -> why it is invalid, or ``None`` when it is valid.
        help: one line for ``--help``.
    """

    name: str
    default: Any
    parse: Callable[[Any], Any]
    problem: Callable[[Any], str | None]
    help: str

    def of(self, config: PolicyConfig) -> Any:
        """This option's value in ``config`` (the default when the config does not set it)."""
        return dict(config.options).get(self.name, self.default)

    def validated(self, raw: Any) -> Any:
        try:
            value = self.parse(raw)
        except (TypeError, ValueError) as err:
            message = str(err) if isinstance(err, ConfigError) else f"cannot parse {raw!r}"
            raise ConfigError(message if message.startswith(f"{self.name}:") else f"{self.name}: {message}") from None
        problem = self.problem(value)
        if problem is not None:
            raise ConfigError(f"{self.name}: {problem}, got {value!r}")
        return value


@dataclass(frozen=True)
class Budget:
    """Per-head, per-layer token budget B: a ratio of the prompt (0 < r <= 1) or an absolute token count.

    Ratios are held as exact fractions so ``ceil(r * n)`` never suffers float rounding (0.1 * 30 is 3, not 4).
    """

    ratio: Fraction | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ConfigError("budget: give exactly one of a ratio or a token count")
        if self.ratio is not None and not (0 < self.ratio <= 1):
            raise ConfigError(f"budget: a ratio must be in (0, 1], got {float(self.ratio)}")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(f"budget: a token count must be >= 1, got {self.tokens}")

    @classmethod
    def parse(cls, value: str | float | int | Budget) -> Budget:
        """``"0.1"``/``0.1`` -> ratio; ``"512"``/``512`` -> tokens. A value with a decimal point is a ratio."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"budget: expected a number, got {value!r}")
        if isinstance(value, int):
            return cls(tokens=value)
        text = str(value).strip()
        try:
            if isinstance(value, float) or any(c in text for c in ".eE"):
                ratio = Fraction(text)
                if ratio > 1 and ratio.denominator == 1:
                    return cls(tokens=int(ratio))
                return cls(ratio=ratio)
            return cls(tokens=int(text))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"budget: expected a ratio like 0.1 or a token count like 512, got {value!r}") from None

    def tokens_for(self, prompt_len: int) -> int:
        """Nominal B for a prompt of ``prompt_len`` tokens (before the floor and the prompt-length clamp)."""
        if self.tokens is not None:
            return self.tokens
        assert self.ratio is not None
        return math.ceil(self.ratio * prompt_len)

    def __str__(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        assert self.ratio is not None
        return format(float(self.ratio), "g") if self.ratio.denominator != 1 else "1.0"


def parse_bool(value: Any) -> bool:
    """``on/off``, ``true/false``, ``1/0``, ``yes/no`` (any case) or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"expected on/off, got {value!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """Everything a policy needs besides the scores (docs/design.md §2-§4).

    Attributes:
        policy: registry name (``madakv``, ``snapkv``, ... see ``madakv_sglang.policies.policy_names()``); checked
            against the registry at the edges (``madakv_sglang.settings``), not here.
        budget: B per head per layer on average, a ratio of the prompt or absolute tokens.
        window: W, the last prompt tokens whose queries score the prompt (the paper's proxy tokens); always kept.
        theta: coverage ratio for the HCC demand (smallest token set holding theta of a modality's mass).
        pooling / pool_kernel: 1-D pooling of scores for ranking only, never across a modality boundary.
        gqa: how the G query heads of a KV group are reduced to one score (mean or max).
        hcc: layer allotment, ``global`` water-filling, the ``paper`` recurrence, or ``off`` (uniform).
        cap: per-layer cap as a multiple of H*B, or ``None`` (no cap but the prompt). Under the ``per-layer``
            layout it bounds the slots a request holds; under ``shared`` it only bounds how unevenly HCC allots.
        head_split: ``uniform`` (paper) or ``demand`` (proportional to per-head demand).
        mpa: modality preference adaptation on/off (ablation).
        min_keep: per-head floor, and a budget below it is raised to it; unset (the default), every head keeps
            at least its sinks and kept window and the budget is never raised.
        sink: S, the first prompt tokens every score-based policy keeps in every head (attention sinks), inside
            the budget; also the sinks of ``streamingllm``. 0 turns them off. Shared by seven policies through
            the common budget state, so it is a field, not a :class:`PolicyOption`.
        window_share: the largest share of what the sinks leave of the budget that the kept window takes (below
            S + W / window_share tokens the kept window shrinks, so the rest is chosen by score).
        min_prompt: prompts shorter than this are not compressed (served as stock SGLang would).
        min_reclaim: a prompt is not compressed when its budget would reclaim less than this share of it.
        layout: where the kept cells live in SGLang's pool. ``shared``: the cells of all layers are one allocation
            and a request holds ceil(sum of kept cells / (L * H_r)) slots; ``per-layer``: each layer packs into
            its own buffer and a request holds its fullest layer's ceil(C_l / H_r) slots in every layer. A
            property of the pool (the server's, never a request's).
        prefill_evict: ``off`` (a prompt holds all its slots until its last prefill chunk has run) or ``chunk``
            (after every chunk but the last, the prompt so far is cut to ``prefill_keep`` times its final budget;
            ``madakv_sglang.chunk_eviction``).
        prefill_keep: what a cut leaves, as a multiple of the final budget B (>= 1: the final decision chooses
            among at least B positions). 4 by default: a cut is made before the question is known, and at 1 it
            drops what the question later asks for (benchmarks/RESULTS.md, "Eviction during chunked prefill").
        prefill_split: how a cut splits what it keeps: ``modality`` in proportion to each modality's attention
            mass (as MPA splits a head's budget), ``none`` in one ranking.
        radix: SGLang's prefix cache for compressing policies (``madakv_sglang.engine.radix``): ``on`` (a prompt
            matches and inserts its dense prefix; its kept cells are copied to fresh slots), ``off`` (the tree is
            off for the whole server), ``auto`` (on unless ``prefill_evict=chunk`` or SGLang's
            ``--disable-radix-cache``). A property of the server, never a request's.
        options: the values of policy options (:class:`PolicyOption`) that differ from their defaults, as sorted
            ``(name, value)`` pairs; read them with ``OPTION.of(config)``.
    """

    policy: str = "madakv"
    budget: Budget = field(default_factory=lambda: Budget(ratio=Fraction(1, 5)))
    window: int = 32
    theta: float = 0.9
    pooling: Pooling = "max"
    pool_kernel: int = 7
    gqa: GqaReduce = "mean"
    hcc: HccMode = "global"
    cap: float | None = 1.25
    head_split: HeadSplit = "uniform"
    mpa: bool = True
    min_keep: int | None = None
    sink: int = 4
    window_share: float = 0.5
    min_prompt: int = 256
    min_reclaim: float = 0.1
    layout: Layout = "shared"
    prefill_evict: PrefillEvict = "off"
    prefill_keep: float = 4.0
    prefill_split: PrefillSplit = "modality"
    radix: Radix = "auto"
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.parse(self.budget))
        if not isinstance(self.policy, str) or not self.policy:
            raise ConfigError(f"policy: expected a policy name, got {self.policy!r}")
        _check_int("window", self.window, lo=1)
        if not (0.0 < self.theta <= 1.0):
            raise ConfigError(f"theta: must be in (0, 1], got {self.theta}")
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_int("pool_kernel", self.pool_kernel, lo=1)
        if self.pool_kernel % 2 == 0:
            raise ConfigError(f"pool_kernel: must be odd so pooling is centred, got {self.pool_kernel}")
        _check_choice("gqa", self.gqa, GQA_REDUCES)
        _check_choice("hcc", self.hcc, HCC_MODES)
        if self.cap is not None and not (1.0 <= self.cap <= 64.0):
            raise ConfigError(f"cap: must be in [1, 64] (a multiple of H*B) or none, got {self.cap}")
        _check_choice("head_split", self.head_split, HEAD_SPLITS)
        if self.min_keep is not None:
            _check_int("min_keep", self.min_keep, lo=1)
        _check_int("sink", self.sink, lo=0)
        if not (0.0 < self.window_share <= 1.0):
            raise ConfigError(f"window_share: must be in (0, 1], got {self.window_share}")
        _check_int("min_prompt", self.min_prompt, lo=0)
        if not (0.0 <= self.min_reclaim < 1.0):
            raise ConfigError(f"min_reclaim: must be in [0, 1), got {self.min_reclaim}")
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("prefill_evict", self.prefill_evict, PREFILL_EVICTS)
        if not (1.0 <= self.prefill_keep <= 64.0):
            raise ConfigError(f"prefill_keep: must be in [1, 64] (a multiple of the budget), got {self.prefill_keep}")
        _check_choice("prefill_split", self.prefill_split, PREFILL_SPLITS)
        _check_choice("radix", self.radix, RADIX_MODES)
        names = [name for name, _ in self.options]
        if names != sorted(set(names)):
            raise ConfigError(f"options: expected sorted, unique (name, value) pairs, got {self.options!r}")

    @property
    def cap_fraction(self) -> Fraction | None:
        """The cap as an exact fraction, so caps are computed in integers (``floor(cap * H * B)``); ``None``
        when there is no cap."""
        return None if self.cap is None else Fraction(str(self.cap))

    @property
    def window_share_fraction(self) -> Fraction:
        return Fraction(str(self.window_share))

    @property
    def prefill_keep_fraction(self) -> Fraction:
        """``prefill_keep`` as an exact fraction, so every TP rank computes the same cut size."""
        return Fraction(str(self.prefill_keep))

    @property
    def min_reclaim_fraction(self) -> Fraction:
        """``min_reclaim`` as an exact fraction, so the skip rule is decided in integers."""
        return Fraction(str(self.min_reclaim))

    def effective_budget(self, prompt_len: int) -> int:
        """B for a prompt of ``prompt_len`` tokens before the skip rule: the nominal budget raised to ``min_keep``
        (at least 1), at most the prompt; ``policies.base.raised_budget`` is the same on tensors."""
        return min(max(self.budget.tokens_for(prompt_len), self.min_keep or 1), prompt_len)

    def replace(self, **changes: Any) -> PolicyConfig:
        return dataclasses.replace(self, **changes)

    def with_options(self, values: Mapping[str, Any], known: Mapping[str, PolicyOption]) -> PolicyConfig:
        """This config with the policy options ``values`` (validated by their ``known`` declarations) set; an
        option set to its default is dropped, so equal settings give equal configs."""
        merged = dict(self.options)
        for name, raw in values.items():
            option = known[name]
            value = option.validated(raw)
            if value == option.default:
                merged.pop(name, None)
            else:
                merged[name] = value
        return dataclasses.replace(self, options=tuple(sorted(merged.items())))

    # ---- text forms shared by CLI flags, environment variables and per-request overrides ----

    @classmethod
    def from_strings(
        cls,
        values: Mapping[str, Any],
        base: PolicyConfig | None = None,
        options: Mapping[str, PolicyOption] | None = None,
    ) -> PolicyConfig:
        """Build from ``{setting: text}`` (e.g. parsed flags or env vars), validating every value. ``options`` are
        the policy options that may appear besides the fields (``madakv_sglang.settings`` passes the registry's)."""
        base = base or cls()
        options = options or {}
        changes: dict[str, Any] = {}
        option_values: dict[str, Any] = {}
        for key, raw in values.items():
            if raw is None:
                continue
            if key in options:
                option_values[key] = raw
                continue
            if key not in FIELD_PARSERS:
                known = sorted([*FIELD_PARSERS, *options])
                raise ConfigError(f"unknown policy setting {key!r}; known: {', '.join(known)}")
            try:
                changes[key] = FIELD_PARSERS[key](raw)
            except ConfigError as err:
                message = str(err)
                raise ConfigError(message if message.startswith(f"{key}:") else f"{key}: {message}") from None
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: cannot parse {raw!r}") from None
        config = dataclasses.replace(base, **changes)
        return config.with_options(option_values, options) if option_values else config

    def to_strings(self) -> dict[str, str]:
        """The inverse of :meth:`from_strings`: every field, and every option that is set, as text."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if f.name == "options":
                continue
            value = getattr(self, f.name)
            if value is None:
                if f.name in _NONE_TEXT:
                    out[f.name] = "none"
            else:
                out[f.name] = _text(value)
        out.update((name, _text(value)) for name, value in self.options)
        return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}: must be an integer >= {lo}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


def _parse_cap(value: Any) -> float | None:
    return None if str(value).strip().lower() == "none" else float(value)


# Fields whose None is a setting of its own that differs from the default, so its text form must carry it.
_NONE_TEXT = frozenset({"cap"})

# The text parser of every field but ``options`` (whose values are parsed by their declarations).
FIELD_PARSERS: dict[str, Callable[[Any], Any]] = {
    "policy": str,
    "budget": Budget.parse,
    "window": int,
    "theta": float,
    "pooling": str,
    "pool_kernel": int,
    "gqa": str,
    "hcc": str,
    "cap": _parse_cap,
    "head_split": str,
    "mpa": parse_bool,
    "min_keep": int,
    "sink": int,
    "window_share": float,
    "min_prompt": int,
    "min_reclaim": float,
    "layout": str,
    "prefill_evict": str,
    "prefill_keep": float,
    "prefill_split": str,
    "radix": str,
}
FIELDS: tuple[str, ...] = tuple(FIELD_PARSERS)
CHOICES: dict[str, tuple[str, ...]] = {
    "pooling": POOLINGS,
    "gqa": GQA_REDUCES,
    "hcc": HCC_MODES,
    "head_split": HEAD_SPLITS,
    "mpa": ("on", "off"),
    "layout": LAYOUTS,
    "prefill_evict": PREFILL_EVICTS,
    "prefill_split": PREFILL_SPLITS,
    "radix": RADIX_MODES,
}
