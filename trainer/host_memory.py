"""Keep freed host memory inside the training process (glibc's malloc), for training on the CPU.

glibc serves every block above its mmap threshold (at most 32 MiB) with freshly mapped pages and unmaps it
again when it is freed. A CNN's activations at batch 256 are 10-130 MB each, so a CPU training step maps,
zero-fills and unmaps gigabytes (up to 3.5 million page faults per step). With mmap disabled and the trim
threshold raised, freed blocks stay in the heap and the next step reuses them, since a training step
allocates the same shapes every time. Measured on resnet18-cifar at batch 256, 2 cores
(``tests/benchmarks/RESULTS_training_speed.md``): simclr 1.69x and byol 1.62x the images/s, dino unchanged
(0.96x, within noise: its per-crop passes allocate few blocks above the threshold); the peak resident memory
grows by 3-20%, the heap's fragmentation.

This is what PyTorch's CPU performance guide gets from preloading jemalloc or tcmalloc, without a
preload. The settings are process-wide and stay for the rest of the process: ``trainer.loop.train``
applies them when it trains on the CPU (unless ``--no-keep-freed-memory``), and forked data-loader workers
inherit them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # the heap's free top is given back to the OS only above 1 GiB


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap'd blocks, 1 GiB trim threshold).

    Returns True when applied; False (and changes nothing) where the C library is not glibc or has no
    ``mallopt``, e.g. macOS or musl.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: mallopt's numbering is glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if applied:
        log.info("host memory: glibc %s keeps freed blocks for reuse (mmap off, trim threshold 1 GiB)",
                 gnu_get_libc_version().decode())
    return applied
