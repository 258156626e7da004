"""Cluster DNS: ``python -m mesh.dns --api URL`` serves ``cluster.local`` over UDP and TCP.

It watches the control plane for the cluster state, answers from :mod:`mesh.dns.zone`, and
exports CoreDNS-named Prometheus metrics (:mod:`mesh.dns.server`).
"""

from __future__ import annotations

import argparse

from mesh import addresses
from mesh.dns import server
from mesh.dns.server import DnsSettings
from mesh.dns.zone import DEFAULT_TTL


def parse_args(argv: list[str] | None = None) -> DnsSettings:
    parser = argparse.ArgumentParser(prog="python -m mesh.dns", description=__doc__)
    parser.add_argument("--api", required=True, help="control-plane API URL")
    parser.add_argument("--listen", default=addresses.DNS_SERVICE_IP)
    parser.add_argument("--port", type=int, default=addresses.DNS_PORT)
    parser.add_argument("--metrics-port", type=int, default=addresses.DNS_METRICS_PORT)
    parser.add_argument("--metrics-address", default=addresses.DNS_METRICS_IP)
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="answer TTL in seconds")
    args = parser.parse_args(argv)
    return DnsSettings(**vars(args))


def main(argv: list[str] | None = None) -> None:
    server.main(parse_args(argv))


if __name__ == "__main__":
    main()
