"""Trace context through the NAT hops (kube-proxy, the overlay, the node gateway).

These hops rewrite addresses, not requests, so they pass the caller's ``traceparent`` on
unchanged: the callee's sidecar span is then the direct child of the caller's CLIENT span,
the pair a service graph (Tempo's metrics-generator) turns into an edge. The NAT hop's own
span is a child of the caller's span too, and the ``x-hopscope-via`` header names it so the
next hop can still be nested below it where hopscope draws the journey
(:mod:`mesh.tracestore.hops`).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()

VIA_HEADER = "x-hopscope-via"
"""Request header naming the span of the last NAT hop a request crossed (16 hex digits).

The trace context itself passes through kube-proxy and the overlay unchanged; this header
lets the next hop (a sidecar's ``hopscope.via.span_id`` tag, a NodePort behind the load
balancer) be nested below the NAT hop in ``hopscope trace`` and the explorer."""

TRACE_HEADERS = ("traceparent", "tracestate", VIA_HEADER)
"""Headers a NAT hop replaces with :func:`forward_headers`."""


def parent_context(headers: dict[str, str]) -> Context:
    """The caller's context, re-parented on the NAT hop named by ``x-hopscope-via``."""
    context = PROPAGATOR.extract(headers)
    via = headers.get(VIA_HEADER, "")
    caller = trace.get_current_span(context).get_span_context()
    if len(via) != 16 or not caller.is_valid:
        return context
    try:
        span_id = int(via, 16)
    except ValueError:
        return context
    if not span_id:
        return context
    parent = SpanContext(
        caller.trace_id,
        span_id,
        is_remote=True,
        trace_flags=caller.trace_flags,
        trace_state=caller.trace_state,
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), context)


def forward_headers(headers: dict[str, str], hop_span: Any) -> dict[str, str]:
    """Trace headers for the next hop: the caller's context as it came, plus ``x-hopscope-via``.

    Without a valid caller context the hop span starts the trace, so its own context is
    sent on (the callee then pairs with it).
    """
    carrier: dict[str, str] = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    caller = trace.get_current_span(PROPAGATOR.extract(headers)).get_span_context()
    if not caller.is_valid:
        carrier = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(hop_span))
    context = hop_span.get_span_context()
    if hop_span.is_recording() and context.is_valid:
        carrier[VIA_HEADER] = format(context.span_id, "016x")
    return carrier
