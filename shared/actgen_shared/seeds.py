"""Seeds derived by hashing, so that distinct inputs never share noise.

A sum such as ``seed + index`` collides across its parts (item k of job s is item k-1 of job
s+1); a hash of the tuple does not. Both services import these, so a job's item seeds are the
same whichever replica runs it and however it is batched.
"""

from __future__ import annotations

import hashlib
import struct

MAX_SEED = 2**63 - 1


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**63 - 1] from a tuple of non-negative integers (blake2b of their bytes)."""
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be non-negative, got {parts}")
    data = b"".join(struct.pack("<Q", p % 2**64) + struct.pack("<Q", p >> 64) for p in parts)
    digest = hashlib.blake2b(data, digest_size=8, person=b"actgen-seed").digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def item_seed(job_seed: int, index: int) -> int:
    """The noise seed of item ``index`` of a job whose options.seed is ``job_seed``."""
    return derive_seed(job_seed, index)
