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

from fedqc.site.contract import ConfigKey, MetricKey, Scalar, SiteReply, Task, candidate_prefix
from fedqc.method import optimiser_config
from fedqc.models.run_folder import atomic_write_bytes, new_autoencoder, new_segmenter
from fedqc.site.algorithm import FedqcSite
from fedqc.core.device import make_generator, seed_everything
from fedqc.train.supervised import OptimiserConfig, build_optimiser, scheduled_lr, train_one_epoch

M = MetricKey


def initial_weights(site: FedqcSite, task: Task, seed: int) -> dict[str, np.ndarray]:
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


def supervised(site: FedqcSite, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    from fedqc.train.supervised import validation_score

    if not site.site.labelled:
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0})
    tc = site.config.train
    phase_round = int(config.get(ConfigKey.PHASE_ROUND, 1))
    mu = float(config.get(ConfigKey.PROXIMAL_MU, 0.0))
    out, n_examples, losses, dice, rv = {}, 0, [], [], []
    passes = _view_passes(site)
    for view in site.config.views:
        images, labels = site.labelled_slices(view)
        model = site.load_module(new_segmenter(site.config), weights, f"seg/{view}/")
        opt_cfg = optimiser_config(site.config)
        first_epoch = (phase_round - 1) * epochs
        total = max(site.config.federation.supervised_rounds * epochs, 1)
        opt = build_optimiser(model, scheduled_lr(tc.lr, first_epoch, total, opt_cfg), opt_cfg)
        generator = make_generator(tc.seed + 7919 * phase_round, site.device)
        augmenter = _augmenter(site, phase_round) if tc.augment else None
        hooks = _proximal_hooks(model, mu)
        for e in range(epochs):
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(tc.lr, first_epoch + e, total, opt_cfg)
            for _ in range(passes[view]):
                stats = train_one_epoch(model, images, labels, opt, batch_size=tc.batch_size, generator=generator,
                                        augmenter=augmenter)
        for h in hooks:
            h.remove()
        losses.append(stats.loss)
        val = [(c.images[:, None].astype(np.float32), c.labels) for c in site.split(view).val]
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


def _view_passes(site: FedqcSite) -> dict[str, int]:
    """Passes over each view's slices per local epoch, so every view gets about as many steps.

    An LA case is one slice against about ten for SA: without this, one federated "epoch" gives the
    LA segmenter a tenth of the SA steps, and a few rounds leave it untrained.
    """
    counts = {view: len(site.labelled_slices(view)[0]) for view in site.config.views}
    most = max(counts.values(), default=0)
    return {view: max(1, round(most / n)) if n else 1 for view, n in counts.items()}


def _augmenter(site: FedqcSite, phase_round: int):
    from fedqc.train.augment import AugmentConfig, BatchAugmenter

    return BatchAugmenter(AugmentConfig(), seed=site.config.train.seed + phase_round, device=site.device)


def autoencoder(site: FedqcSite, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    from fedqc.train.autoencoder import autoencoder_one_epoch

    if not site.site.labelled:
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0})
    qc = site.config.qc
    phase_round = int(config.get(ConfigKey.PHASE_ROUND, 1))
    out, n, losses = {}, 0, []
    passes = _view_passes(site)
    for view in site.config.views:
        _, labels = site.labelled_slices(view)
        ae = site.load_module(new_autoencoder(site.config), weights, f"ae/{view}/")
        opt = build_optimiser(ae, qc.ae_lr, OptimiserConfig(kind="adam", weight_decay=1e-5, schedule="constant"))
        generator = make_generator(site.config.train.seed + 104729 * phase_round, site.device)
        for _ in range(epochs * passes[view]):
            stats = autoencoder_one_epoch(ae, labels, opt, batch_size=qc.ae_batch_size, generator=generator)
        losses.append(stats.loss)
        out.update(site.export(ae, f"ae/{view}/"))
        n += len(labels)
    return SiteReply(weights=out, metrics={M.NUM_EXAMPLES.value: n, M.TRAIN_LOSS.value: float(np.mean(losses))})


def evaluate(site: FedqcSite, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    from fedqc.train.supervised import validation_score

    if not site.site.labelled:
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0})
    dice, rv, n = [], [], 0
    for view in site.config.views:
        val = [(c.images[:, None].astype(np.float32), c.labels) for c in site.split(view).val]
        model = site.load_module(new_segmenter(site.config), weights, f"seg/{view}/")
        dice.append(validation_score(model, val))
        rv.append(validation_score(model, val, classes=(3,)))
        n += len(val)
    return SiteReply(metrics={M.NUM_EXAMPLES.value: n, M.VAL_DICE.value: float(np.mean(dice)),
                              M.VAL_RV_DICE.value: float(np.mean(rv))})


