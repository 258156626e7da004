"""The rootless kernel data path's pieces: the port broker and the private namespace dirs.

The broker must hand out sockets that listen in *its* network namespace, whatever namespace
the asking process is in; a process in a fresh user and network namespace (as the rootless
control plane's forwarder is) asks here. The private dirs must exist also where the host
has none, without hiding what the parent directory held.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.kernel import forward, rootless
from tests.e2e_support import ROOT

NO_USERNS = rootless.userns_support()
needs_userns = pytest.mark.skipif(NO_USERNS is not None, reason=str(NO_USERNS))


def _in_userns(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as root of a new user, mount and network namespace."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*rootless.UNSHARE, sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@needs_userns
def test_a_brokered_listener_accepts_in_the_brokers_namespace(tmp_path: Path) -> None:
    broker = rootless.PortBroker(tmp_path / rootless.BROKER_SOCKET).start()
    try:
        assert oct(os.stat(broker.path).st_mode & 0o777) == "0o600"
        child = subprocess.Popen(
            [
                *rootless.UNSHARE,
                sys.executable,
                "-c",
                textwrap.dedent(
                    """
                    import json, socket, sys
                    from mesh.kernel.rootless import request_listener
                    own = socket.socket()  # this namespace's loopback is down: no route
                    try:
                        own.connect(("127.0.0.1", 9))
                    except OSError as exc:
                        print(json.dumps({"own": exc.strerror}), flush=True)
                    listener = request_listener(sys.argv[1], "127.0.0.1", 0)
                    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
                    conn, peer = listener.accept()
                    conn.sendall(f"hello {peer[0]}".encode())
                    conn.close()
                    """
                ),
                str(broker.path),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert child.stdout is not None
        own = json.loads(child.stdout.readline())
        assert own["own"] in ("Network is unreachable", "Connection refused"), own
        port = json.loads(child.stdout.readline())["port"]
        # the test's own namespace reaches a socket the child holds
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(100) == b"hello 127.0.0.1"
        assert child.wait(10) == 0
    finally:
        broker.close()
    assert not broker.path.exists()


def test_the_broker_binds_loopback_addresses_only(tmp_path: Path) -> None:
    broker = rootless.PortBroker(tmp_path / "b.sock").start()
    try:
        with pytest.raises(OSError, match=re.escape("10.10.0.254 is not a loopback address")):
            rootless.request_listener(broker.path, "10.10.0.254", 8001)
        taken = rootless.request_listener(broker.path, "127.0.0.1", 0)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=re.escape(f"cannot listen on 127.0.0.1:{port}")):
            rootless.request_listener(broker.path, "127.0.0.1", port)
        taken.close()
    finally:
        broker.close()
    with pytest.raises(OSError, match="no port broker at"):
        rootless.request_listener(broker.path, "127.0.0.1", 0)


def test_the_forwarder_takes_its_listeners_in_a_brokered_namespace_from_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward, "_brokers", {})
    broker = rootless.PortBroker(tmp_path / "b.sock").start()
    try:
        forward.use_port_broker("user-ns", str(broker.path))
        # no namespace of that name exists: only the broker can make this socket
        sock = forward.listener_in(forward.Endpoint("user-ns", "127.0.0.1", 0))
        assert sock.getblocking() is False and sock.getsockname()[0] == "127.0.0.1"
        sock.close()
    finally:
        broker.close()


@needs_userns
def test_private_namespace_dirs_keep_the_parent_when_a_dir_is_missing(tmp_path: Path) -> None:
    parent = tmp_path / "etc"
    (parent / "keep").mkdir(parents=True)
    (parent / "keep" / "inner").write_text("inner")
    (parent / "hosts").write_text("hosts")
    (parent / "link").symlink_to("hosts")
    present = tmp_path / "run-netns"
    present.mkdir()
    (present / "someone-elses").write_text("")
    done = _in_userns(
        """
        import os, sys
        from pathlib import Path
        from mesh.kernel.rootless import private_namespace_dirs
        parent, present = Path(sys.argv[1]), Path(sys.argv[2])
        private_namespace_dirs((parent / "netns", present))
        (parent / "netns" / "pod").mkdir()
        (present / "mine").write_text("")
        print(sorted(os.listdir(parent)), sorted(os.listdir(present)))
        print((parent / "keep" / "inner").read_text(), (parent / "link").read_text())
        """,
        str(parent),
        str(present),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "['hosts', 'keep', 'link', 'netns'] ['mine']",
        "inner hosts",
    ]
    # nothing of it is seen outside, and nothing is left once the namespace is gone
    assert sorted(os.listdir(parent)) == ["hosts", "keep", "link"]
    assert os.listdir(present) == ["someone-elses"]


def test_enter_argv_keeps_the_callers_uid_mapped_to_root() -> None:
    argv = rootless.enter_argv(42, ["ip", "-br", "link"])
    assert argv[:3] == ["nsenter", "--target", "42"]
    assert {"--user", "--mount", "--net", "--preserve-credentials"} <= set(argv)
    assert argv[-4:] == ["--", "ip", "-br", "link"]
