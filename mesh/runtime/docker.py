"""The docker runtime: pods as containers, through the Docker API (Docker or Podman).

It runs inside the control-plane container of the compose project. Per pod it creates a
*pause* container that owns the pod's network namespace — on its node's network, at the
pod IP the model allocated, with the node's routes (Services and the other node's pods via
the node, i.e. the control-plane container) — then the app container and the Envoy sidecar
join that namespace (``network_mode: container:<pause>``), as a kubelet with a CRI does.
Every container carries labels naming its project, namespace, pod, node and role, so a
restarted control plane (or ``docker compose down``) finds and removes what is left.

Cluster DNS and the data path (kube-proxy, the CNI emulator) stay processes of the
control-plane container (:class:`~mesh.runtime.system.SystemProcesses`, as in the local
runtime): they are the node's own services.

``python -m mesh.runtime.docker healthcheck`` is the control-plane container's health: it
turns healthy only once a request through the ingress has succeeded, so ``docker compose
up --wait`` returns when the cluster serves, not merely when its API answers.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mesh import addresses
from mesh.model.types import ClusterState, Container, Pod
from mesh.runtime.base import (
    ProcessStatus,
    Runtime,
    SidecarFiles,
    SystemComponent,
    ingress_pod,
)
from mesh.runtime.datapath import DataPath, UserspaceDataPath
from mesh.runtime.environment import container_env
from mesh.runtime.processes import ProcessSupervisor
from mesh.runtime.system import SystemProcesses

log = logging.getLogger(__name__)

LABEL_PROJECT = "dev.hopscope.project"
LABEL_NAMESPACE = "dev.hopscope.namespace"
LABEL_POD = "dev.hopscope.pod"
LABEL_NODE = "dev.hopscope.node"
LABEL_ROLE = "dev.hopscope.role"

SIDECAR_USER = "10001"
"""The user apps and sidecars run as (the image's unprivileged user)."""
SIDECAR_DIR = Path("/tmp/hopscope-sidecar")
"""Where a sidecar container keeps its certificate and xDS files (its own /tmp)."""
INCOMING = ".incoming"
"""Files arrive here first, then are renamed into :data:`SIDECAR_DIR` one by one."""

APP_MEMORY = "192m"
SIDECAR_MEMORY = "96m"
PAUSE_MEMORY = "16m"


class DockerRuntime(Runtime):
    """Pods as containers; system components as processes of the control-plane container."""

    ingress_xds_dir = None
    """The ingress Envoy runs in a container of its own with its bootstrap given inline: it
    cannot read the control plane's files, so its routes are fixed at start."""

    def __init__(
        self,
        state_dir: Path,
        api_url: str,
        otlp_endpoint: str,
        image: str,
        project: str = "hopscope",
        node_networks: dict[str, str] | None = None,
        data_path: DataPath | None = None,
    ) -> None:
        import docker

        self.state_dir = state_dir
        self.otlp_endpoint = otlp_endpoint
        """Where pods send OTLP; ``{node_ip}``/``{node_net}`` are filled in per node."""
        self.processes = ProcessSupervisor(state_dir / "logs")
        self.system = SystemProcesses(
            self.processes,
            api_url,
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or api_url,
            data_path or UserspaceDataPath(),
        )
        self.client = docker.from_env(timeout=60)
        self.image = image
        self.project = project
        self.node_networks = node_networks or {n: f"hopscope-{n}" for n in addresses.NODE_IPS}
        self.remove_leftovers()
        self._own_routes()

    # -- set-up ---------------------------------------------------------------------------

    def _own_routes(self) -> None:
        """The Service range is local to the node (AnyIP), so kube-proxy can bind any VIP."""
        if shutil.which("ip") is None:
            raise RuntimeError(
                "the image has no `ip` (iproute2): the control plane and every pause container "
                "need it — build the image from compose/Dockerfile"
            )
        cmd = ["ip", "route", "replace", "local", addresses.SERVICE_CIDR, "dev", "lo"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"cannot add the Service route ({' '.join(cmd)}): {proc.stderr.strip()} — "
                "the control-plane container needs cap_add: NET_ADMIN"
            )

    def remove_leftovers(self) -> None:
        """Remove every container of this project's pods (from a crashed control plane)."""
        old = self.client.containers.list(
            all=True, filters={"label": f"{LABEL_PROJECT}={self.project}"}
        )
        # sidecars and apps first: they live in the pause container's namespace
        old.sort(key=lambda c: c.labels.get(LABEL_ROLE) == "pause")
        for container in old:
            try:
                container.remove(force=True)
            except Exception as exc:
                log.warning(
                    "could not remove container", extra={"name": container.name, "error": str(exc)}
                )
        if old:
            log.info("removed leftover pod containers", extra={"count": len(old)})

    # -- pods -----------------------------------------------------------------------------

    def _name(self, pod: Pod, role: str) -> str:
        return f"{self.project}-{pod.namespace}-{pod.name}-{role}"

    def _labels(self, pod: Pod, role: str) -> dict[str, str]:
        return {
            LABEL_PROJECT: self.project,
            LABEL_NAMESPACE: pod.namespace,
            LABEL_POD: pod.name,
            LABEL_NODE: pod.node,
            LABEL_ROLE: role,
        }

    def _pause(self, pod: Pod, ip: str, ports: dict[str, Any] | None = None) -> str:
        """The pod's network namespace: its IP on the node network and the node's routes."""
        node_ip = addresses.NODE_IPS[pod.node]
        routes = [f"ip route replace {addresses.SERVICE_CIDR} via {node_ip}"]
        routes += [
            f"ip route replace {cidr} via {node_ip}"
            for node, cidr in addresses.POD_CIDRS.items()
            if node != pod.node
        ]
        script = " && ".join(routes) + " && exec sleep infinity"
        network = self.node_networks[pod.node]
        api = self.client.api
        created = api.create_container(
            self.image,
            command=["sh", "-c", script],
            name=self._name(pod, "pause"),
            hostname=pod.name,
            labels=self._labels(pod, "pause"),
            user="0",
            ports=list(ports or {}),
            host_config=api.create_host_config(
                cap_add=["NET_ADMIN"],
                mem_limit=PAUSE_MEMORY,
                port_bindings=ports or None,
            ),
            networking_config=api.create_networking_config(
                {network: api.create_endpoint_config(ipv4_address=ip)}
            ),
        )
        api.start(created["Id"])
        return str(created["Id"])

    def _create(
        self,
        pod: Pod,
        role: str,
        pause_id: str,
        command: list[str],
        env: dict[str, str],
        memory: str,
    ) -> Any:
        """A container in the pod's network namespace, created but not started."""
        return self.client.containers.create(
            self.image,
            command=command,
            name=self._name(pod, role),
            labels=self._labels(pod, role),
            environment=env,
            network_mode=f"container:{pause_id}",
            user=SIDECAR_USER,
            mem_limit=memory,
        )

    def otlp_for(self, node: str) -> str:
        """Where a pod on ``node`` sends OTLP: ``{node_ip}`` / ``{node_net}`` in the configured
        endpoint are filled in, so pods need no DNS (Podman's CNI networks have none)."""
        node_ip = addresses.NODE_IPS[node]
        return self.otlp_endpoint.format(node_ip=node_ip, node_net=node_ip.rsplit(".", 1)[0])

    def log_sink_for(self, node: str) -> str | None:
        """Where a pod's Envoy ships access logs over OTLP/gRPC (``HOPSCOPE_ACCESS_LOG_OTLP``,
        same placeholders as the OTLP endpoint); None keeps them on stdout only."""
        template = os.environ.get("HOPSCOPE_ACCESS_LOG_OTLP", "")
        if not template:
            return None
        node_ip = addresses.NODE_IPS[node]
        return template.format(node_ip=node_ip, node_net=node_ip.rsplit(".", 1)[0])

    def sidecar_telemetry(self, node: str) -> tuple[str, str | None]:
        return self.otlp_for(node), self.log_sink_for(node)

    def start_pod(self, pod: Pod, state: ClusterState, files: Path | None = None) -> None:
        from mesh.envoy import envoy_flags, render_sidecar

        self.stop_pod(pod)  # a half-started earlier attempt
        pause = self._pause(pod, pod.ip)
        if pod.has_sidecar:
            otlp, sink = self.sidecar_telemetry(pod.node)
            config = render_sidecar(pod, state, otlp_endpoint=otlp, log_sink=sink, files=files)
            argv = [
                "envoy",
                "--config-yaml",
                json.dumps(config),
                *envoy_flags(pod.name, pod.owner_name),
            ]
            sidecar = self._create(pod, "envoy", pause, argv, {}, SIDECAR_MEMORY)
            if files is not None:
                self._copy_all(pod, sidecar)  # in place before Envoy reads them
            sidecar.start()
        for container in pod.containers:
            self._create(
                pod,
                container.name,
                pause,
                self._argv(container),
                self._container_env(pod, container),
                APP_MEMORY,
            ).start()

    # -- sidecar files: copied into the sidecar container, renamed into place -------------

    def sidecar_files(self, pod: Pod) -> SidecarFiles:
        return SidecarFiles(
            self.state_dir / "sidecars" / f"{pod.namespace}_{pod.name}", SIDECAR_DIR
        )

    def _copy_all(self, pod: Pod, container: Any) -> None:
        """The pod's certificate and xDS files into its (created, not started) proxy."""
        host_dir = self.sidecar_files(pod).host_dir
        names = sorted(p.name for p in host_dir.iterdir() if p.is_file())
        container.put_archive("/", _tar(host_dir, names, SIDECAR_DIR, with_dirs=True))

    def sidecar_files_changed(self, pod: Pod, names: list[str]) -> None:
        """Copy the files into the running sidecar next to where Envoy watches, then move
        each into place with one rename (in ``names`` order), so Envoy never reads half of
        one. The sidecar container cannot read the control plane's volume: each pod gets
        only its own key."""
        import docker.errors

        host_dir = self.sidecar_files(pod).host_dir
        moves = " && ".join(
            f"mv -f {SIDECAR_DIR / INCOMING / name} {SIDECAR_DIR / name}" for name in names
        )
        try:
            sidecar = self.client.containers.get(self._name(pod, "envoy"))
            sidecar.put_archive("/", _tar(host_dir, names, SIDECAR_DIR / INCOMING, with_dirs=False))
            code, output = sidecar.exec_run(["sh", "-c", moves], user=SIDECAR_USER)
        except docker.errors.NotFound:
            return  # not started yet (start_pod copies the files) or already gone
        except (docker.errors.APIError, OSError) as exc:
            # A sidecar stopping as we write: its replacement gets the files at start.
            log.warning("sidecar files not copied", extra={"pod": pod.name, "error": str(exc)})
            return
        if code != 0:
            log.warning(
                "sidecar files not moved into place",
                extra={"pod": pod.name, "error": output.decode(errors="replace")[-300:]},
            )

    def _argv(self, container: Container) -> list[str]:
        argv = [*container.command, *container.args]
        if not argv:
            raise RuntimeError(f"container {container.name!r} has no command")
        return argv

    def _container_env(self, pod: Pod, container: Container) -> dict[str, str]:
        env = container_env(pod, container, self.otlp_for(pod.node))
        for key in ("PATH", "HOME", "VIRTUAL_ENV", "PYTHONPATH", "TMPDIR"):
            env.pop(key, None)  # the image's own
        env["HOPSCOPE_ADDRESS_PLAN"] = addresses.PLAN
        if os.environ.get("HOPSCOPE_OTLP_LOGS"):
            env["HOPSCOPE_OTLP_LOGS"] = os.environ["HOPSCOPE_OTLP_LOGS"]
        return env

    def stop_pod(self, pod: Pod) -> None:
        roles = [c.name for c in pod.containers] + ["envoy", "pause"]
        for role in roles:
            try:
                container = self.client.containers.get(self._name(pod, role))
            except Exception:
                continue
            try:
                container.stop(timeout=2 if role != "pause" else 1)
                container.remove(force=True)
            except Exception as exc:
                log.warning(
                    "could not remove container", extra={"name": container.name, "error": str(exc)}
                )

    def container_statuses(self, pod: Pod) -> list[ProcessStatus]:
        names = [self._name(pod, c.name) for c in pod.containers]
        if pod.has_sidecar:
            names.append(self._name(pod, "envoy"))
        return [self._container_status(n) for n in names]

    def _container_status(self, name: str) -> ProcessStatus:
        try:
            state = self.client.containers.get(name).attrs.get("State") or {}
        except Exception:
            state = {}
        code = state.get("ExitCode")
        return ProcessStatus(
            name, bool(state.get("Running")), int(code) if code is not None else None
        )

    def restart_container(self, name: str) -> None:
        try:
            self.client.containers.get(name).restart(timeout=2)
        except Exception as exc:
            log.warning("could not restart container", extra={"name": name, "error": str(exc)})

    # -- system components -----------------------------------------------------------------

    def start_system_components(self) -> list[SystemComponent]:
        """DNS and the data path as processes; payments.example.net is a compose service on
        the external network, not ours to start."""
        host = addresses.EXTERNAL_HOSTS["payments.example.net."]
        internet = SystemComponent("payments.example.net", "internet", f"http://{host}:8080/health")
        return [*self.system.start(), internet]

    def start_ingress(self, state: ClusterState, identity: Path | None = None) -> SystemComponent:
        """The ingress controller pod: Envoy on the ingress address, published on 127.0.0.1."""
        from mesh.envoy import envoy_flags, render_ingress

        pod = ingress_pod()
        self.stop_pod(pod)
        # The HTTPS listener's certificates are inline in this bootstrap: a Secret or a TLS
        # Ingress applied later is served after the ingress pod restarts (no shared files).
        ports = {}
        for port, variable, default in (
            (addresses.INGRESS_PORT, "HOPSCOPE_INGRESS_PUBLISH", "127.0.0.1:8080"),
            (addresses.INGRESS_TLS_PORT, "HOPSCOPE_INGRESS_TLS_PUBLISH", "127.0.0.1:8443"),
        ):
            host_ip, _, host_port = os.environ.get(variable, default).rpartition(":")
            ports[f"{port}/tcp"] = (host_ip or "127.0.0.1", int(host_port))
        pause = self._pause(pod, addresses.INGRESS_IP, ports)
        config = render_ingress(
            state,
            otlp_endpoint=self.otlp_for("node-a"),
            log_sink=self.log_sink_for("node-a"),
            xds_dir=self.ingress_xds_dir,
            identity=identity,
        )
        argv = [
            "envoy",
            "--config-yaml",
            json.dumps(config),
            *envoy_flags("ingress-envoy", "ingress"),
        ]
        envoy = self._create(pod, "envoy", pause, argv, {}, SIDECAR_MEMORY)
        if identity is not None:
            self._copy_all(pod, envoy)
        envoy.start()
        url = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}/ready"
        return SystemComponent("ingress-envoy", "ingress", url)

    def shutdown(self) -> None:
        self.processes.stop_all()
        self.remove_leftovers()


