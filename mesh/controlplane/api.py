"""The control-plane HTTP API: cluster state (with watch), pod actions, OTLP receiver, traces.

One Flask app serves everything on ``CONTROL_PLANE_IP:CONTROL_PLANE_PORT``:

* ``GET  /api/v1/state[?after=N&timeout=S]`` — the ClusterState; long-polls with ``after``.
  Without the API token the values of every Secret come back blank (keys and type stay).
* ``GET  /api/v1/status`` — component and pod readiness (``hopscope status``).
* ``POST /v1/traces`` — OTLP/HTTP trace export (protobuf or JSON, gzip or not), into the
  trace store. The cluster's components send to the receiver's own listener
  (:mod:`mesh.otlp`, port 4318); this path stays for senders outside the cluster that know
  only the API (the compose stack's Collector).
* ``GET|POST /api/v1/debug/receiver`` — whether the OTLP receiver runs; ``{"running": false}``
  stops it alone (to watch telemetry loss being counted), ``true`` starts it again.
* ``GET  /api/v1/traces`` and ``/api/v1/traces/<id>`` — recent traces, one trace's hops
  (``<id>``: the hex trace id or a prefix of it).
* ``GET  /api/v1/namespaces/<ns>/pods/<name>:<port>/proxy/<path>`` — a GET to a pod's
  port, relayed from the control plane (``kubectl get --raw`` of the API server's pod
  proxy): how the host reaches a sidecar's admin page where pod addresses are inside
  network namespaces. Needs the API token.
* ``GET  /metrics`` — the control plane's own Prometheus metrics.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry

from mesh.controlplane.guard import Guard
from mesh.otlp.intake import Intake
from mesh.tracestore.hops import build_hops, trace_view, verdict
from mesh.tracestore.receiver import MAX_BODY_BYTES, PROTOBUF, error_answer
from mesh.tracestore.store import TraceStore

if TYPE_CHECKING:
    from mesh.otlp.pipeline import TelemetryPipeline

bp = Blueprint("api", __name__)

MAX_WATCH_TIMEOUT = 60.0
"""Upper bound for a watch's ``timeout`` parameter, in seconds."""

REDACTED_HEADER = "X-Hopscope-Redacted"
"""Set on a state answer whose Secret values were blanked (the request had no API token)."""


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(
    cluster: Any,
    store: TraceStore,
    status: Callable[[], dict[str, Any]],
    actions: Any = None,
    registry: CollectorRegistry | None = None,
    guard: Guard | None = None,
    pipeline: TelemetryPipeline | None = None,
) -> Flask:
    """Build the API app around a ``Cluster``, a ``TraceStore`` and a status callback.

    ``guard`` decides who may change state (token, Host and Origin checks) and who reads
    Secret values; the control plane always passes one, tests of the read side may leave it
    out (then nothing is checked or blanked). ``pipeline`` is the
    OTLP receiver on its own listener; without one, ``/v1/traces`` here is the only way in.
    """
    app = Flask(__name__)
    if guard is not None:
        guard.install(app)
    app.config.update(CLUSTER=cluster, STORE=store, STATUS=status, ACTIONS=actions, GUARD=guard)
    registry = registry or CollectorRegistry()
    app.config["REGISTRY"] = registry
    registry.register(_ClusterCollector(cluster))
    app.config["PIPELINE"] = pipeline
    app.config["INTAKE"] = pipeline.intake if pipeline is not None else Intake(store, registry)
    app.register_blueprint(bp)
    from mesh.controlplane.explorer import explorer

    app.register_blueprint(explorer)

    @app.errorhandler(APIError)
    def _api_error(err: APIError) -> tuple[Response, int]:
        return jsonify(error=err.message), err.status

    return app


