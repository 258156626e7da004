"""The scheduler: picks a node for each new pod.

Filter: nodes whose labels match the template's ``nodeSelector``. Score: fewest pods of the
same workload, then fewest pods overall, so replicas spread across nodes.
"""

from __future__ import annotations

from mesh.model.controllers.pods import owned_pods
from mesh.model.manifests import ManifestError
from mesh.model.types import ClusterState, Node, Workload


class Scheduler:
    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def feasible(self, wl: Workload) -> list[Node]:
        selector = wl.template.node_selector
        return [
            n for n in self.state.nodes if all(n.labels.get(k) == v for k, v in selector.items())
        ]

    def check(self, wl: Workload) -> None:
        """Refuse a workload no node can run (nodes are fixed, so this never changes)."""
        if not self.feasible(wl):
            raise ManifestError(
                f"{wl.source}: spec.template.spec.nodeSelector: no node matches "
                f"{wl.template.node_selector} (nodes: {[n.name for n in self.state.nodes]})"
            )

    def pick(self, wl: Workload) -> Node:
        self.check(wl)
        siblings = owned_pods(self.state, wl)

        def load(node: Node) -> tuple[int, int]:
            mine = sum(1 for p in siblings if p.node == node.name)
            total = sum(1 for p in self.state.pods if p.node == node.name)
            return mine, total

        return min(self.feasible(wl), key=load)
