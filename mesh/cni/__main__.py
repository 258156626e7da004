"""``python -m mesh.cni --api URL``: the CNI emulator's data path on every node.

Runs, per node, the overlay tunnel endpoint (``node-ip:8472``) and the egress SNAT gateway
(``node-ip:15080``), and follows the ``kube-system/hopscope-cni`` settings (VNI, overlay
delay, egress IPs) from the control plane. Prometheus metrics on ``node-a-ip:9091``.
"""

from __future__ import annotations

import argparse

from mesh import addresses
from mesh.cni import daemon
from mesh.cni.daemon import CniSettings


def parse_args(argv: list[str] | None = None) -> CniSettings:
    parser = argparse.ArgumentParser(prog="python -m mesh.cni", description=__doc__)
    parser.add_argument("--api", help="control-plane API URL to watch (omit: defaults only)")
    parser.add_argument("--vtep-port", type=int, default=addresses.VTEP_PORT)
    parser.add_argument("--metrics-address", default=addresses.NODE_IPS["node-a"])
    parser.add_argument("--metrics-port", type=int, default=addresses.CNI_METRICS_PORT)
    args = parser.parse_args(argv)
    return CniSettings(**vars(args))


def main(argv: list[str] | None = None) -> None:
    daemon.main(parse_args(argv))


if __name__ == "__main__":
    main()
