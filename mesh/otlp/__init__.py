"""The control plane as the cluster's local OpenTelemetry collector.

Every component of the local cluster (apps, Envoys, kube-proxy, DNS, CNI, the traffic
generator) sends OTLP/HTTP to one receiver on the control-plane address, port 4318 (the
standard OTLP/HTTP port). What it does with it:

* :mod:`mesh.otlp.intake` — sans-io: one ``POST /v1/{traces,logs,metrics}`` body in, the
  HTTP answer out. Traces go into the embedded trace store; when the user named an OTLP
  endpoint (``hopscope up --otlp-endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``), every
  accepted body — traces, logs, metrics — is also queued for forwarding. Requests are counted
  by signal and outcome.
* :mod:`mesh.otlp.server` — the listener: an asyncio server with the ``httptools`` parser in a
  thread of its own, stoppable and restartable on its own (``POST /api/v1/debug/receiver``)
  so that telemetry loss can be produced and observed.
* :mod:`mesh.otlp.forward` — the forwarder: a bounded queue, retries with backoff, every item
  counted as sent, failed or dropped.
* :mod:`mesh.otlp.prom_bridge` — metrics: every component exposes Prometheus ``/metrics``;
  the bridge scrapes each target the control plane knows of and sends the samples as OTLP
  metrics, named so that a Prometheus-compatible OTLP backend yields the series the hopscope
  dashboards query.
* :mod:`mesh.otlp.pipeline` — wires these together for the control plane.
"""

OTLP_HTTP_PORT = 4318
"""The standard OTLP/HTTP port; the receiver listens on it at the control-plane address."""
