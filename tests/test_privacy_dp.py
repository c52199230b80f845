"""DP-SGD at the sites (privacy.dp): Opacus's accountant figures, per-patient clipping, the site's budget."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedqc.config import config_from_dict, to_dict
from fedqc.config.flat import encode_value, flatten
from fedqc.core.errors import ConfigError
from fedqc.models.factory import dp_ready, new_autoencoder
from fedqc.models.segmenter import build_segmenter
from fedqc.site.algorithm import make_site_algo
from fedqc.site.contract import Task
from fedqc.train.losses import supervised_loss
from fedqc.train.privacy import (
    PrivacyBudget,
    calibrate_noise,
    calibrate_phases,
    check_dp_model,
    epsilon_of,
    unit_index,
)
from fedqc.train.supervised import OptimiserConfig, train_epochs
from tests.conftest import tiny_config_dict

SIZE = 32


def tiny_slices(n_patients: int = 4, per_patient: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    images = rng.normal(size=(n, 1, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, 4, size=(n, SIZE, SIZE)).astype(np.uint8)
    units = unit_index([f"p{i // per_patient}" for i in range(n)])
    return images, labels, units


def test_epsilon_and_calibration_match_opacus():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    sigma, q, steps, delta = 1.1, 0.05, 600, 1e-5
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_of([(sigma, q, steps)], delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    # Composition of two phases (segmenter and R at different sample rates) as Opacus composes them.
    for _ in range(100):
        accountant.step(noise_multiplier=sigma, sample_rate=0.2)
    assert epsilon_of([(sigma, q, steps), (sigma, 0.2, 100)], delta) == pytest.approx(accountant.get_epsilon(delta))
    ours = calibrate_noise(3.0, delta, [(q, steps)])
    phases = calibrate_phases(3.0, delta, [("a", q, steps), ("b", 0.2, 100)])
    alone = {"a": calibrate_noise(1.5, delta / 2, [(q, steps)]), "b": calibrate_noise(1.5, delta / 2, [(0.2, 100)])}
    assert phases["a"] / phases["b"] == pytest.approx(alone["a"] / alone["b"])  # each phase's share kept
    assert 2.98 <= epsilon_of([(phases["a"], q, steps), (phases["b"], 0.2, 100)], delta) <= 3.0
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=delta, sample_rate=q, steps=steps,
                                  accountant="rdp", epsilon_tolerance=0.005)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert epsilon_of([(ours, q, steps)], delta) <= 3.0


def test_a_dp_run_records_its_steps_in_the_ledger(tmp_path):
    images, labels, units = tiny_slices()
    plan = [("segmenter/SA", 4 / len(units), 2 * 3)]  # batch 4 of 12 slices: q = 1/3, 3 steps an epoch, 2 epochs
    budget = PrivacyBudget.open(tmp_path / "ledger.json", epsilon=4.0, delta=1e-3, max_grad_norm=1.0,
                                noise_multiplier=None, plan=plan, run_key="k")
    model = dp_ready(build_segmenter("tiny", SIZE), fix_norm=False)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    private = budget.training(units, batch_size=4, seed=0, phase="segmenter/SA")
    train_epochs(model, images, labels, optimiser, first_epoch=0, epochs=2, total_epochs=2, lr=0.01,
                 schedule=OptimiserConfig(kind="sgd", schedule="constant"), batch_size=4, seed=0, augment=False,
                 privacy=private)
    budget.record(private)
    assert budget.history == [(budget.phase_noise["segmenter/SA"], pytest.approx(1 / 3), 6)]
    assert budget.spent() == pytest.approx(epsilon_of(budget.history, 1e-3))
    assert 3.9 < budget.spent() <= 4.0  # the calibrated sigma spends the budget on the planned steps
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus's hooks removed
    again = PrivacyBudget.open(tmp_path / "ledger.json", epsilon=4.0, delta=1e-3, max_grad_norm=1.0,
                               noise_multiplier=None, plan=plan, run_key="k")
    assert again.history == budget.history and again.noise_multiplier == budget.noise_multiplier
    assert not again.fits([("segmenter/SA", 1 / 3, 1)])  # the next step would overspend


def test_per_patient_gradients_are_clipped_by_opacus():
    """noise 0, q 1 (every patient each step), plain SGD: the step is -lr / P * sum_u clip(g_u), g_u the
    gradient of patient u's summed per-slice losses; computed here independently with autograd."""
    images, labels, units = tiny_slices(n_patients=3, per_patient=2)
    clip, lr = 0.05, 1.0
    torch.manual_seed(0)
    model = dp_ready(build_segmenter("tiny", SIZE), fix_norm=False)
    start = copy.deepcopy(model)
    reference = []
    for u in range(3):
        probe = copy.deepcopy(start)
        idx = np.flatnonzero(units == u)
        loss = sum(supervised_loss(probe(torch.as_tensor(images[i:i + 1])), torch.as_tensor(labels[i:i + 1]),
                                   per_sample=True) for i in idx)
        grads = torch.autograd.grad(loss, [p for p in probe.parameters()])
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        assert norm > clip  # the clip binds for every patient
        reference.append([g * min(1.0, clip / (norm.item() + 1e-6)) for g in grads])
    expected = [start_p.detach() - lr * sum(r[k] for r in reference) / 3
                for k, start_p in enumerate(start.parameters())]
    budget = PrivacyBudget(epsilon=1.0, delta=1e-3, noise_multiplier=0.0, max_grad_norm=clip)
    private = budget.training(units, batch_size=len(units), seed=0)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    train_epochs(model, images, labels, optimiser, first_epoch=0, epochs=1, total_epochs=1, lr=lr,
                 schedule=OptimiserConfig(kind="sgd", schedule="constant", weight_decay=0.0, momentum=0.0,
                                          nesterov=False),
                 batch_size=len(units), seed=0, augment=False, privacy=private)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-6)
    total = torch.sqrt(sum(((g.detach() - s.detach()) ** 2).sum() for g, s in zip(model.parameters(),
                                                                                     start.parameters())))
    assert total <= lr * clip * 3 / 3 + 1e-6  # three clipped patients over an expected batch of three


