"""glibc's malloc in a training process: big blocks go back to the system when freed.

glibc serves a request of at least its mmap threshold with a mapping of its own, unmapped
on free; smaller ones come from the heap, whose freed blocks stay in the process. The
threshold is dynamic: freeing a mapped block raises it to that block's size (up to 32 MiB
on 64-bit), so once a step's first activations are freed, later ones of that size come
from the heap, and a backward pass that frees and allocates them in other sizes leaves
it fragmented. Measured on CPU: the peak RSS then exceeds the live tensors by up to
~1.4 x an un-checkpointed step's activations on small models, and by 3.5 GiB at Llama
3.2 1B's shape (docs/design.md 4.11), an amount no formula of the shape predicts.

A threshold set with `mallopt` is fixed (glibc turns the dynamic raise off), so every
tensor of at least MMAP_THRESHOLD bytes goes back to the system when freed and the peak
follows the live tensors, which is what the memory plan estimates. At 1B that took the
peak from 9.15 to 5.60 GiB. The price is the kernel zero-filling fresh pages for each big
tensor instead of the heap reusing them: measured side by side on the "wide" calibration
model (bench/memory_calibration.py, hidden 1024, 2 x 512 tokens), two steps took 1.24 and
1.34 x as long as with the dynamic threshold at 1 MiB, 1.48 and 1.35 x at glibc's
smallest, 128 KiB (two interleaved rounds on a busy machine; the 1B job: 1.21 x at
128 KiB, one run each). 1 MiB keeps the heap for the many small blocks (LoRA's r-wide
intermediates, norms' statistics) and sends every activation-sized one back.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 1 << 20
ENVIRONMENT = "MALLOC_MMAP_THRESHOLD_"  # glibc's own setting: an operator's choice wins


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for the rest of this process (a job's forked child:
    glibc read its environment long before). False where nothing changed: the C library
    is not glibc, or MALLOC_MMAP_THRESHOLD_ already fixed it."""
    if ENVIRONMENT in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        logger.info("no mallopt in this C library: the mmap threshold stays dynamic")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
