"""Scenarios at the edge: what the ingress does with TLS."""

from __future__ import annotations

import copy
import ssl
import time
from typing import Any

from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh import addresses
from mesh.model.k8s_objects import tls_secret_document
from mesh.scenarios.base import Context, Finding, ScenarioError, lab_docs, spans_of
from mesh.scenarios.library import SCENARIOS, Scenario
from mesh.traffic.engine import Outcome

MANIFEST = "ingress-tls-sni.yaml"
TERMINATED = ("secure.shop.local", "www.shop.local")
PASSTHROUGH = "vault.edge.local"
SECRETS = {"secure.shop.local": "secure-shop-tls", "www.shop.local": "www-shop-tls"}
REQUESTS_PER_HOST = 3


def _cluster_ca() -> Any:
    """The cluster CA the control plane keeps in its state directory (as a cert-manager CA
    issuer would hold it), to issue the scenario's certificates."""
    from mesh.apiclient import state_dir
    from mesh.controlplane.mesh import IDENTITY_DIR
    from mesh.identity.ca import ROOT_KEY_FILE, CertificateAuthority, IdentityError

    directory = state_dir(create=False) / IDENTITY_DIR
    if not (directory / ROOT_KEY_FILE).is_file():
        raise ScenarioError(
            f"the cluster CA is not in {directory}: run the scenario as the user who ran "
            "`hopscope up` (with the same HOPSCOPE_HOME)"
        )
    try:
        return CertificateAuthority.load_or_create(directory)
    except IdentityError as exc:
        raise ScenarioError(str(exc)) from None


