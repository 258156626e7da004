"""Generated name suffixes, the way the API server's name generator makes them."""

from __future__ import annotations

import hashlib
import random

NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
"""Characters Kubernetes uses for generated name suffixes (no vowels, no look-alikes)."""


def name_suffix(seed: str | None, length: int) -> str:
    """``length`` characters of :data:`NAME_ALPHABET`: random, or derived from ``seed``."""
    if seed is None:
        return "".join(random.choice(NAME_ALPHABET) for _ in range(length))
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(NAME_ALPHABET[b % len(NAME_ALPHABET)] for b in digest[:length])
