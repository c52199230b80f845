"""What a site does for each task of the federated protocol (``fedqc.site.algorithm.FedqcSite.run``).

SUPERVISED and QC_AUTOENCODER: local epochs of Eq. 1 / the autoencoder loss on the site's labelled
slices, from the global weights (FedProx adds its proximal term through gradient hooks).
REFINE: score the site's unlabelled pool with every candidate, fit the site's fences once (kept in
its work dir), flag OoD cases and run local epochs of Eq. 2 on them (labelled sites add the
supervised term). PREDICT: QC-based selection, predictions and ``qc.csv`` written locally.
Replies carry weights and counts only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch

from fedqc.core.device import seed_everything
from fedqc.core.io import atomic_write
from fedqc.models.factory import new_autoencoder, new_segmenter
from fedqc.qc.fences import (
    choose_fences,
    fences_from_scores,
    fit_fences,
)
from fedqc.qc.ood import flag_ood
from fedqc.qc.scoring import score_cases
from fedqc.qc.thresholds import MIN_VALUES, Thresholds, fence_quartiles
from fedqc.site.contract import (
    ConfigKey,
    MetricKey,
    Scalar,
    SiteReply,
    Task,
    candidate_prefix,
    fence_metric_key,
    view_metric_key,
)
from fedqc.site import privacy as site_privacy
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
    budget = site_privacy.site_budget(site, passes)
    if budget is not None and not budget.fits(site_privacy.round_steps(site, epochs, passes, autoencoder=False)):
        return site_privacy.spent_reply(site, budget, Task.SUPERVISED.value)
    for view in site.config.views:
        images, labels = site.labelled_slices(view)
        model = site.load_module(new_segmenter(site.config), weights, f"seg/{view}/")
        hooks = _proximal_hooks(model, mu)
        private = site_privacy.training(site, budget, view, autoencoder=False)
        stats = supervised_round(site.config, model, images, labels, first_epoch=(phase_round - 1) * epochs,
                                 epochs=epochs, total_epochs=total, passes=passes[view], privacy=private)
        if private is not None:
            budget.record(private)
        for h in hooks:
            h.remove()
        losses.append(stats.loss)
        val = _val_cases(site, view)
        if val:
            dice.append(validation_score(model, val))
            rv.append(validation_score(model, val, classes=(3,)))
        out.update(site.export(model, f"seg/{view}/"))
        n_examples += len(images)
    metrics = {M.NUM_EXAMPLES.value: n_examples, M.TRAIN_LOSS.value: float(np.mean(losses)),
               **site_privacy.spent_metrics(budget)}
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
    m = int(config.get(ConfigKey.NUM_CANDIDATES, 0))
    out, n, losses = {}, 0, []
    passes = _view_passes(site)
    budget = site_privacy.site_budget(site, passes)
    if budget is not None and not budget.fits(site_privacy.round_steps(site, epochs, passes, autoencoder=True)):
        return site_privacy.spent_reply(site, budget, Task.QC_AUTOENCODER.value)
    for view in site.config.views:
        images, labels = site.labelled_slices(view)
        ae = site.load_module(new_autoencoder(site.config), weights, f"ae/{view}/")
        # The candidates, when the coordinator sent them: their own failures teach the corrective R.
        sent = m and any(k.startswith(f"{candidate_prefix(0)}seg/{view}/") for k in weights)
        segmenters = _candidates(site, weights, view, m) if sent else None
        private = site_privacy.training(site, budget, view, autoencoder=True)
        stats = autoencoder_round(site.config, ae, labels, first_epoch=(phase_round - 1) * epochs, epochs=epochs,
                                  passes=passes[view], segmenters=segmenters, images=images, privacy=private)
        if private is not None:
            budget.record(private)
        losses.append(stats.loss)
        out.update(site.export(ae, f"ae/{view}/"))
        n += len(labels)
    return SiteReply(weights=out, metrics={M.NUM_EXAMPLES.value: n, M.TRAIN_LOSS.value: float(np.mean(losses)),
                                           **site_privacy.spent_metrics(budget)})


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
    """The frozen autoencoder: from this message (then cached in the work dir) or from the cache.

    The cache (``WORK/qc_autoencoder/<view>.pt``) is stamped with the run it came from
    (``<view>.json``: the site's config and the weights' digest, :meth:`SiteState.run_key`); a cache
    of another run, or one that differs from the autoencoder this run already sent, is refused.
    """
    import json

    from fedqc.core.errors import DataError

    path = site.work_dir / "qc_autoencoder" / f"{view}.pt"
    stamp = path.with_suffix(".json")
    prefix = f"ae/{view}/"
    if any(k.startswith(prefix) for k in weights):
        ae = site.load_module(new_autoencoder(site.config), weights, prefix)
        state = {k: v.cpu() for k, v in ae.state_dict().items()}
        key = site.run_key(view, ae)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        atomic_write(stamp, json.dumps(key, indent=2) + "\n")
        site.autoencoder_digests[view] = key["ae"]
    elif path.is_file():
        ae = new_autoencoder(site.config)
        ae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        ae = ae.to(site.device)
        key = site.run_key(view, ae)
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = {}
        expected = site.autoencoder_digests.get(view, recorded.get("ae"))
        if recorded.get("config") != key["config"] or key["ae"] != expected:
            raise DataError(path, f"the cached QC autoencoder for {view} belongs to another run (recorded "
                                  f"{recorded or 'nothing'}, this run {key}); the coordinator must send "
                                  "this run's autoencoder")
        site.autoencoder_digests[view] = key["ae"]
    else:
        raise KeyError(f"the frozen QC autoencoder for {view} is neither in the message nor cached at this site")
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae.eval()


def _candidates(site: SiteState, weights: dict, view: str, m: int) -> list[torch.nn.Module]:
    return [site.load_module(new_segmenter(site.config), weights, f"{candidate_prefix(i)}seg/{view}/")
            for i in range(m)]


def site_fences(site: SiteState, view: str, models, ae, pool_scores=None,
                consortium: Thresholds | None = None) -> Thresholds:
    """The site's fences for ``view`` (:func:`fedqc.qc.fences.choose_fences`), chosen once per run and
    kept in its work dir: the consortium's (sent by the coordinator; a labelled site without them
    fits its own validation cases) or its own pool's. Beside consortium fences the site keeps the
    fences its own pool would give (``<view>.own-pool.json``), for comparison; they never leave it.

    The fences belong to one run: their JSON records the run key (:meth:`SiteState.run_key`: the
    site's config and the frozen autoencoder's digest) and the candidates' digest they were fitted
    with. Fences recorded under another key (an earlier federation), or under none, are refitted
    and the site's log says so; fences of this run are reused in its later rounds and after a restart.

    ``pool_scores``: the pool's scores under these models when the caller has them already (they
    are reused when the fences come from the pool, saving a scoring pass).
    """
    import logging

    from fedqc.predict.folder import fences_key, write_fences
    from fedqc.site.state import state_digest

    logger = logging.getLogger("fedqc.site")
    path = site.work_dir / "thresholds" / f"{view}.json"
    key = site.run_key(view, ae)
    if path.is_file():
        recorded = fences_key(path)
        if {k: recorded.get(k) for k in key} == key:
            site.fences_checked[view] = recorded
            return Thresholds.from_json(path)
        differs = [k for k in key if recorded.get(k) != key[k]]
        logger.warning("site %s %s: the fences in %s were fitted in another run (%s); refitting them for this run",
                       site.site.name, view, path,
                       "no run recorded" if not recorded else ", ".join(
                           f"{k} {recorded.get(k)} != {key[k]}" for k in differs))
    split, qc = site.split(view), site.config.qc

    def own_pool() -> Thresholds:
        if pool_scores is not None:
            return fences_from_scores(pool_scores, qc.tukey_factor, "unlabelled")
        return fit_fences(site.config, models, ae, split.pool, "unlabelled", site.device)

    if consortium is not None:
        given = lambda: consortium  # noqa: E731
    elif split.val:
        given = lambda: fit_fences(site.config, models, ae, split.val, "consortium (this site)",  # noqa: E731
                                   site.device)
    else:
        given = None
    th = choose_fences(qc.threshold_source, labelled_val=given, unlabelled=own_pool if split.pool else None,
                       where=f"site {site.site.name} {view}")
    record = {**key, "candidates": state_digest(list(models))}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fences(path, th, record)
    if th.source.startswith("consortium") and len(split.pool) >= MIN_VALUES:
        write_fences(path.with_name(f"{view}.own-pool.json"), own_pool(), record)
    site.fences_checked[view] = record
    logger.info("site %s %s: fences fitted for this run (%s) -> %s", site.site.name, view, record, path)
    return th


def consortium_fences(config: Mapping[str, Scalar], view: str) -> Thresholds | None:
    """The consortium's fences of ``view`` from a REFINE / PREDICT message, when it carries them."""
    raw = config.get(ConfigKey.CONSORTIUM_FENCES)
    if not raw:
        return None
    entry = json.loads(str(raw)).get(view)
    return Thresholds(**entry) if entry else None


