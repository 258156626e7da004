"""The kernel data path without root: the whole cluster inside a user namespace of its own.

As a user who is not root, ``hopscope up --dataplane kernel`` runs the control plane under
``unshare --user --map-root-user --mount --net``: inside, it is root over namespaces it
creates, and the names of those namespaces (``/run/netns``) and the pods' ``/etc/netns``
files live on private tmpfs mounts no other process sees (:func:`private_namespace_dirs`).
When the last process of the user namespace exits, the kernel frees every namespace, link
and rule in it: a crash leaves nothing behind.

What the cluster cannot do from inside is listen in the user's own network namespace (the
API at 127.10.0.254:8001, the ingress at 127.200.0.1:8080, ...). A socket keeps the
namespace it was created in, so a *port broker* that stays in the user's namespace binds
those listening sockets and passes them over a Unix socket in the state directory
(``SCM_RIGHTS``); the forwarder inside accepts on them (:func:`request_listener`). The broker
only hands out loopback addresses, is the control plane's parent (:func:`run`), and exits
when the control plane does, after killing anything still left in the user namespace.

CLI commands that work inside the cluster's namespaces re-run themselves under ``nsenter``
into the control plane's user, mount and network namespaces (:func:`enter_argv`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BROKER_SOCKET = "kernel-broker.sock"
"""In the state directory: where the port broker takes requests."""
BROKER_PID = "kernel-broker.pid"
BROKER_ENV = "HOPSCOPE_PORT_BROKER"
"""Set (to the broker's socket) for the control plane the broker runs: the cluster is rootless."""
INSIDE_ENV = "HOPSCOPE_IN_CLUSTER_NAMESPACES"
"""Set by :func:`enter_argv`: the command already runs inside the cluster's namespaces."""
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "--net"]
NAMESPACE_DIRS = (Path("/run/netns"), Path("/etc/netns"))
"""``ip netns`` keeps its names in the first and the per-namespace /etc files in the second."""

MS_BIND = 0x1000
MS_REC = 0x4000


class RootlessError(RuntimeError):
    """Something the rootless set-up needs failed; the message says what, in one line."""


# -- what the host permits -------------------------------------------------------------------


def userns_support() -> str | None:
    """Why an unprivileged user cannot run the cluster in a user namespace here (one line),
    or None when ``unshare --user --map-root-user --net --mount`` works."""
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare: {exc}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        return f"unprivileged user namespaces are not permitted here ({detail})"
    return None


def broker_socket() -> Path | None:
    """Inside a rootless cluster: the port broker's socket; None when the cluster runs as root."""
    value = os.environ.get(BROKER_ENV)
    return Path(value) if value else None


def privileges() -> str:
    """``root`` or ``rootless``: what the control plane runs with."""
    return "rootless" if broker_socket() is not None or os.geteuid() != 0 else "root"


# -- inside: private names for the namespaces -----------------------------------------------


def private_namespace_dirs(dirs: tuple[Path, ...] = NAMESPACE_DIRS) -> None:
    """Mount a private, empty tmpfs on each directory (call it as root of a fresh user and
    mount namespace). A directory that does not exist is made on a tmpfs laid over its
    parent, which keeps the parent's entries by bind-mounting each one back."""
    libc = ctypes.CDLL(None, use_errno=True)
    for path in dirs:
        if not path.is_dir():
            _shadow(libc, path.parent)
            path.mkdir()
        _mount(libc, "tmpfs", str(path), "tmpfs", 0)


def _shadow(libc: ctypes.CDLL, parent: Path) -> None:
    """Lay a writable tmpfs over ``parent`` with every entry of the original bound back."""
    original = os.open(parent, os.O_PATH | os.O_DIRECTORY)
    try:
        entries = sorted(os.listdir(f"/proc/self/fd/{original}"))
        _mount(libc, "tmpfs", str(parent), "tmpfs", 0)
        for name in entries:
            source, target = f"/proc/self/fd/{original}/{name}", parent / name
            if os.path.islink(source):
                target.symlink_to(os.readlink(source))
                continue
            if os.path.isdir(source):
                target.mkdir()
            else:
                target.touch()
            _mount(libc, source, str(target), None, MS_BIND | MS_REC)
    finally:
        os.close(original)


def _mount(libc: ctypes.CDLL, source: str, target: str, fstype: str | None, flags: int) -> None:
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags, None):
        err = ctypes.get_errno()
        raise RootlessError(f"cannot mount {fstype or source} on {target}: {os.strerror(err)}")


