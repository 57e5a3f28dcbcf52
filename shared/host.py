"""The host a run trains on, made the same in every launch: glibc's allocator thresholds fixed.

glibc's malloc serves a large block (a batch's activations, a gradient) from mmap when it is above its mmap
threshold, and raises that threshold as such blocks are freed. Which way it settles depends on the order of
the first steps' frees, so one launch of a config reuses its heap every step while the next maps, faults in
and unmaps fresh pages every step: measured here (2-core AMD EPYC VM, conv_autoencoder at batch 128, one
thread), launches of one config read 3,650-4,000 or 6,050-6,500 samples/s, the slow ones with 2-3x the
kernel (page fault) time. Fixing both thresholds (as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would)
keeps blocks up to 32 MiB on the heap and the heap from being trimmed: five launches read 6,400-6,860.
Called first by every script (shared.runtime.entry), whatever launched it; the record keeps what was set.

What remains between launches here (about +-10-15% with the thresholds fixed, each launch steady within
itself) has no cause found in the process: not page faults (the same kernel time and minor faults in slow
and fast launches), not core placement (pinning each process to a core of its own was tried: twelve
alternating launches, pinned or not, spread alike, 4,590-7,000 samples/s). The VM shows no steal time; the
host's other tenants are the likely cause. The bench's intervals must cover it: 2-3 launches per cell and a
bootstrap over launches (bench/run.py, shared/stats.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**30
STATE: dict = {"allocator": "not set"}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (find_library runs ldconfig in a subprocess); None where it cannot be."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def steady_malloc() -> dict:
    """Fix glibc's mmap and trim thresholds for this process (unless the user set either by environment,
    or DISTBENCH_MALLOC=default). Returns and keeps in STATE what was done, for the record."""
    if os.environ.get("DISTBENCH_MALLOC") == "default":
        STATE.update(allocator="glibc default (DISTBENCH_MALLOC=default)")
        return STATE
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        STATE.update(allocator="as the environment set it (MALLOC_*_THRESHOLD_ or LD_PRELOAD)")
        return STATE
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        STATE.update(allocator="not glibc: left as it is")
        return STATE
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    STATE.update(
        allocator=f"glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
        if ok
        else "glibc mallopt refused: default"
    )
    return STATE


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(f, ctypes.c_size_t) for f in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def heap_free_gib() -> float | None:
    """The freed memory glibc's heaps keep (mallinfo2 `fordblks`, every arena), in GiB: memory the process
    holds but does not use, which its resident set counts as its own. None where it cannot be read (not
    glibc, or one older than 2.33)."""
    info = getattr(_libc(), "mallinfo2", None)
    if info is None:
        return None
    info.restype = _Mallinfo2
    return info().fordblks / 2**30


def trim_heap() -> None:
    """Give the heap's free pages back to the kernel (glibc's malloc_trim), so that what the process holds
    afterwards is what it uses: memory it freed before and reuses later would otherwise never show in its
    resident set (shared/runtime.py training_memory_base). Not glibc: nothing."""
    if (trim := getattr(_libc(), "malloc_trim", None)) is not None:
        trim(0)
