"""The kube-proxy emulator: Service VIPs → endpoints, narrated hop by hop.

``python -m mesh.kubeproxy --api URL`` watches the control plane, keeps a listener on every
ClusterIP:port, DNATs each new connection to a ready endpoint (see :mod:`.proxier`), and
emits a ``kube-proxy`` hop span per request (:mod:`.hop`, :mod:`.relays`). Metrics, health
and the conntrack table are served on ``<node-a IP>:10249``.
"""
