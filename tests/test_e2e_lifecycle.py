"""`hopscope up` refuses bad manifests up front, and Ctrl-C on a foreground `up` stops all."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import requests

from tests.e2e_support import (
    API,
    HOPSCOPE,
    api_get,
    assert_all_gone,
    cluster_env,
    hopscope,
    poll_until,
)

pytestmark = pytest.mark.e2e

BAD_SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: catalog
  namespace: shop
spec:
  selector: {app: catalog}
  ports:
    - port: eighty
      targetPort: http
"""


def _nothing_listening() -> bool:
    try:
        requests.get(f"{API}/api/v1/status", timeout=1)
    except requests.ConnectionError:
        return True
    return False


def test_invalid_manifest_names_file_object_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SERVICE)
    proc = hopscope(
        "up", "--detach", "-f", str(bad), env=cluster_env(tmp_path / "home"), check=False
    )
    assert proc.returncode != 0
    assert "bad.yaml" in proc.stderr
    assert "Service shop/catalog" in proc.stderr
    assert "spec.ports[0].port" in proc.stderr
    assert _nothing_listening()


def test_ctrl_c_on_foreground_up_stops_everything(tmp_path: Path) -> None:
    env = cluster_env(tmp_path / "home")
    proc = subprocess.Popen(
        [*HOPSCOPE, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        poll_until(lambda: api_get("/api/v1/status")["ready"], timeout=120, interval=0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 19  # 8 pods x 2 + ingress + DNS + kube-proxy
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) in (0, 1, 130)
        assert_all_gone(children)
        assert _nothing_listening()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
