"""``hopscope dig``: ask cluster DNS like `dig`, from outside or with a pod's resolv.conf."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from mesh import addresses
from mesh.cli._client import APIClient
from mesh.model.types import ClusterState

TYPES = ("A", "AAAA", "SRV", "PTR", "CNAME", "ANY", "TXT", "NS", "SOA")


def _ask(
    name: str,
    rdtype: str,
    source: str | None,
    tcp: bool,
    server: tuple[str, int] = (addresses.DNS_SERVICE_IP, addresses.DNS_PORT),
    netns: str | None = None,
) -> tuple[dns.message.Message, float]:
    """One query to ``server``, from ``source`` or from inside ``netns`` (the kernel data
    path: the pod's namespace, or the cluster host's)."""
    from mesh.kernel.forward import in_netns

    query = dns.message.make_query(name, rdtype)
    query.flags |= dns.flags.RD
    host, port = server
    start = time.perf_counter()
    try:
        with in_netns(netns):
            return _send(query, host, port, source, tcp), (time.perf_counter() - start) * 1000
    except dns.exception.Timeout:
        raise click.ClickException(
            f"no answer from cluster DNS at {host}:{port} within 3 s (is the cluster up?)"
        ) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach cluster DNS at {host}:{port}: {exc}") from None


def _send(
    query: dns.message.Message, server: str, port: int, source: str | None, tcp: bool
) -> dns.message.Message:
    if tcp:
        return dns.query.tcp(query, server, port=port, timeout=3, source=source)
    return dns.query.udp(query, server, port=port, timeout=3, source=source)


def _records(section: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": rrset.name.to_text(),
            "ttl": rrset.ttl,
            "class": dns.rdataclass.to_text(rrset.rdclass),
            "type": dns.rdatatype.to_text(rrset.rdtype),
            "data": r.to_text(),
        }
        for rrset in section
        for r in rrset
    ]


@click.command()
@click.argument("name")
@click.argument(
    "rdtype", metavar="[TYPE]", default="A", type=click.Choice(TYPES, case_sensitive=False)
)
@click.option(
    "--from", "from_pod", metavar="POD", help="Resolve as this pod: search path, ndots:5, its IP."
)
@click.option("--tcp", is_flag=True, help="Ask over TCP instead of UDP.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def dig(name: str, rdtype: str, from_pod: str | None, tcp: bool, as_json: bool) -> None:
    """Query cluster DNS and print the answer the way dig does.

    Without --from, NAME is asked as given (like `dig @127.96.0.10 -p 10053 NAME`). With
    --from POD, the pod's resolver rules apply: the search path
    `<ns>.svc.cluster.local svc.cluster.local cluster.local` and ndots:5, so a short name
    like `catalog` works and an outside name first costs the search-path NXDOMAINs.
    """
    from mesh.cli.kernel_cmds import host_netns, kernel_status, pod_netns
    from mesh.dns.resolver import candidates

    rdtype = rdtype.upper()
    source = None
    names = [name if name.endswith(".") else name + "."]
    server = (addresses.DNS_SERVICE_IP, addresses.DNS_PORT)
    netns = None
    status = kernel_status()  # the kernel data path: ask from inside the cluster's network
    if status is not None:
        host, _, port = str(status["cluster_dns"]).rpartition(":")
        server, netns = (host, int(port)), host_netns(status)
    pod_ip = None
    if from_pod:
        state = ClusterState.from_dict(APIClient().get("/api/v1/state"))
        ns, _, pod_name = from_pod.rpartition("/")
        pod = next((p for p in state.pods if p.name == pod_name and ns in ("", p.namespace)), None)
        if pod is None:
            raise click.ClickException(f"pod {from_pod!r} not found (`hopscope get pods`)")
        source = pod_ip = pod.ip
        if status is not None:  # from the pod's own namespace, its address the only one
            source, netns = None, pod_netns(status, f"{pod.namespace}/{pod.name}")
        search = [f"{pod.namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"]
        names = candidates(name, search, 5)
    tried = []
    reply, elapsed = None, 0.0
    for qname in names:
        reply, took = _ask(qname, rdtype, source, tcp, server, netns)
        elapsed += took
        tried.append({"name": qname, "status": dns.rcode.to_text(reply.rcode())})
        if reply.rcode() == dns.rcode.NOERROR and reply.answer:
            break
    assert reply is not None
    doc = {
        "name": name,
        "type": rdtype,
        "server": f"{server[0]}#{server[1]}",
        "protocol": "TCP" if tcp else "UDP",
        "from": pod_ip,
        "status": dns.rcode.to_text(reply.rcode()),
        "flags": dns.flags.to_text(reply.flags).lower().split(),
        "queries": tried,
        "question": tried[-1]["name"],
        "answer": _records(reply.answer),
        "additional": _records(reply.additional),
        "query_time_ms": round(elapsed, 3),
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    _print_dig(doc, rdtype, reply)


def _print_dig(doc: dict[str, Any], rdtype: str, reply: dns.message.Message) -> None:
    echo = click.echo
    echo(
        f"; <<>> hopscope dig <<>> {doc['name']} {rdtype}"
        + (f" (from {doc['from']})" if doc["from"] else "")
    )
    if len(doc["queries"]) > 1:
        tried = ", ".join(f"{q['name']} {q['status']}" for q in doc["queries"])
        echo(f";; search path: {tried}")
    echo(f";; ->>HEADER<<- opcode: QUERY, status: {doc['status']}, id: {reply.id}")
    echo(
        f";; flags: {' '.join(doc['flags'])}; QUERY: 1, ANSWER: {len(doc['answer'])}, "
        f"AUTHORITY: 0, ADDITIONAL: {len(doc['additional'])}"
    )
    echo("")
    echo(";; QUESTION SECTION:")
    echo(f";{doc['question']}\t\tIN\t{rdtype}")
    for title, rows in (("ANSWER", doc["answer"]), ("ADDITIONAL", doc["additional"])):
        if rows:
            echo("")
            echo(f";; {title} SECTION:")
            for r in rows:
                echo(f"{r['name']}\t{r['ttl']}\t{r['class']}\t{r['type']}\t{r['data']}")
    echo("")
    echo(f";; Query time: {doc['query_time_ms']:.1f} msec")
    echo(f";; SERVER: {doc['server']}({addresses.DNS_SERVICE_IP}) ({doc['protocol']})")
