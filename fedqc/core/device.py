"""Where and how tensors are computed: device choice, mixed precision, seeding, CPU threads.

Every training loop takes a ``torch.device`` from :func:`select_device` and wraps its forward pass in
:func:`autocast_context`, so the same code runs in float32 on a CPU and in bf16 autocast on a GPU.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from fedqc.core.errors import ConfigError


def select_device(preference: str | torch.device = "auto") -> torch.device:
    """Choose the compute device.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or a ``torch.device``.

    Returns:
        The device to compute on.

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    if isinstance(preference, torch.device):
        return preference
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"'{preference}' requested but CUDA is not available")
    return device


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision context: bf16 autocast on CUDA, a no-op on CPU or when disabled.

    bf16 needs no loss scaling (same exponent range as float32), so no GradScaler is involved.
    On CPU autocast is off: CPU bf16 kernels are slower than float32 on most machines.

    Args:
        device: the device the forward pass runs on.
        enabled: set False to force float32.

    Returns:
        A context manager to wrap the forward pass (and loss) in.
    """
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible initialisation.

    Training loops additionally draw batches and augmentations from their own
    :func:`make_generator`, so results do not depend on unrelated global RNG use.

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch generator living on ``device``, so random draws need no host-device copies.

    Args:
        seed: the seed.
        device: where random numbers will be drawn.

    Returns:
        The seeded generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def set_torch_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op CPU thread count (useful when several simulated sites share one CPU).

    Args:
        num_threads: threads to use; None leaves torch's current setting.

    Returns:
        The thread count now in effect.

    Raises:
        ConfigError: ``num_threads`` is below 1.
    """
    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError("num_threads", f"must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Temporarily put modules in eval mode, restoring each one's previous mode on exit.

    Args:
        *modules: the modules.
    """
    previous = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, was_training in zip(modules, previous):
            m.train(was_training)
