"""The torch device a config key names: checked, so a typo or a missing GPU is one line naming
the key rather than a torch traceback in the middle of a job."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from srmil.errors import InputError

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


def resolve_device(device: str = "auto", key: str = "features.device") -> torch.device:
    """"auto" means the first CUDA device when there is one, else the CPU. A string that is
    not a device, or a device this machine lacks, is an InputError naming config.yaml's `key`."""
    if not DEVICE.match(str(device)):
        raise InputError(f"config.yaml: {key} {device!r} is not a device; "
                         "use auto, cpu, mps, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    present = {
        "cpu": True,
        "mps": torch.backends.mps.is_available(),
        "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
    }[dev.type]
    if not present:
        raise InputError(f"config.yaml: {key} {device!r} is not available on this "
                         "machine; set auto or cpu")
    return dev


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAINED = False


def retain_freed_memory() -> bool:
    """Keep memory this process frees for reuse instead of giving it back to the OS (glibc).

    torch allocates every activation of a forward pass anew, and by default glibc maps each
    block above a threshold (128 KiB, rising to at most 32 MiB) on allocation and unmaps it on
    free, so each forward pass faults its activations in again: about 3,100 page faults per
    224-px patch for resnet18, a fifth of its CPU time on the development machine. Raising the
    mmap and trim thresholds keeps the pages mapped (forward passes 1.26x faster for resnet18
    and 1.5x for resnet50 there, docs/features.md); the process then holds its peak working
    set until it exits, so this is for one-job processes such as `srmil features`, not for a
    library call. Returns whether the setting took (False where the C library is not glibc).
    """
    global _RETAINED
    if _RETAINED:
        return True
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Blocks up to 1 GiB from the heap; free memory at its top kept up to 1 GiB.
    _RETAINED = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _RETAINED


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Limit torch's intra-op CPU threads inside the block (None: leave as is)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
