"""``hopscope exec``, and the kernel side of ``conntrack`` and ``iptables-save``.

With ``hopscope up --dataplane kernel`` every node and pod is a network namespace
(``hopscope-node-a``, ``hopscope-pod-shop-frontend-…``): these commands look inside them —
the node's live netfilter rules, the kernel's conntrack table, or any program (``ip
route``, ``tcpdump -ni any``, ``ss -tn``) run in a node's or pod's network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import click

from mesh.cli._client import APIClient
from mesh.kernel.topology import host_netns_name, node_netns_name, pod_netns_name

USERSPACE_NOTE = (
    "the cluster runs the userspace data path: nodes and pods share the host's network, "
    "there is no namespace to enter (start it with `hopscope up --dataplane kernel`)"
)


def kernel_status() -> dict[str, Any] | None:
    """The running cluster's status if it runs the kernel data path, else None. A rootless
    cluster's namespaces are reachable only from inside its user namespace: this command
    then runs again there (:func:`enter_cluster`) and does not return."""
    status: dict[str, Any] = APIClient().get("/api/v1/status")
    if status.get("dataplane") != "kernel":
        return None
    enter_cluster(status)
    return status


def enter_cluster(status: dict[str, Any]) -> None:
    """For a rootless cluster, run this same command again inside the control plane's user,
    mount and network namespaces (as their root); nothing for a root cluster, or once inside."""
    from mesh.kernel.rootless import INSIDE_ENV, enter_argv

    if status.get("privileges") != "rootless" or os.environ.get(INSIDE_ENV):
        return
    if shutil.which("nsenter") is None:
        raise click.ClickException("`nsenter` (util-linux) is not installed")
    argv = enter_argv(int(status["pid"]), [sys.executable, "-m", "mesh.cli", *sys.argv[1:]])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, {**os.environ, INSIDE_ENV: "1"})


def node_netns(status: dict[str, Any], node: str) -> str:
    nodes = sorted({p["node"] for p in status["pods"] if p.get("node")} | {"node-a", "node-b"})
    if node not in nodes:
        raise click.ClickException(f"node {node!r} not found; nodes: {', '.join(nodes)}")
    return node_netns_name(str(status["netns_prefix"]), node)


def host_netns(status: dict[str, Any]) -> str:
    return host_netns_name(str(status["netns_prefix"]))


def pod_netns(status: dict[str, Any], ref: str) -> str:
    """The namespace of pod ``ref`` (``NS/NAME``, or ``NAME`` in ``shop``)."""
    namespace, _, name = ref.rpartition("/")
    namespace = namespace or "shop"
    for pod in status["pods"]:
        if pod["name"] == name and pod["namespace"] == namespace:
            return pod_netns_name(str(status["netns_prefix"]), namespace, name)
    raise click.ClickException(
        f"pod {namespace}/{name} not found (`hopscope get pods -o wide` lists them)"
    )


def run_in(netns: str, argv: list[str], capture: bool = False) -> subprocess.CompletedProcess[str]:
    if shutil.which("ip") is None:
        raise click.ClickException("`ip` (iproute2) is not installed")
    if os.geteuid() != 0:
        raise click.ClickException("entering the cluster's namespaces needs root")
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=capture, text=True, check=False
    )


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--node", help="Run in this node's network namespace (e.g. node-a).")
@click.option("--pod", help="Run in this pod's network namespace (NAME or NAMESPACE/NAME).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(node: str | None, pod: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a node's or a pod's network (kernel data path).

    \b
    hopscope exec --node node-a -- iptables-save -t nat
    hopscope exec --node node-b -- ip -s link show flannel.1
    hopscope exec --pod frontend-7d9c… -- ss -tn
    hopscope exec --node node-a -- tcpdump -ni any port 8472
    """
    if (node is None) == (pod is None):
        raise click.UsageError("give exactly one of --node or --pod")
    status = kernel_status()
    if status is None:
        raise click.ClickException(USERSPACE_NOTE)
    netns = node_netns(status, node) if node else pod_netns(status, str(pod))
    if shutil.which(command[0]) is None:
        raise click.ClickException(f"{command[0]}: command not found on this machine")
    done = run_in(netns, list(command))
    raise SystemExit(done.returncode)