def _autoencoder_for(site: FedqcSite, weights: dict, view: str) -> torch.nn.Module:
    """The frozen autoencoder: from this message (then cached in the work dir) or from the cache."""
    path = site.work_dir / "qc_autoencoder" / f"{view}.pt"
    prefix = f"ae/{view}/"
    if any(k.startswith(prefix) for k in weights):
        ae = site.load_module(new_autoencoder(site.config), weights, prefix)
        state = {k: v.cpu() for k, v in ae.state_dict().items()}
        atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
    elif path.is_file():
        ae = new_autoencoder(site.config)
        ae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        ae = ae.to(site.device)
    else:
        raise KeyError(f"the frozen QC autoencoder for {view} is neither in the message nor cached at this site")
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.eval()


def _candidates(site: FedqcSite, weights: dict, view: str, m: int) -> list[torch.nn.Module]:
    return [site.load_module(new_segmenter(site.config), weights, f"{candidate_prefix(i)}seg/{view}/")
            for i in range(m)]


def site_fences(site: FedqcSite, view: str, models, ae, pool_scores=None):
    """The site's fences for ``view``: fitted once on its own data and kept in its work dir.

    ``pool_scores``: the pool's scores under these models when the caller has them already (they
    are reused when the fences come from the pool, saving a scoring pass).
    """
    from fedqc.method import fit_thresholds
    from fedqc.qc.thresholds import Thresholds, fit_from_candidates

    path = site.work_dir / "thresholds" / f"{view}.json"
    if path.is_file():
        return Thresholds.from_json(path)
    split = site.split(view)
    # A labelled site without unlabelled cases (or under the labelled-val source) uses its validation cases.
    if split.val and (site.config.qc.threshold_source == "labelled-val" or not split.pool):
        th = fit_thresholds(site.config, models, ae, split.val, "labelled-val", site.device)
    elif pool_scores is not None:
        th = fit_from_candidates(pool_scores.pdc, pool_scores.phd, factor=site.config.qc.tukey_factor,
                                 source="unlabelled")
    else:
        th = fit_thresholds(site.config, models, ae, split.pool, "unlabelled", site.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    th.to_json(path)
    return th


def refine(site: FedqcSite, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    from fedqc.qc.scoring import score_cases
    from fedqc.qc.ood import flag_ood
    from fedqc.train.refine import refine_epoch

    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    alpha = float(config.get(ConfigKey.ALPHA, 1.0))
    rc = site.config.refine
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
        if flagged:
            for i, model in enumerate(models):
                opt = build_optimiser(model, rc.lr, OptimiserConfig(kind="adam", schedule="constant"))
                generator = make_generator(site.config.train.seed + 31 * i, site.device)
                for _ in range(epochs):
                    stats = refine_epoch(model, ae, [c.images[:, None] for c in flagged],
                                         images if len(images) else None, labels if len(labels) else None,
                                         alpha=alpha, batch_size=rc.batch_size, optimiser=opt, generator=generator,
                                         rv_weight=rc.rv_weight)
                semi.append(stats["semi_loss"])
                sup.append(stats["sup_loss"])
            n_examples += sum(len(c.images) for c in flagged) + stats["n_labelled"]
            n_labelled += stats["n_labelled"]
        elif len(images):
            # No flagged case here: the site still contributes Eq. 2's supervised term to the round.
            for i, model in enumerate(models):
                opt = build_optimiser(model, rc.lr, OptimiserConfig(kind="adam", schedule="constant"))
                generator = make_generator(site.config.train.seed + 31 * i, site.device)
                for _ in range(epochs):
                    stats = train_one_epoch(model, images, labels, opt, batch_size=rc.batch_size,
                                            generator=generator)
                sup.append(stats.loss)
            n_examples += len(images)
            n_labelled += len(images)
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


def predict(site: FedqcSite, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """QC-based selection on every case of the site; files stay in ``WORK/predictions``."""
    from fedqc.cli.commands import qc_csv_text
    from fedqc.predict.folder import predict_cases
    from fedqc.data.site import site_cases

    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    out_dir = site.work_dir / "predictions"
    rows: list[dict] = []
    for view in site.config.views:
        models = _candidates(site, weights, view, m)
        ae = _autoencoder_for(site, weights, view)
        th = site_fences(site, view, models, ae)
        cases = site_cases(site.site, [view])
        rows += predict_cases(site.config, models, ae, cases, th, out_dir, site.device, progress=None)
    atomic_write_bytes(out_dir / "qc.csv", lambda tmp: tmp.write_text(qc_csv_text(rows)))
    flagged = sum(1 for r in rows if r["ood"])
    return SiteReply(metrics={M.NUM_CASES.value: len(rows), M.NUM_FLAGGED.value: flagged})
