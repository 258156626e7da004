"""Break-it scenarios of the mesh's mutual TLS: a plaintext caller meets STRICT, and a
workload certificate that has expired.

Both turn mTLS on for the catalog alone (a ``PeerAuthentication`` with a selector), so the
ingress → frontend hop stays as shipped and the failure sits exactly on frontend → catalog.
"""

from __future__ import annotations

from typing import Any

from mesh.scenarios.base import BlameCheck, Context
from mesh.scenarios.library import SCENARIOS, Scenario
from mesh.scenarios.routing import until_outbound
from mesh.traffic.engine import Outcome

CATALOG_STRICT: dict[str, Any] = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "catalog-strict", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "catalog"}}, "mtls": {"mode": "STRICT"}},
}

CATALOG_PLAINTEXT: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "catalog", "namespace": "shop"},
    "spec": {"host": "catalog", "trafficPolicy": {"tls": {"mode": "DISABLE"}}},
}


def _mesh_settled(ctx: Context, want: str) -> None:
    """Until the frontend → catalog hops show ``want`` (``mtls``/``plaintext``) as their
    TLS mode towards a STRICT catalog: every frontend sidecar has taken the new policy."""
    until_outbound(
        ctx,
        lambda a: (
            a.get("k8s.service.name") == "catalog"
            and a.get("hopscope.tls.mode") == want
            and a.get("hopscope.mtls.peer_mode") == "STRICT"
        ),
        f"{want} to a STRICT catalog",
    )


class StrictPlaintext(Scenario):
    name = "mtls-strict-plaintext"
    title = "STRICT mTLS on the catalog, and a DestinationRule that still sends plaintext"
    story = (
        "The team turns on STRICT mTLS for the catalog (a PeerAuthentication with a "
        "selector). Someone had copied a DestinationRule for the catalog from a mesh without "
        "mTLS — trafficPolicy.tls.mode DISABLE — so the frontend's sidecar keeps speaking "
        "plaintext. The catalog's sidecar has no filter chain for plaintext: it closes every "
        "such connection before reading a byte of HTTP, and logs why (response flag NR). "
        "The frontend's sidecar sees the connection end and answers 503 UC — the classic "
        "'503 after enabling STRICT'."
    )
    breaks = (
        "applies PeerAuthentication shop/catalog-strict (STRICT, app=catalog) and "
        "DestinationRule shop/catalog (tls.mode DISABLE)"
    )
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "the frontend's sidecar-outbound span to catalog: 503 UC, hopscope.tls.mode plaintext, "
        "hopscope.mtls.peer_mode STRICT, hopscope.mtls.origination names the DestinationRule",
        "the catalog sidecar's log: 'connection refused: no filter chain accepts it' with "
        "response_flags NR and the policy's name",
        "no span from the catalog's side: the request never reached HTTP there",
    )
    dashboard = "Mesh: mTLS, retries and canaries"
    blame = BlameCheck("sidecar-outbound", "sidecar-inbound", ("refused a plaintext", "STRICT"))

    def inject(self, ctx: Context) -> None:
        ctx.apply([CATALOG_STRICT, CATALOG_PLAINTEXT], self.name)
        _mesh_settled(ctx, "plaintext")

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 10, rps=5)

    def restore(self, ctx: Context) -> None:
        ctx.delete([CATALOG_PLAINTEXT, CATALOG_STRICT], self.name)


class ExpiredCertificate(Scenario):
    name = "mtls-expired-cert"
    title = "mTLS with a workload certificate that has expired"
    story = (
        "mTLS is on for the catalog (STRICT), and its certificates stop being renewed — the "
        "control plane hands the catalog's sidecars a certificate that expired an hour ago "
        "(`hopscope cert pod … --expire`; in a real mesh: a stuck agent, a clock jump, a CA "
        "outage longer than the certificate's life). The frontend's sidecar checks the "
        "catalog's certificate during the handshake and refuses it: no HTTP is exchanged, "
        "the frontend's sidecar answers 503 UF and its span carries the TLS failure reason."
    )
    breaks = (
        "applies PeerAuthentication shop/catalog-strict (STRICT, app=catalog), then swaps an "
        "expired certificate into every catalog sidecar (no restart)"
    )
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "the frontend's sidecar-outbound span to catalog: 503 UF, hopscope.upstream.failure "
        "with CERTIFICATE_VERIFY_FAILED (certificate has expired)",
        "`hopscope cert pod <catalog pod>`: NOT AFTER in the past (EXPIRED)",
        "after the scenario, `--renew` fixes it without restarting a pod",
    )
    dashboard = "Mesh: mTLS, retries and canaries"
    blame = BlameCheck("sidecar-outbound", "sidecar-outbound", ("certificate has expired",))

    def inject(self, ctx: Context) -> None:
        ctx.apply([CATALOG_STRICT], self.name)
        _mesh_settled(ctx, "mtls")
        for pod in ctx.pods("shop", "catalog"):
            ctx.api.post(f"/api/v1/pods/shop/{pod.name}/certificate", {"expired": True})
            ctx.say(f"pod {pod.name}: its certificate expired an hour ago")

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 10, rps=5)

    def restore(self, ctx: Context) -> None:
        for pod in ctx.pods("shop", "catalog"):
            ctx.api.post(f"/api/v1/pods/shop/{pod.name}/certificate", {"expired": False})
        ctx.delete([CATALOG_STRICT], self.name)


for _scenario in (StrictPlaintext, ExpiredCertificate):
    SCENARIOS[_scenario.name] = _scenario
