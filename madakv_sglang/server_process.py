"""Start a real SGLang server on CPU as a subprocess, for the demo and the engine tests.

Each server is a ``python -m sglang.launch_server`` child (so plugins load exactly as for a user) in its own
process group; its log goes to a file that callers read (``#running-req`` counts, madakv's reclaim lines).
Always used as a context manager, so an exception or Ctrl-C never leaves a server behind.

Ports: a free port below the kernel's ephemeral range, or one in ``MADAKV_PORT_RANGE`` (e.g. ``33000-33099``)
when set, for machines shared by several people. Not an ephemeral port: while the server starts, our own health
probes (and any other client on the machine) take ephemeral source ports, and one that takes the server's port
first leaves the server unable to bind (seen: SGLang then logs "address already in use" and hangs).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PORT_RANGE_ENV = "MADAKV_PORT_RANGE"
FIRST_PORT = 20000  # the lowest port picked without a range: above the well-known and most registered services
CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "HF_HUB_OFFLINE": "1",  # the tiny checkpoints are complete on disk; never reach for the hub
}
# Debug checks for the tests: slower, and they turn an accounting slip into a failure instead of a wrong answer.
STRICT_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "2",  # check (and log) the accounting after every batch
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",  # no use-after-free, no double free
    "MADAKV_DEBUG_POISON": "1",  # evicted and freed cells hold NaN: a stray read makes outputs non-finite
}
CPU_ARGS = [
    "--device",
    "cpu",
    "--disable-overlap-schedule",
    "--mem-fraction-static",
    "0.3",
    "--dtype",
    "float32",
    "--host",
    "127.0.0.1",
    # An idle CPU server otherwise spins a whole core polling for work, which slows every other process here.
    "--sleep-on-idle",
]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(environ: Mapping[str, str] | None = None) -> int:
    """A port nothing listens on now: from ``MADAKV_PORT_RANGE`` (``LOW-HIGH``, inclusive) when set, else from
    :data:`FIRST_PORT` up to the kernel's ephemeral range (module docstring)."""
    environ = os.environ if environ is None else environ
    span = environ.get(PORT_RANGE_ENV, "").strip()
    if not span:
        return _free_port_in(range(FIRST_PORT, _ephemeral_low()), "below the ephemeral range")
    low, sep, high = span.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"{PORT_RANGE_ENV}={span!r}: expected LOW-HIGH, e.g. 33000-33099") from None
    return _free_port_in(range(first, last + 1), f"in {PORT_RANGE_ENV}={span}")


def _ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free_port_in(ports: range, where: str) -> int:
    # A random start spreads concurrent users over the range: the server binds its port only some seconds after
    # this check, and two runs that both took the lowest free port would race for it.
    offset = random.randrange(len(ports)) if ports else 0
    for port in [*ports[offset:], *ports[:offset]]:
        if _port_is_free(port):
            return port
    raise RuntimeError(f"no free port {where}")


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc; empty where /proc is missing."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(group) and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` in the main thread, so ``with Server(...)`` blocks stop their servers.

    A server runs in its own session (see :class:`Server`), so ``kill`` of a benchmark does not reach it; without
    this the benchmark dies without unwinding and its server keeps serving, and eating CPU, on its own.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Server:
    """``python -m sglang.launch_server --model-path MODEL <CPU_ARGS> --port P <args>``, ready on return.

    Args:
        model: checkpoint dir (or hub id, which HF_HUB_OFFLINE=1 only finds in the local cache).
        args: more server flags, e.g. ``["--kv-policy", "madakv", "--kv-budget", "0.2"]``.
        log_path: the server's stdout and stderr, truncated first.
        env: extra environment on top of ours (wins over CPU_ENV and STRICT_ENV).
        startup_timeout: seconds until ``/health`` answers 200, else the server is stopped and TimeoutError
            carries the log's tail.
        strict: turn on SGLang's strict memory checks and madakv's NaN poisoning (:data:`STRICT_ENV`).
        port: the HTTP port; None picks one with :func:`free_port`.
    """

    def __init__(
        self,
        model: Path | str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        startup_timeout: float = 240.0,
        strict: bool = False,
        port: int | None = None,
    ) -> None:
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        command = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(model),
            *CPU_ARGS,
            "--port",
            str(self.port),
            *args,
        ]
        full_env = {**os.environ, **CPU_ENV, **(STRICT_ENV if strict else {}), **(env or {})}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        # Its own session: Ctrl-C in a terminal reaches only us, and stop() signals the whole group (the
        # launcher and the scheduler / detokenizer processes it spawns).
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            # HTTPException: before the server listens, a connect to a port in the ephemeral range can pick that
            # same port as its source and connect to itself (TCP self-connect), reading back its own request.
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, payload: dict[str, Any], timeout: float = 300.0) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body.strip() else None

    def stream(self, path: str, payload: dict[str, Any], timeout: float = 300.0) -> Iterator[Any]:
        """POST and yield each server-sent ``data:`` event as JSON, up to ``[DONE]``."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)

    def get(self, path: str, timeout: float = 30.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return str(response.read().decode())

    def stop(self) -> int:
        """SIGTERM the server's process group, SIGKILL what is left after 60 s; returns the launcher's exit
        code. Idempotent. Waits for the scheduler and detokenizer too, not only for the launcher."""
        group = self.process.pid  # the launcher leads its own process group (start_new_session)
        if self.process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _signal_group(group, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + 30
        while _group_members(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_members(group):
            _signal_group(group, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return int(self.process.returncode)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
