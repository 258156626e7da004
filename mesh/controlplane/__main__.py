"""``python -m mesh.controlplane``: run the local control plane (what ``hopscope up`` starts)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mesh.controlplane.server import ControlPlane, StartupError
from mesh.model.manifests import ManifestError
from mesh.tracestore.store import TRACE_STORE_BUDGET, budget_from_env, parse_budget
from telemetry.logs import setup_json_logging


def _budget(text: str) -> int:
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (and ``HOPSCOPE_TRACE_STORE_BUDGET``) read into settings; a bad
    value exits 2 with a one-line error naming the flag or the variable."""
    parser = argparse.ArgumentParser(prog="python -m mesh.controlplane", description=__doc__)
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        type=Path,
        help="manifest file or directory (repeatable)",
    )
    parser.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        help="where logs, pid file and rendered Envoy configs go",
    )
    parser.add_argument(
        "--schema-checked",
        action="store_true",
        help="the caller has just validated these files against the schema (`hopscope up`)",
    )
    parser.add_argument(
        "--runtime",
        choices=["local", "docker"],
        default="local",
        help="local: pods are processes; docker: pods are containers (the compose stack)",
    )
    parser.add_argument(
        "--dataplane",
        choices=["userspace", "kernel"],
        default="userspace",
        help="userspace: kube-proxy and the overlay are relays; kernel: nodes and pods are "
        "network namespaces with real netfilter rules, bridges and VXLAN (local runtime; root, "
        "or root of a user namespace)",
    )
    parser.add_argument("--image", default="hopscope/hopscope", help="pod image (docker runtime)")
    parser.add_argument("--project", default="hopscope", help="label of the pod containers")
    parser.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("HOPSCOPE_OTLP_ENDPOINT", ""),
        help="where pods send OTLP (docker runtime; default: the control plane itself)",
    )
    parser.add_argument(
        "--trace-store-budget",
        type=_budget,
        metavar="SIZE",
        help=f"memory the trace store may use, e.g. 256MiB (env {TRACE_STORE_BUDGET}; "
        "default 256MiB); the oldest traces are evicted beyond it",
    )
    args = parser.parse_args(argv)
    if args.trace_store_budget is None:
        try:  # the compose path: the error names the variable the user set, not the flag
            args.trace_store_budget = budget_from_env()
        except ValueError as exc:
            parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_json_logging({"component": "controlplane"})
    args.state_dir.mkdir(parents=True, exist_ok=True)
    network = None
    try:
        runtime = None
        if args.dataplane == "kernel":
            if args.runtime != "local":
                print("error: --dataplane kernel needs the local runtime", file=sys.stderr)
                return 2
            from mesh.runtime.kernel import KernelSetupError, enter_cluster_host

            try:  # before any thread starts: they are born in the cluster host's namespace
                network = enter_cluster_host()
            except KernelSetupError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        if args.runtime == "docker":
            from mesh.controlplane.server import API_URL
            from mesh.runtime.docker import DockerRuntime

            runtime = DockerRuntime(
                args.state_dir,
                API_URL,
                args.otlp_endpoint or API_URL,
                image=args.image,
                project=args.project,
            )
        plane = ControlPlane(
            args.filename,
            args.state_dir,
            args.schema_checked,
            runtime,
            trace_store_budget=args.trace_store_budget,
            kernel_network=network,
        )
        return plane.run()
    except (ManifestError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if network is not None:
            network.cleanup()
        return 1


if __name__ == "__main__":
    sys.exit(main())