class IngressSni(Scenario):
    name = "ingress-sni"
    title = "One ingress address, three HTTPS sites: SNI picks the certificate"
    story = (
        "Three sites share the ingress's one address and port. Before any HTTP is spoken, the "
        "client names the site it wants in the TLS ClientHello (SNI), and the ingress picks a "
        "filter chain by that name: secure.shop.local and www.shop.local each get their own "
        "certificate from a kubernetes.io/tls Secret and TLS ends at the ingress, which then "
        "routes by Host like any HTTP request; vault.edge.local is ssl-passthrough — the "
        "ingress reads only the SNI and splices the still-encrypted bytes to a pod that "
        "terminates TLS itself, so the certificate the client sees is the pod's and the "
        "ingress has no HTTP span at all. Plain HTTP to secure.shop.local is answered 308."
    )
    breaks = (
        "nothing breaks: issues certificates from the cluster CA into two TLS Secrets, "
        "applies Ingress shop/shop-tls (spec.tls, ssl-redirect) and an ssl-passthrough "
        "Ingress edge/vault in front of a TLS-terminating pod"
    )
    traffic = (
        f"{REQUESTS_PER_HOST} HTTPS requests to each host at "
        f"{addresses.INGRESS_IP}:{addresses.INGRESS_TLS_PORT} (SNI = host), one plain-HTTP "
        "request to http://secure.shop.local/"
    )
    look_for = (
        "the ingress span of a secure.shop.local request: hopscope.tls.terminated_by=ingress, "
        "tls.client.server_name, tls.protocol.version, hopscope.tls.secret",
        "a vault.edge.local trace: no ingress span; the tls-echo app span says "
        "hopscope.tls.terminated_by=app; the ingress's access log has tls_mode=passthrough",
        "`hopscope curl --cacert $HOPSCOPE_HOME/identity/root-cert.pem "
        "https://www.shop.local/`: the certificate names www.shop.local",
    )
    dashboard = "Envoy: ingress and sidecars"

    def inject(self, ctx: Context) -> None:
        ca = _cluster_ca()
        self.root_pem = ca.root_pem
        self.serials: dict[str, str] = {}
        secrets = []
        for host in TERMINATED:
            cert, key = ca.issue_server_certificate([host])
            self.serials[host] = _serial(cert)
            secrets.append(tls_secret_document("shop", SECRETS[host], cert, key))
        cert, key = ca.issue_server_certificate([PASSTHROUGH])
        self.serials[PASSTHROUGH] = _serial(cert)
        docs = copy.deepcopy(lab_docs(MANIFEST))
        for doc in docs:
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                container["env"] = [
                    {"name": "TLS_CERT", "value": cert.decode()},
                    {"name": "TLS_KEY", "value": key.decode()},
                ]
        self.applied = secrets + docs
        ctx.apply(self.applied, MANIFEST)
        ctx.wait_ready("edge", "tls-echo", 1)
        ctx.say("waiting for the ingress to serve the new hosts")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(self._get(ctx, h)[0].status == 200 for h in (*TERMINATED, PASSTHROUGH)):
                return
            time.sleep(0.5)
        raise ScenarioError(
            "the ingress did not serve the TLS hosts within 20 s (in the compose stack the "
            "ingress reads TLS Secrets only when it starts: see docs/design.md, Ingress TLS)"
        )

    def _get(self, ctx: Context, host: str, secure: bool = True) -> tuple[Outcome, dict[str, str]]:
        from mesh.cli.curl_cmd import Target, send_request

        port = addresses.INGRESS_TLS_PORT if secure else addresses.INGRESS_PORT
        target = Target(
            addresses.INGRESS_IP,
            port,
            addresses.EXTERNAL_CLIENT_IP,
            host,
            "/",
            {},
            "",
            ssl.create_default_context(cadata=self.root_pem.decode()) if secure else None,
            host,
        )
        tracer = ctx.tracer().get_tracer("hopscope.scenario")
        scheme = "https" if secure else "http"
        started = time.perf_counter()
        with tracer.start_as_current_span(
            f"client GET {scheme}://{host}/", kind=SpanKind.CLIENT
        ) as span:
            span.set_attributes({"hopscope.hop": "client", "url.full": f"{scheme}://{host}/"})
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                status, _reason, _body, headers = send_request(target, "GET", None, carrier)
            except Exception as exc:  # a refused or failed handshake is an outcome here
                return Outcome("/", 0, 0, trace_id, str(exc)), {}
            span.set_attributes({"http.response.status_code": status, **target.tls_info})
        latency = int((time.perf_counter() - started) * 1e6)
        return Outcome("/", status, latency, trace_id), {**headers, **target.tls_info}

    def drive(self, ctx: Context) -> list[Outcome]:
        self.seen: dict[str, list[dict[str, str]]] = {}
        outcomes = []
        for host in (*TERMINATED, PASSTHROUGH):
            for _ in range(REQUESTS_PER_HOST):
                outcome, info = self._get(ctx, host)
                outcomes.append(outcome)
                self.seen.setdefault(host, []).append(info)
        self.redirect, headers = self._get(ctx, TERMINATED[0], secure=False)
        self.location = headers.get("Location", headers.get("location", ""))
        ctx.tracer().force_flush()
        return outcomes

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        lines, traces, ok = [], [], True
        hosts = [h for h in (*TERMINATED, PASSTHROUGH) for _ in range(REQUESTS_PER_HOST)]
        for host, outcome, info in zip(
            hosts,
            outcomes,
            [i for h in (*TERMINATED, PASSTHROUGH) for i in self.seen[h]],
            strict=True,
        ):
            right_cert = info.get("tls.server.serial") == self.serials[host]
            ended = self._where_tls_ended(ctx, outcome.trace_id, host)
            want = "app" if host == PASSTHROUGH else "ingress"
            good = outcome.status == 200 and right_cert and ended == want
            ok = ok and good
            traces.append(outcome.trace_id)
            lines.append(
                f"{host}: {outcome.status or outcome.error}, certificate "
                f"{'issued for it' if right_cert else 'NOT the expected one'}, "
                f"TLS ended at {ended or '?'} {'✓' if good else '✗'}"
            )
        https = f"https://{TERMINATED[0]}:{addresses.INGRESS_TLS_PORT}/"
        redirected = self.redirect.status == 308 and self.location == https
        lines.append(f"http://{TERMINATED[0]}/: {self.redirect.status} → {self.location or '-'}")
        ok = ok and redirected
        verdict = (
            f"one address, three certificates: {', '.join(TERMINATED)} got their own Secret's "
            f"certificate and TLS ended at the ingress; {PASSTHROUGH} got the pod's own "
            "certificate and TLS ended in the app (no ingress span); plain HTTP got 308"
            if ok
            else "the TLS paths did not show as expected"
        )
        return Finding(ok, verdict, lines, traces[::REQUESTS_PER_HOST])

    @staticmethod
    def _where_tls_ended(ctx: Context, trace_id: str, host: str) -> str:
        """``ingress`` or ``app``: whose span says it terminated the request's TLS."""

        def says(view: dict[str, Any]) -> str:
            for hop in ("ingress", "app"):
                for span in spans_of(view, hop):
                    a = span["attributes"]
                    if a.get("hopscope.tls.terminated_by") and a.get("tls.client.server_name") in (
                        host,
                        None,
                    ):
                        return str(a["hopscope.tls.terminated_by"])
            return ""

        view = ctx.trace(trace_id, lambda v: bool(says(v)) and bool(spans_of(v, "app")))
        if view is None:
            return ""
        ended = says(view)
        if ended == "app" and spans_of(view, "ingress"):
            return "app, but the ingress has a span"  # passthrough must not read HTTP
        return ended

    def restore(self, ctx: Context) -> None:
        docs = [d for d in getattr(self, "applied", []) if d["kind"] != "Namespace"]
        if not docs:
            docs = [d for d in lab_docs(MANIFEST) if d["kind"] != "Namespace"]
        ctx.delete(docs, MANIFEST)


def _serial(cert_pem: bytes) -> str:
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


SCENARIOS[IngressSni.name] = IngressSni
