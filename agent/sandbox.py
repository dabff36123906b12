"""Run untrusted Python code (the ``python`` tool) in a bubblewrap sandbox.

Each run is a fresh ``python -I`` of the interpreter the node runs on, started through ``bwrap``
(Debian package ``bubblewrap``). The program gets:

* **an unprivileged user.** When the node runs as root, the program runs as uid/gid 65534
  ("nobody") in the host's own user namespace too (``setpriv`` drops to it before the sandbox
  is built), so even a program that escaped every namespace could do only what "nobody" can.
  A node running as another user runs its programs as that user.
* **new user, PID, mount, network, IPC, UTS and cgroup namespaces**, and no further user
  namespaces inside (``--disable-userns``). The network namespace has nothing but a loopback,
  so every connection fails. Its ``/proc`` shows only its own processes.
* **a minimal, read-only filesystem**: ``/usr``, the ``/bin`` and ``/lib*`` links (or
  directories), and the Python install (``sys.base_prefix``), all read-only. Not ``/etc``,
  ``/home``, ``/root``, the node's working directory, its data, nor a virtualenv's packages.
  ``/`` and ``/dev`` are remounted read-only; the one writable place is a fresh tmpfs of
  WORK_DIR_BYTES at ``/tmp``, the working directory and ``HOME``, which holds ``main.py``.
* **an empty environment** but ``PATH``, ``HOME`` and ``LANG``, and stdin closed.
* **resource limits**: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE and
  RLIMIT_NPROC. The kernel counts RLIMIT_NPROC over every process of the user, so each run may
  start MAX_PROCESSES more processes than that user already has: a fork bomb stops there.
* **an end that takes everything with it**: the program is the child of bwrap's init, PID 1 of
  its own PID namespace; when the program ends, or the time runs out and the sandbox is killed,
  that init dies and the kernel kills every process left in the namespace, including children
  that called ``setsid()`` and double-forked. ``--die-with-parent`` does the same if the node
  dies, and ``--new-session`` keeps the program off the node's terminal.
* **bounded output**: at most ``max_output_bytes`` per stream are kept, the rest is read and
  dropped, so a program printing forever costs no memory.

Why bubblewrap rather than our own ``unshare()`` calls: a sandbox built by hand has to get many
subtle steps right in the right order (uid maps, mount propagation, pivot_root, a fresh procfs,
dropping capabilities and the bounding set, no_new_privs, a reaping PID 1, death with the parent)
and run them in a ``preexec_fn`` of a threaded server, where little is safe. bwrap is a small,
audited, widely deployed tool made for exactly this (Flatpak's sandbox), and it refuses to run
rather than silently give less isolation.

As root it runs in two stages. bwrap cannot build the sandbox as "nobody" alone, because the
Python install may sit where "nobody" cannot reach (``/root/.pyenv``), and as root it would map
the sandbox's user to root. So a first bwrap, as root, builds a view of just those read-only
directories in a new mount and PID namespace. Inside it ``setpriv`` drops to nobody and a
second bwrap builds the sandbox proper. The first view holds the host's ``/proc`` read-write,
because the kernel lets an unprivileged bwrap mount a new procfs and write its uid map only
then. Only setpriv and bwrap run in that view; the program never sees it. There is no seccomp
filter: bwrap takes one only as compiled BPF.

If bwrap or setpriv is missing, or the kernel refuses unprivileged user namespaces,
``check_available`` and every run raise SandboxUnavailableError: there is no weaker fallback.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SANDBOX_UID = SANDBOX_GID = 65534  # "nobody": what a root node's programs run as
MAX_PROCESSES = 64  # processes and threads a run may add to those its user already has
MAX_OPEN_FILES = 64
MAX_FILE_BYTES = 16 * 1024 * 1024
WORK_DIR = "/tmp"
WORK_DIR_BYTES = 32 * 1024 * 1024
SCRIPT_NAME = "main.py"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_LANG = "C.UTF-8"
SANDBOX_HOSTNAME = "sandbox"
SYSTEM_DIRS = ("/usr",)  # bound read-only into every sandbox
ROOT_ENTRIES = ("/bin", "/lib", "/lib32", "/lib64", "/libx32")  # symlinks into /usr on merged-/usr systems, else bound
TOOL_SEARCH_PATH = "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin"
PROBE_TIMEOUT = 30.0
READ_CHUNK = 65536
POLL_SECONDS = 0.05


class SandboxUnavailableError(RuntimeError):
    """bwrap cannot run sandboxes on this machine; the message says why and what to install."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed program did.

    ``exit_code`` is the program's exit status, 128+N when signal N ended it, and -9 when the
    sandbox was killed because the time ran out.
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool
    seconds: float


