"""Known answers and properties of the label-free peers (fedqc.adapt) and their report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedqc.adapt.dae_tta import ImageNormaliser, NormalisedSegmenter, dae_tta
from fedqc.adapt.norm_stats import adabn, batch_norms
from fedqc.adapt.post_dae import PostDAE
from fedqc.adapt.tent import collect_params, softmax_entropy, tent
from fedqc.models.qc_autoencoder import build_qc_autoencoder
from fedqc.models.segmenter import build_segmenter, main_output
from fedqc.qc.scoring import reconstruct, segment

CPU = torch.device("cpu")


def net(norm: str = "INSTANCE", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_segmenter("tiny", in_size_px=32, kwargs={"norm": norm}).eval()


def pool(n: int = 6, seed: int = 1, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 1, 32, 32)) * 2.0 + shift).astype(np.float32)


def states_equal(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_unet_bn_preset_has_batch_norm_and_unet_has_none():
    assert batch_norms(build_segmenter("unet-bn", in_size_px=32))
    assert not batch_norms(build_segmenter("unet", in_size_px=32))


def test_adabn_on_instance_norm_is_a_no_op_and_says_so():
    model = net("INSTANCE")
    out = adabn(model, pool(), CPU)
    assert not out.applied and "no-op" in out.note
    assert states_equal(model.state_dict(), out.model.state_dict()) == []
    x = torch.as_tensor(pool(2, seed=5))
    assert torch.equal(model(x), out.model(x))


def test_adabn_on_batch_norm_changes_running_stats_only_to_the_pools():
    model = net("BATCH")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = pool(6, shift=3.0)
    out = adabn(model, images, CPU, batch_size=64)  # one batch: the running stats are its statistics
    assert out.applied
    changed = states_equal(before, out.model.state_dict())
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert states_equal(before, model.state_dict()) == []  # the source network is untouched
    # Known answer: the first BN's running mean is the per-channel mean of its input over the pool.
    first = batch_norms(out.model)[0]
    seen = {}
    hook = first.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    out.model(torch.as_tensor(images))
    hook.remove()
    assert torch.allclose(first.running_mean, seen["x"].mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, seen["x"].var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)


def test_tent_changes_only_the_normalisation_affine_parameters_and_lowers_entropy():
    model = net("BATCH")
    before = {k: v.clone() for k, v in model.named_parameters()}
    images = pool(8, shift=2.0)
    out = tent(model, images, CPU, epochs=3, lr=1e-2, batch_size=4)
    assert out.applied
    _, affine = collect_params(out.model)
    after = dict(out.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(affine)
    assert not any(p.requires_grad for p in out.model.parameters())
    x = torch.as_tensor(images)
    source = net("BATCH")
    from fedqc.adapt.tent import configure_model

    configure_model(source)  # the same batch statistics, the source's affine parameters
    with torch.no_grad():
        assert softmax_entropy(main_output(out.model(x))).mean() < softmax_entropy(main_output(source(x))).mean()


def test_tent_does_not_apply_without_affine_normalisation():
    out = tent(net("INSTANCE"), pool(), CPU)
    assert not out.applied and "does not apply" in out.note


def test_the_normaliser_starts_as_the_identity_and_leaves_predictions_unchanged():
    model = net("INSTANCE")
    x = torch.as_tensor(pool(3))
    normaliser = ImageNormaliser()
    assert torch.equal(normaliser(x), x)
    with torch.no_grad():
        assert torch.equal(NormalisedSegmenter(normaliser, model)(x), model(x))
    assert sum(p.numel() for p in normaliser.parameters()) == 16 * 9 + 16 + 16 * 16 * 9 + 16 + 16 * 9 + 1 + 32


def test_dae_tta_updates_the_normaliser_only_and_keeps_the_best_agreement():
    model = net("INSTANCE")
    torch.manual_seed(3)
    ae = build_qc_autoencoder(32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = dae_tta(model, ae, pool(8), CPU, epochs=2, lr=1e-2, batch_size=4)
    assert out.applied and out.note.startswith("pool agreement")
    assert states_equal(before, out.model.segmenter.state_dict()) == []
    assert not any(p.requires_grad for p in out.model.parameters())


def test_post_dae_output_is_the_reconstruction_of_the_prediction():
    model = net("INSTANCE")
    torch.manual_seed(4)
    ae = build_qc_autoencoder(32).eval()
    images = pool(4)[:, 0]
    probs = segment(PostDAE(model, ae), images, CPU)
    expected = reconstruct(ae, segment(model, images, CPU).argmax(1))
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.equal(probs.argmax(1), expected.argmax(1))


def test_the_peers_key_is_validated_with_the_key_named(tmp_path):
    from fedqc.config import load_config
    from fedqc.core.errors import ConfigError

    base = "sites:\n  - {name: a, root: %s}\n" % tmp_path
    for text, key in [("adapt: {peers: [tent, bogus]}\n", "adapt.peers[1]"), ("adapt: {peers: [tent, tent]}\n",
                                                                               "adapt.peers"),
                      ("adapt: {epochs: 0}\n", "adapt.epochs"), ("model: {preset: unet-gn}\n", "model.preset")]:
        path = tmp_path / "c.yaml"
        path.write_text(base + text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.key == key, text
    path.write_text(base + "adapt: {peers: [adabn, tent, post-dae, dae-tta]}\nmodel: {preset: unet-bn}\n")
    config = load_config(path)
    assert config.adapt.peers == ("adabn", "tent", "post-dae", "dae-tta") and config.model.preset == "unet-bn"
    path.write_text(base)
    assert load_config(path).adapt.peers == ()


def _results() -> list[dict]:
    """Two seeds, one shifted site: full beats TENT on every case, AdaBN is the weakest peer."""
    results = []
    for seed in (0, 1):
        records, summary = [], []
        for variant, base in [("M", 0.5), ("full", 0.8), ("TENT", 0.7), ("AdaBN", 0.6)]:
            dices = [base + 0.01 * i + 0.002 * seed for i in range(8)]
            records += [{"site": "b", "case_id": f"c{i}", "variant": variant, "rv_dice": d, "rv_hd_mm": 10.0}
                        for i, d in enumerate(dices)]
            summary.append({"site": "b", "view": "SA", "variant": variant, "rv_dice": float(np.mean(dices)),
                            "rv_hd_mm": 10.0})
        results.append({"seed": seed, "views": {"SA": {
            "records": records, "summary": summary,
            "upper_bound": [{"site": "b", "variant": "M", "rv_dice": 0.9 + 0.035 + 0.002 * seed, "rv_hd_mm": 5.0}],
            "adapt": {"full_refine_seconds": 12.0, "sites": {"b": {
                "TENT": {"seconds": 2.0, "applied": True, "note": ""},
                "AdaBN": {"seconds": 1.0, "applied": True, "note": ""}}}}}}})
    return results


def test_peers_report_known_answers(tmp_path):
    from fedqc.config import Config, SiteConfig
    from fedqc.evaluation.peers_report import case_dice, paired_test, peers_png, peers_report

    config = Config(sites=(SiteConfig(name="b", root=tmp_path, labelled=False),), views=("SA",))
    results = _results()
    report = peers_report(results, config)
    # M mean 0.536, full 0.836, upper bound 0.936: full closes 75% of the gap.
    assert "| full | 0.836 ± 0.001 | 10.0 ± 0.0 | 75% |" in report
    assert "| b | TENT | 0.836 | 0.736 | 8 | +0.100 |" in report  # the strongest peer is TENT
    t = paired_test(case_dice(results, "SA", "b", "full"), case_dice(results, "SA", "b", "TENT"))
    assert t["n"] == 8 and t["p_greater"] == pytest.approx(1 / 2 ** 8)  # all 8 differences positive (exact)
    assert "| b | TENT | 2.0 | +0.200 |" in report and "| b | full | 12.0 | +0.300 |" in report
    png = peers_png(results, config, tmp_path / "peers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_federated_report_adds_each_peer_at_the_shifted_site_on_its_own_pool(tiny_data, tmp_path):
    """Peers on in the config: each shifted site's rows gain the peers, adapted from M on its pool."""
    import json

    import yaml

    from fedqc.config import load_config
    from fedqc.evaluation.federated_report import federated_report
    from fedqc.models.factory import new_autoencoder, new_segmenter
    from fedqc.qc.thresholds import Thresholds
    from tests.conftest import tiny_config_dict

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, views=["SA"], model={"preset": "unet-bn"},
                                                    adapt={"peers": ["adabn", "tent", "post-dae", "dae-tta"],
                                                           "epochs": 1})))
    config = load_config(path)
    torch.manual_seed(0)
    seg = {f"seg/SA/{k}": v.numpy() for k, v in new_segmenter(config).state_dict().items()}
    ae = {f"ae/SA/{k}": v.numpy() for k, v in new_autoencoder(config).state_dict().items()}
    final = {**{f"m0/{k}": v for k, v in seg.items()}, **ae}
    fences = Thresholds(th_low_pdc=0.5, th_up_phd=50.0, q1_pdc=0.6, q3_pdc=0.9, q1_phd=5.0, q3_phd=20.0,
                        factor=1.5, n_cases=4, source="consortium")
    for site in config.sites:
        (tmp_path / "run" / "sites" / site.name / "thresholds").mkdir(parents=True)
        fences.to_json(tmp_path / "run" / "sites" / site.name / "thresholds" / "SA.json")
    federated_report(config, tmp_path / "run", final, [seg], progress=None)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    variants = {(r["site"], r["variant"]) for r in report["summary"]}
    assert {("centre2", p) for p in ("AdaBN", "TENT", "Post-DAE", "DAE-TTA")} <= variants
    assert not any(v in {"AdaBN", "TENT", "Post-DAE", "DAE-TTA"} for s, v in variants if s == "centre1")
    (cost,) = report["adapt"]
    assert cost["site"] == "centre2" and all(cost[p]["applied"] for p in ("AdaBN", "TENT", "DAE-TTA"))
    # Each peer also runs on top of full's refined model; here that model is M itself (the same
    # weights), so the deterministic peers on it score exactly as on M.
    assert {("centre2", f"full+{p}") for p in ("AdaBN", "TENT", "Post-DAE", "DAE-TTA")} <= variants
    dice = {(r["site"], r["variant"]): r["rv_dice"] for r in report["summary"]}
    for peer in ("AdaBN", "Post-DAE"):
        assert dice[("centre2", f"full+{peer}")] == dice[("centre2", peer)]


