"""kube-proxy's sync loop on the kernel data path, for one node.

Each :meth:`KernelProxier.sync` renders the whole rule set for the node, adds the deletion
of chains the previous sync had and this one has not, and loads the result into the node's
namespace with one restore command: the kernel switches from the old rules to the new ones
at once, never showing a half-written state (kube-proxy's ``syncProxyRules``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mesh.kernel.iptables import IptablesRenderer
from mesh.kernel.renderer import ProxyNode, RuleRenderer
from mesh.kernel.topology import KernelNetwork
from mesh.kubeproxy.rules import RuleSet


@dataclass(frozen=True)
class SyncResult:
    version: int
    """The rule set's version that is now live."""
    seconds: float
    """Render plus load (kube-proxy's ``sync_proxy_rules_duration_seconds``)."""
    document_bytes: int


class KernelProxier:
    """Keeps one node's netfilter rules equal to the latest rule set."""

    def __init__(
        self, network: KernelNetwork, node: ProxyNode, renderer: RuleRenderer | None = None
    ) -> None:
        self.network = network
        self.node = node
        self.renderer: RuleRenderer = renderer or IptablesRenderer()
        self.rules: RuleSet | None = None
        """The rule set of the last successful sync (what the observer reads flows with)."""
        self._loaded = ""
        self._set_up = False

    def sync(self, rules: RuleSet) -> SyncResult:
        started = time.perf_counter()
        if not self._set_up:
            # A restarted proxy finds its hooks in place (the setup is not idempotent).
            if "\n:KUBE-SERVICES " not in self.network.save(self.node.name, "nat"):
                self.network.restore(
                    self.node.name, self.renderer.restore_argv, self.renderer.setup(self.node)
                )
            self._set_up = True
        document = self.renderer.render(rules, self.node)
        load = self.renderer.delete_stale(document, self._loaded)
        self.network.restore(self.node.name, self.renderer.restore_argv, load)
        self._loaded = document
        self.rules = rules
        return SyncResult(rules.version, time.perf_counter() - started, len(load))
