"""Deterministic seeds: every random draw in the pipeline is keyed by names, not by call order."""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np


def derive_seed(*keys: object) -> int:
    """A stable 31-bit seed from any keys (e.g. ``derive_seed(base_seed, "degrade", obj_id, "severe")``).

    Unlike ``hash()``, this does not change between Python processes.
    """
    text = "\x1f".join(str(k) for k in keys)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def rng(*keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*keys))


def seed_everything(seed: int, *, deterministic_torch: bool = True) -> None:
    """Seed python, numpy and torch; force deterministic torch kernels on CPU."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:  # world/render stages do not need torch
        return
    torch.manual_seed(seed)
    if deterministic_torch:
        # torch.use_deterministic_algorithms also imports torch._inductor (~2 s a process) just to
        # set the compiler's flag; nothing here is compiled, so set the kernel switch directly.
        set_kernels = getattr(torch._C, "_set_deterministic_algorithms", None)
        if set_kernels is None:
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            set_kernels(True, warn_only=True)
