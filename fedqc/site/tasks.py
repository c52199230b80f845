"""What a site does for each task of the federated protocol (``fedqc.site.algorithm.FedqcSite.run``).

SUPERVISED and QC_AUTOENCODER: local epochs of Eq. 1 / the autoencoder loss on the site's labelled
slices, from the global weights (FedProx adds its proximal term through gradient hooks).
REFINE: score the site's unlabelled pool with every candidate, fit the site's fences once (kept in
its work dir), flag OoD cases and run local epochs of Eq. 2 on them (labelled sites add the
supervised term). PREDICT: QC-based selection, predictions and ``qc.csv`` written locally.
Replies carry weights and counts only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedqc.core.device import seed_everything
from fedqc.core.io import atomic_write
from fedqc.models.factory import new_autoencoder, new_segmenter
from fedqc.qc.fences import choose_fences, fences_from_scores, fit_fences
from fedqc.qc.ood import flag_ood
from fedqc.qc.scoring import score_cases
from fedqc.qc.thresholds import Thresholds
from fedqc.site.contract import (
    ConfigKey,
    MetricKey,
    Scalar,
    SiteReply,
    Task,
    candidate_prefix,
)
from fedqc.site.state import SiteState
from fedqc.train.stages import autoencoder_round, refine_round, supervised_round
from fedqc.train.supervised import validation_score, view_passes

M = MetricKey


def initial_weights(site: SiteState, task: Task, seed: int) -> dict[str, np.ndarray]:
    """Freshly initialised global weights (the coordinator asks one site once)."""
    out: dict[str, np.ndarray] = {}
    for view in site.config.views:
        seed_everything(seed)
        if task == Task.SUPERVISED:
            out.update(site.export(new_segmenter(site.config), f"seg/{view}/"))
        else:
            out.update(site.export(new_autoencoder(site.config), f"ae/{view}/"))
    return out


def _proximal_hooks(model: torch.nn.Module, mu: float) -> list:
    """FedProx: d/dw of mu/2 ||w - w_global||^2 added to every gradient."""
    if mu <= 0:
        return []
    hooks = []
    for p in model.parameters():
        anchor = p.detach().clone()
        hooks.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    return hooks


def supervised(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """Round r of Eq. 1: epochs (r-1)E .. rE-1 of the schedule over R rounds x E local epochs."""
    if not site.site.labelled:
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0})
    phase_round = int(config.get(ConfigKey.PHASE_ROUND, 1))
    mu = float(config.get(ConfigKey.PROXIMAL_MU, 0.0))
    total = max(site.config.federation.supervised_rounds * epochs, 1)
    out, n_examples, losses, dice, rv = {}, 0, [], [], []
    passes = _view_passes(site)
    for view in site.config.views:
        images, labels = site.labelled_slices(view)
        model = site.load_module(new_segmenter(site.config), weights, f"seg/{view}/")
        hooks = _proximal_hooks(model, mu)
        stats = supervised_round(site.config, model, images, labels, first_epoch=(phase_round - 1) * epochs,
                                 epochs=epochs, total_epochs=total, passes=passes[view])
        for h in hooks:
            h.remove()
        losses.append(stats.loss)
        val = _val_cases(site, view)
        if val:
            dice.append(validation_score(model, val))
            rv.append(validation_score(model, val, classes=(3,)))
        out.update(site.export(model, f"seg/{view}/"))
        n_examples += len(images)
    metrics = {M.NUM_EXAMPLES.value: n_examples, M.TRAIN_LOSS.value: float(np.mean(losses))}
    if dice:
        metrics[M.VAL_DICE.value] = float(np.mean(dice))
        metrics[M.VAL_RV_DICE.value] = float(np.mean(rv))
    return SiteReply(weights=out, metrics=metrics)


def _val_cases(site: SiteState, view: str) -> list:
    return [(c.images[:, None].astype(np.float32), c.labels) for c in site.split(view).val]


def _view_passes(site: SiteState) -> dict[str, int]:
    """Passes per epoch over each view's slices (:func:`fedqc.train.supervised.view_passes`)."""
    return view_passes({view: len(site.labelled_slices(view)[0]) for view in site.config.views})


def autoencoder(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """Round r of L^R on the site's ground-truth masks."""
    if not site.site.labelled:
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0})
    phase_round = int(config.get(ConfigKey.PHASE_ROUND, 1))
    out, n, losses = {}, 0, []
    passes = _view_passes(site)
    for view in site.config.views:
        _, labels = site.labelled_slices(view)
        ae = site.load_module(new_autoencoder(site.config), weights, f"ae/{view}/")
        stats = autoencoder_round(site.config, ae, labels, first_epoch=(phase_round - 1) * epochs, epochs=epochs,
                                  passes=passes[view])
        losses.append(stats.loss)
        out.update(site.export(ae, f"ae/{view}/"))
        n += len(labels)
    return SiteReply(weights=out, metrics={M.NUM_EXAMPLES.value: n, M.TRAIN_LOSS.value: float(np.mean(losses))})


def evaluate(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    if not site.site.labelled:
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0})
    dice, rv, n = [], [], 0
    for view in site.config.views:
        val = _val_cases(site, view)
        model = site.load_module(new_segmenter(site.config), weights, f"seg/{view}/")
        dice.append(validation_score(model, val))
        rv.append(validation_score(model, val, classes=(3,)))
        n += len(val)
    return SiteReply(metrics={M.NUM_EXAMPLES.value: n, M.VAL_DICE.value: float(np.mean(dice)),
                              M.VAL_RV_DICE.value: float(np.mean(rv))})


