"""Run untrusted Python code (the ``python`` tool) in a throwaway, resource-limited subprocess.

Each run gets:

* a fresh ``python -I`` process of the running interpreter (``sys.executable``), with
  stdin closed and an environment holding only ``HOME`` and ``TMPDIR``;
* a new temporary directory as its working directory, ``HOME`` and ``TMPDIR``, deleted
  afterwards;
* ``resource`` limits set before exec: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NOFILE and
  RLIMIT_FSIZE. RLIMIT_NPROC is deliberately *not* set: Linux counts every process of the
  user against it (not only the sandbox's) and ignores it for root, so it cannot cap the
  sandbox alone. Runaway children are ended by the process-group kill instead;
* its own session and process group, killed as a whole when the time runs out (and once
  the program ends, so it leaves no background processes behind);
* output captured through a bounded reader: at most ``max_output_bytes`` per stream are
  kept, the rest is drained and dropped, so a program printing forever costs no memory;
* no network, by one of two mechanisms (see ``network_isolation()``):

  ``"namespace"`` (in force whenever the kernel permits it, e.g. when running as root):
      the child enters a new, empty network namespace (``unshare(CLONE_NEWNET)``, through
      ``os.unshare`` on Python 3.12+ and libc through ctypes before that) in which not even
      loopback is up, so every connection fails with "Network is unreachable".
  ``"audit-hook"`` (fallback): a bootstrap passed with ``-c`` installs an audit hook that
      refuses socket creation, connects, name lookups, process spawning and ctypes before
      the user's code runs. Site-packages are left out (``-S``) in this mode, because C
      extensions can open sockets without raising audit events. This is best effort, not
      a security boundary.

The program runs as the same user as the caller: files outside the temporary directory
are protected only by ordinary permissions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
MAX_OPEN_FILES = 64
MAX_FILE_BYTES = 16 * 1024 * 1024
READ_CHUNK = 65536
POLL_SECONDS = 0.05
SCRIPT_NAME = "main.py"

# Runs before the user's code when no network namespace is available. The hook's sets are
# code constants, so user code cannot edit them; replacing the hook's __code__ is refused too.
# _posixsubprocess.fork_exec raises no audit event, so it is swapped for a stub up front
# (which keeps ``import subprocess`` and ``import asyncio`` working).
AUDIT_BOOTSTRAP = r"""
import sys

def _sandbox_audit_hook(event, args):
    if event in {
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    }:
        raise PermissionError("network and process access are blocked in this sandbox (" + event + ")")
    if event == "import" and args[0] in {"_ctypes", "_posixsubprocess"}:
        raise PermissionError("module " + args[0] + " is blocked in this sandbox")
    if event == "object.__setattr__" and args[1] == "__code__" and type(args[0]).__name__ == "function":
        if args[0].__code__.co_name == "_sandbox_audit_hook" and args[0].__code__.co_filename == "<string>":
            raise PermissionError("the sandbox's audit hook cannot be replaced")

def _no_fork_exec(*args):
    raise PermissionError("starting processes is blocked in this sandbox")

import _posixsubprocess  # imported now and disarmed; importing it afresh is refused below
_posixsubprocess.fork_exec = _no_fork_exec
sys.addaudithook(_sandbox_audit_hook)
del _sandbox_audit_hook, _no_fork_exec, _posixsubprocess
with open(sys.argv[1], encoding="utf-8") as _file:
    _source = _file.read()
