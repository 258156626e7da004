"""Span attribute names of the hop contract that the emitting components and the trace
readers both need (the full contract: docs/design.md, "Traces")."""

VIA = "hopscope.via.span_id"
"""Set by a sidecar from the ``x-hopscope-via`` header: the NAT hop the request came through."""

EMULATION_COST = "hopscope.emulation.cost_us"
"""Microseconds of the hop spent in hopscope's userspace emulator — work a node's kernel does
in microseconds (DNAT in netfilter, VXLAN in the kernel): docs/design.md, "Truthful timing"."""