class _ClusterCollector:
    """Cluster state as metrics, like kube-state-metrics: endpoints and their readiness."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        ready = GaugeMetricFamily(
            "hopscope_endpoint_ready",
            "1 if the endpoint is ready in its EndpointSlice, 0 if not",
            labels=["namespace", "service", "pod", "node"],
        )
        pods = GaugeMetricFamily(
            "hopscope_pod_ready",
            "1 if the pod is ready",
            labels=["namespace", "pod", "node", "app"],
        )
        with self.cluster.lock:
            state = self.cluster.state
            for slice_ in state.endpoint_slices:
                for e in slice_.endpoints:
                    ready.add_metric(
                        [slice_.namespace, slice_.service, e.pod, e.node], 1.0 if e.ready else 0.0
                    )
            for pod in state.pods:
                app = pod.labels.get("app", pod.owner_name)
                pods.add_metric([pod.namespace, pod.name, pod.node, app], 1.0 if pod.ready else 0.0)
        yield ready
        yield pods


def _float_arg(name: str, default: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise APIError(400, f"query parameter {name!r} must be a number, got {raw!r}") from None


@bp.get("/api/v1/state")
def state() -> Response:
    """The cluster state; Secret values only for a request with the API token."""
    cluster = current_app.config["CLUSTER"]
    guard: Guard | None = current_app.config["GUARD"]
    if "after" in request.args:
        after = int(_float_arg("after", 0))
        timeout = min(_float_arg("timeout", 30.0), MAX_WATCH_TIMEOUT)
        body = cluster.wait_for_change(after, timeout)
    else:
        body = cluster.snapshot()
    if guard is None or guard.authorised():
        return jsonify(body)
    resp = jsonify(redact_secrets(body))
    resp.headers[REDACTED_HEADER] = "secret-values"
    return resp


def redact_secrets(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a ``ClusterState.to_dict()``, changed in place) with every Secret's values
    blank: its keys and type still say what it holds, not the key material itself."""
    for secret in state.get("secrets", []):
        for field in ("data", "stringData"):
            if isinstance(secret.get(field), dict):
                secret[field] = dict.fromkeys(secret[field], "")
    return state


@bp.get("/api/v1/status")
def status() -> Response:
    return jsonify(current_app.config["STATUS"]())


@bp.post("/v1/traces")
def otlp_traces() -> Response:
    """OTLP/HTTP trace export: protobuf or JSON, gzip-compressed or not (see ``receiver``)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        answer = error_answer(413, "export too large", PROTOBUF)
    else:
        body = request.stream.read(MAX_BODY_BYTES + 1)
        answer = current_app.config["INTAKE"].handle(
            "traces",
            body,
            request.headers.get("Content-Type"),
            request.headers.get("Content-Encoding"),
        )
    return Response(answer.body, status=answer.status, content_type=answer.content_type)


@bp.route("/api/v1/debug/receiver", methods=["GET", "POST"])
def debug_receiver() -> Response:
    """The OTLP receiver's state; POST ``{"running": false|true}`` stops or starts it alone."""
    pipeline: TelemetryPipeline | None = current_app.config["PIPELINE"]
    if pipeline is None:
        raise APIError(501, "this control plane has no OTLP receiver of its own")
    if request.method == "POST":
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("running"), bool):
            raise APIError(400, 'body must be {"running": true|false}')
        try:
            pipeline.set_running(body["running"])
        except OSError as exc:
            raise APIError(
                500, f"cannot start the OTLP receiver on {pipeline.url}: {exc}"
            ) from None
    return jsonify(pipeline.status())


@bp.get("/api/v1/traces")
def traces() -> Response:
    limit = int(_float_arg("limit", 20))
    out = []
    for trace_id, spans in current_app.config["STORE"].recent(limit):
        hops = build_hops(spans)
        root = min(spans, key=lambda s: s.start_ns)
        out.append(
            {
                "trace_id": trace_id,
                "root": root.name,
                "start_ns": root.start_ns,
                "duration_ms": round(max(s.end_ns for s in spans) / 1e6 - root.start_ns / 1e6, 3),
                "hops": [h["hop"] for h in hops],
                "span_count": len(spans),
                "verdict": verdict(hops),
            }
        )
    return jsonify(out)


