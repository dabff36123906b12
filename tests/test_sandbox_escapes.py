"""The python tool's sandbox (agent/sandbox.py) against the escapes that worked before it ran in bubblewrap.

Every test runs real programs in the real sandbox and looks at the host from outside: real processes
holding secrets, real files, real signals, a real listening socket.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from edgeswarm.agent import sandbox
from tests.support import wait_until

try:
    sandbox.check_available()
except sandbox.SandboxUnavailableError as unavailable:
    pytest.skip(f"bwrap cannot build the sandbox on this machine: {unavailable}", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the node drops to uid 65534 only when it runs as root")
DEADLINE_SECONDS = 60.0


def pids_with(marker: str) -> list[int]:
    """Host processes whose command line or name holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            seen = (entry / "cmdline").read_bytes() + b"\0" + (entry / "comm").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if marker.encode() in seen:
            found.append(int(entry.name))
    return found


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}


@pytest.fixture
def secret() -> str:
    return f"edgeswarm-secret-{uuid.uuid4().hex}"


@pytest.fixture
def node_process(secret):
    """A host process standing for the node: the API token in its environment and on its command line."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", f"--api-token={secret}"],
        env={**os.environ, "EDGESWARM_API_TOKEN": secret},
    )
    yield process
    process.kill()
    process.wait()


def run_json(code: str, **limits) -> dict:
    result = sandbox.run_python(code, **limits)
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- the node's /proc, files and environment

PROC_PROBE = """
import json, os
report = {{}}
for pid in {pids}:
    for name in ("environ", "cmdline"):
        path = f"/proc/{{pid}}/{{name}}"
        try:
            report[path] = open(path, "rb").read().decode(errors="replace")
        except OSError as error:
            report[path] = type(error).__name__
for entry in os.listdir("/proc"):  # everything this sandbox can see of any process
    if entry.isdigit():
        for name in ("environ", "cmdline"):
            try:
                report[f"/proc/{{entry}}/{{name}}"] = open(f"/proc/{{entry}}/{{name}}", "rb").read().decode(errors="replace")
            except OSError as error:
                report[f"/proc/{{entry}}/{{name}}"] = type(error).__name__
print(json.dumps(report))
"""


def test_the_node_process_environment_and_command_line_are_out_of_sight(node_process, secret, monkeypatch):
    monkeypatch.setenv("EDGESWARM_API_TOKEN", secret)  # this process, which runs the sandbox, holds it too
    result = sandbox.run_python(PROC_PROBE.format(pids=[node_process.pid, os.getpid(), 1]))
    assert result.exit_code == 0, result
    assert secret not in result.stdout and secret not in result.stderr
    report = json.loads(result.stdout)
    for pid in (node_process.pid, os.getpid()):
        assert report[f"/proc/{pid}/environ"] == report[f"/proc/{pid}/cmdline"] == "FileNotFoundError"
    visible = {int(path.split("/")[2]) for path in report}
    assert visible == {1, 2, node_process.pid, os.getpid()}, "the sandbox sees its own init (1) and program (2) only"
    assert node_process.poll() is None


FILE_PROBE = """
import json
report = {{}}
for path in {paths}:
    try:
        with open(path, "rb") as file:
            file.read(1)
        report[path] = "read"
    except OSError as error:
        report[path] = type(error).__name__
print(json.dumps(report))
"""


def test_host_files_cannot_be_read(tmp_path):
    data_dir = tmp_path / "node-data"
    data_dir.mkdir()
    root_only = [data_dir / "identity.key", data_dir / "memory.sqlite", tmp_path / "root-only.txt"]
    for path in root_only:
        path.write_text("secret")
        path.chmod(0o600)
    paths = [
        "/etc/shadow",
        "/etc/passwd",
        "/root/.bash_history",
        *map(str, root_only),
        str(REPO / "README.md"),
        str(Path(__file__).resolve()),
        str(REPO / ".venv" / "pyvenv.cfg"),
    ]
    report = run_json(FILE_PROBE.format(paths=paths))
    assert all(outcome != "read" for outcome in report.values()), report


def test_only_the_system_and_the_python_install_are_visible():
    listing = run_json("import json, os\nprint(json.dumps({d: sorted(os.listdir(d)) for d in ('/', '/tmp')}))")
    top = {Path(sys.base_prefix).resolve().parts[1]}  # where the Python install lives, e.g. usr or root
    assert set(listing["/"]) <= {"usr", "bin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp", *top}
    assert listing["/tmp"] == [sandbox.SCRIPT_NAME]
    assert "etc" not in listing["/"] and "work" not in listing["/"] and "home" not in listing["/"]


def test_the_environment_is_empty(monkeypatch, secret):
    monkeypatch.setenv("EDGESWARM_API_TOKEN", secret)
    environment = run_json("import json, os\nprint(json.dumps(dict(os.environ)))")
    assert set(environment) <= {"PATH", "HOME", "LANG", "PWD"} and secret not in json.dumps(environment)


@NEEDS_ROOT
def test_the_program_runs_as_nobody_on_the_host():
    marker = f"edgeswarm-uid-{uuid.uuid4().hex}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])"
    outcome: dict[str, sandbox.SandboxResult] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", sandbox.run_python(code, timeout=DEADLINE_SECONDS)))
    runner.start()
    try:
        wait_until(lambda: pids_with(marker), "the sandboxed program starts", DEADLINE_SECONDS, interval=0.05)
        [pid] = pids_with(marker)
        status = status_of(pid)
        assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
        assert status["Groups"] == "" and int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1"
        os.kill(pid, signal.SIGKILL)
    finally:
        runner.join()
    assert outcome["result"].exit_code == 128 + signal.SIGKILL


# --------------------------------------------------------------------------- signals and processes

KILL_PROBE = """
import os, signal
for pid, signum in {targets}:
    try:
        os.kill(pid, signum)
        print(pid, "signalled")
    except OSError as error:
        print(pid, type(error).__name__)