def run_python(code: str, *, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 65536) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox described in the module docstring.

    Raises SandboxUnavailableError when the sandbox cannot be built here.
    """
    _check_limits(timeout, memory_mb, max_output_bytes)
    script = os.memfd_create("edgeswarm-sandbox-script")
    try:
        os.write(script, code.encode("utf-8"))
        os.lseek(script, 0, os.SEEK_SET)
        return _run(_command(script), script, timeout, memory_mb, max_output_bytes)
    finally:
        os.close(script)


def check_available() -> None:
    """Raise SandboxUnavailableError unless a program really runs in the sandbox here (probed once per process)."""
    problem = _probe()
    if problem:
        raise SandboxUnavailableError(problem)


def _command(script_fd: int) -> list[str]:
    """The command that runs the script read from ``script_fd`` in the sandbox (the fd must be passed to it)."""
    bwrap, interpreter = _find_tool("bwrap"), _interpreter()
    view = _read_only_view()
    sandbox = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--hostname", SANDBOX_HOSTNAME,
        "--die-with-parent",
        "--new-session",
        *view,
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(WORK_DIR_BYTES), "--tmpfs", WORK_DIR,
        "--file", str(script_fd), f"{WORK_DIR}/{SCRIPT_NAME}",
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--chdir", WORK_DIR,
        "--clearenv",
        "--setenv", "PATH", SANDBOX_PATH,
        "--setenv", "HOME", WORK_DIR,
        "--setenv", "LANG", SANDBOX_LANG,
        "--",
        interpreter, "-I", SCRIPT_NAME,
    ]  # fmt: skip
    if os.geteuid() != 0:
        return sandbox
    # the host's /proc, read-write, lets the second bwrap write its uid map and mount a new procfs; /tmp is its scratch mount point
    root_view = [bwrap, "--unshare-pid", "--die-with-parent", *view, "--bind", "/proc", "/proc", "--dev", "/dev", "--dir", "/tmp"]
    drop_to_nobody = [_find_tool("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups", "--no-new-privs"]
    return [*root_view, "--", *drop_to_nobody, "--", *sandbox]


# --------------------------------------------------------------------------- what the sandbox sees


def _find_tool(name: str) -> str:
    found = shutil.which(name, path=TOOL_SEARCH_PATH)
    if found is None:
        raise SandboxUnavailableError(
            f"{name} is not installed: the python tool's sandbox needs bubblewrap and setpriv "
            "(Debian: apt-get install bubblewrap util-linux; scripts/setup.sh installs them as root)"
        )
    path = os.path.realpath(found)
    if not _is_within(path, _bound_dirs()):
        raise SandboxUnavailableError(f"{name} is at {path}, outside the directories the sandbox binds ({', '.join(_bound_dirs())})")
    return path


def _python_dirs() -> list[str]:
    """The Python install's directories (prefix and exec prefix) that /usr does not already hold."""
    dirs: list[str] = []
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        path = os.path.realpath(prefix)
        if path == "/":
            raise SandboxUnavailableError("Python is installed with prefix /: the sandbox would have to show the whole filesystem")
        if not _is_within(path, [*SYSTEM_DIRS, *dirs]):
            dirs.append(path)
    return dirs


def _bound_dirs() -> list[str]:
    entries = [entry for entry in ROOT_ENTRIES if os.path.isdir(entry) and not os.path.islink(entry)]
    return [*SYSTEM_DIRS, *entries, *_python_dirs()]


def _read_only_view() -> list[str]:
    """bwrap arguments that show /usr, /bin and /lib*, and the Python install, read-only at their own paths."""
    arguments: list[str] = []
    for directory in SYSTEM_DIRS:
        arguments += ["--ro-bind", directory, directory]
    for entry in ROOT_ENTRIES:
        if os.path.islink(entry):
            arguments += ["--symlink", os.readlink(entry), entry]
        elif os.path.isdir(entry):
            arguments += ["--ro-bind", entry, entry]
    for directory in _python_dirs():
        for parent in reversed(Path(directory).parents[:-1]):  # made world-searchable, unlike /root
            arguments += ["--dir", str(parent)]
        arguments += ["--ro-bind", directory, directory]
    return arguments


