"""CPU memory for quantized weight blocks, backed by transparent huge pages where Linux offers them.

A decode step reads every weight block once, from memory, in a few hundred streams: with 4 KiB pages that is a
TLB miss every 4 KiB of each stream. In 2 MiB pages the same kernels read faster, and so does a plain sum
(docs/performance.md, "Huge pages"). Linux gives huge pages to
anonymous memory that asks for them (``madvise(MADV_HUGEPAGE)``, which the "madvise" setting of
/sys/kernel/mm/transparent_hugepage/enabled requires), so the blocks of a whole model are carved out of one
anonymous mapping, 2 MiB aligned, that asks. Where the call is missing it is an ordinary mapping, and without
POSIX mmap (Windows) ordinary tensors.

Each tensor is its own storage (``torch.frombuffer`` of its slice), so that checkpoint writers see separate
tensors; the mapping lives as long as any of them.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import mmap

import torch

HUGE_PAGE = 2 * 2**20
ALIGN = 64                      # each tensor starts on a cache line


def huge_page_tensors(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Uninitialised uint8 CPU tensors of these shapes in one mapping advised as huge-page memory.

    Tensor i starts at the 2 MiB-aligned start of the mapping plus the sizes of tensors 0 .. i - 1, each rounded
    up to 64 bytes: shapes [(3, 34), (2, 18)] give tensors at offsets 0 (102 bytes) and 128 (36 bytes)."""
    sizes = [math.prod(s) for s in shapes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // ALIGN) * ALIGN
    if total == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):             # nothing to map, or no POSIX mmap (Windows)
        return [torch.empty(s, dtype=torch.uint8) for s in shapes]
    length = -(-total // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE          # room to move the start to a 2 MiB boundary
    area = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    probe = ctypes.c_char.from_buffer(area)
    start = -ctypes.addressof(probe) % HUGE_PAGE
    del probe                                                         # no exported pointer left behind
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):                            # a kernel built without THP
            area.madvise(advice, start, length - start)
    view = memoryview(area)
    return [torch.frombuffer(view[start + o:start + o + n], dtype=torch.uint8).view(shape) if n else
            torch.empty(shape, dtype=torch.uint8)
            for shape, o, n in zip(shapes, offsets, sizes, strict=True)]
