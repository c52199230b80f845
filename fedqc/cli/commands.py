"""The centralised commands: ``fedqc train``, ``refine``, ``predict``, ``evaluate`` and ``simulate``.

Each command reads its inputs, runs the method's stages (``fedqc.train.stages``, ``fedqc.qc``,
``fedqc.predict``: the same functions a federated site runs) and writes its outputs into a
run directory (``fedqc.models.run_folder``) or a prediction folder, printing progress and ending with a
readable summary table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from fedqc.config import Config, load_config
from fedqc.core.errors import DataError, FedqcError
from fedqc.data.site import ensure_data


def _prepare(config: Config, view, progress=print):
    """Every site's split of ``view``; the bad files of all sites listed at once."""
    from fedqc.data.site import BadCasesError, load_site_split, raise_collected

    splits, bad = [], []
    for site in config.sites:
        try:
            splits.append(load_site_split(site, view, config, progress=progress))
        except BadCasesError as exc:
            bad.append(exc)
    raise_collected(bad, f"unusable {view} case file(s); nothing was trained or changed")
    return splits


def check_fence_sizes(config: Config, federated: bool) -> None:
    """Before any training: enough validation (or pool) cases for the QC fences (ConfigError otherwise)."""
    from fedqc.core.errors import ConfigError
    from fedqc.site.state import fence_shortfalls

    problems = fence_shortfalls(config, federated=federated)
    if problems:
        raise ConfigError("qc.threshold_source", "too few cases for the QC fences, nothing was trained: "
                          + "; ".join(problems))


def train_command(config_path: Path, run: Path, overrides=None) -> int:
    from fedqc.core.device import select_device
    from fedqc.core.io import write_json
    from fedqc.core.table import format_table
    from fedqc.data.site import BadCasesError, raise_collected
    from fedqc.models.factory import segmenters_from_states
    from fedqc.models.run_folder import (
        clear_derived,
        load_autoencoder,
        save_autoencoder,
        save_candidates,
        save_config,
        thresholds_path,
        training_id,
    )
    from fedqc.predict.folder import write_fences
    from fedqc.qc.fences import fit_fences
    from fedqc.qc.thresholds import ThresholdFitError
    from fedqc.train.stages import consortium_passes, train_supervised
    
    config = load_config(config_path, overrides)
    if not config.labelled_sites:
        raise FedqcError("no site is labelled: set 'labelled: true' on at least one site to train")
    ensure_data(config)
    check_fence_sizes(config, federated=False)
    device = select_device(config.train.device)
    rows = []
    prepared, bad = {}, []
    for view in config.views:
        print(f"[{view}] preparing data")
        try:
            prepared[view] = _prepare(config, view)
        except BadCasesError as exc:
            bad.append(exc)
    raise_collected(bad, "unusable case file(s); nothing was trained or changed")
    # Only now, with the data known good, touch the run folder: what the old training left that the
    # new one makes stale goes first (refined models, fences), so nothing mixes two trainings.
    run.mkdir(parents=True, exist_ok=True)
    for view in config.views:
        removed = clear_derived(run, view)
        if removed:
            print(f"[{view}] removed what the earlier training in {run} left and this one makes stale: "
                  f"{', '.join(p.name for p in removed)} (rerun 'fedqc refine' after training)")
    save_config(run, config)
    passes = consortium_passes(prepared)
    for view, splits in prepared.items():
        start = time.perf_counter()
        train = [c for s in splits for c in s.train]
        val = [c for s in splits for c in s.val]
        print(f"[{view}] training on {len(train)} cases ({sum(len(c.images) for c in train)} slices), "
              f"validating on {len(val)} cases, device {device}")
        result = train_supervised(config, train, val, device, passes=passes[view])
        save_candidates(run, view, "supervised", result.candidate_states, result.candidate_info)
        save_autoencoder(run, view, result.autoencoder_state)
        write_json(run / view / "history.json", result.history)
        models = segmenters_from_states(config, result.candidate_states, device)
        ae = load_autoencoder(run, view, config, device)
        for info in result.candidate_info:
            rows.append([view, info["rank"], info["epoch"], info["val_score"]])
        try:
            th = fit_fences(config, models, ae, val, "labelled-val", device)
        except ThresholdFitError as exc:
            if config.qc.threshold_source in ("consortium", "labelled-val"):
                raise
            print(f"[{view}] note: no labelled-validation fences ({exc})")
            continue
        write_fences(thresholds_path(run, view, "labelled-val"), th, {"training": training_id(run, view)})
        print(f"[{view}] done in {time.perf_counter() - start:.0f} s; labelled-val fences: "
              f"pDC < {th.th_low_pdc:.3f}, pHD > {th.th_up_phd:.2f} mm")
    print(format_table(["view", "candidate", "epoch", "val Dice"], rows))
    print(f"run directory: {run}")
    return 0