# -- the port broker ------------------------------------------------------------------------


class PortBroker:
    """Binds listening TCP sockets on loopback addresses in this process's network namespace
    and passes them to whoever asks on a Unix socket (only the user: mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        os.chmod(path, 0o600)
        self.server.listen(16)
        self._thread = threading.Thread(target=self._serve, name="port-broker", daemon=True)

    def start(self) -> PortBroker:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            request = json.loads(conn.recv(4096).decode())
            listener = bind_listener(str(request["host"]), int(request["port"]), request["backlog"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"error": str(exc)}).encode())
            return
        with listener, contextlib.suppress(OSError):
            socket.send_fds(conn, [b'{"ok": true}'], [listener.fileno()])


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket listening on ``host:port``; ``host`` must be a loopback address."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(int(backlog))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def request_listener(path: Path | str, host: str, port: int, backlog: int = 512) -> socket.socket:
    """A socket listening on ``host:port`` in the broker's network namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        try:
            conn.connect(str(path))
        except OSError as exc:
            raise OSError(exc.errno, f"no port broker at {path}: {exc.strerror}") from None
        conn.sendall(json.dumps({"host": host, "port": port, "backlog": backlog}).encode())
        message, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
    reply = json.loads(message.decode() or '{"error": "the port broker closed the connection"}')
    if not fds:
        raise OSError(f"port broker: {reply.get('error', 'no socket passed')}")
    return socket.socket(fileno=fds[0])


# -- running the cluster --------------------------------------------------------------------


def run(state_dir: Path, argv: list[str]) -> int:
    """Serve as port broker while ``argv`` (the control plane) runs in a new user, mount and
    network namespace; pass SIGTERM and SIGINT on; when it exits, kill whatever is left in
    its user namespace, and exit with its status."""
    state_dir.mkdir(parents=True, exist_ok=True)
    broker = PortBroker(state_dir / BROKER_SOCKET).start()
    pid_file = state_dir / BROKER_PID
    pid_file.write_text(str(os.getpid()))
    env = {**os.environ, BROKER_ENV: str(broker.path)}
    try:
        child = subprocess.Popen([*UNSHARE, "--", *argv], env=env)
    except OSError as exc:
        broker.close()
        pid_file.unlink(missing_ok=True)
        print(f"error: cannot start the control plane: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    userns = _userns_of(child)
    try:
        return child.wait()
    finally:
        broker.close()
        if userns is not None:
            kill_userns(userns)
        pid_file.unlink(missing_ok=True)


def _userns_of(child: subprocess.Popen[bytes], timeout: float = 10.0) -> str | None:
    """The user namespace ``child`` moves into (``user:[INODE]``), once it has."""
    own = os.readlink("/proc/self/ns/user")
    deadline = time.monotonic() + timeout
    while child.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = os.readlink(f"/proc/{child.pid}/ns/user")
            if found != own:
                return found
        time.sleep(0.01)
    return None


def kill_userns(userns: str) -> list[int]:
    """SIGKILL every process in user namespace ``userns`` (only the user's own are visible)."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/user") == userns:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


def runner_argv(state_dir: Path, argv: list[str]) -> list[str]:
    """``argv`` (the control plane) run rootless by the port broker (:func:`run`)."""
    return [sys.executable, "-m", "mesh.kernel.rootless", "--state-dir", str(state_dir), *argv]


def broker_pid(state_dir: Path) -> int | None:
    """The running port broker of the state directory's cluster, if any."""
    try:
        return int((state_dir / BROKER_PID).read_text().strip())
    except (OSError, ValueError):
        return None


def enter_argv(pid: int, argv: list[str]) -> list[str]:
    """``argv`` run inside the user, mount and network namespaces of process ``pid`` (as the
    namespace's root: the caller's own uid is mapped to it)."""
    return [
        "nsenter", "--target", str(pid), "--user", "--mount", "--net", "--preserve-credentials",
        "--", *argv,
    ]  # fmt: skip


def forward_args(netns: str) -> list[str]:
    """The forwarder's options that make its listeners in ``netns`` (the user's namespace)
    come from the port broker; none when the cluster runs as root."""
    path = broker_socket()
    return [] if path is None else ["--port-broker", f"{netns}={path}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.kernel.rootless",
        description="Run a command (the control plane) in a new user, mount and network "
        "namespace, serving it listening sockets in this namespace until it exits.",
    )
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    return run(args.state_dir, command)


if __name__ == "__main__":
    sys.exit(main())