def test_the_reconstruction_floor_switches_a_failing_site_to_post_dae(trained):
    """qc.reconstruction_floor: a site whose median selection pDC is below it outputs R's reconstructions."""
    import dataclasses

    from fedqc.data.site import load_site_split
    from fedqc.evaluation.variants import score_site_variants
    from fedqc.models.run_folder import load_autoencoder, load_candidates, load_run_config
    from fedqc.predict.case import predict_case, site_reconstructs
    from fedqc.qc.thresholds import Thresholds

    _, run = trained
    config = load_run_config(run)
    models = load_candidates(run, "SA", "supervised", config, CPU)
    ae = load_autoencoder(run, "SA", config, CPU)
    fences = Thresholds(th_low_pdc=0.5, th_up_phd=50.0, q1_pdc=0.6, q3_pdc=0.9, q1_phd=5.0, q3_phd=20.0,
                        factor=1.5, n_cases=4, source="test")
    cases = load_site_split(config.sites[1], "SA", config, progress=None).test
    off = [predict_case(config, models, ae, c, fences, CPU) for c in cases]
    median = float(np.median([r.pdc_selected for r in off]))
    assert not any(r.reconstructed for r in off) and 0 < median < 1

    def with_floor(floor: float):
        return dataclasses.replace(config, qc=dataclasses.replace(config.qc, reconstruction_floor=floor))

    assert not site_reconstructs(config, models, ae, cases, fences, CPU)  # 0: off
    assert not site_reconstructs(with_floor(median), models, ae, cases, fences, CPU)  # not below
    assert site_reconstructs(with_floor(min(1.0, median + 1e-6)), models, ae, cases, fences, CPU)
    on = predict_case(config, models, ae, cases[0], fences, CPU, reconstruct=True)
    assert on.reconstructed and on.selected == off[0].selected
    # The output is R's softmax of the selected prediction: its labels are R's reconstruction of it.
    np.testing.assert_array_equal(on.labels, off[0].reconstruction)
    assert not np.array_equal(on.labels, off[0].labels)
    np.testing.assert_allclose(on.probs.sum(1), 1.0, atol=1e-5)
    assert not predict_case(config, models, ae, cases[0], fences, CPU, selection=False, reconstruct=True).reconstructed
    # The report's and the ablation's scoring: only the selecting variants switch, and all of the site.
    variants = {"M": (models[:1], False), "{M}+QC": (models, True)}
    plain = score_site_variants(config, "centre1", cases, variants, ae, fences, CPU)
    switched = score_site_variants(with_floor(1.0), "centre1", cases, variants, ae, fences, CPU)
    assert [r.rv_dice for r in plain if r.variant == "M"] == [r.rv_dice for r in switched if r.variant == "M"]
    assert [r.rv_dice for r in plain if r.variant == "{M}+QC"] != [r.rv_dice for r in switched if r.variant == "{M}+QC"]
    with pytest.raises(ValueError, match="reconstruction_floor"):
        dataclasses.replace(config.qc, reconstruction_floor=1.5)