def site_thresholds(config: Config, run: Path, view, models, ae, splits, device) -> dict:
    """Each site's fences for its pool, by the one policy of :func:`fedqc.qc.fences.choose_fences`."""
    from fedqc.models.run_folder import thresholds_path, training_id
    from fedqc.predict.folder import labelled_val_fences, write_fences
    from fedqc.qc.fences import choose_fences, fit_fences

    labelled_val = labelled_val_fences(run, view)
    key = {"training": training_id(run, view)}
    result = {}
    for split in splits:
        if not split.pool:
            continue
        th = choose_fences(config.qc.threshold_source, labelled_val=labelled_val,
                           unlabelled=lambda pool=split.pool: fit_fences(config, models, ae, pool, "unlabelled", device),
                           where=f"{split.site} {view}")
        write_fences(thresholds_path(run, view, split.site), th, key)
        result[split.site] = th
    return result


def refine_command(config_path: Path, run: Path, overrides=None) -> int:
    from fedqc.core.device import select_device
    from fedqc.core.io import write_json
    from fedqc.core.table import format_table
    from fedqc.models.run_folder import (
        load_autoencoder,
        load_candidates,
        save_candidates,
        training_id,
    )
    from fedqc.train.stages import refine

    config = load_config(config_path, overrides)
    ensure_data(config)
    device = select_device(config.train.device)
    rows = []
    for view in config.views:
        models = load_candidates(run, view, "supervised", config, device)
        ae = load_autoencoder(run, view, config, device)
        trained_by = training_id(run, view)  # what the refined models derive from (checked by predict)
        splits = _prepare(config, view)
        pools = {s.site: s.pool for s in splits if s.pool}
        if not pools:
            raise FedqcError("no unlabelled cases to refine on: add a site with 'labelled: false'")
        labelled = [c for s in splits for c in s.train]
        thresholds = site_thresholds(config, run, view, models, ae, splits, device)
        print(f"[{view}] refining {len(models)} candidates on {sum(map(len, pools.values()))} unlabelled cases")
        refined, log = refine(config, models, ae, pools, thresholds, labelled, device)
        states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in refined]
        save_candidates(run, view, "refined", states,
                        [{"rank": i, "training": trained_by} for i in range(len(states))])
        write_json(run / view / "refine_log.json", log.__dict__)
        for site in pools:
            rows.append([view, site, log.flagged_initial[site], log.flagged_final[site], len(log.epochs)])
    print(format_table(["view", "site", "flagged before", "flagged after", "epochs"], rows))
    return 0


def predict_command(run: Path, data: Path, out: Path, stage: str = "refined") -> int:
    """``fedqc predict``: every case of ``data``; a bad case is listed, the others are written."""
    from fedqc.data.mnms2 import discover_cases
    from fedqc.models.run_folder import load_run_config
    from fedqc.predict.folder import PredictionErrors, predict_folder

    config = load_run_config(run)
    cases = discover_cases(data, views=config.views)
    if not cases:
        raise DataError(data, "no cases found")
    rows = predict_folder(config, run, cases, out, stage=stage)
    done = [r for r in rows if not r["error"]]
    flagged = sum(1 for r in done if r["ood"])
    print(f"wrote {len(done)} predictions, qc.csv, the QC review page qc.html and {flagged} overlay PNGs of "
          f"flagged cases to {out}")
    if len(done) < len(rows):
        raise PredictionErrors(out, rows)
    return 0


