"""The method's training stages, one implementation for every path (Galati & Zuluaga 2021, Sec. 2).

``fedqc train`` / ``refine`` / ``ablation`` run them over the consortium's data in one process; a
federated site (:mod:`fedqc.site.tasks`) runs the same functions on its own data for one round:

* :func:`supervised_round`: local epochs of Eq. 1 from given weights (``fedqc train`` is
  :func:`train_supervised`: the same loop over all epochs, keeping the m_best checkpoints);
* :func:`autoencoder_round`: local epochs of L^R on ground-truth masks;
* :func:`refine_round`: one refinement epoch / round k of Eq. 2 for every candidate, on the
  flagged cases with the supervised term on the labelled slices (alpha from
  :func:`fedqc.train.losses.alpha_schedule`, the only alpha schedule); :func:`refine` is the
  centralised loop: flag, refine, re-flag, until nothing is flagged or K_semi.

Randomness is seeded per epoch (:func:`fedqc.train.supervised.epoch_seed`), so one site's round of
E local epochs draws exactly what the centralised loop draws for the same epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedqc.config import Config
from fedqc.core.device import make_generator, seed_everything
from fedqc.data.site import PreparedCase, stack_slices
from fedqc.models.factory import new_autoencoder, new_segmenter
from fedqc.qc.ood import flag_ood
from fedqc.qc.scoring import score_cases
from fedqc.qc.thresholds import Thresholds
from fedqc.train.autoencoder import (
    Examples,
    autoencoder_epochs,
    autoencoder_optimiser,
    segmenter_examples,
    train_qc_autoencoder,
)
from fedqc.train.corrupt import CorruptionConfig
from fedqc.train.losses import alpha_schedule
from fedqc.train.privacy import PrivacyBudget, PrivateTraining, check_dp_model, unit_index
from fedqc.train.refine import refine_epoch
from fedqc.train.supervised import (
    EpochStats,
    OptimiserConfig,
    build_optimiser,
    epoch_seed,
    nnunet_optimiser,
    train_epochs,
    train_segmenter,
    view_passes,
)

Progress = Callable[[str], None] | None
AE_WEIGHT_DECAY = 1e-5  # the reference's Adam weight decay for R


def optimiser_config(config: Config) -> OptimiserConfig:
    """Eq. 1's optimiser and schedule from ``train`` (SGD: nnU-Net's; Adam: x0.985 per epoch)."""
    if config.train.optimiser == "sgd":
        return dataclasses.replace(nnunet_optimiser(), weight_decay=config.train.weight_decay)
    return OptimiserConfig(kind="adam", weight_decay=config.train.weight_decay)


def consortium_passes(splits_by_view: Mapping[str, Sequence]) -> dict[str, int]:
    """:func:`fedqc.train.supervised.view_passes` over the training slices of every site's split per view."""
    return view_passes({view: sum(len(c.images) for s in splits for c in s.train)
                        for view, splits in splits_by_view.items()})


