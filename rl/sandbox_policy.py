"""What the scoring worker may do once sealed: an audit hook and resource limits (runs only inside the worker).

`seal()` is called after the worker's imports and warm-up, before it reads the first answer. From then on:

- A `sys.addaudithook` hook (which cannot be removed) refuses, by raising `SandboxViolation` inside the call that
  asked: compiling source and executing code objects that are more than arithmetic over literals, symbols and
  whitelisted maths functions (`rl.code_screen`: the only way a scorer turns an answer into code, whatever scorer or
  answer shape); importing any module not already loaded; opening a file for writing or creating/removing/renaming
  files; process creation (`os.system`, `subprocess.Popen`, `os.exec*`, `os.spawn*`, `os.posix_spawn`, `os.fork`,
  `pty.spawn`); signals to other processes; sockets and any network client; `ctypes`; building code or function
  objects by hand, `marshal`, new audit hooks, environment and working-directory changes, and `resource` limit
  changes other than the worker's own per-item CPU budget.
- Resource limits: address space (`mem_bytes`), CPU seconds (a per-item budget, re-armed by `cpu_budget` before each
  item: past it the kernel stops the worker with SIGXCPU even inside C code), file size 0, no new files beyond the
  ones open now, no new processes, no core dumps. A limit that cannot be set raises `SandboxSetupError`: a worker that
  is not sealed never scores.

Refusals are recorded in `violations` (event names) so that the worker can report them with its answer.
"""

from __future__ import annotations

import os
import sys

from rl import code_screen

__all__ = ["SandboxSetupError", "SandboxViolation", "cpu_budget", "seal", "violations"]


class SandboxViolation(RuntimeError):
    """Raised inside the worker by the audit hook when scored code asks for something it may not do."""


class SandboxSetupError(RuntimeError):
    """The worker could not install its hook or one of its resource limits."""


violations: list[str] = []  # refused events since the worker last reported

_REFUSED = frozenset({
    "import", "os.system", "subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
    "os.kill", "os.killpg", "pty.spawn", "os.remove", "os.unlink", "os.rmdir", "os.mkdir", "os.rename", "os.replace",
    "os.link", "os.symlink", "os.truncate", "os.chmod", "os.chown", "os.chdir", "os.chroot", "os.putenv",
    "os.unsetenv", "os.startfile", "os.mkfifo", "os.mknod", "os.utime", "os.setxattr", "os.removexattr",
    "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move", "shutil.chown",
    "shutil.make_archive", "shutil.unpack_archive", "code.__new__", "function.__new__", "marshal.load",
    "marshal.loads", "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys.remote_exec", "mmap.__new__",
    "resource.setrlimit", "resource.prlimit", "webbrowser.open", "urllib.Request", "ftplib.connect",
    "smtplib.connect", "poplib.connect", "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open",
    "http.client.connect", "sqlite3.connect", "signal.pthread_kill", "os.setuid", "os.setgid", "tempfile.mkstemp",
    "tempfile.mkdtemp", "fcntl.ioctl",
})
_REFUSED_PREFIXES = ("socket.", "ctypes.", "_ctypes.", "winreg.", "_winapi.", "msvcrt.", "os.exec", "os.spawn",
                     "os.posix_spawn", "subprocess.", "pty.", "multiprocessing.", "_posixsubprocess.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_TMPFILE", 0)

_state = {"sealed": False, "busy": False, "own_setrlimit": False}


def _refuse(event: str, why: str = "") -> None:
    violations.append(event if not why else f"{event}: {why}")
    raise SandboxViolation(f"sandbox refused {event}" + (f" ({why})" if why else ""))


def _open_writes(args) -> bool:
    mode, flags = (args[1], args[2]) if len(args) >= 3 else (args[1] if len(args) > 1 else None, 0)
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event: str, args) -> None:
    if not _state["sealed"] or _state["busy"]:
        return  # before sealing, or a nested event raised by the hook's own parsing
    if event == "compile":
        _state["busy"] = True
        try:
            why = code_screen.source_refusal(args[0])
        except Exception as e:  # a screen that fails refuses
            why = f"screen failed ({type(e).__name__})"
        finally:
            _state["busy"] = False
        if why:
            _refuse("compile", why)
    elif event == "exec":
        why = code_screen.code_refusal(args[0])
        if why:
            _refuse("exec", why)
    elif event == "open":
        if _open_writes(args):
            _refuse("open", f"for writing: {str(args[0])[:80]}")
    elif event in ("resource.setrlimit", "resource.prlimit") and _state["own_setrlimit"]:
        return
    elif event in _REFUSED or event.startswith(_REFUSED_PREFIXES):
        _refuse(event)


def _open_fds() -> list[int]:
    try:
        return [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(16))


def _set(resource, name: str, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except Exception as e:
        raise SandboxSetupError(f"cannot set {name} to {soft}: {e}") from e


def cpu_budget(seconds: float) -> None:
    """Let the worker spend at most `seconds` more CPU time (soft RLIMIT_CPU; SIGXCPU past it)."""
    import math
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(math.ceil(r.ru_utime + r.ru_stime + max(1.0, seconds)))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    _state["own_setrlimit"] = True
    try:
        _set(resource, "RLIMIT_CPU", min(soft, hard) if hard != resource.RLIM_INFINITY else soft, hard)
    finally:
        _state["own_setrlimit"] = False


def seal(*, mem_bytes: int, cpu_seconds_total: int = 3600, spare_fds: int = 2) -> None:
    """Set the resource limits, then install the audit hook (see the module docstring). Raises `SandboxSetupError`
    if any limit cannot be set; call once, after every import and warm-up."""
    try:
        import resource
    except ImportError as e:
        raise SandboxSetupError("the resource module is unavailable: no limits can be set on this platform") from e
    code_screen.prepare()
    r = resource.getrusage(resource.RUSAGE_SELF)
    _set(resource, "RLIMIT_AS", int(mem_bytes))
    _set(resource, "RLIMIT_CPU", int(r.ru_utime + r.ru_stime) + 60, int(r.ru_utime + r.ru_stime) + cpu_seconds_total)
    _set(resource, "RLIMIT_FSIZE", 0)
    _set(resource, "RLIMIT_NOFILE", max(_open_fds()) + 1 + spare_fds)
    _set(resource, "RLIMIT_NPROC", 0)
    _set(resource, "RLIMIT_CORE", 0)
    sys.addaudithook(_hook)
    _state["sealed"] = True
