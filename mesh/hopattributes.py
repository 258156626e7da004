"""Span attribute names of the hop contract that the emitting components and the trace
readers both need (the full contract: docs/design.md, "Traces")."""

VIA = "hopscope.via.span_id"
"""Set by a sidecar from the ``x-hopscope-via`` header: the NAT hop the request came through."""

EMULATION_COST = "hopscope.emulation.cost_us"
"""Microseconds of the hop spent in hopscope's userspace emulator — work a node's kernel does
in microseconds (DNAT in netfilter, VXLAN in the kernel): docs/design.md, "Truthful timing"."""

# -- connections kube-proxy cannot read (TLS between sidecars) -----------------------------

CONN_CLIENT = "hopscope.conn.client"
"""On kube-proxy's per-connection span: the client's ``ip:port`` as kube-proxy accepted it.
The trace store pairs the span with the caller's outbound span by it."""

CONN_BYTES_IN = "hopscope.conn.bytes_in"
"""Bytes the client sent through the connection (client → endpoint)."""

CONN_BYTES_OUT = "hopscope.conn.bytes_out"
"""Bytes the endpoint sent back (endpoint → client)."""

TLS_OPAQUE = "hopscope.tls.opaque"
"""True on a per-connection hop of a TLS stream: the hop saw bytes, not requests."""

TLS_SERVER_NAME = "tls.client.server_name"
"""The SNI of the ClientHello (OpenTelemetry's TLS attribute)."""

UPSTREAM_LOCAL_ADDRESS = "hopscope.upstream.local_address"
"""On a proxy's span: the ``ip:port`` its upstream connection left from (Envoy's
``%UPSTREAM_LOCAL_ADDRESS%``), the client tuple the next hop saw."""

DOWNSTREAM_LOCAL_ADDRESS = "hopscope.downstream.local_address"
"""On a proxy's span: the ``ip:port`` the connection reached it at."""

UPSTREAM_FAILURE = "hopscope.upstream.failure"
"""Envoy's ``%UPSTREAM_TRANSPORT_FAILURE_REASON%`` (``... refused``, a BoringSSL error)."""

# -- TLS on the sidecars' spans (Envoy custom tags; "-" or "" mean absent) ----------------

TLS_MODE = "hopscope.tls.mode"
"""``mtls`` or ``plaintext``: how the connection was taken (inbound) or opened (outbound)."""

TLS_VERSION = "tls.protocol.version"
"""Inbound: the negotiated TLS version (``TLSv1.3``)."""

TLS_PEER_IDENTITY = "hopscope.tls.peer_identity"
"""Inbound: the caller's SPIFFE ID from its certificate."""

MTLS_MODE = "hopscope.mtls.mode"
"""Inbound: the listener's effective mode (STRICT, PERMISSIVE, DISABLE)."""

MTLS_POLICY = "hopscope.mtls.policy"
"""Inbound: the resource that set the mode (``PeerAuthentication shop/default``)."""

UPSTREAM_TLS_VERSION = "hopscope.upstream.tls_version"
"""Outbound: the TLS version negotiated with the callee."""

UPSTREAM_PEER_IDENTITY = "hopscope.upstream.peer_identity"
"""Outbound: the callee's SPIFFE ID from its certificate."""

MTLS_PEER_MODE = "hopscope.mtls.peer_mode"
"""Outbound: the mode the destination accepts (STRICT, PERMISSIVE, DISABLE)."""

MTLS_PEER_POLICY = "hopscope.mtls.peer_policy"
"""Outbound: the resource that sets the destination's mode."""

MTLS_PEER_NAMESPACE = "hopscope.mtls.peer_namespace"
"""Outbound: the destination's namespace."""

MTLS_ORIGINATION = "hopscope.mtls.origination"
"""Outbound: why it originated what it did (``automatic mTLS``, a DestinationRule)."""

DATAPLANE = "hopscope.dataplane"
"""``kernel`` on hops written from the kernel's conntrack table rather than by a relay."""
