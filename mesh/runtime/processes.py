"""Child processes of the local runtime: started, watched, and always stopped.

Every child gets ``PR_SET_PDEATHSIG`` = SIGKILL (set by util-linux ``setpriv`` right before
it execs the real program), so even if the control plane is killed with SIGKILL nothing it
started survives it (Envoy in particular must be started from a long-lived parent). A
``preexec_fn`` would do the same without the extra exec, but forking a multi-threaded
Python process that then runs Python code in the child can deadlock; ``setpriv`` keeps the
fork/exec path entirely in C. Output goes to one log file per process under the state
directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SETPRIV = shutil.which("setpriv")
"""util-linux ``setpriv``, used to set the parent-death signal; None where missing."""


def _with_pdeathsig(argv: list[str]) -> list[str]:
    if SETPRIV is None:
        return argv
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


@dataclass
class ChildProcess:
    """One started process and what is needed to restart it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


class ProcessSupervisor:
    """Starts named processes, keeps track of them, and stops them all on shutdown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, ChildProcess] = {}
        self._lock = threading.Lock()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> ChildProcess:
        log_path = self.log_dir / f"{name.replace('/', '_')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        child = ChildProcess(name, argv, env, log_path)
        self._spawn(child)
        with self._lock:
            self.children[name] = child
        return child

    def _spawn(self, child: ChildProcess) -> None:
        with open(child.log_path, "ab") as out:
            child.popen = subprocess.Popen(
                _with_pdeathsig(child.argv),
                env=child.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                close_fds=True,
                # Own process group: a terminal Ctrl-C reaches only the control plane,
                # which then stops its children in order (apps before sidecars).
                process_group=0,
            )
        log.info("started process", extra={"proc": child.name, "pid": child.pid})

    def restart(self, name: str) -> ChildProcess | None:
        with self._lock:
            child = self.children.get(name)
        if child is None:
            return None
        self._terminate(child, grace=2.0)
        child.restarts += 1
        self._spawn(child)
        return child

    def stop(self, name: str, grace: float = 5.0) -> None:
        with self._lock:
            child = self.children.pop(name, None)
        if child is not None:
            self._terminate(child, grace)

    def stop_all(self, grace: float = 5.0) -> None:
        with self._lock:
            children = list(self.children.values())
            self.children.clear()
        for child in children:
            if child.alive() and child.popen:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            self._wait_or_kill(child, max(0.0, deadline - time.monotonic()))

    def _terminate(self, child: ChildProcess, grace: float) -> None:
        if child.alive() and child.popen:
            child.popen.send_signal(signal.SIGTERM)
        self._wait_or_kill(child, grace)

    @staticmethod
    def _wait_or_kill(child: ChildProcess, timeout: float) -> None:
        if child.popen is None:
            return
        try:
            child.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("process ignored SIGTERM; killing", extra={"proc": child.name})
            child.popen.kill()
            child.popen.wait(timeout=5)

    def get(self, name: str) -> ChildProcess | None:
        with self._lock:
            return self.children.get(name)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