def test_networks_opacus_cannot_train_are_refused_naming_the_key(tiny_data):
    with pytest.raises(ConfigError, match="model.preset.*dynunet"):
        config_from_dict(tiny_config_dict(tiny_data, model={"preset": "dynunet"}, privacy={"dp": {"epsilon": 8}}))
    batch_norm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="model.network.*BatchNorm"):
        check_dp_model(batch_norm, "model.network", SIZE)
    check_dp_model(dp_ready(build_segmenter("unet", SIZE), fix_norm=False), "model.preset", SIZE)
    config = config_from_dict(tiny_config_dict(tiny_data, privacy={"dp": {"epsilon": 8}}))
    ae = new_autoencoder(config)  # R's batch norm becomes group norm under DP
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ae.modules())
    check_dp_model(ae, "qc", config.preprocess.size_px, in_channels=4)


@pytest.mark.parametrize("section, key", [
    ({"dp": {"epsilon": 0}}, "privacy.dp.epsilon"),
    ({"dp": {"epsilon": 3, "delta": 2}}, "privacy.dp.delta"),
    ({"dp": {"epsilon": 3, "max_grad_norm": -1}}, "privacy.dp.max_grad_norm"),
    ({"dp": {"epsilon": 3, "noise_multiplier": -0.5}}, "privacy.dp.noise_multiplier"),
    ({"dp": {"delta": 1e-5}}, "privacy.dp.epsilon"),
    ({"dp": {"epsilon": 3, "refinement": "sometimes"}}, "privacy.dp.refinement"),
    ({"secure_aggregation": "yes"}, "privacy.secure_aggregation"),
])
def test_bad_privacy_settings_name_the_key(tiny_data, section, key):
    with pytest.raises(ConfigError) as error:
        config_from_dict(tiny_config_dict(tiny_data, privacy=section))
    assert error.value.key == key


def test_secure_aggregation_refuses_what_needs_individual_updates(tiny_data):
    with pytest.raises(ConfigError) as error:
        config_from_dict(tiny_config_dict(tiny_data, privacy={"secure_aggregation": True},
                                          federation={"aggregation": "median", "refine_aggregation": "slices"}))
    assert error.value.key == "federation.aggregation"
    with pytest.raises(ConfigError) as error:
        config_from_dict(tiny_config_dict(tiny_data, privacy={"secure_aggregation": True}))
    assert error.value.key == "federation.refine_aggregation"
    config_from_dict(tiny_config_dict(tiny_data, privacy={"secure_aggregation": True},
                                      federation={"refine_aggregation": "slices"}))


