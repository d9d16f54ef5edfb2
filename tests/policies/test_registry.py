"""The policy registry loads the built-in policies exactly once, also when threads ask for them at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# A fresh interpreter, so the built-in policies are not imported yet when the threads start.
RACE = textwrap.dedent("""
    import json
    import threading
    from madakv_sglang.policies.registry import policy_names

    start, seen = threading.Barrier(8, timeout=60), []  # fail, never hang, if a thread dies

    def look() -> None:
        start.wait()
        seen.append(policy_names())

    threads = [threading.Thread(target=look) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(sorted(set(seen))))
""")


def test_threads_that_look_up_policies_during_the_first_import_see_them_all() -> None:
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120, check=True)
    views = json.loads(out.stdout)
    assert len(views) == 1, views  # every thread saw the same names
    assert {"full", "madakv", "snapkv", "adakv", "streamingllm"} <= set(views[0])