def refine_optimiser(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Eq. 2's optimiser: Adam at ``refine.lr``, constant, with ``train.weight_decay``."""
    return build_optimiser(model, config.refine.lr,
                           OptimiserConfig(kind="adam", schedule="constant", weight_decay=config.train.weight_decay))


# -- Eq. 1 and L^R ---------------------------------------------------------------------------------


def supervised_round(config: Config, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *,
                     first_epoch: int, epochs: int, total_epochs: int, passes: int = 1,
                     privacy: PrivateTraining | None = None) -> EpochStats:
    """``epochs`` epochs of Eq. 1 from the model's current weights (a fresh optimiser);
    ``privacy``: with DP-SGD (:mod:`fedqc.train.privacy`)."""
    tc = config.train
    schedule = optimiser_config(config)
    optimiser = build_optimiser(model, tc.lr, schedule)
    if privacy is not None:
        check_dp_model(model, "model.network" if config.model.network else "model.preset", config.preprocess.size_px)
    return train_epochs(model, images, labels, optimiser, first_epoch=first_epoch, epochs=epochs,
                        total_epochs=total_epochs, lr=tc.lr, schedule=schedule, batch_size=tc.batch_size,
                        seed=tc.seed, augment=tc.augment, passes=passes, privacy=privacy)


def dp_phase(view: str, autoencoder: bool) -> str:
    """The name of a DP-SGD phase in a site's ledger (its noise multiplier is its own)."""
    return f"{'autoencoder' if autoencoder else 'segmenter'}/{view}"


def dp_steps(config: Config, view: str, slices: int, epochs: int, passes: int,
             autoencoder: bool = False) -> tuple[str, float, int]:
    """``(phase, sample rate, steps)`` of ``epochs`` DP-SGD epochs of ``passes`` passes over ``slices`` slices."""
    batch = config.qc.ae_batch_size if autoencoder else config.train.batch_size
    q = min(1.0, batch / max(slices, 1))
    return dp_phase(view, autoencoder), q, epochs * passes * max(1, math.ceil(1.0 / q))


def dp_plan(config: Config, slices: Mapping[str, int], passes: Mapping[str, int], supervised_epochs: int,
            ae_epochs: int) -> list[tuple[str, float, int]]:
    """Every DP-SGD phase a run takes on one site's patients: the segmenter and R of each view."""
    plan = []
    for view, n in slices.items():
        if n:
            plan.append(dp_steps(config, view, n, supervised_epochs, passes[view]))
            plan.append(dp_steps(config, view, n, ae_epochs, passes[view], autoencoder=True))
    return [p for p in plan if p[2] > 0]


def slice_units(cases: Sequence[PreparedCase]) -> np.ndarray:
    """Per labelled slice (in :func:`fedqc.data.site.stack_slices`' order), its patient's index: the
    privacy unit of DP-SGD (a subject's ED and ES cases are one patient)."""
    subjects = [c.case.subject for c in cases if c.labels is not None for _ in range(len(c.images))]
    return unit_index(subjects)


def dp_delta(config: Config, slices: int) -> float:
    """``privacy.dp.delta``, or 1 / the training slices (below 1 / patients)."""
    dp = config.privacy.dp
    return dp.delta if dp.delta is not None else 1.0 / max(slices, 2)


def corruption_of(config: Config) -> CorruptionConfig | None:
    """``qc.autoencoder``: ``corrective`` trains R to repair corrupted masks, ``plain`` to reproduce them;
    ``qc.whole_mask_warps`` false leaves out the failures that move the whole mask."""
    if config.qc.autoencoder != "corrective":
        return None
    return CorruptionConfig() if config.qc.whole_mask_warps else CorruptionConfig(affine=0.0, elastic=0.0)


def examples_of(config: Config, segmenters: Sequence[torch.nn.Module] | None, images: np.ndarray | None,
                labels: np.ndarray) -> Callable[[int], Examples] | None:
    """``qc.segmenter_examples`` (with a corrective R): each epoch, the candidate segmenters' own
    predictions of the labelled training slices under an appearance shift
    (:func:`fedqc.train.autoencoder.segmenter_examples`), beside the corrupted masks."""
    if config.qc.autoencoder != "corrective" or not config.qc.segmenter_examples or not segmenters \
            or images is None or len(images) == 0:
        return None
    return lambda seed: segmenter_examples(segmenters, images, labels, seed=seed)


def autoencoder_round(config: Config, ae: torch.nn.Module, labels: np.ndarray, *, first_epoch: int, epochs: int,
                      passes: int = 1, segmenters: Sequence[torch.nn.Module] | None = None,
                      images: np.ndarray | None = None, privacy: PrivateTraining | None = None) -> EpochStats:
    """``epochs`` epochs of L^R from the autoencoder's current weights (a fresh optimiser);
    ``segmenters`` and ``images``: the candidates and the slices of :func:`examples_of`;
    ``privacy``: with DP-SGD."""
    qc = config.qc
    optimiser = autoencoder_optimiser(ae, qc.ae_lr, AE_WEIGHT_DECAY)
    return autoencoder_epochs(ae, labels, optimiser, first_epoch=first_epoch, epochs=epochs,
                              batch_size=qc.ae_batch_size, seed=config.train.seed, passes=passes,
                              corruption=corruption_of(config),
                              examples=examples_of(config, segmenters, images, labels), privacy=privacy)


@dataclass
class SupervisedResult:
    candidate_states: list[dict[str, torch.Tensor]]
    candidate_info: list[dict]
    autoencoder_state: dict[str, torch.Tensor]
    history: dict


def train_supervised(config: Config, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase],
                     device: torch.device, progress: Progress = print, with_autoencoder: bool = True,
                     passes: int = 1) -> SupervisedResult:
    """Eq. 1 training of the segmenter (m_best checkpoints kept) and the QC autoencoder's training
    (skipped with ``with_autoencoder=False``: ``autoencoder_state`` is then empty)."""
    images, labels = stack_slices(train_cases)
    if len(images) == 0:
        raise ValueError("no labelled training slices: at least one site must be labelled")
    val = [(c.images[:, None].astype(np.float32), c.labels) for c in val_cases if c.labels is not None]
    tc = config.train
    seed_everything(tc.seed)
    model = new_segmenter(config).to(device)
    budget = centralised_budget(config, len(images), passes, with_autoencoder)
    private = (budget.training(slice_units(train_cases), tc.batch_size, secrets.randbits(62),
                               phase=dp_phase("view", False)) if budget else None)
    if private is not None:
        check_dp_model(model, "model.network" if config.model.network else "model.preset", config.preprocess.size_px)
    result = train_segmenter(model, images, labels, val, epochs=tc.epochs, batch_size=tc.batch_size, lr=tc.lr,
                             optimiser=optimiser_config(config), m_best=tc.m_best, augment=tc.augment,
                             device=device, seed=tc.seed, passes=passes,
                             progress=_epoch_printer("segmenter", tc.epochs, progress), privacy=private)
    if budget is not None:
        budget.record(private)
    states = [c.state_dict for c in result.checkpoints]
    info = [{"rank": i, "epoch": c.epoch, "val_score": c.score} for i, c in enumerate(result.checkpoints)]
    history = {"segmenter": result.history}
    if not with_autoencoder:
        history.update(_privacy_history(budget))
        return SupervisedResult(states, info, {}, history)
    ae_result = train_autoencoder(config, states, images, labels, val_cases, device, progress=progress, passes=passes,
                                  budget=budget, units=slice_units(train_cases) if budget else None)
    history["autoencoder"] = ae_result.history
    history.update(_privacy_history(budget))
    return SupervisedResult(states, info, ae_result.state, history)


