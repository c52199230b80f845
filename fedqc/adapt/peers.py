"""The peers a config lists (``adapt.peers``), each adapted from M on one site's unlabelled pool."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from fedqc.adapt.dae_tta import dae_tta
from fedqc.adapt.norm_stats import Adapted, adabn, pool_slices
from fedqc.adapt.post_dae import PostDAE
from fedqc.adapt.tent import tent
from fedqc.config import Config

# Variant names in the ablation's records and tables, by config name.
PEER_VARIANTS = {"adabn": "AdaBN", "tent": "TENT", "post-dae": "Post-DAE", "dae-tta": "DAE-TTA"}


def adapt_peer(name: str, config: Config, model: nn.Module, autoencoder: nn.Module, pool: Sequence,
               device: torch.device, seed: int = 0) -> Adapted:
    """One peer (a config name of :data:`PEER_VARIANTS`) adapted from ``model`` on the cases ``pool``."""
    cfg = config.adapt
    images = pool_slices(pool)
    if name == "adabn":
        return adabn(model, images, device, batch_size=cfg.batch_size)
    if name == "tent":
        return tent(model, images, device, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed)
    if name == "dae-tta":
        return dae_tta(model, autoencoder, images, device, epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, seed=seed)
    if name == "post-dae":
        start = time.perf_counter()
        return Adapted(PostDAE(model, autoencoder).eval(), time.perf_counter() - start, True)
    raise ValueError(f"unknown peer {name!r}; choose from {sorted(PEER_VARIANTS)}")


def adapt_peers(config: Config, model: nn.Module, autoencoder: nn.Module, pool: Sequence, device: torch.device,
                seed: int = 0) -> dict[str, Adapted]:
    """Every peer of ``config.adapt.peers`` on one site's pool, by variant name."""
    return {PEER_VARIANTS[name]: adapt_peer(name, config, model, autoencoder, pool, device, seed)
            for name in config.adapt.peers}
