"""The runtime interface, driven by the kubelet: real processes, fresh metric registries.

Pods here run without a sidecar and bind nothing, so no address of the local cluster is
used and the tests can run next to one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mesh.controlplane.ingress import IngressController
from mesh.controlplane.kubelet import Kubelet
from mesh.model.controllers import Cluster
from mesh.model.manifests import load_manifests
from mesh.runtime.base import Runtime
from mesh.runtime.docker import DockerRuntime
from mesh.runtime.local import LocalRuntime
from tests.test_model import DEPLOYMENT


def _workload(command: str) -> str:
    """One replica of ``command``, without a sidecar."""
    return (
        DEPLOYMENT.format(replicas=1)
        .replace('["python", "-m", "http.server"]', command)
        .replace(
            "metadata: {labels: {app: web}}",
            'metadata: {labels: {app: web}, annotations: {sidecar.hopscope.dev/inject: "false"}}',
        )
    )


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[LocalRuntime]:
    rt = LocalRuntime(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    yield rt
    rt.shutdown()


def _cluster(tmp_path: Path, command: str) -> Cluster:
    path = tmp_path / "job.yaml"
    path.write_text(_workload(command))
    cluster = Cluster()
    cluster.apply(load_manifests([path]))
    return cluster


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_both_runtimes_implement_the_interface_and_neither_derives_from_the_other() -> None:
    for cls in (LocalRuntime, DockerRuntime):
        assert issubclass(cls, Runtime) and not cls.__abstractmethods__
    assert not issubclass(DockerRuntime, LocalRuntime)
    assert not issubclass(LocalRuntime, DockerRuntime)


def test_local_ingress_reads_fresh_xds_files_and_docker_reads_none(tmp_path: Path) -> None:
    leftover = tmp_path / "envoy" / "ingress-xds" / "rds.json"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("{}")  # a previous cluster's routes
    local = LocalRuntime(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    assert local.ingress_xds_dir == leftover.parent
    assert not leftover.exists()
    controller = IngressController.for_runtime(Cluster(), local)
    assert controller is not None and controller.xds.directory == local.ingress_xds_dir
    assert DockerRuntime.ingress_xds_dir is None  # its Envoy gets the routes inline


def test_kubelet_restarts_an_exited_container_and_counts_it(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    cmd = '["python", "-c", "import time, sys; time.sleep(0.2); sys.exit(3)"]'
    cluster = _cluster(tmp_path, cmd)
    registry = CollectorRegistry()
    kubelet = Kubelet(cluster, runtime, registry=registry)
    kubelet.sync_once()
    (pod,) = cluster.state.pods
    assert pod.phase == "Running"
    assert _sample(registry, "hopscope_kubelet_started_pods_total") == 1
    (status,) = runtime.container_statuses(pod)
    assert status.name == f"demo/{pod.name}/web" and status.pid is not None
    deadline = time.monotonic() + 10
    while pod.restarts == 0 and time.monotonic() < deadline:
        kubelet.sync_once()
        time.sleep(0.1)
    assert pod.restarts >= 1
    assert _sample(registry, "hopscope_kubelet_restarted_containers_total", kind="container") >= 1
    statuses = runtime.container_statuses(pod)
    assert statuses[0].restarts >= 1 and statuses[0].log_path is not None


def test_a_pod_that_cannot_start_stays_pending_with_its_error(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    cluster = _cluster(tmp_path, "[]")
    registry = CollectorRegistry()
    kubelet = Kubelet(cluster, runtime, registry=registry)
    kubelet.sync_once()
    kubelet.sync_once()
    (pod,) = cluster.state.pods
    assert pod.phase == "Pending" and runtime.container_statuses(pod) == []
    assert "has no command" in kubelet.start_errors[("demo", pod.name)]
    assert _sample(registry, "hopscope_kubelet_started_pods_errors_total") == 2
    assert _sample(registry, "hopscope_kubelet_started_pods_total") == 0
    assert (
        registry.get_sample_value("hopscope_kubelet_restarted_containers_total", {"kind": "system"})
        == 0
    )


def test_a_stopped_pod_is_finalized_and_its_processes_are_gone(
    tmp_path: Path, runtime: LocalRuntime
) -> None:
    cluster = _cluster(tmp_path, '["python", "-c", "import time; time.sleep(60)"]')
    kubelet = Kubelet(cluster, runtime, registry=CollectorRegistry())
    kubelet.sync_once()
    (pod,) = cluster.state.pods
    (status,) = runtime.container_statuses(pod)
    assert status.running
    cluster.scale("demo", "web", 0)
    kubelet.sync_once()
    assert cluster.state.pods == [] and runtime.container_statuses(pod) == []
