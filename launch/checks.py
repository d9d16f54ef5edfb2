"""Is this Python ready to serve with the plugin: the pinned SGLang, and the ``madakv`` entry point loading.

SGLang loads plugins itself and only logs a plugin that fails, so a missing or broken install would start a
stock server that silently ignores ``--kv-*`` (or fails later on an unknown flag). The launcher checks first.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

SGLANG_VERSION = "0.5.23"  # pyproject's `sglang` extra
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "madakv"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def plugin_problems() -> list[str]:
    """Why this Python cannot serve with the plugin; empty when it can."""
    problems = []
    found = package_version("sglang")
    if found != SGLANG_VERSION:
        problems.append(
            f"sglang {found} is installed in {sys.executable}; madakv-sglang needs sglang=={SGLANG_VERSION}"
        )
    points = [point for point in entry_points(group=PLUGIN_GROUP) if point.name == PLUGIN_NAME]
    if not points:
        problems.append(
            f"the {PLUGIN_GROUP} entry point {PLUGIN_NAME!r} is not installed in {sys.executable}; "
            "install madakv-sglang (pip install -e . in the repository)"
        )
    else:
        try:
            points[0].load()
        except Exception as err:  # noqa: BLE001 - any import failure is the message
            problems.append(
                f"the {PLUGIN_GROUP} entry point {PLUGIN_NAME!r} ({points[0].value}) fails to load: "
                f"{type(err).__name__}: {err}"
            )
    return problems
