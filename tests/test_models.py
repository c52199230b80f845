"""Segmenter builder, presets, and the QC autoencoder's architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedqc.core.errors import ConfigError
from fedqc.models import (
    build_qc_autoencoder,
    build_segmenter,
    count_parameters,
    main_output,
)
from fedqc.models.qc_autoencoder import encoder_plan
from fedqc.models.segmenter import (
    dynunet_num_pools,
    predict_probabilities,
    preset_kwargs,
)

TINY_DYNUNET = {"filters": [4, 8, 16, 32]}


@pytest.mark.parametrize("size, pools", [(256, 6), (128, 5), (96, 4), (64, 4), (32, 3)])
def test_dynunet_pools_follow_nnunet_rule(size, pools):
    assert dynunet_num_pools(size) == pools


def test_dynunet_preset_mirrors_nnunet_at_256():
    name, kwargs = preset_kwargs("dynunet", 256)
    assert name == "DynUNet"
    assert kwargs["filters"] == [32, 64, 128, 256, 480, 480, 480]
    assert kwargs["strides"] == [1, 2, 2, 2, 2, 2, 2]
    assert kwargs["deep_supervision"] and kwargs["deep_supr_num"] == 5
    assert kwargs["act_name"][1]["negative_slope"] == 0.01


def test_dynunet_returns_stacked_heads_in_training_and_logits_in_eval():
    model = build_segmenter("dynunet", 32, kwargs=TINY_DYNUNET)
    x = torch.randn(2, 1, 32, 32)
    model.train()
    out = model(x)
    assert out.shape == (2, 3, 4, 32, 32)  # 3 pools -> 3 decoder outputs
    assert main_output(out).shape == (2, 4, 32, 32)
    model.eval()
    assert model(x).shape == (2, 4, 32, 32)


@pytest.mark.parametrize("preset, size", [("tiny", 32), ("unet", 64)])
def test_unet_presets_output_four_class_logits(preset, size):
    model = build_segmenter(preset, size).eval()
    assert model(torch.randn(1, 1, size, size)).shape == (1, 4, size, size)


def test_any_monai_network_by_name():
    model = build_segmenter(network="BasicUNet", kwargs={"features": (4, 4, 8, 16, 32, 4)}).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4, 32, 32)


@pytest.mark.parametrize("kwargs", [{"preset": "resnet"}, {"network": "NoSuchNet"},
                                    {"network": "UNet", "kwargs": {"bogus": 1}},
                                    {"preset": "unet", "in_size_px": 72}])
def test_bad_model_config_names_the_key(kwargs):
    with pytest.raises(ConfigError, match="model"):
        build_segmenter(**kwargs)


def test_main_output_of_list_and_plain_tensor():
    x = torch.randn(2, 4, 8, 8)
    assert main_output(x) is x
    assert main_output([x, x[:, :, ::2, ::2]]) is x


def test_predict_probabilities_batches_and_restores_mode():
    model = build_segmenter("dynunet", 32, kwargs=TINY_DYNUNET).train()
    probs = predict_probabilities(model, torch.randn(5, 1, 32, 32), batch_size=2)
    assert probs.shape == (5, 4, 32, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(5, 32, 32))
    assert model.training


@pytest.mark.parametrize("size", [256, 128, 96, 64])
def test_autoencoder_latent_is_4x4(size):
    ae = build_qc_autoencoder(size).eval()
    with torch.no_grad():
        x = torch.softmax(torch.randn(1, 4, size, size), 1)
        assert ae.encoder(x).shape == (1, 100, 4, 4)
        y = ae(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum(1), torch.ones(1, size, size))


def test_autoencoder_at_256_is_the_reference_architecture():
    plan = encoder_plan(256)
    assert [(p.in_channels, p.out_channels, p.kernel, p.stride) for p in plan] == [
        (4, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2), (32, 32, 3, 1), (32, 64, 4, 2), (64, 64, 3, 1),
        (64, 128, 4, 2), (128, 64, 3, 1), (64, 32, 3, 1), (32, 100, 4, 2)]
    assert 770_000 < count_parameters(build_qc_autoencoder(256)) < 790_000  # reference: ~0.78 M


def test_autoencoder_dropout_is_configurable():
    def rates(ae):
        return {m.p for m in ae.modules() if isinstance(m, nn.Dropout)}
    assert rates(build_qc_autoencoder(64, dropout=0.5)) == {0.5}
    assert rates(build_qc_autoencoder(64, dropout=0.0)) == set()
    with pytest.raises(ConfigError):
        build_qc_autoencoder(64, dropout=1.0)


def test_autoencoder_rejects_sizes_without_4x4_latent():
    with pytest.raises(ConfigError, match="qc.in_size_px"):
        build_qc_autoencoder(100)
