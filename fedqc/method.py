"""The method for one view, stage by stage (Galati & Zuluaga 2021, Sec. 2).

supervised training of M (m_best kept) -> QC autoencoder R on ground-truth masks -> pDC/pHD ->
Tukey fences -> OoD flags -> semi-supervised refinement (Eq. 2) -> QC-based candidate selection.
Each function is one stage and takes what it needs explicitly; the centralised commands
(``fedqc.cli.commands``) and the federated site (``fedqc.site.algorithm``) both call them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedqc.config import Config
from fedqc.qc.scoring import candidate_outputs, score_cases
from fedqc.qc.ood import flag_ood
from fedqc.qc.selection import apply_selection, select_candidate
from fedqc.qc.thresholds import Thresholds, fit_from_candidates
from fedqc.models.run_folder import new_autoencoder, new_segmenter
from fedqc.data.site import PreparedCase, stack_slices
from fedqc.train.autoencoder import train_qc_autoencoder
from fedqc.core.device import make_generator, seed_everything
from fedqc.train.losses import alpha_schedule
from fedqc.train.refine import refine_epoch
from fedqc.train.supervised import OptimiserConfig, build_optimiser, nnunet_optimiser, train_segmenter

Progress = Callable[[str], None] | None


@dataclass
class SupervisedResult:
    candidate_states: list[dict[str, torch.Tensor]]
    candidate_info: list[dict]
    autoencoder_state: dict[str, torch.Tensor]
    history: dict


def train_supervised(config: Config, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase],
                     device: torch.device, progress: Progress = print,
                     with_autoencoder: bool = True) -> SupervisedResult:
    """Eq. 1 training of the segmenter (m_best checkpoints kept) and the QC autoencoder's training
    (skipped with ``with_autoencoder=False``: ``autoencoder_state`` is then empty)."""
    images, labels = stack_slices(train_cases)
    if len(images) == 0:
        raise ValueError("no labelled training slices: at least one site must be labelled")
    val = [(c.images[:, None].astype(np.float32), c.labels) for c in val_cases if c.labels is not None]
    tc = config.train
    seed_everything(tc.seed)
    model = new_segmenter(config).to(device)
    result = train_segmenter(model, images, labels, val, epochs=tc.epochs, batch_size=tc.batch_size, lr=tc.lr,
                             optimiser=optimiser_config(config), m_best=tc.m_best, augment=tc.augment,
                             device=device, seed=tc.seed, progress=_epoch_printer("segmenter", tc.epochs, progress))
    states = [c.state_dict for c in result.checkpoints]
    info = [{"rank": i, "epoch": c.epoch, "val_score": c.score} for i, c in enumerate(result.checkpoints)]
    if not with_autoencoder:
        return SupervisedResult(states, info, {}, {"segmenter": result.history})
    seed_everything(tc.seed)
    ae = new_autoencoder(config).to(device)
    qc = config.qc
    val_labels = np.concatenate([c.labels for c in val_cases if c.labels is not None]) if val else None
    ae_result = train_qc_autoencoder(ae, labels, epochs=qc.ae_epochs, batch_size=qc.ae_batch_size, lr=qc.ae_lr,
                                     val_labels=val_labels, device=device, seed=tc.seed,
                                     progress=_epoch_printer("QC autoencoder", qc.ae_epochs, progress))
    ae_state = {k: v.detach().cpu().clone() for k, v in ae.state_dict().items()}
    return SupervisedResult(states, info, ae_state, {"segmenter": result.history, "autoencoder": ae_result.history})


def optimiser_config(config: Config) -> OptimiserConfig:
    if config.train.optimiser == "sgd":
        return dataclasses.replace(nnunet_optimiser(), weight_decay=config.train.weight_decay)
    return OptimiserConfig(kind="adam", weight_decay=config.train.weight_decay)


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


def models_from_states(config: Config, states: Sequence[Mapping[str, torch.Tensor]],
                       device: torch.device) -> list[torch.nn.Module]:
    models = []
    for state in states:
        model = new_segmenter(config)
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return models


def fit_thresholds(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                   cases: Sequence[PreparedCase], source: str, device: torch.device) -> Thresholds:
    """Tukey fences (Eq. 3/4) over the cases' pDC/pHD (best candidate per case, as the reference)."""
    scores = score_cases(models, autoencoder, cases, config.qc, device)
    return fit_from_candidates(scores.pdc, scores.phd, factor=config.qc.tukey_factor, source=source)


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
        flags[site] = flag_ood(scores.pdc, scores.phd, thresholds[site])
    return flags


