"""A tiny typed registry of policies: a decorator to add one, lookups by name, and the options policies declare.
Adding a policy = one class with ``name``, ``score_source`` and ``select`` (and ``options`` if it has knobs of its
own) + ``@register_policy``, and one row in the test matrix."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from madakv_sglang.config import ConfigError, PolicyOption

if TYPE_CHECKING:
    from madakv_sglang.policies.base import Policy

_POLICIES: dict[str, Policy] = {}
_OPTIONS: dict[str, PolicyOption] = {}
_LOADED = False
_LOADING = threading.RLock()  # re-entrant: a policy module may look a name up while it is being imported
T = TypeVar("T")


def register_policy(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: instantiate the policy and file it under ``name`` (names are unique), with its options
    (an option several policies share must be the same declaration)."""

    def wrap(cls: type[T]) -> type[T]:
        if name in _POLICIES:
            raise ValueError(f"policy {name!r} is registered twice")
        options: tuple[PolicyOption, ...] = getattr(cls, "options", ())
        for option in options:
            if _OPTIONS.get(option.name, option) is not option:
                raise ValueError(
                    f"policy {name!r} declares option {option.name!r}, which another policy declares differently"
                )
        _POLICIES[name] = cls()  # type: ignore[assignment]
        _OPTIONS.update((option.name, option) for option in options)
        return cls

    return wrap


def _load_builtin() -> None:
    """Import the built-in policies once. Marked loaded only after the imports finish, under a lock, so a thread
    that looks a name up while another is still importing waits instead of seeing a half-filled registry."""
    global _LOADED
    if _LOADED:
        return
    with _LOADING:
        if not _LOADED:
            from madakv_sglang.policies import baselines, madakv  # noqa: F401  (registration side effect)

            _LOADED = True


def get_policy(name: str) -> Policy:
    """The policy registered as ``name``; ConfigError naming the choices when there is none."""
    _load_builtin()
    try:
        return _POLICIES[name]
    except KeyError:
        raise ConfigError(f"policy: unknown {name!r}; choose one of {', '.join(policy_names())}") from None


def policy_options() -> dict[str, PolicyOption]:
    """Every option the registered policies declare, by name."""
    _load_builtin()
    return dict(_OPTIONS)


def policy_names() -> tuple[str, ...]:
    """Registered names: ``full`` first, then ``madakv``, then the rest alphabetically."""
    _load_builtin()
    first = [n for n in ("full", "madakv") if n in _POLICIES]
    return tuple(first + sorted(n for n in _POLICIES if n not in first))