@bp.get("/api/v1/traces/<trace_id>")
def one_trace(trace_id: str) -> Response:
    store: TraceStore = current_app.config["STORE"]
    if len(trace_id) > 32 or any(c not in string.hexdigits for c in trace_id):
        raise APIError(400, f"{trace_id!r} is not a trace id (hex, 32 digits, or a prefix)")
    matches = store.find_prefix(trace_id) if len(trace_id) < 32 else [trace_id.lower()]
    if len(matches) > 1:
        raise APIError(409, f"trace id prefix {trace_id!r} is ambiguous ({len(matches)} traces)")
    spans = store.get(matches[0]) if matches else []
    if not spans:
        raise APIError(404, store.missing_message(trace_id))
    view = trace_view(matches[0], spans)
    view["spans"] = [s.to_dict() for s in spans]
    return jsonify(view)


POD_PROXY_TIMEOUT_S = 5.0


@bp.get("/api/v1/namespaces/<namespace>/pods/<pod_port>/proxy/")
@bp.get("/api/v1/namespaces/<namespace>/pods/<pod_port>/proxy/<path:path>")
def pod_proxy(namespace: str, pod_port: str, path: str = "") -> Response:
    """The API server's pod proxy, GET only: ``<name>:<port>`` of a Running pod."""
    import requests

    guard: Guard | None = current_app.config["GUARD"]
    if guard is not None and not guard.authorised():
        raise APIError(401, "the pod proxy needs the API token")
    name, _, port = pod_port.rpartition(":")
    if not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise APIError(400, f"{pod_port!r}: expected <pod name>:<port>")
    cluster = current_app.config["CLUSTER"]
    with cluster.lock:
        pod = next(
            (p for p in cluster.state.pods if p.namespace == namespace and p.name == name), None
        )
    if pod is None or not pod.ip:
        raise APIError(404, f"pod {namespace}/{name} not found or has no IP")
    url = f"http://{pod.ip}:{port}/{path}"
    try:
        upstream = requests.get(
            url,
            params=request.args.to_dict(),
            headers={"Accept": request.headers.get("Accept", "*/*")},  # OpenMetrics, say
            timeout=POD_PROXY_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        raise APIError(502, f"pod {namespace}/{name} port {port}: {exc}") from None
    content_type = upstream.headers.get("Content-Type", "application/octet-stream")
    return Response(upstream.content, upstream.status_code, content_type=content_type)


@bp.post("/api/v1/pods/<namespace>/<name>/<action>")
def pod_action(namespace: str, name: str, action: str) -> Response:
    actions = current_app.config["ACTIONS"]
    if actions is None:
        raise APIError(501, "pod actions are not available")
    body = request.get_json(silent=True) or {}
    try:
        result = actions.pod_action(namespace, name, action, body)
    except KeyError as exc:
        raise APIError(404, str(exc.args[0])) from None
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return jsonify(result)


def _manifest_objects() -> list[Any]:
    """The validated objects of a ``{"source", "documents": [...]}`` body."""
    from mesh.model.manifests import ManifestError, load_document

    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
        raise APIError(400, 'body must be {"source": "...", "documents": [ {...}, ... ]}')
    source = str(body.get("source") or "request")
    try:
        objects = [load_document(doc, source, i) for i, doc in enumerate(body["documents"])]
    except ManifestError as exc:
        raise APIError(400, str(exc)) from None
    _refuse_ingress_if_not_live(objects)
    return objects


def _refuse_ingress_if_not_live(objects: list[Any]) -> None:
    """Where no ingress controller follows Ingress objects (the compose stack's ingress
    container reads its config at start), refuse them instead of storing what nobody serves."""
    from mesh.model.types import Ingress

    actions = current_app.config["ACTIONS"]
    if actions is None or getattr(actions, "ingress", None) is not None:
        return
    cluster = current_app.config["CLUSTER"]
    with cluster.lock:
        live = {(i.namespace, i.name): i for i in cluster.state.ingresses}
    for obj in objects:
        if not isinstance(obj, Ingress):
            continue
        old = live.get((obj.namespace, obj.name))
        # re-applying what runs (scenario reset re-applies the shipped manifests) is no change
        if old is None or (obj.rules, obj.default_backend, obj.ingress_class) != (
            old.rules,
            old.default_backend,
            old.ingress_class,
        ):
            raise APIError(
                400,
                f"Ingress {obj.namespace}/{obj.name}: this cluster's ingress takes its routes "
                "at start only (compose); nothing applied. Add the Ingress to the manifests "
                "and restart the stack (`docker compose down && docker compose up -d`)",
            )


@bp.post("/api/v1/apply")
def apply() -> Response:
    """Apply manifest documents (``hopscope apply -f``)."""
    from mesh.model.manifests import ManifestError

    objects = _manifest_objects()
    try:
        changes = current_app.config["CLUSTER"].apply(objects)
    except ManifestError as exc:
        raise APIError(400, str(exc)) from None
    return jsonify(changes=changes)


@bp.post("/api/v1/delete")
def delete() -> Response:
    """Delete the objects manifest documents name (``hopscope delete -f``)."""
    return jsonify(changes=current_app.config["CLUSTER"].delete(_manifest_objects()))


@bp.post("/api/v1/scale/<namespace>/<name>")
def scale(namespace: str, name: str) -> Response:
    body = request.get_json(silent=True) or {}
    replicas = body.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise APIError(400, 'body must be {"replicas": N}')
    try:
        message = current_app.config["CLUSTER"].scale(namespace, name, replicas)
    except KeyError as exc:
        raise APIError(404, str(exc.args[0])) from None
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return jsonify(message=message)


@bp.get("/api/v1/sd/prometheus")
def prometheus_targets() -> Response:
    """Prometheus HTTP service discovery: every app's /metrics and every Envoy's stats.

    ``?via=api``: each pod's page through the API's pod proxy
    (``/api/v1/namespaces/NS/pods/NAME:PORT/proxy/…``, the token as bearer credentials),
    for a Prometheus outside the pods' network — on the kernel data path, pod addresses
    exist only inside the cluster's namespaces, as an API server's proxy serves a
    Prometheus outside a real cluster."""
    via = request.args.get("via", "direct")
    if via not in ("direct", "api"):
        raise APIError(400, f"via={via!r}: use direct (pod addresses) or api (the pod proxy)")
    return jsonify(prometheus_sd_groups(current_app.config["CLUSTER"], via_api=via == "api"))


def prometheus_sd_groups(cluster: Any, via_api: bool = False) -> list[dict[str, Any]]:
    """The cluster's scrape targets as Prometheus HTTP service-discovery groups."""
    from mesh import addresses
    from mesh.model.types import ClusterState

    state = ClusterState.from_dict(cluster.snapshot())
    groups: list[dict[str, Any]] = []
    for pod in state.pods:
        if pod.phase != "Running" or not pod.ip:
            continue
        labels = {
            "namespace": pod.namespace,
            "pod": pod.name,
            "node": pod.node,
            "app": pod.labels.get("app", pod.owner_name),
        }
        pages = [(addresses.APP_METRICS_PORT, "/metrics", "apps")]
        if pod.has_sidecar:
            pages.append((addresses.SIDECAR_ADMIN_PORT, "/stats/prometheus", "envoy"))
        for port, path, job in pages:
            if via_api:
                target = f"{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
                path = f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}:{port}/proxy{path}"
            else:
                target = f"{pod.ip}:{port}"
            group_labels = {**labels, "job": job}
            if path != "/metrics":
                group_labels["__metrics_path__"] = path
            groups.append({"targets": [target], "labels": group_labels})
    groups.append(
        {
            "targets": [f"{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}"],
            "labels": {
                "job": "envoy",
                "pod": "ingress-envoy",
                "namespace": "hopscope-system",
                "app": "ingress",
                "__metrics_path__": "/stats/prometheus",
            },
        }
    )
    return groups


@bp.get("/metrics")
def metrics() -> Response:
    """The control plane's metrics, then the trace store's (``hopscope_tracestore_*``)."""
    from prometheus_client.exposition import choose_encoder

    registry = current_app.config["REGISTRY"]
    store_registry = current_app.config["STORE"].registry
    # OpenMetrics when asked for (the only exposition with exemplars: the kernel path's
    # kube-proxy request histogram links to traces), else the classic text format.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(registry)
    if store_registry is not registry:
        more = encode(store_registry)
        if content_type.startswith("application/openmetrics-text"):  # one "# EOF", at the end
            body = body.removesuffix(b"# EOF\n")
        body += more
    return Response(body, content_type=content_type)