def refine(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
           pools: Mapping[str, Sequence[PreparedCase]], thresholds: Mapping[str, Thresholds],
           labelled_cases: Sequence[PreparedCase], device: torch.device,
           progress: Progress = print) -> tuple[list[torch.nn.Module], RefineLog]:
    """Semi-supervised refinement (Eq. 2) of every candidate until no case is flagged or K_semi epochs.

    Each of the m_best candidates is refined on the cases flagged OoD (a case is flagged when all
    candidates fail the site's fences), with the supervised term on the labelled slices. The
    fences are fitted once, before refinement, and kept: re-fitting them on the moving pool would
    always flag its tail and never let the loop stop. Optimisers persist across epochs (no
    learning-rate restart, unlike the reference code).
    """
    rc = config.refine
    models = [copy.deepcopy(m).to(device) for m in models]
    images, labels = stack_slices(labelled_cases)
    optimisers = [build_optimiser(m, rc.lr, OptimiserConfig(kind="adam", schedule="constant",
                                                             weight_decay=config.train.weight_decay))
                  for m in models]
    generators = [make_generator(config.train.seed + 1000 + i, device) for i in range(len(models))]
    log = RefineLog()
    flags = count_flags(config, models, autoencoder, pools, thresholds, device)
    log.flagged_initial = {s: int(f.sum()) for s, f in flags.items()}
    for k in range(1, rc.k_semi + 1):
        flagged = [c for site, cases in pools.items() for c, f in zip(cases, flags[site]) if f]
        if not flagged:
            if progress:
                progress(f"  refinement: no case flagged, stopping before epoch {k}")
            break
        alpha = alpha_schedule(k, rc.alpha, rc.k_semi)
        stats = []
        for i, (model, opt) in enumerate(zip(models, optimisers)):
            stats.append(refine_epoch(model, autoencoder, [c.images[:, None] for c in flagged],
                                      images if len(images) else None, labels if len(labels) else None,
                                      alpha=alpha, batch_size=rc.batch_size, optimiser=opt,
                                      generator=generators[i], rv_weight=rc.rv_weight))
        flags = count_flags(config, models, autoencoder, pools, thresholds, device)
        entry = {"epoch": k, "alpha": alpha, "flagged_before": len(flagged),
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


@dataclass
class CasePrediction:
    """QC-based selection's outcome for one case, in the network grid."""

    probs: np.ndarray  # (Z, C, H, W) selected (or fallback-averaged) probabilities
    labels: np.ndarray  # (Z, H, W)
    reconstruction: np.ndarray  # (Z, H, W) reconstruction of the selected candidate (or of the best-pDC one)
    pdc: np.ndarray  # (m,)
    phd: np.ndarray  # (m,)
    ood: bool
    selected: int | None  # candidate index, None for the fallback average
    pdc_selected: float
    phd_selected: float


def predict_case(config: Config, models: Sequence[torch.nn.Module], autoencoder: torch.nn.Module,
                 case: PreparedCase, thresholds: Thresholds, device: torch.device,
                 selection: bool = True) -> CasePrediction:
    """Sec. 2.3 steps 1-5 on one case (``selection=False``: the first candidate, i.e. M)."""
    probs, recons, pdc, phd = candidate_outputs(models, autoencoder, case, config.qc, device)
    ood = bool(flag_ood(pdc[None], phd[None], thresholds)[0])
    if selection:
        choice = select_candidate(pdc, phd, thresholds.th_up_phd)
        chosen = apply_selection(choice, probs)
        index = choice.index
    else:
        chosen, index = probs[0], 0
    ref = index if index is not None else int(np.argmax(pdc))
    if index is None:
        i, j = choice.fallback_pair
        pdc_sel, phd_sel = float(max(pdc[i], pdc[j])), float(min(phd[i], phd[j]))
    else:
        pdc_sel, phd_sel = float(pdc[index]), float(phd[index])
    return CasePrediction(probs=chosen, labels=chosen.argmax(1).astype(np.uint8), reconstruction=recons[ref],
                          pdc=pdc, phd=phd, ood=ood, selected=index, pdc_selected=pdc_sel, phd_selected=phd_sel)
