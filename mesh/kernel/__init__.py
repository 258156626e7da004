"""The kernel data path: kube-proxy's rules as real netfilter rules in a node's namespace.

The userspace data path (:mod:`mesh.kubeproxy`) relays every connection through Python.
This package renders the same :class:`~mesh.kubeproxy.rules.RuleSet` into the rules real
kube-proxy writes, so the kernel does the DNAT, the random choice, the affinity and the
REJECT. A backend sits behind :class:`RuleRenderer` (:mod:`.renderer`): it turns the rule
set into one text document that one restore command loads atomically. :mod:`.iptables`
is the iptables-mode backend (``iptables-restore``); an nftables backend fits the same
protocol. The data path that creates the namespaces and applies the documents on each
sync builds on these.
"""

from mesh.kernel.iptables import (
    IptablesRenderer,
    endpoint_chain,
    external_chain,
    local_policy_chain,
    service_chain,
)
from mesh.kernel.renderer import ProxyNode, RuleRenderer, ServicePortView, service_ports

__all__ = [
    "IptablesRenderer",
    "ProxyNode",
    "RuleRenderer",
    "ServicePortView",
    "endpoint_chain",
    "external_chain",
    "local_policy_chain",
    "service_chain",
    "service_ports",
]
