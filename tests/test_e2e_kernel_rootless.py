"""``hopscope up --dataplane kernel`` as a user who is not root (``nobody``).

The cluster runs in a user namespace of its own: the ingress and the API answer on the
user's loopback through the port broker, the traces carry the kernel's kube-proxy hops,
``hopscope exec`` enters a node, and ``down`` (or a SIGKILL of the control plane) leaves no
process, and so no namespace, behind. Needs root to drop to ``nobody``, an interpreter and a
checkout ``nobody`` can run (``HOPSCOPE_TEST_ROOTLESS_PYTHON`` names another interpreter
with the project's packages when the test's own lies under a private directory), and
unprivileged user namespaces; the module is skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mesh.kernel.rootless import BROKER_PID, UNSHARE
from tests.e2e_support import ROOT, api_get, assert_all_gone, poll_until, traced_shop_requests

NOBODY = 65534
PYTHON = os.environ.get("HOPSCOPE_TEST_ROOTLESS_PYTHON", sys.executable)
DROP = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _as_nobody(argv: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> str:
    """Why ``argv`` fails as ``nobody`` (its last line of output), or '' when it works."""
    try:
        done = subprocess.run(
            [*DROP, *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    lines = (done.stderr or done.stdout).strip().splitlines()
    return "" if done.returncode == 0 else (lines[-1] if lines else f"exit {done.returncode}")


def _cannot_run(python: str) -> str:
    """Why ``nobody`` cannot run the project with ``python`` ('' when it can): probed as the
    cluster will, a process of nobody's starting the interpreter (setpriv itself may still
    reach a path nobody cannot)."""
    child = "import mesh.cli, pyroute2, envoy"
    probe = [
        "sh", "-c", 'exec "$0" -c "import subprocess, sys; '
        'subprocess.run([sys.executable, \'-c\', sys.argv[1]], check=True)" "$1"', python, child,
    ]  # fmt: skip
    return _as_nobody(probe, {"PATH": PATH, "PYTHONPATH": str(ROOT)})


def _nobodys_interpreter() -> str | None:
    """The test's interpreter often lives under root's home (pyenv): a venv of the system's
    Python 3 of the same minor version, seeing this environment's packages, that nobody can
    run; None if there is no such Python."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        return None
    version = subprocess.run(
        [system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        return None
    venv = Path(tempfile.mkdtemp(prefix="hopscope-rootless-python-"))
    atexit.register(shutil.rmtree, venv, True)
    os.chmod(venv, 0o755)
    if subprocess.run([system, "-m", "venv", "--without-pip", str(venv)]).returncode != 0:
        return None
    site = next((p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()), None)
    if site is None:
        return None
    [target] = list((venv / "lib").glob("python3*/site-packages"))
    (target / "hopscope-test.pth").write_text(f"import site; site.addsitedir({site!r})\n")
    return str(venv / "bin" / "python")


def _unsupported() -> str | None:
    global PYTHON
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root (to run the cluster as nobody)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    why = _cannot_run(PYTHON)
    if why and "HOPSCOPE_TEST_ROOTLESS_PYTHON" not in os.environ:
        other = _nobodys_interpreter()
        if other is not None and not _cannot_run(other):
            PYTHON, why = other, ""
    if why:
        return (
            f"nobody cannot run {PYTHON} with {ROOT} ({why}); set "
            "HOPSCOPE_TEST_ROOTLESS_PYTHON to an interpreter with the project's packages "
            "that nobody can run"
        )
    if why := _as_nobody([*UNSHARE, "true"]):
        return f"unprivileged user namespaces are not permitted here ({why})"
    return None


REASON = _unsupported()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A state directory ``nobody`` owns (the test's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="hopscope-rootless-"))
    os.chmod(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hopscope_as_nobody(
    home: Path, *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": PATH,
        "HOME": str(home),
        "HOPSCOPE_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        [*DROP, PYTHON, "-m", "mesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=home,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"hopscope {' '.join(args)} exited {done.returncode}\n{done.stderr}")
    return done


def _up(home: Path) -> list[psutil.Process]:
    """Start the cluster as nobody; return its processes, the port broker first."""
    up = hopscope_as_nobody(home, "up", "--dataplane", "kernel", "--detach", "--timeout", "120")
    assert "cluster ready" in up.stderr, up.stderr
    broker = psutil.Process(int((home / BROKER_PID).read_text()))
    procs = [broker, *broker.children(recursive=True)]
    assert {p.uids().real for p in procs} == {NOBODY}
    return procs


def _root_netns() -> set[str]:
    """The namespace names root sees (a rootless cluster adds none)."""
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def test_up_works_rootless_and_down_leaves_nothing(home: Path) -> None:
    names_before = _root_netns()
    procs = _up(home)
    try:
        status = api_get("/api/v1/status")
        assert status["privileges"] == "rootless" and status["dataplane"] == "kernel"
        assert status["pid"] in {p.pid for p in procs}
        # through the broker's listener on this namespace's 127.200.0.1:8080 into the pods
        [view] = traced_shop_requests(1)
        assert view["verdict"]["ok"] is True
        proxied = [
            s["attributes"]
            for s in view["spans"]
            if s["attributes"].get("hopscope.hop") == "kube-proxy"
        ]
        assert proxied and all(a["hopscope.dataplane"] == "kernel" for a in proxied), proxied
        assert all(a["hopscope.conntrack.state"] in ("new", "established") for a in proxied)
        links = hopscope_as_nobody(home, "exec", "--node", "node-a", "--", "ip", "-br", "link")
        names = {line.split()[0].split("@")[0] for line in links.stdout.splitlines()}
        assert {"eth0", "cni0", "flannel.1"} <= names, links.stdout
        assert _root_netns() == names_before
    finally:
        down = hopscope_as_nobody(home, "down", check=False)
    assert "cluster stopped" in down.stderr, down.stderr
    assert_all_gone(procs)
    assert not (home / BROKER_PID).exists()


def test_a_killed_control_plane_takes_the_namespaces_with_it(home: Path) -> None:
    procs = _up(home)
    control_plane = api_get("/api/v1/status")["pid"]
    try:
        os.kill(control_plane, signal.SIGKILL)
        # the broker sees its child die, kills what is left in the user namespace and exits
        assert_all_gone(procs, timeout=20)
    finally:
        hopscope_as_nobody(home, "down", check=False)
    assert "no hopscope cluster is running" in hopscope_as_nobody(home, "down").stderr
    poll_until(lambda: not (home / BROKER_PID).exists(), timeout=5)
