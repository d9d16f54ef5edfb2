"""Run the nodes of a plan: stream their logs, announce when node 0 is ready, stop them all on a signal or when
one dies.

Every node is a child in its own session (process group): the local server tree, or the remote prefix. Stopping
follows SGLang's shutdown path (package docstring): SIGTERM to node 0's process only, which drains and stops the
other nodes' schedulers; then SIGTERM, then SIGKILL, to the process group of each node still running.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from types import FrameType
from typing import IO

from madakv_sglang.launch.commands import local_env, node_command
from madakv_sglang.launch.node_plan import Node, Plan

TAIL_LINES = 30  # a dead node's last log lines, printed with the error
POLL_SECONDS = 0.2
KILL_WAIT_SECONDS = 10.0  # after SIGTERM to a node's group, before SIGKILL
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def group_alive(group: int) -> bool:
    """Some process (an orphaned scheduler, say) is still in the group."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Running:
    node: Node
    process: subprocess.Popen[bytes]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None

    def alive(self) -> bool:
        return self.process.poll() is None


class Supervisor:
    """Start, watch and stop the nodes of ``plan``; :meth:`run` returns the launcher's exit code (0 stopped on
    request, 1 a node died or node 0 was not ready in time)."""

    def __init__(
        self,
        plan: Plan,
        ready_timeout: float | None,
        stop_timeout: float,
        out: IO[str] = sys.stdout,
        err: IO[str] = sys.stderr,
    ) -> None:
        self.plan = plan
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.out, self.err = out, err
        self.running: list[_Running] = []
        self.signals = 0
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()

    def say(self, line: str, error: bool = False) -> None:
        with self._print_lock:
            print(line, file=self.err if error else self.out, flush=True)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED}
        try:
            self._start()
            return self._watch()
        finally:
            self.stopping.set()
            self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _start(self) -> None:
        for node in self.plan.nodes:
            if self.signals:
                return
            process = subprocess.Popen(
                node_command(self.plan, node),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=local_env(node) if node.local else None,
                start_new_session=True,
            )
            running = _Running(node, process)
            running.reader = threading.Thread(target=self._stream, args=(running,), daemon=True)
            running.reader.start()
            self.running.append(running)
            how = "here" if node.local else "through the remote prefix"
            self.say(f"[launch] started node {node.rank} on {node.host} {how}: pid {process.pid}")
        threading.Thread(target=self._poll_ready, daemon=True).start()

    def _stream(self, running: _Running) -> None:
        assert running.process.stdout is not None
        for raw in iter(running.process.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            running.tail.append(line)
            self.say(f"[node{running.node.rank}] {line}")

    def _poll_ready(self) -> None:
        url = self.plan.ready_url + "/health_generate"
        while not self.stopping.is_set():
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if response.status == 200:
                        self.ready.set()
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, http.client.HTTPException):
                pass
            self.stopping.wait(1.0)

    def _watch(self) -> int:
        started = time.monotonic()
        announced = False
        while True:
            if self.signals:
                self.say("[launch] signal received: stopping every node")
                return 0
            for running in self.running:
                if not running.alive():
                    return self._died(running, announced)
            if self.ready.is_set() and not announced:
                announced = True
                self.say(
                    f"[launch] ready: {self.plan.ready_url} ({len(self.running)} nodes, "
                    f"node 0 answers /health_generate)"
                )
            if not announced and self.ready_timeout is not None and time.monotonic() - started > self.ready_timeout:
                self.say(
                    f"[launch] error: node 0 did not answer {self.plan.ready_url}/health_generate within "
                    f"--ready-timeout {self.ready_timeout:g} s; stopping every node",
                    error=True,
                )
                return 1
            time.sleep(POLL_SECONDS)

    def _died(self, running: _Running, was_ready: bool) -> int:
        if running.reader is not None:
            running.reader.join(timeout=2.0)  # the last lines (an orphaned child may hold the pipe open)
        node = running.node
        when = "while serving" if was_ready else "before node 0 was ready"
        lines = [
            f"[launch] error: {node.name} {describe_exit(running.process.returncode)} {when}; "
            f"its last {len(running.tail)} log lines:"
        ]
        lines += [f"[node{node.rank}] {line}" for line in running.tail]
        lines.append(f"[launch] error: {node.name} died; stopping the other nodes")
        self.say("\n".join(lines), error=True)
        return 1

    def _wait(self, seconds: float, hurry_after: int) -> None:
        """Until every node has exited, ``seconds`` have passed, or a signal beyond ``hurry_after`` arrives."""
        deadline = time.monotonic() + seconds
        while any(r.alive() for r in self.running) and time.monotonic() < deadline and self.signals <= hurry_after:
            time.sleep(POLL_SECONDS)

    def _stop(self) -> None:
        """Node 0 first (SGLang's graceful path), then each group still running: SIGTERM, SIGKILL. A further
        signal to the launcher skips the waits."""
        signals_at_stop = self.signals
        if self.running and self.running[0].alive():
            self.running[0].process.send_signal(signal.SIGTERM)
            self._wait(self.stop_timeout, signals_at_stop)
        for sig, wait in ((signal.SIGTERM, KILL_WAIT_SECONDS), (signal.SIGKILL, 0.0)):
            late = [r for r in self.running if r.alive()]
            for running in late:
                self.say(f"[launch] {running.node.name} still running: {sig.name} to its process group")
                signal_group(running.process.pid, sig)
            if late:
                self._wait(wait, signals_at_stop)
        for running in self.running:
            running.process.wait()
            deadline = time.monotonic() + KILL_WAIT_SECONDS
            while group_alive(running.process.pid) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
            if group_alive(running.process.pid):  # what its own shutdown left behind
                signal_group(running.process.pid, signal.SIGKILL)
            if running.reader is not None:
                running.reader.join(timeout=2.0)
        if self.running:
            codes = ", ".join(f"node {r.node.rank} {r.process.returncode}" for r in self.running)
            self.say(f"[launch] every node stopped (exit codes: {codes})")
