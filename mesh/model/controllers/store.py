"""The object store: the one :class:`ClusterState`, its lock, and its watchers.

Every change bumps ``resource_version`` and wakes :meth:`ObjectStore.wait_for_change`,
the way the API server notifies a watching kube-proxy. :func:`upsert` and :func:`remove`
are the create/update/delete of one namespaced object in one of the state's lists.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol, TypeVar

from mesh.model.types import ClusterState


class Namespaced(Protocol):
    name: str
    namespace: str


T = TypeVar("T", bound=Namespaced)


class ObjectStore:
    """The state behind one re-entrant lock; all mutation happens while holding it."""

    def __init__(self, state: ClusterState) -> None:
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.state = state
        """Never replaced, only changed in place: other parts keep a reference to it."""

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self.state.to_dict()

    def wait_for_change(self, after: int, timeout: float) -> dict[str, Any]:
        """Return the state once its version exceeds ``after`` or ``timeout`` passes."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while self.state.resource_version <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self.state.to_dict()

    def bump(self) -> None:
        """Record a change: a new ``resource_version``, and every watcher wakes."""
        with self.lock:
            self.state.resource_version += 1
            self._changed.notify_all()


def upsert(items: list[T], obj: T, kind: str) -> str:
    """Create ``obj`` or replace the object of the same namespace and name; say which."""
    for i, old in enumerate(items):
        if old.namespace == obj.namespace and old.name == obj.name:
            if getattr(old, "created", 0):
                obj.created = old.created  # type: ignore[attr-defined]  # keeps creationTimestamp
            items[i] = obj
            return f"{kind}/{obj.namespace}/{obj.name} configured"
    items.append(obj)
    return f"{kind}/{obj.namespace}/{obj.name} created"


def remove(items: list[T], obj: Namespaced, kind: str) -> str:
    """Delete the object with ``obj``'s namespace and name from ``items``; say whether it was
    there."""
    found = [i for i in items if (i.namespace, i.name) == (obj.namespace, obj.name)]
    for item in found:
        items.remove(item)
    verb = "deleted" if found else "not found"
    return f"{kind}/{obj.namespace}/{obj.name} {verb}"
