"""The segmenter M and the QC autoencoder R of a config: the one place networks are built from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedqc.config import Config
from fedqc.models.qc_autoencoder import build_qc_autoencoder
from fedqc.models.segmenter import build_segmenter


def new_segmenter(config: Config) -> torch.nn.Module:
    """M; under ``privacy.dp`` with out-of-place activations (a batch-norm network is not fixed but
    refused when it trains: :func:`fedqc.train.privacy.check_dp_model`)."""
    model = build_segmenter(config.model.preset, in_size_px=config.preprocess.size_px, network=config.model.network,
                            kwargs=dict(config.model.kwargs) or None)
    return dp_ready(model, fix_norm=False) if config.privacy.dp is not None else model


def new_autoencoder(config: Config) -> torch.nn.Module:
    """R; under ``privacy.dp`` with Opacus's replacement of its batch norm (group norm), which mixes
    patients within a batch (docs/PRIVACY.md). Every site builds the same architecture from the
    same config, so the weights still aggregate."""
    ae = build_qc_autoencoder(config.preprocess.size_px, latent_channels=config.qc.ae_latent_channels,
                              dropout=config.qc.ae_dropout)
    return dp_ready(ae) if config.privacy.dp is not None else ae


def dp_ready(model: torch.nn.Module, fix_norm: bool = True) -> torch.nn.Module:
    """``model`` as Opacus can train it: with ``fix_norm`` batch norm replaced by group norm (Opacus's
    ``ModuleValidator.fix``), and in-place activations made out-of-place (Opacus's backward hooks
    refuse a view modified in place). Weights and names of the other layers are unchanged."""
    from opacus.validators import ModuleValidator

    if fix_norm:
        model = ModuleValidator.fix(model)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


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
