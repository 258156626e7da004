"""Allocators: addresses from a CIDR and ports from a range, with checkpoints.

The Service registry, the pod IPAM and the emulated cloud provider share these two kinds.
A caller that allocates several things for one object takes a :meth:`checkpoint` of each
allocator first and :meth:`rollback`s on failure, so a refused object leaks nothing (the
API server's service storage does the same with its allocation transactions).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class AllocationError(ValueError):
    """An address or port cannot be had: outside the range, already taken, or none left."""


class AddressPool:
    """Lowest-free allocation from a CIDR, skipping the network address, the addresses below
    ``first_host`` and the broadcast address."""

    def __init__(self, cidr: str, first_host: int = 2, reserved: Iterable[str] = ()) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.first = int(self.network.network_address) + first_host
        self.last = int(self.network.broadcast_address) - 1
        self.used: set[str] = set(reserved)
        """Addresses handed out (and the reserved ones, which are never handed out)."""

    def allocate(self) -> str:
        for n in range(self.first, self.last + 1):
            ip = str(ipaddress.ip_address(n))
            if ip not in self.used:
                self.used.add(ip)
                return ip
        raise AllocationError(f"address pool {self.network} is exhausted")

    def claim(self, ip: str) -> None:
        """Take a requested address."""
        if ipaddress.ip_address(ip) not in self.network:
            raise AllocationError(f"{ip} is not in {self.network}")
        if ip in self.used:
            raise AllocationError(f"{ip} is already allocated")
        self.used.add(ip)

    def release(self, ip: str) -> None:
        self.used.discard(ip)

    def checkpoint(self) -> frozenset[str]:
        return frozenset(self.used)

    def rollback(self, checkpoint: frozenset[str]) -> None:
        self.used = set(checkpoint)


class PortAllocator:
    """Lowest-free allocation from a port range; every port remembers its owner."""

    def __init__(self, low: int, high: int, what: str = "port") -> None:
        self.low, self.high = low, high
        self.what = what
        """How errors name the range, e.g. ``NodePort``."""
        self.owners: dict[int, str] = {}
        """Allocated port → its owner, in words (``Service shop/web``)."""

    def claim(self, wanted: int | None, owner: str) -> int:
        """Take ``wanted`` if it is in range and free, or the lowest free port if ``None``."""
        low, high = self.low, self.high
        if wanted is not None:
            if not low <= wanted <= high:
                raise AllocationError(f"{wanted} is outside the {self.what} range {low}-{high}")
            holder = self.owners.get(wanted)
            if holder is not None:
                raise AllocationError(f"{wanted} is already allocated (to {holder})")
            self.owners[wanted] = owner
            return wanted
        for port in range(low, high + 1):
            if port not in self.owners:
                self.owners[port] = owner
                return port
        raise AllocationError(f"the {self.what} range {low}-{high} is full")

    def release(self, port: int, owner: str) -> None:
        """Free ``port`` if ``owner`` holds it."""
        if self.owners.get(port) == owner:
            del self.owners[port]

    def checkpoint(self) -> dict[int, str]:
        return dict(self.owners)

    def rollback(self, checkpoint: dict[int, str]) -> None:
        self.owners = dict(checkpoint)
