"""The segmenter M and the QC autoencoder R of a config: the one place networks are built from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedqc.config import Config
from fedqc.models.qc_autoencoder import build_qc_autoencoder
from fedqc.models.segmenter import build_segmenter


def new_segmenter(config: Config) -> torch.nn.Module:
    return build_segmenter(config.model.preset, in_size_px=config.preprocess.size_px, network=config.model.network,
                           kwargs=dict(config.model.kwargs) or None)


def new_autoencoder(config: Config) -> torch.nn.Module:
    return build_qc_autoencoder(config.preprocess.size_px, latent_channels=config.qc.ae_latent_channels,
                                dropout=config.qc.ae_dropout)


def segmenters_from_states(config: Config, states: Sequence[Mapping[str, torch.Tensor]],
                           device: torch.device) -> list[torch.nn.Module]:
    """The m_best candidates from their state dicts, on ``device``, in eval mode."""
    models = []
    for state in states:
        model = new_segmenter(config)
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return models


def frozen_autoencoder(config: Config, state: Mapping[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """R from its state dict: on ``device``, eval mode, no gradients (it is never updated after training)."""
    ae = new_autoencoder(config)
    ae.load_state_dict(state)
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.to(device).eval()
