"""Segmenter M (model agnostic): any MONAI network by name, or a preset mirroring the paper's base networks.

Every segmenter maps a (N, 1, H, W) image batch to (N, 4, H, W) logits. The ``"dynunet"`` preset has deep
supervision: in training mode it returns (N, S, 4, H, W), the full-resolution output first and the coarser
decoder outputs after it (upsampled by MONAI); :func:`main_output` drops the extra heads, and in eval mode
the network returns the (N, 4, H, W) logits only. The losses in :mod:`fedqc.train.losses` weight the heads.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks import nets

from fedqc.core.device import autocast_context, eval_mode
from fedqc.core.errors import ConfigError
from fedqc.core.types import NUM_CLASSES

ArrayOrTensor = "np.ndarray | torch.Tensor"

PRESETS: tuple[str, ...] = ("unet", "unet-bn", "dynunet", "tiny")

# nnU-Net: 32 base channels doubling per stage up to 480 in 2D; pool until the map is 4 pixels wide.
_NNUNET_BASE_CHANNELS = 32
_NNUNET_MAX_CHANNELS = 480
_NNUNET_MIN_FEATURE_PX = 4


def dynunet_num_pools(in_size_px: int, min_feature_px: int = _NNUNET_MIN_FEATURE_PX) -> int:
    """Number of stride-2 stages nnU-Net would plan for a square 2D input.

    Halve while the size stays even and the halved map is at least ``min_feature_px`` wide:
    256 -> 6 (the reference's 6 down-sampling stages), 128 -> 5, 96 -> 4, 64 -> 4, 32 -> 3.

    Args:
        in_size_px: input height (= width) in pixels.
        min_feature_px: smallest bottleneck feature map.

    Returns:
        The number of pooling (stride-2) stages.
    """
    pools, size = 0, in_size_px
    while size % 2 == 0 and size // 2 >= min_feature_px:
        size //= 2
        pools += 1
    return pools


def _dynunet_kwargs(in_size_px: int) -> dict[str, Any]:
    pools = dynunet_num_pools(in_size_px)
    if pools < 2:
        raise ConfigError("model.in_size_px", f"{in_size_px} px is too small for the dynunet preset")
    return dict(
        spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES,
        kernel_size=[3] * (pools + 1),
        strides=[1] + [2] * pools,
        upsample_kernel_size=[2] * pools,
        filters=[min(_NNUNET_BASE_CHANNELS * 2**i, _NNUNET_MAX_CHANNELS) for i in range(pools + 1)],
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=True,
        # One output per decoder stage, as nnU-Net; the coarsest gets loss weight 0 (see losses).
        deep_supr_num=pools - 1,
        res_block=False,
    )


def _unet_kwargs(in_size_px: int, channels: tuple[int, ...], num_res_units: int,
                 dropout: float, norm: str = "INSTANCE") -> dict[str, Any]:
    factor = 2 ** (len(channels) - 1)
    if in_size_px % factor:
        raise ConfigError("model.in_size_px", f"{in_size_px} px must be divisible by {factor}")
    return dict(
        spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES,
        channels=channels, strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units, norm=norm, dropout=dropout,
    )


def preset_kwargs(preset: str, in_size_px: int) -> tuple[str, dict[str, Any]]:
    """The MONAI network name and constructor arguments of a preset.

    Args:
        preset: one of :data:`PRESETS`.
        in_size_px: input height (= width) in pixels.

    Returns:
        ``(network_name, kwargs)``.

    Raises:
        ConfigError: unknown preset or unsupported input size.
    """
    if preset == "dynunet":
        return "DynUNet", _dynunet_kwargs(in_size_px)
    if preset == "unet":
        return "UNet", _unet_kwargs(in_size_px, (16, 32, 64, 128, 256), num_res_units=2, dropout=0.1)
    if preset == "unet-bn":  # the same UNet with batch norm, for the BN-based peers (fedqc.adapt)
        return "UNet", _unet_kwargs(in_size_px, (16, 32, 64, 128, 256), num_res_units=2, dropout=0.1, norm="BATCH")
    if preset == "tiny":
        return "UNet", _unet_kwargs(in_size_px, (8, 16, 32), num_res_units=1, dropout=0.0)
    raise ConfigError("model.preset", f"unknown preset '{preset}'; choose one of {list(PRESETS)}")


def build_segmenter(preset: str = "unet", in_size_px: int = 128, network: str | None = None,
                    kwargs: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build a 2D segmenter producing 4-class logits.

    Args:
        preset: ``"unet"`` (light MONAI UNet, instance norm, residual units), ``"unet-bn"`` (the
            same with batch norm, so AdaBN / TENT apply), ``"dynunet"``
            (nnU-Net-style 2D U-Net with deep supervision) or ``"tiny"`` (for tests). Ignored when
            ``network`` is given.
        in_size_px: input height (= width) in pixels; sets the number of stages of ``"dynunet"``.
        network: name of any class in ``monai.networks.nets`` (e.g. ``"SegResNet"``); it gets
            ``spatial_dims=2, in_channels=1, out_channels=4`` where its constructor takes them.
        kwargs: constructor arguments; with a preset they override the preset's values.

    Returns:
        The network (on CPU, float32, training mode).

    Raises:
        ConfigError: unknown preset or network, or arguments the network rejects.
    """
    extra = dict(kwargs or {})
    if network is None:
        network, args = preset_kwargs(preset, in_size_px)
        args.update(extra)
    else:
        cls = getattr(nets, network, None)
        if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
            raise ConfigError("model.network", f"'{network}' is not a network in monai.networks.nets")
        params = inspect.signature(cls).parameters
        defaults = {"spatial_dims": 2, "in_channels": 1, "out_channels": NUM_CLASSES}
        args = {k: v for k, v in defaults.items() if k in params}
        args.update(extra)
    try:
        return getattr(nets, network)(**args)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError("model.kwargs", f"{network} rejected its arguments: {err}") from err


def main_output(output: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The full-resolution (N, C, H, W) logits of a network output, dropping deep-supervision heads.

    Args:
        output: (N, C, H, W) logits, (N, S, C, H, W) stacked heads (DynUNet in training mode) or a
            list/tuple of heads with the full-resolution one first.

    Returns:
        The (N, C, H, W) logits.
    """
    if isinstance(output, (list, tuple)):
        return output[0]
    return output[:, 0] if output.ndim == 5 else output


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters.

    Args:
        model: the network.

    Returns:
        The count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: ArrayOrTensor, batch_size: int = 32,
                          device: torch.device | None = None, autocast: bool = True) -> torch.Tensor:
    """Softmax probabilities of a stack of slices, batch by batch, in eval mode.

    Args:
        model: the segmenter (its train/eval mode is restored afterwards).
        images: (Z, 1, H, W) float images.
        batch_size: slices per forward pass.
        device: where to compute; defaults to the model's device.
        autocast: bf16 autocast on CUDA.

    Returns:
        (Z, 4, H, W) float32 probabilities on ``device``.
    """
    device = device or next(model.parameters()).device
    images = torch.as_tensor(images, dtype=torch.float32)
    chunks = []
    with eval_mode(model):
        for first in range(0, images.shape[0], batch_size):
            batch = images[first:first + batch_size].to(device, non_blocking=True)
            with autocast_context(device, autocast):
                logits = main_output(model(batch))
            chunks.append(torch.softmax(logits.float(), dim=1))
    if not chunks:
        return torch.empty((0, NUM_CLASSES, *images.shape[2:]), device=device)
    return torch.cat(chunks)
