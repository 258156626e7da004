"""The local cluster the e2e modules run against.

Only one local cluster can run at a time (fixed loopback addresses), and booting one takes
a while, so a session-wide :class:`ClusterPool` holds at most one:

- ``local_cluster`` / ``cluster``: the shared cluster (:data:`SHARED_SPEC`: the sample shop
  plus the echo Services). Started by the first module that asks, reused by the next ones;
  a module that follows another gets it back in the sample state (:meth:`LocalCluster.restore`),
  whatever the one before changed.
- ``cluster_to_stop``: the shared cluster for a module whose tests stop it themselves; such
  modules run after every other module that shares it.
- ``cluster_pool.exclusive(spec)``: a cluster with options of its own (an environment
  variable, other manifests, other ``up`` options) for the span of a ``with`` block; the
  shared one is stopped first.

The items that use the pool run together (collection order otherwise kept), and the pool's
cluster is stopped before any item that does not use it, so modules that start clusters of
their own never overlap it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e_support import SHARED_SPEC, ClusterPool, LocalCluster

POOL = "cluster_pool"
_POOL_KEY = pytest.StashKey[ClusterPool]()


@pytest.fixture(scope="session")
def cluster_pool(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ClusterPool]:
    pool = ClusterPool(tmp_path_factory.mktemp)
    pytestconfig.stash[_POOL_KEY] = pool
    try:
        yield pool
    finally:
        del pytestconfig.stash[_POOL_KEY]
        pool.release()


@pytest.fixture(scope="module")
def local_cluster(cluster_pool: ClusterPool, request: pytest.FixtureRequest) -> LocalCluster:
    """The shared cluster, in the sample state when the module starts."""
    return cluster_pool.acquire(SHARED_SPEC, request.module.__name__)


@pytest.fixture(scope="module")
def cluster(local_cluster: LocalCluster) -> dict[str, str]:
    """The environment for ``hopscope`` commands against the shared cluster."""
    return local_cluster.env


@pytest.fixture(scope="module")
def cluster_to_stop(local_cluster: LocalCluster) -> dict[str, str]:
    """Like ``cluster``, for a module that stops the cluster: it runs after the others."""
    return local_cluster.env


def _rank(item: pytest.Item) -> int:
    names = getattr(item, "fixturenames", ())
    if "local_cluster" not in names:
        return 2  # a cluster of its own
    return 1 if "cluster_to_stop" in names else 0


def _uses_pool(item: pytest.Item | None) -> bool:
    return item is not None and POOL in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users = [item for item in items if _uses_pool(item)]
    if not users:
        return
    first = items.index(users[0])
    others = [item for item in items if not _uses_pool(item)]
    items[:] = [*others[:first], *sorted(users, key=_rank), *others[first:]]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    try:
        return (yield)
    finally:
        pool = item.config.stash.get(_POOL_KEY, None)
        if pool is not None and not _uses_pool(nextitem):
            pool.release()
