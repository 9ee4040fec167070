"""How the service's processes give memory back after a burst: glibc's allocator settings, set for every process.

glibc keeps freed memory for reuse: in up to 8 x cores arenas (one per thread
that allocated), and, once a large block was freed, it raises its threshold
for serving large blocks from the heap (up to 32 MB), so later request bodies,
decoded audio and buffers land in heaps that rarely shrink. After batch and
overload runs this held about 1 GB in the ingress, 0.7 GB in the proxy and
0.4 GB in the scorer until a restart. Two arenas and a fixed 256 KB threshold
(blocks above it are mapped and unmapped on their own, so a freed body returns
at once) bound that; the ``MALLOC_*`` variables take effect when a process
starts, so every process of the service gets them (:func:`memory_env`).
"""

from __future__ import annotations

#: glibc allocator settings of every process of the service.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(256 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024 * 1024),
}


def memory_env() -> dict[str, str]:
    """The environment variables that bound what each process of the service keeps after a burst."""
    return dict(MALLOC_ENV)
