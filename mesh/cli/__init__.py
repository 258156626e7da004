"""The ``hopscope`` command line, kubectl-like.

Each command module holds one group of commands; this module assembles them. Commands talk
to the running control plane over its HTTP API (:mod:`mesh.cli._client`), so errors are one
clear line and a non-zero exit (click's ``ClickException``).
"""

from __future__ import annotations

import click

from mesh.cli.cluster_cmds import down, status, up
from mesh.cli.curl_cmd import curl
from mesh.cli.dig_cmd import dig
from mesh.cli.get_cmds import get
from mesh.cli.iptables_cmd import iptables_save
from mesh.cli.kernel_cmds import exec_
from mesh.cli.manage_cmds import apply, cert, conntrack, delete, kill, ready, scale
from mesh.cli.scenario_cmds import scenario
from mesh.cli.trace_cmds import trace
from mesh.cli.traffic_cmd import traffic

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hopscope")
def cli() -> None:
    """hopscope — see how a request really travels through Kubernetes.

    Start the sample cluster with `hopscope up`, send a request with
    `hopscope curl http://shop.local/`, then follow it hop by hop with
    `hopscope trace --last`.
    """


for command in (
    up,
    down,
    status,
    get,
    apply,
    delete,
    scale,
    ready,
    kill,
    curl,
    dig,
    trace,
    cert,
    conntrack,
    iptables_save,
    exec_,
    traffic,
    scenario,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="hopscope")
