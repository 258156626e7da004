"""``python -m mesh.kubeproxy --api URL``: run the kube-proxy emulator."""

from __future__ import annotations

import argparse
from pathlib import Path

from mesh import addresses
from mesh.kubeproxy import daemon
from mesh.kubeproxy.daemon import KubeProxySettings


def parse_args(argv: list[str] | None = None) -> KubeProxySettings:
    parser = argparse.ArgumentParser(prog="python -m mesh.kubeproxy", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--api", help="control-plane API URL to watch")
    source.add_argument(
        "--state-file", type=Path, help="serve a fixed ClusterState (JSON) instead (benchmarks)"
    )
    parser.add_argument(
        "--hop-telemetry",
        choices=["on", "off"],
        default="on",
        help="per-request kube-proxy spans (parses HTTP); off splices connections as plain TCP",
    )
    parser.add_argument(
        "--event-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="uvloop (libuv) roughly doubles the data path's throughput",
    )
    parser.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=1.0,
        help="share of new traces sampled (a sampled caller's requests are always traced)",
    )
    parser.add_argument("--metrics-address", default=addresses.NODE_IPS["node-a"])
    parser.add_argument("--metrics-port", type=int, default=addresses.KUBE_PROXY_METRICS_PORT)
    parser.add_argument(
        "--min-sync-period",
        type=float,
        default=0.0,
        help="seconds between rule syncs at most (KubeProxyConfiguration minSyncPeriod)",
    )
    args = parser.parse_args(argv)
    if args.state_file is not None and not args.state_file.is_file():
        parser.error(f"--state-file {args.state_file}: no such file")
    args.hop_telemetry = args.hop_telemetry == "on"
    return KubeProxySettings(**vars(args))


def main(argv: list[str] | None = None) -> None:
    daemon.main(parse_args(argv))


if __name__ == "__main__":
    main()
