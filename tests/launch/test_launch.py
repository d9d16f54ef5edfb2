"""The launcher (``python -m madakv_sglang.launch``): command building, host lists, validation, the printed
commands, the sbatch script, the preflight refusal, the single-node hand-off, and two SGLang nodes on loopback
(node 1 through ``tests/fake_remote.sh``, a stand-in for ssh) that serve, stop cleanly, and stop when one dies.

The integration tests serve ``--kv-policy madakv``: every node's rank logs its reclamation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from madakv_sglang.checkpoints import write_checkpoint
from madakv_sglang.launch import LaunchError, checks, cli, preflight
from madakv_sglang.launch.__main__ import main, run
from madakv_sglang.launch.commands import prefix_argv
from madakv_sglang.launch.hosts import parse_hostfile, parse_nodes, split_address
from madakv_sglang.launch.node_plan import build_plan, local_ranks
from madakv_sglang.launch.slurm import sbatch_script
from madakv_sglang.log_lines import request_lines
from madakv_sglang.server_process import CPU_ARGS, CPU_ENV, free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE_REMOTE = ROOT / "tests" / "fake_remote.sh"
PY = sys.executable
CWD = os.getcwd()
AWAY = "192.0.2.1"  # TEST-NET-1: resolves (an address literal) and is never this machine
ENVIRON = {"SGLANG_USE_CPU_ENGINE": "1", "MADAKV_KV_WINDOW": "16", "HOME": "/home/me", "HF_TOKEN": "secret"}
MARKER_ENV = "MADAKV_TEST_LAUNCH_RUN"  # MADAKV_*: the launcher sends it to every node, so survivors can be found
# --kv-min-prompt 0: the test's prompt has 80 tokens, which the default floor (256) would keep whole.
POLICY_ARGS = ["--kv-policy", "madakv", "--kv-budget", "0.2", "--kv-window", "4", "--kv-min-prompt", "0"]


def _options(*argv: str) -> cli.Options:
    return cli.parse(list(argv))


def _plan(*argv: str, environ: dict[str, str] | None = None) -> Any:
    return build_plan(_options(*argv), ENVIRON if environ is None else environ, check_in_use=False)


# ---- host lists, addresses, command pieces ----


def test_hostfile_takes_the_first_field_of_each_line_and_skips_comments() -> None:
    text = "# rack A\nnode-a slots=8\n\n  node-b   # the second\n#node-c\nnode-d\n"
    assert parse_hostfile(text) == ["node-a", "node-b", "node-d"]


def test_hostfile_option_reads_the_file(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1\n# spare\nlocalhost\n")
    assert _options("--hostfile", str(hostfile), "--model-path", "m").nodes == ("127.0.0.1", "localhost")
    hostfile.write_text("# nothing\n")
    with pytest.raises(LaunchError, match="names no host"):
        _options("--hostfile", str(hostfile))
    with pytest.raises(LaunchError, match="No such file"):
        _options("--hostfile", str(tmp_path / "missing"))


def test_node_lists_refuse_empty_entries() -> None:
    assert parse_nodes(" a, b ") == ["a", "b"]
    with pytest.raises(LaunchError, match="empty entry"):
        parse_nodes("a,,b")


@pytest.mark.parametrize(("address", "want"), [("h:5000", ("h", 5000)), ("[::1]:7", ("::1", 7))])
def test_addresses_split(address: str, want: tuple[str, int]) -> None:
    assert split_address(address) == want


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("h", "HOST:PORT"),
        ("h:x", "HOST:PORT"),
        (":5", "HOST:PORT"),
        ("h:0", "outside 1..65535"),
        ("h:65536", "outside 1..65535"),
    ],
)
def test_bad_addresses_are_refused(address: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        split_address(address)


def test_remote_prefix_places_the_host() -> None:
    assert prefix_argv("ssh -p 2222 {host}", "h1") == ["ssh", "-p", "2222", "h1"]
    assert prefix_argv("ssh -o User=me", "h1") == ["ssh", "-o", "User=me", "h1"]
    assert prefix_argv("srun -w {host} --", "h1") == ["srun", "-w", "h1", "--"]
    with pytest.raises(LaunchError, match="--remote-prefix"):
        prefix_argv("ssh 'unclosed", "h1")


def test_server_flags_are_read_with_sglang_spellings_and_the_per_node_ones_removed() -> None:
    given = [
        "--model-path",
        "m",
        "--tp",
        "4",
        "--port=31000",
        "--nnodes",
        "2",
        "--nccl-init-addr",
        "h:1",
        "--kv-budget",
        "0.1",
        "--pipeline-parallel-size",
        "2",
        "--host",
        "0.0.0.0",
        "--node-rank",
        "0",
    ]
    server = cli.parse_server_flags(given)
    assert (
        server.tp_size,
        server.pp_size,
        server.port,
        server.host,
        server.nnodes,
        server.node_rank,
        server.dist_init_addr,
    ) == (4, 2, 31000, "0.0.0.0", 2, 0, "h:1")
    assert server.argv == (
        "--model-path",
        "m",
        "--tp",
        "4",
        "--kv-budget",
        "0.1",
        "--pipeline-parallel-size",
        "2",
        "--host",
        "0.0.0.0",
    )
    assert server.given == tuple(given)  # a single-node hand-off passes them on untouched
    assert cli.parse_server_flags(["--tensor-parallel-size", "2"]).tp_size == 2


def test_nodes_on_this_machine_run_here_and_need_distinct_ports() -> None:
    assert local_ranks("auto", ["127.0.0.1", AWAY, "localhost", socket.gethostname()]) == {0, 2, 3}
    assert local_ranks("none", ["127.0.0.1"]) == set()
    assert local_ranks("1", ["127.0.0.1", "127.0.0.1"]) == {1}
    plan = _plan(
        "--nodes",
        f"127.0.0.1,localhost,{AWAY}",
        "--dist-init-addr",
        "10.0.0.1:5000",
        "--model-path",
        "m",
        "--tp",
        "3",
        "--port",
        "31000",
    )
    assert [(n.port, n.local) for n in plan.nodes] == [(31000, True), (31001, True), (31000, False)]


# ---- validation: refused before anything starts ----


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "3"], r"--tp 3 ranks cannot be split evenly over 2 nodes"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "1"], r"--tp 1 ranks cannot be split evenly"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--nnodes", "3"], r"--nnodes 3 conflicts with the 2 nodes"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--node-rank", "1"], r"--node-rank 1: the launcher gives"),
        (["--nodes", "127.0.0.1,no-such-host.invalid", "--tp", "2"], r"cannot resolve the host of node 1"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--port", "0"], r"--port: port 0 is outside 1..65535"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--port", "65535"], r"port 65536 is outside"),
        (
            ["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--port", "31000", "--dist-init-addr", "127.0.0.1:31001"],
            r"the dist-init port 31001 is also node 1's HTTP port",
        ),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--dist-init-addr", "127.0.0.1"], r"expected HOST:PORT"),
        (["--nodes", f"127.0.0.1,{AWAY}", "--tp", "2"], r"127.0.0.1:\d+ is loopback, which node 1 \(192.0.2.1\)"),
        (["--nodes", f"{AWAY},127.0.0.1", "--tp", "2"], r"node 0 \(192.0.2.1\) is another machine .* --host"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--local-node-rank", "2"], r"--local-node-rank '2'"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--node-env", "2:A=1"], r"there is no node 2"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--node-env", "1:A"], r"expected RANK:NAME=VALUE"),
        (["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--env", "NOT_SET_HERE"], r"--env NOT_SET_HERE: not set"),
    ],
)
def test_bad_launches_are_refused_with_the_flag_named(argv: list[str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        _plan(*argv, "--model-path", "m")


def test_multi_node_flags_need_nodes() -> None:
    with pytest.raises(LaunchError, match="--remote-prefix, --node-env need --nodes or --hostfile"):
        _options("--remote-prefix", "ssh", "--node-env", "1:A=1", "--model-path", "m")


def test_ports_in_use_here_are_refused() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["--nodes", "127.0.0.1,127.0.0.1", "--tp", "2", "--model-path", "m"]
        with pytest.raises(LaunchError, match=rf"port {port} \(node 0's HTTP port\) already in use"):
            build_plan(_options(*argv, "--port", str(port)), ENVIRON, check_in_use=True)
        with pytest.raises(LaunchError, match=rf"port {port} \(the dist-init port\) already in use"):
            build_plan(
                _options(*argv, "--port", str(free_port()), "--dist-init-addr", f"127.0.0.1:{port}"),
                ENVIRON,
                check_in_use=True,
            )


def test_main_reports_refusals_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "127.0.0.1,127.0.0.1", "--model-path", "m", "--tp", "3", "--print-commands"]) == 2
    assert "python -m madakv_sglang.launch: error: --tp 3 ranks" in capsys.readouterr().err


def test_bad_kv_flags_stop_the_launcher_with_the_plugins_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--nodes",
                "127.0.0.1,127.0.0.1",
                "--model-path",
                "m",
                "--tp",
                "2",
                "--kv-policy",
                "madakv",
                "--kv-budget",
                "-1",
                "--print-commands",
            ]
        )
    assert exit_info.value.code == 2
    assert "argument --kv-budget" in capsys.readouterr().err


# ---- what is printed and written ----


def test_print_commands_gives_one_pasteable_line_per_node(capsys: pytest.CaptureFixture[str]) -> None:
    options = _options(
        "--nodes",
        f"127.0.0.1,{AWAY}",
        "--local-node-rank",
        "0",
        "--remote-prefix",
        "ssh -p 2222 {host}",
        "--remote-python",
        "/opt/venv/bin/python",
        "--remote-cwd",
        "/srv/my dir",
        "--env",
        "HF_HUB_OFFLINE=1",
        "--node-env",
        "1:SGLANG_CPU_OMP_THREADS_BIND=0-7",
        "--print-commands",
        "--model-path",
        "/models/qwen",
        "--tp",
        "2",
        "--kv-policy",
        "madakv",
        "--kv-budget",
        "0.1",
        "--dist-init-addr",
        "10.0.0.1:5000",
        "--host",
        "0.0.0.0",
    )
    assert run(options, ENVIRON) == 0
    env = "HF_HUB_OFFLINE=1 MADAKV_KV_WINDOW=16 PYTHONUNBUFFERED=1 SGLANG_USE_CPU_ENGINE=1"
    flags = "--model-path /models/qwen --tp 2 --kv-policy madakv --kv-budget 0.1 --host 0.0.0.0"
    assert capsys.readouterr().out == (
        "# node 0 on 127.0.0.1 (this machine)\n"
        f"cd {CWD} && env {env} {PY} -m sglang.launch_server {flags} --port 30000 --nnodes 2 --node-rank 0 "
        "--dist-init-addr 10.0.0.1:5000\n"
        f"# node 1 on {AWAY}\n"
        f"ssh -p 2222 {AWAY} 'cd '\"'\"'/srv/my dir'\"'\"' && exec env {env} SGLANG_CPU_OMP_THREADS_BIND=0-7 "
        f"/opt/venv/bin/python -m sglang.launch_server {flags} --port 30000 --nnodes 2 --node-rank 1 "
        "--dist-init-addr 10.0.0.1:5000'\n"
    )


def test_print_commands_for_one_node_is_the_hand_off_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_options("--print-commands", "--model-path", "m", "--port", "31000"), {"HOME": "/x"}) == 0
    line = f"env PYTHONUNBUFFERED=1 {PY} -m sglang.launch_server --model-path m --port 31000\n"
    assert capsys.readouterr().out == line


def test_slurm_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "job.sbatch"
    options = _options(
        "--slurm",
        str(script),
        "--nodes",
        "gpu-a,gpu-b",
        "--sbatch-option=--partition=gpu",
        "--sbatch-option=--time=01:00:00",
        "--remote-python",
        "/opt/venv/bin/python",
        "--remote-cwd",
        "/srv/app",
        "--model-path",
        "/models/qwen",
        "--tp",
        "8",
        "--kv-policy",
        "madakv",
        "--kv-budget",
        "0.1",
        "--port",
        "30000",
    )
    assert run(options, ENVIRON) == 0
    assert capsys.readouterr().out == f"wrote {script}; submit it with: sbatch {script}\n"
    assert (
        script.read_text()
        == """\