# -- container health ----------------------------------------------------------------------

SERVED_MARK = Path("/tmp/hopscope-served")
"""Written once a request through the ingress succeeded; holds the start time of the
container's PID 1, so a restarted container has to serve again before it is healthy."""


def _tar(directory: Path, names: list[str], target: Path, with_dirs: bool) -> bytes:
    """A tar of ``directory``'s files ``names`` at ``target`` (absolute, stored relative to
    ``/``), owned by the sidecar's user with their own modes (keys stay 0600)."""
    buf = io.BytesIO()
    uid = int(SIDECAR_USER)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if with_dirs:
            for path in (target, target / INCOMING):
                info = tarfile.TarInfo(str(path).lstrip("/"))
                info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o700, uid, uid
                tar.addfile(info)
        for name in names:
            data = (directory / name).read_bytes()
            info = tarfile.TarInfo(str(target / name).lstrip("/"))
            info.size, info.uid, info.gid = len(data), uid, uid
            info.mode = (directory / name).stat().st_mode & 0o777
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _container_start() -> str:
    """PID 1's start time (clock ticks since boot, field 22 of ``/proc/1/stat``)."""
    try:
        stat = Path("/proc/1/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def healthcheck(api_url: str, ingress_host: str, timeout: float = 5.0) -> str | None:
    """None when healthy, else why not.

    Healthy means: the API answers, and since this container started, a request through
    the ingress (``GET /`` with ``Host: ingress_host``, the whole request journey) has
    succeeded once. After that only the API is checked: a scenario that breaks the journey
    on purpose must not turn the control plane unhealthy."""
    try:
        with urllib.request.urlopen(f"{api_url}/api/v1/status", timeout=timeout) as resp:
            status = json.load(resp)
    except (OSError, ValueError) as exc:
        return f"the API at {api_url} does not answer: {exc}"
    started = _container_start()
    try:
        if SERVED_MARK.read_text() == started:
            return None
    except OSError:
        pass
    if not status.get("ready"):
        return f"the cluster is not ready: {status.get('summary', '')}"
    url = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_PORT}/"
    request = urllib.request.Request(
        url, headers={"Host": ingress_host, "User-Agent": "hopscope-healthcheck"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        return f"the ingress answered {exc.code} for http://{ingress_host}/"
    except OSError as exc:
        return f"the ingress at {url} does not answer: {exc}"
    SERVED_MARK.write_text(started)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.runtime.docker",
        description="Health of the compose control-plane container.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("healthcheck", help="exit 0 once the ingress has served a request")
    check.add_argument("--api", default="http://127.0.0.1:8001")
    check.add_argument("--ingress-host", default="shop.local")
    args = parser.parse_args(argv)
    problem = healthcheck(args.api, args.ingress_host)
    if problem is None:
        return 0
    print(problem, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
