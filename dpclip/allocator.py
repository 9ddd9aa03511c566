"""Keep the memory a training step frees for the next step (Linux with glibc): a CPU speed setting for the process.

glibc's malloc serves a block above its mmap threshold (which moves between 128 KiB and 32 MiB) with fresh pages
from the kernel and unmaps them on free, and it hands the top of its heap back to the kernel once more than its
trim threshold (twice the mmap threshold) lies free there. A training step frees most of what it allocated, so the
next step takes the same memory again as fresh pages: a page fault and a zero fill per 4 KiB. A DP step holds more
at once than a non-private one (each layer's output gradient until backward ends, per-example gradients), so it
pays more of this: the benchmark transformer's DP step (one thread, batch 256) took 41,506 page faults and 765 ms
by default, none and 650 ms with :func:`retain_freed_memory`; the ResNet's 41,213 and 419 ms against 46 and 325 ms
(``benchmarks/results/compare_opacus_full_cpu*.md``; benchmarks/README.md, "Seventh round").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX). dpclip forms the
#: per-example gradients it keeps or recomputes in pieces below it (:data:`dpclip.grads.contributions.PIECE_BYTES`);
#: its other per-step tensors (patches, Grams) are formed whole.
MMAP_THRESHOLD_MAX = 32 * 2**20
#: The largest trim threshold mallopt takes (a C int): the heap is then handed back only past 2 GiB free at its top.
TRIM_THRESHOLD_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux") or sys.maxsize <= 2**32:
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (an AttributeError where it is not glibc)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory(trim_bytes: int = TRIM_THRESHOLD_MAX) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel after each step.

    Sets the mmap threshold to its maximum, 32 MiB (smaller blocks come from the heap and are reused; the per-example
    gradients dpclip forms always are, :data:`~dpclip.grads.contributions.PIECE_BYTES`), and the trim threshold to
    ``trim_bytes`` (the heap is handed back only when that much lies free at its top). The same as starting Python
    with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=<trim_bytes>``. The cost: the process keeps its
    peak heap mapped between steps (its RSS stays near its peak, as PyTorch's CUDA caching allocator does on a
    GPU). Process-wide and not undone: call it once, before training; it speeds up the non-private step too.

    Returns True where it was applied (64-bit Linux with glibc), False where nothing changed (macOS, Windows, musl).
    """
    if isinstance(trim_bytes, bool) or not isinstance(trim_bytes, int) or not 0 <= trim_bytes <= TRIM_THRESHOLD_MAX:
        raise ValueError(f"trim_bytes must be an int in [0, {TRIM_THRESHOLD_MAX}] (bytes free at the heap's top "
                         f"before glibc hands them back), got {trim_bytes!r}")
    libc = _glibc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1