#!/bin/bash
#SBATCH --job-name=madakv-sglang
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --nodelist=gpu-a,gpu-b
#SBATCH --partition=gpu
#SBATCH --time=01:00:00
# Written by `python -m madakv_sglang.launch --slurm`; submit with `sbatch FILE`. One task per node runs
# sglang.launch_server; node 0 (the first host of the allocation) serves HTTP on port 30000.
set -euo pipefail
cd /srv/app
export MADAKV_KV_WINDOW=16
export PYTHONUNBUFFERED=1
export SGLANG_USE_CPU_ENGINE=1
export DIST_INIT_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):50000"
srun --nodes=2 --ntasks-per-node=1 bash -c 'exec /opt/venv/bin/python -m sglang.launch_server --model-path \
/models/qwen --tp 8 --kv-policy madakv --kv-budget 0.1 --port 30000 --nnodes 2 --node-rank "$SLURM_NODEID" \
--dist-init-addr "$DIST_INIT_ADDR"'
""".replace("\\\n", "")
    )


def test_slurm_without_hosts_counts_nnodes_and_keeps_a_given_address() -> None:
    options = _options(
        "--slurm", "job", "--model-path", "m", "--nnodes", "4", "--tp", "4", "--dist-init-addr", "head:6000"
    )
    script = sbatch_script(options, {})
    assert "#SBATCH --nodes=4\n" in script and "--nodelist" not in script
    assert "export DIST_INIT_ADDR=head:6000\n" in script
    with pytest.raises(LaunchError, match="--tp 2 ranks cannot be split evenly over 4 nodes"):
        sbatch_script(_options("--slurm", "job", "--model-path", "m", "--nnodes", "4", "--tp", "2"), {})


# ---- plugin check, preflight, hand-off ----


def test_plugin_check_names_a_wrong_sglang_and_a_missing_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    assert checks.plugin_problems() == []
    monkeypatch.setattr(checks, "version", lambda name: "0.5.22")
    monkeypatch.setattr(checks, "entry_points", lambda group: [])
    problems = checks.plugin_problems()
    assert "sglang 0.5.22 is installed" in problems[0] and "sglang==0.5.23" in problems[0]
    assert "entry point 'madakv' is not installed" in problems[1]


def test_single_node_refuses_without_the_plugin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(checks, "entry_points", lambda group: [])
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("must not hand off"))
    assert main(["--model-path", "m"]) == 2
    assert "cannot serve with the madakv plugin" in capsys.readouterr().err


def test_single_node_hands_off_to_sglang_with_its_exit_code() -> None:
    """The plugin inside the SGLang that took over refuses h2o with its message and exit code 2."""
    result = subprocess.run(
        [PY, "-m", "madakv_sglang.launch", "--model-path", "unused", "--kv-policy", "h2o"],
        capture_output=True,
        text=True,
        env={**os.environ, **CPU_ENV},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "runs in the HF path only" in result.stderr


def test_preflight_reports_versions_and_the_resolved_policy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MADAKV_KV_WINDOW", "16")
    assert preflight.main(["--json", "--kv-policy", "snapkv", "--kv-budget", "0.1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["versions"]) == set(preflight.PACKAGES) and report["versions"]["sglang"] == "0.5.23"
    assert (report["policy"]["policy"], report["policy"]["budget"], report["policy"]["window"]) == (
        "snapkv",
        "0.1",
        "16",
    )
    assert report["plugin"] == []


def test_preflight_differences_name_the_node_and_the_item() -> None:
    base: dict[str, Any] = {
        "versions": {name: "1" for name in preflight.PACKAGES},
        "policy": {"policy": "madakv", "budget": "0.2"},
        "plugin": [],
    }
    other = {
        "versions": {**base["versions"], "sglang": "0.5.22"},
        "policy": {"policy": "madakv", "budget": "0.3"},
        "plugin": ["the entry point is missing"],
    }
    assert preflight.differences([base, other], ["node 0 (a)", "node 1 (b)"]) == [
        "node 1 (b): the entry point is missing",
        "node 1 (b) has sglang version 0.5.22, node 0 (a) has 1",
        "node 1 (b) has --kv-budget 0.3, node 0 (a) has 0.2",
    ]


def test_nodes_that_resolve_different_policies_are_refused() -> None:
    """Node 1 runs through a prefix that sets another budget in its environment; nothing may start."""
    result = subprocess.run(
        [
            PY,
            "-m",
            "madakv_sglang.launch",
            "--nodes",
            "127.0.0.1,127.0.0.1",
            "--local-node-rank",
            "0",
            "--remote-prefix",
            f"env MADAKV_KV_BUDGET=0.3 bash {FAKE_REMOTE} {{host}}",
            "--model-path",
            "unused",
            "--tp",
            "2",
            "--kv-policy",
            "madakv",
            "--port",
            str(_two_free_ports()),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("MADAKV_KV_")},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to start, the nodes differ" in result.stderr
    assert "node 1 (127.0.0.1) has --kv-budget 0.3, node 0 (127.0.0.1, local) has 0.2" in result.stderr
    assert "started node" not in result.stdout


# ---- two SGLang nodes on loopback ----


def _two_free_ports() -> int:
    """An HTTP port P with P + 1 free too (node 1 on the same machine takes P + 1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port + 1)) != 0 and port + 1 <= 65535:
                return port
    raise RuntimeError("no two adjacent free ports")