def fences(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """FENCES: a labelled site's quartiles of the best candidate's pDC / pHD on its validation cases,
    per view, and their count; scalars only (the per-case scores stay here)."""
    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    metrics: dict[str, Scalar] = {M.NUM_CASES.value: 0}
    for view in site.config.views:
        val = site.split(view).val if site.site.labelled else []
        if len(val) < MIN_VALUES:
            continue
        models = _candidates(site, weights, view, m)
        ae = _autoencoder_for(site, weights, view)
        quartiles = fence_quartiles(fit_fences(site.config, models, ae, val, "consortium", site.device))
        metrics.update({fence_metric_key(view, k): v for k, v in quartiles.items()})
        metrics[M.NUM_CASES.value] = int(metrics[M.NUM_CASES.value]) + len(val)
    return SiteReply(metrics=metrics)


def refine(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """Round k of Eq. 2, in order: score the pool with every candidate -> fences -> OoD flags ->
    :func:`fedqc.train.stages.refine_round` on the flagged cases (labelled sites add the supervised
    term; a labelled site with nothing flagged contributes that term alone) -> weights and counts."""
    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    alpha = float(config.get(ConfigKey.ALPHA, 1.0))
    k = int(config.get(ConfigKey.PHASE_ROUND, 1))
    control = bool(config.get(ConfigKey.CONTROL, False))  # M+sup: the supervised share only, nothing flagged
    semi_only = bool(config.get(ConfigKey.SEMI_ONLY, False))  # a sequential round's first half: no labelled term
    dp = site.config.privacy.dp
    if dp is not None and (dp.refinement == "skip" or (dp.refinement == "unlabelled-only" and site.site.labelled)):
        # Eq. 2 under DP (docs/PRIVACY.md): a site whose patients the DP guarantee covers sends no update.
        return SiteReply(metrics={M.NUM_EXAMPLES.value: 0, M.NUM_FLAGGED.value: 0})
    out: dict = {}
    n_cases, semi, sup = 0, [], []
    per_view: dict[str, dict[M, int]] = {}  # view -> the counts of its own work this round
    for view in site.config.views:
        models = _candidates(site, weights, view, m)
        ae = _autoencoder_for(site, weights, view)
        pool = [] if control else site.split(view).pool
        flagged = []
        if pool:
            scores = score_cases(models, ae, pool, site.config.qc, site.device)
            th = site_fences(site, view, models, ae, pool_scores=scores, consortium=consortium_fences(config, view))
            flagged = [c for c, f in zip(pool, flag_ood(scores.pdc, scores.phd, th, scores.ptc)) if f]
        n_cases += len(pool)
        counts = per_view[view] = {M.NUM_FLAGGED: len(flagged), M.NUM_EXAMPLES: 0, M.NUM_LABELLED: 0}
        images, labels = site.labelled_slices(view)
        if semi_only:
            images, labels = images[:0], labels[:0]
        if flagged or len(images):
            _, stats = refine_round(site.config, models, ae, flagged, (images, labels), alpha=alpha, k=k,
                                    epochs=epochs)
            semi += [s["semi_loss"] for s in stats if s["n_flagged_slices"]]
            sup += [s["sup_loss"] for s in stats if s["n_labelled"]]
            counts[M.NUM_EXAMPLES] = stats[-1]["n_flagged_slices"] + stats[-1]["n_labelled"]
            counts[M.NUM_LABELLED] = stats[-1]["n_labelled"]
        if counts[M.NUM_EXAMPLES]:
            # Only a view trained this round travels: an untrained view's unchanged weights would pull the
            # consortium's average of that view back toward its start, in proportion to the other view's slices.
            for i, model in enumerate(models):
                out.update(site.export(model, f"{candidate_prefix(i)}seg/{view}/"))
    # The coordinator weights refinement updates by these counts, per view, so the round's step is Eq. 2's
    # (flagged slices = num-examples - num-labelled; fedqc.fl.aggregation.eq2_average).
    metrics: dict[str, Scalar] = {M.NUM_CASES.value: n_cases, M.ALPHA.value: alpha}
    for key in (M.NUM_FLAGGED, M.NUM_EXAMPLES, M.NUM_LABELLED):
        metrics[key.value] = sum(c[key] for c in per_view.values())
        metrics.update({view_metric_key(view, key): c[key] for view, c in per_view.items()})
    if semi:
        metrics[M.SEMI_LOSS.value] = float(np.mean(semi))
    if sup:
        metrics[M.SUP_LOSS.value] = float(np.mean(sup))
    return SiteReply(weights=out or None, metrics=metrics)


def predict(site: SiteState, weights: dict, config: Mapping[str, Scalar], epochs: int) -> SiteReply:
    """QC-based selection on every case of the site; files stay in ``WORK/predictions``: the
    predictions, ``qc.csv`` and the QC review page ``qc.html`` (Dice where labels may be read: a
    labelled site). Files an earlier run left there are removed. A bad case does not stop the
    others; they are all written, then the failures are raised together
    (:class:`fedqc.predict.folder.PredictionErrors`)."""
    import logging

    from fedqc.data.site import site_cases
    from fedqc.predict.folder import PredictionErrors, finish_predictions, predict_cases

    m = int(config.get(ConfigKey.NUM_CANDIDATES, 1))
    out_dir = site.work_dir / "predictions"
    rows: list[dict] = []
    for view in site.config.views:
        models = _candidates(site, weights, view, m)
        ae = _autoencoder_for(site, weights, view)
        th = site_fences(site, view, models, ae, consortium=consortium_fences(config, view))
        cases = site_cases(site.site, [view])
        rows += predict_cases(site.config, models, ae, cases, th, out_dir, site.device, progress=None,
                              with_dice=site.site.labelled)
    removed = finish_predictions(out_dir, rows, title=f"QC review: site {site.site.name}", progress=None)
    if removed:
        logging.getLogger("fedqc.site").warning("site %s: removed %d files of an earlier run's predictions "
                                                "from %s", site.site.name, len(removed), out_dir)
    if any(r["error"] for r in rows):
        raise PredictionErrors(out_dir, rows)
    flagged = sum(1 for r in rows if r["ood"])
    return SiteReply(metrics={M.NUM_CASES.value: len(rows), M.NUM_FLAGGED.value: flagged})