def centralised_budget(config: Config, slices: int, passes: int, with_autoencoder: bool) -> PrivacyBudget | None:
    """``fedqc train`` under ``privacy.dp``: a budget (in memory) for this call's segmenter and R, the
    noise calibrated to their planned steps. Each call (one view) is accounted on its own; the views
    of the same patients compose (docs/PRIVACY.md)."""
    dp = config.privacy.dp
    if dp is None:
        return None
    plan = dp_plan(config, {"view": slices}, {"view": passes}, config.train.epochs,
                   config.qc.ae_epochs if with_autoencoder else 0)
    return PrivacyBudget.open(None, epsilon=dp.epsilon, delta=dp_delta(config, slices),
                              max_grad_norm=dp.max_grad_norm, noise_multiplier=dp.noise_multiplier, plan=plan)


def _privacy_history(budget: PrivacyBudget | None) -> dict:
    if budget is None:
        return {}
    return {"privacy": {"epsilon": budget.spent(), "delta": budget.delta, "noise_multiplier": budget.noise_multiplier,
                        "phase_noise": dict(budget.phase_noise),
                        "max_grad_norm": budget.max_grad_norm, "accountant": "rdp", "unit": "patient",
                        "steps": [list(h) for h in budget.history]}}


@dataclass
class AutoencoderStage:
    state: dict[str, torch.Tensor]
    history: list[dict]