def _survivors(marker: str) -> list[str]:
    """Processes, here, of one launcher run (the marker is in the environment of everything it started)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(environ.parent.name)
        except OSError:
            continue
    return found


class Launcher:
    """``python -m madakv_sglang.launch`` with two nodes on loopback, its output collected line by line."""

    def __init__(self, checkpoint: Path, policy_args: list[str]) -> None:
        self.port = _two_free_ports()
        self.marker = uuid.uuid4().hex
        command = [
            PY,
            "-m",
            "madakv_sglang.launch",
            "--nodes",
            "127.0.0.1,127.0.0.1",
            "--local-node-rank",
            "0",
            "--remote-prefix",
            f"bash {FAKE_REMOTE} {{host}}",
            "--env",
            "HF_HUB_OFFLINE",
            # Each node holds one TP rank, bound to its own core (SGLang's default binding wants a NUMA node each).
            "--node-env",
            "0:SGLANG_CPU_OMP_THREADS_BIND=0",
            "--node-env",
            "1:SGLANG_CPU_OMP_THREADS_BIND=1",
            "--ready-timeout",
            "300",
            "--stop-timeout",
            "60",
            "--model-path",
            str(checkpoint),
            *CPU_ARGS,
            "--port",
            str(self.port),
            "--tp",
            "2",
            "--max-total-tokens",
            "2048",
            *policy_args,
        ]
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            env={**os.environ, **CPU_ENV, MARKER_ENV: self.marker},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 360.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} in the launcher's output:\n{self.output()[-6000:]}")

    def wait(self, timeout: float = 180.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def cleanup(self) -> list[str]:
        """Kill whatever is left (the launcher, then any survivor); returns the survivors found."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        left = _survivors(self.marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        return left


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint("qwen2", tmp_path_factory.mktemp("tiny_qwen2"), seed=0)