"""


def test_host_processes_cannot_be_signalled(node_process):
    # Only the stand-in node gets SIGKILL; the others get signal 0, which checks the right to signal
    # without harm, so that a broken sandbox fails this test instead of killing the test run.
    targets = [(node_process.pid, signal.SIGKILL), (os.getpid(), 0), (os.getppid(), 0)]
    result = sandbox.run_python(KILL_PROBE.format(targets=[(pid, int(signum)) for pid, signum in targets]))
    assert result.stdout.splitlines() == [f"{pid} ProcessLookupError" for pid, _ in targets], result
    assert node_process.poll() is None, "the node process was killed from the sandbox"


DOUBLE_FORK = """
import os, sys, time
ready, done = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(ready)
        os.set_inheritable(done, True)
        daemon = "import os, sys, time; os.write(int(sys.argv[1]), b'x'); time.sleep(120)"
        os.execv(sys.executable, [sys.executable, "-c", daemon, str(done), {marker!r}])
    os._exit(0)
os.close(done)
os.read(ready, 1)
print("daemon started", flush=True)
if {wait_forever}:
    while True:
        time.sleep(1)
"""


@pytest.mark.parametrize("ending", ["exits", "times out"])
def test_a_setsid_double_forked_child_dies_with_the_run(ending):
    marker = f"edgeswarm-daemon-{uuid.uuid4().hex}"
    timeout = 5.0 if ending == "times out" else DEADLINE_SECONDS
    result = sandbox.run_python(DOUBLE_FORK.format(marker=marker, wait_forever=ending == "times out"), timeout=timeout)
    assert result.stdout == "daemon started\n", result
    assert result.timed_out == (ending == "times out")
    wait_until(lambda: not pids_with(marker), "the double-forked daemon is gone", DEADLINE_SECONDS, interval=0.05)


FORK_BOMB = """
import os, time
children = 0
try:
    for _ in range({ceiling}):  # a ceiling, so that a broken sandbox fails the test without flooding the host
        if os.fork() == 0:
            with open("/proc/self/comm", "w") as comm:
                comm.write({marker!r})
            time.sleep(120)
            os._exit(0)
        children += 1
    print("not stopped after", children, "children: 0")
except OSError as error:
    print("stopped after", children, "children:", error.errno)
"""


def test_a_fork_bomb_is_stopped_by_the_process_limit():
    marker = f"fb{uuid.uuid4().hex[:13]}"  # a process name holds 15 characters
    code = FORK_BOMB.format(marker=marker, ceiling=4 * sandbox.MAX_PROCESSES)
    result = sandbox.run_python(code, timeout=DEADLINE_SECONDS)
    words = result.stdout.split()
    assert words[:2] == ["stopped", "after"] and words[-1] == str(errno.EAGAIN), result
    assert 0 < int(words[2]) < sandbox.MAX_PROCESSES
    wait_until(lambda: not pids_with(marker), "the fork bomb's children are gone", DEADLINE_SECONDS, interval=0.05)


# --------------------------------------------------------------------------- network and writes


@pytest.fixture
def listening_port():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server.getsockname()[1]
    with pytest.raises(BlockingIOError):
        server.accept()  # nobody got through
    server.close()


NETWORK_PROBE = """
import json, socket
report = {{}}
for host, port in [("127.0.0.1", {port}), ("192.0.2.1", 80), ("example.com", 80)]:
    try:
        socket.create_connection((host, port), timeout=5).close()
        report[host] = "connected"
    except OSError as error:
        report[host] = type(error).__name__ + ": " + str(error)
print(json.dumps(report))
"""


def test_the_network_is_refused(listening_port):
    report = run_json(NETWORK_PROBE.format(port=listening_port))
    assert report["127.0.0.1"].startswith("ConnectionRefusedError"), report  # the sandbox's own, empty loopback
    assert "Network is unreachable" in report["192.0.2.1"], report
    assert report["example.com"].startswith("gaierror"), report  # no resolver either


WRITE_PROBE = """
import json
report = {}
for path in ["/usr/evil", "/evil", "/dev/evil", "/proc/evil"]:
    try:
        open(path, "w").close()
        report[path] = "written"
    except OSError as error:
        report[path] = type(error).__name__
try:
    with open("big", "wb") as file:
        for _ in range(64):
            file.write(bytes(1024 * 1024))
    report["big"] = "written"
except OSError as error:
    report["big"] = error.errno
print(json.dumps(report))
"""


def test_only_the_work_directory_is_writable_and_it_is_bounded():
    report = run_json(WRITE_PROBE)
    assert all(outcome != "written" for outcome in report.values()), report
    assert report["big"] in (errno.EFBIG, errno.ENOSPC)  # RLIMIT_FSIZE, or the tmpfs is full
