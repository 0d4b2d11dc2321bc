"""The torch device a config key names: checked, so a typo or a missing GPU is one line naming
the key rather than a torch traceback in the middle of a job."""

from __future__ import annotations

import re

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