@pytest.fixture
def launcher(checkpoint: Path) -> Iterator[Launcher]:
    launcher = Launcher(checkpoint, POLICY_ARGS)
    try:
        yield launcher
    finally:
        assert launcher.cleanup() == [], f"processes outlived the launcher:\n{launcher.output()[-4000:]}"


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))


def test_two_nodes_serve_and_stop_cleanly(launcher: Launcher) -> None:
    url = launcher.wait_for(r"\[launch\] ready: (\S+)").group(1)
    assert url == f"http://127.0.0.1:{launcher.port}"
    prompt = list(range(3, 83))  # 80 token ids
    output = _post(
        url + "/generate",
        {
            "input_ids": prompt,
            "rid": "two-nodes",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        },
    )
    assert len(output["output_ids"]) == 8
    assert output["meta_info"]["madakv"][0]["prompt_slots"] == 80
    kept = output["meta_info"]["madakv"][0]["kept_slots"]
    assert kept < 80
    with urllib.request.urlopen(f"http://127.0.0.1:{launcher.port + 1}/health", timeout=10) as response:
        assert response.status == 200  # node 1's health stub (SGLang's follower nodes serve no API)
    log = launcher.output()
    assert re.search(r"^\[node0\] .*TP0\] init_threads_binding: numa_index=0, world_size=2", log, re.M)
    assert re.search(r"^\[node1\] .*TP1\] init_threads_binding: numa_index=0, world_size=2", log, re.M)
    assert "started node 1 on 127.0.0.1 through the remote prefix" in log
    for node in range(2):  # each node's rank reclaimed the same slots from its own pool
        node_log = "\n".join(line for line in log.splitlines() if line.startswith(f"[node{node}] "))
        logged = [(r.rid, r.prompt_slots, r.kept_slots) for r in request_lines(node_log) if r.tp_rank == node]
        assert ("two-nodes", 80, kept) in logged, log[-4000:]

    os.kill(launcher.process.pid, signal.SIGINT)
    assert launcher.wait() == 0, launcher.output()[-4000:]
    assert "[launch] every node stopped (exit codes: node 0 0, node 1 0)" in launcher.output()
    assert _survivors(launcher.marker) == []


def test_a_dead_node_stops_the_launch_and_is_named(launcher: Launcher) -> None:
    launcher.wait_for(r"\[launch\] ready: ")
    node1 = int(launcher.wait_for(r"started node 1 on \S+ through the remote prefix: pid (\d+)").group(1))
    os.killpg(node1, signal.SIGKILL)  # the stand-in prefix exec'd the server: its group is node 1's tree
    assert launcher.wait() == 1, launcher.output()[-4000:]
    log = launcher.output()
    assert "[launch] error: node 1 (127.0.0.1) was killed by SIGKILL while serving; its last 30 log lines:" in log
    tail = log.split("its last 30 log lines:\n", 1)[1].splitlines()[:30]
    assert all(line.startswith("[node1] ") for line in tail)
    assert "[launch] error: node 1 (127.0.0.1) died; stopping the other nodes" in log
    assert "[launch] every node stopped" in log
    assert _survivors(launcher.marker) == []