def train_autoencoder(config: Config, candidate_states: Sequence[Mapping[str, torch.Tensor]], images: np.ndarray,
                      labels: np.ndarray, val_cases: Sequence[PreparedCase], device: torch.device,
                      progress: Progress = print, passes: int = 1, budget: PrivacyBudget | None = None,
                      units: np.ndarray | None = None) -> AutoencoderStage:
    """L^R on the labelled training masks (``qc.ae_epochs``; best validation epoch kept): ``qc.autoencoder``
    decides plain or corrective, ``qc.segmenter_examples`` whether the candidates' own failures on
    ``images`` are examples too (:func:`examples_of`)."""
    candidates = []
    for state in candidate_states:
        candidate = new_segmenter(config).to(device)
        candidate.load_state_dict(state)
        candidates.append(candidate)
    seed_everything(config.train.seed)
    ae = new_autoencoder(config).to(device)
    qc = config.qc
    val_labels = [c.labels for c in val_cases if c.labels is not None]
    private = (budget.training(units, qc.ae_batch_size, secrets.randbits(62), phase=dp_phase("view", True))
               if budget is not None else None)
    ae_result = train_qc_autoencoder(ae, labels, epochs=qc.ae_epochs, batch_size=qc.ae_batch_size, lr=qc.ae_lr,
                                     weight_decay=AE_WEIGHT_DECAY,
                                     val_labels=np.concatenate(val_labels) if val_labels else None, device=device,
                                     seed=config.train.seed, passes=passes, corruption=corruption_of(config),
                                     examples=examples_of(config, candidates, images, labels),
                                     progress=_epoch_printer("QC autoencoder", qc.ae_epochs, progress),
                                     privacy=private)
    if private is not None:
        budget.record(private)
    return AutoencoderStage({k: v.detach().cpu().clone() for k, v in ae.state_dict().items()}, ae_result.history)


def _epoch_printer(name: str, total: int, progress: Progress):
    if progress is None:
        return None
    every = max(1, total // 10)

    def report(record: dict) -> None:
        epoch = int(record["epoch"])
        if epoch % every == 0 or epoch == total or epoch == 1:
            extras = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
                               if k in ("train_loss", "val_score", "val_loss"))
            progress(f"    {name} epoch {epoch}/{total}: {extras} ({record.get('seconds', 0):.1f} s)")

    return report


# -- Eq. 2 -----------------------------------------------------------------------------------------


def refine_round(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                 flagged: Sequence[PreparedCase], labelled: tuple[np.ndarray, np.ndarray] | None, *,
                 alpha: float, k: int, epochs: int = 1,
                 optimisers: Sequence[torch.optim.Optimizer] | None = None,
                 ) -> tuple[list[torch.optim.Optimizer], list[dict[str, float]]]:
    """Refinement round (or centralised epoch) ``k`` of every candidate: ``epochs`` epochs of Eq. 2.

    Args:
        flagged: the OoD-flagged cases (may be empty: then the supervised term alone).
        labelled: the labelled slices ``(images (N, 1, H, W), labels (N, H, W))``, or None.
        alpha: the semi-supervised weight of this round.
        k: 1-based round; with ``epochs`` it sets each epoch's seed.
        optimisers: one per candidate to continue (centralised); None: fresh ones (a federated
            round: optimiser state does not travel between messages).

    Returns:
        The optimisers and, per candidate, the last epoch's statistics of :func:`refine_epoch`.
    """
    rc = config.refine
    optimisers = list(optimisers) if optimisers is not None else [refine_optimiser(config, m) for m in models]
    images, labels = labelled if labelled is not None and len(labelled[0]) else (None, None)
    stacks = [c.images[:, None] for c in flagged]
    # Adam is blind to a loss's scale: a step whose loss is alpha * L_WGD alone (an unlabelled site)
    # moves as far at alpha 0.1 as at 1. There alpha scales the learning rate instead, so Eq. 2's
    # decay reaches the step (refine.semi_only_alpha; docs/FEDERATION.md).
    lr = rc.lr * alpha if (images is None and stacks and rc.semi_only_alpha == "lr") else rc.lr
    for optimiser in optimisers:
        for group in optimiser.param_groups:
            group["lr"] = lr
    stats = []
    for i, (model, optimiser) in enumerate(zip(models, optimisers)):
        device = next(model.parameters()).device
        for e in range(epochs):
            seed = epoch_seed(config.train.seed + 1000 + 31 * i, (k - 1) * epochs + e)
            seed_everything(seed)
            last = refine_epoch(model, autoencoder, stacks, images, labels, alpha=alpha, batch_size=rc.batch_size,
                                optimiser=optimiser, generator=make_generator(seed, device),
                                rv_weight=rc.rv_weight, min_confidence=rc.pseudo_label_confidence)
        stats.append(last)
    return optimisers, stats