def _autoencoder_for(site: SiteState, weights: dict, view: str) -> torch.nn.Module:
    """The frozen autoencoder: from this message (then cached in the work dir) or from the cache."""
    path = site.work_dir / "qc_autoencoder" / f"{view}.pt"
    prefix = f"ae/{view}/"
    if any(k.startswith(prefix) for k in weights):
        ae = site.load_module(new_autoencoder(site.config), weights, prefix)
        state = {k: v.cpu() for k, v in ae.state_dict().items()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    elif path.is_file():
        ae = new_autoencoder(site.config)
        ae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        ae = ae.to(site.device)
    else:
        raise KeyError(f"the frozen QC autoencoder for {view} is neither in the message nor cached at this site")
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.eval()


def _candidates(site: SiteState, weights: dict, view: str, m: int) -> list[torch.nn.Module]:
    return [site.load_module(new_segmenter(site.config), weights, f"{candidate_prefix(i)}seg/{view}/")
            for i in range(m)]


def site_fences(site: SiteState, view: str, models, ae, pool_scores=None) -> Thresholds:
    """The site's fences for ``view`` (:func:`fedqc.qc.fences.choose_fences`), fitted once and kept
    in its work dir: its own labelled validation cases or its own pool.

    ``pool_scores``: the pool's scores under these models when the caller has them already (they
    are reused when the fences come from the pool, saving a scoring pass).
    """
    path = site.work_dir / "thresholds" / f"{view}.json"
    if path.is_file():
        return Thresholds.from_json(path)
    split, qc = site.split(view), site.config.qc

    def own_pool() -> Thresholds:
        if pool_scores is not None:
            return fences_from_scores(pool_scores, qc.tukey_factor, "unlabelled")
        return fit_fences(site.config, models, ae, split.pool, "unlabelled", site.device)

    th = choose_fences(qc.threshold_source,
                       labelled_val=(lambda: fit_fences(site.config, models, ae, split.val, "labelled-val",
                                                        site.device)) if split.val else None,
                       unlabelled=own_pool if split.pool else None, where=f"site {site.site.name} {view}")
    path.parent.mkdir(parents=True, exist_ok=True)
    th.to_json(path)
    return th


def refine(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """Round k of Eq. 2, in order: score the pool with every candidate -> fences -> OoD flags ->
    :func:`fedqc.train.stages.refine_round` on the flagged cases (labelled sites add the supervised
    term; a labelled site with nothing flagged contributes that term alone) -> weights and counts."""
    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    alpha = float(config.get(ConfigKey.ALPHA, 1.0))
    k = int(config.get(ConfigKey.PHASE_ROUND, 1))
    out, n_cases, n_flagged, n_examples, n_labelled, semi, sup = {}, 0, 0, 0, 0, [], []
    for view in site.config.views:
        models = _candidates(site, weights, view, m)
        ae = _autoencoder_for(site, weights, view)
        pool = site.split(view).pool
        flagged = []
        if pool:
            scores = score_cases(models, ae, pool, site.config.qc, site.device)
            th = site_fences(site, view, models, ae, pool_scores=scores)
            flagged = [c for c, f in zip(pool, flag_ood(scores.pdc, scores.phd, th)) if f]
        n_cases += len(pool)
        n_flagged += len(flagged)
        images, labels = site.labelled_slices(view)
        if flagged or len(images):
            _, stats = refine_round(site.config, models, ae, flagged, (images, labels), alpha=alpha, k=k,
                                    epochs=epochs)
            semi += [s["semi_loss"] for s in stats if s["n_flagged_slices"]]
            sup += [s["sup_loss"] for s in stats if s["n_labelled"]]
            n_examples += stats[-1]["n_flagged_slices"] + stats[-1]["n_labelled"]
            n_labelled += stats[-1]["n_labelled"]
        for i, model in enumerate(models):
            out.update(site.export(model, f"{candidate_prefix(i)}seg/{view}/"))
    # The coordinator weights refinement updates by these counts so the round's step is Eq. 2's
    # (flagged slices = num-examples - num-labelled; fedqc.fl.aggregation.eq2_average).
    metrics = {M.NUM_CASES.value: n_cases, M.NUM_FLAGGED.value: n_flagged, M.NUM_EXAMPLES.value: n_examples,
               M.NUM_LABELLED.value: n_labelled, M.ALPHA.value: alpha}
    if semi:
        metrics[M.SEMI_LOSS.value] = float(np.mean(semi))
    if sup:
        metrics[M.SUP_LOSS.value] = float(np.mean(sup))
    return SiteReply(weights=out if n_examples else None, metrics=metrics)


def predict(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """QC-based selection on every case of the site; files stay in ``WORK/predictions``."""
    from fedqc.core.io import csv_text
    from fedqc.data.site import site_cases
    from fedqc.predict.folder import predict_cases

    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    out_dir = site.work_dir / "predictions"
    rows: list[dict] = []
    for view in site.config.views:
        models = _candidates(site, weights, view, m)
        ae = _autoencoder_for(site, weights, view)
        th = site_fences(site, view, models, ae)
        cases = site_cases(site.site, [view])
        rows += predict_cases(site.config, models, ae, cases, th, out_dir, site.device, progress=None)
    atomic_write(out_dir / "qc.csv", csv_text(rows))
    flagged = sum(1 for r in rows if r["ood"])
    return SiteReply(metrics={M.NUM_CASES.value: len(rows), M.NUM_FLAGGED.value: flagged})
