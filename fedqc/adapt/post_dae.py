"""Post-DAE (Larrazabal et al., TMI 2020): the autoencoder's reconstruction of the prediction is the
final segmentation; no network is updated.

fedqc's QC autoencoder R (trained on ground-truth masks, corrective by default) plays the DAE.
:class:`PostDAE` is a segmenter like any other (logits in, so QC scoring and restoring to the
original geometry treat it as M): its softmax is R's reconstruction of M's one-hot prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from fedqc.core.types import NUM_CLASSES
from fedqc.models.segmenter import main_output
from fedqc.train.losses import one_hot


class PostDAE(nn.Module):
    """M followed by R on M's hard prediction; returns log-probabilities of R's reconstruction."""

    def __init__(self, segmenter: nn.Module, autoencoder: nn.Module):
        super().__init__()
        self.segmenter = segmenter
        self.autoencoder = autoencoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = main_output(self.segmenter(images)).argmax(1)
        reconstruction = self.autoencoder(one_hot(labels, NUM_CLASSES)).float()  # softmax over classes
        return torch.log(reconstruction.clamp_min(1e-12))