@dataclass
class RefineLog:
    epochs: list[dict] = field(default_factory=list)
    flagged_initial: dict[str, int] = field(default_factory=dict)
    flagged_final: dict[str, int] = field(default_factory=dict)


def count_flags(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                pools: Mapping[str, Sequence[PreparedCase]], thresholds: Mapping[str, Thresholds],
                device: torch.device) -> dict[str, np.ndarray]:
    """Per site, the boolean OoD flag of each pool case under that site's fences."""
    flags = {}
    for site, cases in pools.items():
        scores = score_cases(models, autoencoder, cases, config.qc, device)
        flags[site] = flag_ood(scores.pdc, scores.phd, thresholds[site], scores.ptc)
    return flags


def refine(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
           pools: Mapping[str, Sequence[PreparedCase]], thresholds: Mapping[str, Thresholds],
           labelled_cases: Sequence[PreparedCase], device: torch.device,
           progress: Progress = print, alpha_scale: float = 1.0) -> tuple[list[torch.nn.Module], RefineLog]:
    """Centralised refinement: :func:`refine_round` per epoch until no case is flagged or K_semi.

    ``alpha_scale=0`` is the compute-matched control M+sup: the same loop, steps and labelled
    batches, without the QC-driven term.

    The fences are fitted once, before refinement, and kept: re-fitting them on the moving pool
    would always flag its tail and never let the loop stop. The optimisers persist across epochs
    (no learning-rate restart, unlike the reference code).
    """
    rc = config.refine
    models = [copy.deepcopy(m).to(device) for m in models]
    images, labels = stack_slices(labelled_cases)
    labelled = (images, labels) if len(images) else None
    optimisers = None
    log = RefineLog()
    flags = count_flags(config, models, autoencoder, pools, thresholds, device)
    log.flagged_initial = {s: int(f.sum()) for s, f in flags.items()}
    for k in range(1, rc.k_semi + 1):
        flagged = [c for site, cases in pools.items() for c, f in zip(cases, flags[site]) if f]
        if not flagged:
            if progress:
                progress(f"  refinement: no case flagged, stopping before epoch {k}")
            break
        alpha = alpha_scale * alpha_schedule(k, rc.alpha, rc.k_semi)
        optimisers, stats = refine_round(config, models, autoencoder, flagged, labelled, alpha=alpha, k=k,
                                         epochs=rc.local_epochs or 1, optimisers=optimisers)
        flags = count_flags(config, models, autoencoder, pools, thresholds, device)
        entry = {"epoch": k, "epochs": rc.local_epochs or 1, "alpha": alpha, "flagged_before": len(flagged),
                 "flagged_after": {s: int(f.sum()) for s, f in flags.items()},
                 "semi_loss": float(np.mean([s["semi_loss"] for s in stats])),
                 "sup_loss": float(np.mean([s["sup_loss"] for s in stats]))}
        log.epochs.append(entry)
        if progress:
            progress(f"  refinement epoch {k}/{rc.k_semi}: alpha {alpha:.3f}, flagged {len(flagged)} -> "
                     f"{sum(entry['flagged_after'].values())}, semi loss {entry['semi_loss']:.4f}")
    log.flagged_final = {s: int(f.sum()) for s, f in flags.items()}
    for m in models:
        m.eval()
    return models, log