def evaluate_command(data: Path, pred: Path, json_path: Path | None = None) -> int:
    """``fedqc evaluate``: every labelled case with a prediction; bad cases listed at the end (exit 2).
    Where ``pred`` holds a ``qc.csv`` (``fedqc predict``'s), its review page ``qc.html`` is rebuilt
    with each case's Dice (the pDC-vs-Dice plot)."""
    import csv

    import numpy as np

    from fedqc.core.io import write_json
    from fedqc.data.site import raise_collected
    from fedqc.evaluation.evaluate import (
        evaluate_predictions,
        format_summary,
        results_as_json,
    )
    from fedqc.predict.review import write_review

    failures: list[DataError] = []
    results = evaluate_predictions(data, pred, failures=failures)
    if results:
        print(format_summary(results))
    if json_path is not None:
        write_json(json_path, {**(results_as_json(results) if results else {"cases": [], "summary": {}}),
                               "failures": [str(e) for e in failures]})
        print(f"results written to {json_path}")
    qc_csv = pred / "qc.csv"
    if qc_csv.is_file() and results:
        with open(qc_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and "case_id" in rows[0]:
            dice = {r.case_id: round(float(np.mean(list(r.dice.values()))), 5) for r in results}
            page = write_review(pred, rows, title=f"QC review: {pred} against {data}", dice=dice)
            print(f"QC review page with pDC against Dice: {page}")
    raise_collected(failures, f"case(s) could not be evaluated (the other {len(results)} are scored above)")
    return 0


def simulate_command(config_path: Path, run: Path | None, overrides=None, report_only: bool = False) -> int:
    """``fedqc simulate``: the whole federation on this machine, then the per-site ablation report.

    ``report_only``: score the finished run in ``run`` again, without federating.
    """
    from fedqc.evaluation.federated_report import federated_report
    from fedqc.fl import run_state
    from fedqc.fl.from_config import federation_settings, node_config
    from fedqc.fl.simulation import SimulationConfig, run_simulation, summary

    config = load_config(config_path, overrides)
    run = run or Path("runs") / config_path.stem
    ensure_data(config)
    check_fence_sizes(config, federated=True)
    start = time.perf_counter()
    if report_only:
        finished = run_state.load_finished(run)
        for name in ("report.md", "report.json"):  # the earlier scoring is kept beside the new one
            if (run / name).is_file():
                (run / name).replace(run / name.replace("report", "report.previous"))
        print(f"scoring the finished run {run} again (no federation); the earlier report is now "
              f"report.previous.md / .json")
    else:
        sites = [node_config(site, config.views) for site in config.sites]
        simulation = SimulationConfig(sites=sites, federation=federation_settings(config, audit=True, control=True))
        print(f"federating {len(sites)} sites ({', '.join(s.name for s in config.sites)}) into {run}")
        run_simulation(simulation, run)
        seconds = time.perf_counter() - start
        print(f"federation finished in {seconds:.0f} s; scoring each site's held-out test subjects")
        finished = run_state.load_finished(run)
    table = federated_report(config, run, finished.final, finished.supervised)
    from fedqc.evaluation.figures import round_log_pngs

    plots = round_log_pngs(run)
    info = summary(run)
    print(table)
    print(f"\nrun directory: {run} (report.md, report.json, log.json, summary.json, "
          f"{len(plots)} plots, sites/*/predictions)")
    print(f"wall time {time.perf_counter() - start:.0f} s; m_best supervised rounds {info.get('m_best')}")
    return 0


def ablation_command(config_path: Path, out: Path, seeds: Sequence[int], overrides=None,
                     report_from: Sequence[Path] = (), transductive: bool = True) -> int:
    from fedqc.core.io import write_json
    from fedqc.evaluation.experiment import (
        aggregate,
        load_results,
        quality_tables,
        run_seed,
    )

    config = load_config(config_path, overrides)
    out.mkdir(parents=True, exist_ok=True)
    if report_from:
        results = load_results(report_from)
    else:
        ensure_data(config)
        results = []
        for seed in seeds:
            print(f"=== seed {seed}")
            results.append(run_seed(config, seed, out, transductive=transductive))
            write_json(out / "ablation.json", results)
    report = aggregate(results, config) + "\n\n" + quality_tables(results, config)
    if config.adapt.peers:  # the label-free peers side by side (fedqc.adapt), with their figure
        from fedqc.evaluation.peers_report import peers_png, peers_report

        report += "\n\n" + peers_report(results, config)
        peers_png(results, config, out / "peers.png")
    (out / "ablation.md").write_text(report + "\n")
    print(report)
    return 0
