"""Shared telemetry setup for every hopscope process: traces (OTLP), JSON logs, Prometheus.

* :mod:`telemetry.tracing` — a TracerProvider exporting OTLP/HTTP, resource attributes
  following the Kubernetes semantic conventions.
* :mod:`telemetry.logs` — JSON log lines carrying ``trace_id`` / ``span_id`` in hex.
"""