del _file
sys.argv = sys.argv[1:]
exec(compile(_source, sys.argv[0], "exec"), {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed program did. ``exit_code`` is negative for a signal (-9 when killed)."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool
    seconds: float
    network_isolation: str


def run_python(code: str, *, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 65536) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox described in the module docstring."""
    _check_limits(timeout, memory_mb, max_output_bytes)
    isolation = network_isolation()
    workdir = tempfile.mkdtemp(prefix="edgeswarm-sandbox-")
    try:
        Path(workdir, SCRIPT_NAME).write_text(code, encoding="utf-8")
        return _run(workdir, isolation, timeout, memory_mb, max_output_bytes)
    finally:
        _remove_tree(workdir)


def network_isolation() -> str:
    """How the sandbox cuts the network on this machine: ``"namespace"`` or ``"audit-hook"``."""
    return "namespace" if _network_namespace_works() else "audit-hook"


# --------------------------------------------------------------------------- running


def _check_limits(timeout: float, memory_mb: int, max_output_bytes: int) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter needs it), got {memory_mb}")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must not be negative, got {max_output_bytes}")


def _run(workdir: str, isolation: str, timeout: float, memory_mb: int, max_output_bytes: int) -> SandboxResult:
    started = time.monotonic()
    process = subprocess.Popen(
        _command(isolation),
        cwd=workdir,
        env={"HOME": workdir, "TMPDIR": workdir},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        start_new_session=True,
        # preexec_fn only calls unshare and setrlimit (no locks taken), so it is safe despite threads
        preexec_fn=_child_setup(isolation == "namespace", _limits(timeout, memory_mb)),  # noqa: PLW1509
    )
    try:
        stdout, stderr, timed_out = _collect(process, started + timeout, max_output_bytes)
    finally:
        _kill_group(process.pid)
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
        network_isolation=isolation,
    )


def _command(isolation: str) -> list[str]:
    if not sys.executable:
        raise RuntimeError("cannot find the Python interpreter (sys.executable is empty)")
    if isolation == "namespace":
        return [sys.executable, "-I", SCRIPT_NAME]
    return [sys.executable, "-I", "-S", "-c", AUDIT_BOOTSTRAP, SCRIPT_NAME]


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
                _kill_group(process.pid)  # background children may still hold the pipes open
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
    """Whether the child has exited, without reaping it where possible (so its pid stays a valid group id)."""
    if not hasattr(os, "waitid"):  # macOS
        return process.poll() is not None
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str) -> None:
    """Delete the sandbox directory, even if the program took permissions away inside it."""

    def allow_and_retry(function: Callable[[str], object], target: str, _exc_info: object) -> None:
        try:
            for directory in (os.path.dirname(target), target):
                if os.path.isdir(directory) and not os.path.islink(directory):
                    os.chmod(directory, 0o700)
            function(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=allow_and_retry)
    if os.path.exists(path):
        logger.warning("could not fully remove sandbox directory %s", path)


# --------------------------------------------------------------------------- the child's limits


def _limits(timeout: float, memory_mb: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, never above the limits we ourselves run under."""
    cpu_seconds = math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES, MAX_OPEN_FILES),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES, MAX_FILE_BYTES),
    ]
    return [(kind, _clamp(kind, soft), _clamp(kind, hard)) for kind, soft, hard in wanted]


def _clamp(kind: int, value: int) -> int:
    hard = resource.getrlimit(kind)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _child_setup(new_network: bool, limits: list[tuple[int, int, int]]) -> Callable[[], None]:
    """The preexec_fn: runs in the forked child just before exec."""
    unshare = _unshare_function() if new_network else None

    def setup() -> None:
        if unshare is not None:
            unshare(CLONE_NEWNET)
        for kind, soft, hard in limits:
            resource.setrlimit(kind, (soft, hard))

    return setup


@functools.cache
def _unshare_function() -> Callable[[int], None] | None:
    """os.unshare where Python has it (3.12+), else libc's unshare through ctypes (Linux)."""
    if hasattr(os, "unshare"):
        return os.unshare
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc_unshare = libc.unshare
    except (OSError, AttributeError):
        return None

    def unshare(flags: int) -> None:
        if libc_unshare(flags) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return unshare


@functools.cache
def _network_namespace_works() -> bool:
    """Probe once: can a child process enter a new network namespace here?"""
    if _unshare_function() is None:
        return False
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", "-c", ""],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_child_setup(True, []),
            timeout=30,
            check=False,
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return probe.returncode == 0