def _interpreter() -> str:
    """The real interpreter binary (not a virtualenv's link to it), inside the directories the sandbox binds."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable)] if sys.executable else []
    candidates.append(os.path.realpath(os.path.join(sys.base_prefix, "bin", version)))
    for candidate in candidates:
        if os.path.isfile(candidate) and _is_within(candidate, _bound_dirs()):
            return candidate
    raise SandboxUnavailableError(f"cannot find the {version} binary under {sys.base_prefix} or /usr")


def _is_within(path: str, directories: list[str]) -> bool:
    return any(path == directory or path.startswith(directory.rstrip("/") + "/") for directory in directories)


# --------------------------------------------------------------------------- running


def _check_limits(timeout: float, memory_mb: int, max_output_bytes: int) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter needs it), got {memory_mb}")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must not be negative, got {max_output_bytes}")


def _run(command: list[str], script_fd: int, timeout: float, memory_mb: int, max_output_bytes: int) -> SandboxResult:
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd="/",
        env={},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        pass_fds=(script_fd,),
        start_new_session=True,
        # preexec_fn only calls setrlimit (no locks taken), so it is safe despite threads
        preexec_fn=_limit_setter(_limits(timeout, memory_mb)),  # noqa: PLW1509
    )
    try:
        stdout, stderr, timed_out = _collect(process, started + timeout, max_output_bytes)
    finally:
        _kill_group(process.pid)  # the outer bwrap and its init: the sandbox's namespaces die with them
        process.wait()
        process.stdout.close()
        process.stderr.close()
    return SandboxResult(
        stdout=stdout.text(),
        stderr=stderr.text(),
        exit_code=process.returncode,
        timed_out=timed_out,
        truncated=stdout.truncated or stderr.truncated,
        seconds=time.monotonic() - started,
    )


class _Capture:
    """The first ``limit`` bytes of a stream, and whether anything was dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[: max(room, 0)]
        self.truncated = self.truncated or len(chunk) > room

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _collect(process: subprocess.Popen, deadline: float, limit: int) -> tuple[_Capture, _Capture, bool]:
    """Read both pipes until they close or the deadline passes; return (stdout, stderr, timed_out)."""
    captures = {process.stdout: _Capture(limit), process.stderr: _Capture(limit)}
    with selectors.DefaultSelector() as selector:
        for stream in captures:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            if _has_exited(process):
                _kill_group(process.pid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return *captures.values(), not _has_exited(process)
            for key, _ in selector.select(min(remaining, POLL_SECONDS)):
                chunk = os.read(key.fd, READ_CHUNK)
                if chunk:
                    captures[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return *captures.values(), True
    return *captures.values(), False


def _has_exited(process: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (so its pid stays a valid group id)."""
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- limits


def _limits(timeout: float, memory_mb: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, never above the limits we ourselves run under."""
    cpu_seconds = math.ceil(timeout) + 1
    processes = _task_count(SANDBOX_UID if os.geteuid() == 0 else os.getuid()) + MAX_PROCESSES
    wanted = [
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
        (resource.RLIMIT_NPROC, processes, processes),
    ]
    return [(kind, _clamp(kind, soft), _clamp(kind, hard)) for kind, soft, hard in wanted]


def _clamp(kind: int, value: int) -> int:
    hard = resource.getrlimit(kind)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _task_count(uid: int) -> int:
    """How many processes and threads of ``uid`` run now: what RLIMIT_NPROC already counts for it."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in Path(entry.path, "status").read_text().splitlines() if ":" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid:
            count += int(fields["Threads"])
    return count


def _limit_setter(limits: list[tuple[int, int, int]]) -> Callable[[], None]:
    """The preexec_fn: runs in the forked child just before exec; bwrap, setpriv and the program inherit the limits."""

    def set_limits() -> None:
        for kind, soft, hard in limits:
            resource.setrlimit(kind, (soft, hard))

    return set_limits


@functools.cache
def _probe() -> str:
    """Why the sandbox does not work here, or "" when a program ran in it."""
    try:
        result = run_python("print('ok')", timeout=PROBE_TIMEOUT)
    except (SandboxUnavailableError, OSError) as error:
        return str(error)
    if result.exit_code != 0 or result.stdout != "ok\n":
        detail = result.stderr.strip() or f"exit code {result.exit_code}"
        return f"bwrap cannot run the python tool's sandbox here: {detail}"
    return ""