def _dp_site(tiny_data, work, epsilon: float):
    data = tiny_config_dict(tiny_data, views=["SA"], federation={"supervised_rounds": 3, "local_epochs": 1},
                            privacy={"dp": {"epsilon": epsilon, "noise_multiplier": 1.0}})
    config = config_from_dict(data)
    settings = to_dict(config)
    settings.pop("sites")
    settings.pop("simulated", None)
    site = config.sites[0]
    node = {"site-id": site.name, "work-dir": str(work), "root": str(site.root),
            "filter": encode_value(dict(site.filter)), "labelled": True, "views": "SA"}
    return node, flatten(settings)


def test_a_site_stops_contributing_when_its_budget_is_spent(tiny_data, tmp_path):
    """Noise fixed, epsilon between one round's and two rounds' spending: round 1 trains, round 2 is refused."""
    from fedqc.site.privacy import round_steps

    probe = make_site_algo(*_dp_site(tiny_data, tmp_path / "probe", 1.0))
    delta = 1.0 / len(probe.labelled_slices("SA")[0])
    steps = round_steps(probe, 1, {"SA": 1}, autoencoder=False)
    epsilon_one = epsilon_of([(1.0, q, n) for _, q, n in steps], delta)
    epsilon_two = epsilon_of([(1.0, q, 2 * n) for _, q, n in steps], delta)
    assert 0 < epsilon_one < epsilon_two
    node, run_config = _dp_site(tiny_data, tmp_path / "site", (epsilon_one + epsilon_two) / 2)
    algo = make_site_algo(node, run_config)
    weights = algo.run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    first = algo.run(Task.SUPERVISED, weights, {"local-epochs": 1, "phase-round": 1})
    assert first.weights and first.metrics["dp-epsilon"] == pytest.approx(epsilon_one, rel=1e-6)
    assert "dp-budget-spent" not in first.metrics
    # A fresh site object (a new process) reads the ledger from its work dir and refuses round 2.
    again = make_site_algo(node, run_config)
    second = again.run(Task.SUPERVISED, first.weights, {"local-epochs": 1, "phase-round": 2})
    assert second.weights is None
    assert second.metrics["dp-budget-spent"] == 1 and second.metrics["num-examples"] == 0
    assert second.metrics["dp-epsilon"] == pytest.approx(epsilon_one, rel=1e-6)
    ledger = (tmp_path / "site" / "privacy" / "ledger.json")
    assert ledger.is_file() and oct(ledger.stat().st_mode & 0o777) == "0o600"


def test_fedqc_train_takes_the_same_dp_path(tiny_data):
    """Centralised training under privacy.dp: the same loops with DP-SGD, the budget spent as planned."""
    from fedqc.data.site import load_site_split
    from fedqc.train.stages import train_supervised

    config = config_from_dict(tiny_config_dict(tiny_data, views=["SA"], train={"epochs": 1},
                                               qc={"ae_epochs": 1, "segmenter_examples": True},
                                               privacy={"dp": {"epsilon": 5.0}}))
    split = load_site_split(config.sites[0], "SA", config, progress=None)
    result = train_supervised(config, split.train, split.val, torch.device("cpu"), progress=None)
    privacy = result.history["privacy"]
    assert 4.9 < privacy["epsilon"] <= 5.0 and privacy["unit"] == "patient"
    assert len(privacy["steps"]) == 2 and set(privacy["phase_noise"]) == {"segmenter/view", "autoencoder/view"}
    assert {tuple(s[:2]) for s in privacy["steps"]} == {(privacy["phase_noise"][p], q) for p, q in (
        ("segmenter/view", privacy["steps"][0][1]), ("autoencoder/view", privacy["steps"][1][1]))}
    assert result.candidate_states and result.autoencoder_state


def test_clipping_only_never_stops_a_site_and_claims_no_guarantee():
    """``noise_multiplier: 0`` (measurement only: clipping without noise) trains every round; its epsilon is infinite."""
    plan = [("segmenter/SA", 0.1, 100)]
    budget = PrivacyBudget.open(None, epsilon=1.0, delta=1e-3, max_grad_norm=1.0, noise_multiplier=0.0,
                                        plan=plan, run_key="k")
    assert budget.clipping_only and budget.fits(plan * 50)
    budget.history.append((0.0, 0.1, 100))
    assert budget.spent() == float("inf")
    noisy = PrivacyBudget.open(None, epsilon=1.0, delta=1e-3, max_grad_norm=1.0, noise_multiplier=1.0,
                                       plan=plan, run_key="k")
    assert not noisy.clipping_only and not noisy.fits(plan * 50)
