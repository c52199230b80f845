"""Per-site refinement wall time on a simulated site of N subjects, stage by stage.

fedqc's simulator (docs/SIMULATOR.md) writes two data sets from one preset: a labelled 1.5 T centre
(``--labelled-subjects``, for the brief supervised training, the labelled-validation fences and Eq. 2's
supervised term) and the site, the preset's first shifted, unlabelled centre (``--subjects``). Then, per
view, fedqc's real stages run on the site's unlabelled pool:

    data prep (read, preprocess, cache: cold by default)  ->  fences (fedqc.qc.fences.fit_fences)
    ->  refinement (fedqc.train.stages.refine: OoD scoring, then K_semi epochs of refine_epoch, each followed
        by re-scoring, stopping early when nothing is flagged)  ->  selection (predict_case per case)

with a segmenter (m_best candidates) and QC autoencoder trained for a few epochs only (the point is
timing; their training is reported but not part of the site's time). Scoring and refinement epochs
inside ``refine`` are timed by wrapping ``fedqc.train.stages.score_cases`` / ``refine_epoch``. Optionally
(on by default) one refinement epoch (``refine_epoch``) is compared with a bare PyTorch loop of the same
model, batches and loss (no shuffling, clipping or bookkeeping), best of 2 interleaved runs.

    python benchmarks/bench_refine.py --subjects 100 --k-semi 2 --json refine.json  # CUDA: ~1.5-2 min
    python benchmarks/bench_refine.py --subjects 100 --simulate-only               # data only, CPU
    python benchmarks/bench_refine.py --device cpu --threads 1 --preset tiny --subjects 3 \\
        --labelled-subjects 4 --size 64 --spacing 2.5 --epochs 1 --ae-epochs 1 --k-semi 1 --loop-slices 16
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fedqc.models.factory import segmenters_from_states
from fedqc.predict.case import predict_case
from fedqc.qc.fences import fit_fences
from fedqc.train import stages as method


def simulate(data: Path, preset: str, n_site: int, n_labelled: int, seed: int) -> float:
    """Simulate the labelled centre and the site (one-centre variants of ``preset``); seconds taken."""
    from fedqc.data.simulator import simulate_dataset
    from fedqc.data.simulator.presets import PRESETS

    base = PRESETS[preset]
    centres = {"labelled": next(c for c in base.centres if c.labelled),
               "site": next(c for c in base.centres if not c.labelled)}
    start = time.perf_counter()
    for name, n in (("labelled", n_labelled), ("site", n_site)):
        if (data / name / "dataset_information.csv").is_file():
            continue
        key = f"bench-{preset}-{name}"
        PRESETS[key] = dataclasses.replace(base, name=key, centres=(centres[name],))  # type: ignore[index]
        simulate_dataset(data / name, preset=key, subjects_per_centre=n, seed=seed, progress=None)
    return time.perf_counter() - start


class Clock:
    """Cumulative seconds and calls of wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return timed


CLOCK = Clock()  # fedqc.train.stages's scoring pass and refinement epochs, wrapped once in main()


def bare_refine_epoch(model, ae, flagged, images_l, labels_l, alpha, batch, opt, weights) -> None:
    """Eq. 2 steps over contiguous batches: the same forward, pseudo ground truth and losses as refine_epoch."""
    from fedqc.core.device import autocast_context
    from fedqc.models.segmenter import main_output
    from fedqc.train.losses import (
        deep_supervised,
        one_hot,
        semi_supervised_term,
        supervised_loss,
    )

    device = flagged.device
    model.train()
    for first in range(0, flagged.shape[0], batch):
        x, x_l, y_l = flagged[first:first + batch], images_l[first:first + batch], labels_l[first:first + batch]
        nf = x.shape[0]
        with autocast_context(device):
            output = model(torch.cat([x, x_l]))
        probs = torch.softmax(main_output(output)[:nf].float(), dim=1)
        with torch.no_grad(), autocast_context(device):
            target = ae(one_hot(probs.argmax(1), 4)).float()
        loss = alpha * semi_supervised_term(probs, target, weights) + deep_supervised(supervised_loss, output[nf:], y_l)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def loop_compare(model, ae, pool, images, labels, n_slices, batch, device) -> dict:
    """One refinement epoch on up to ``n_slices`` pool slices: refine_epoch vs the bare loop (img/s)."""
    from fedqc.core.device import make_generator
    from fedqc.train.losses import class_weights_with_rv
    from fedqc.train.refine import refine_epoch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    stacks = [c.images[:, None] for c in pool]
    flagged = torch.as_tensor(np.concatenate(stacks)[:n_slices], dtype=torch.float32, device=device)
    n = flagged.shape[0]
    reps = math.ceil(n / len(images))
    images_l = torch.as_tensor(np.concatenate([images] * reps)[:n], device=device)
    labels_l = torch.as_tensor(np.concatenate([labels] * reps)[:n], device=device).long()
    weights = class_weights_with_rv(3.0).to(device)
    ae.eval()
    models = {k: copy.deepcopy(model).to(device) for k in ("bare", "fedqc")}
    opts = {k: torch.optim.Adam(m.parameters(), lr=2e-4) for k, m in models.items()}
    gen = make_generator(0, device)
    runs = {
        "bare": lambda: bare_refine_epoch(models["bare"], ae, flagged, images_l, labels_l, 1.0, batch,
                                          opts["bare"], weights),
        "fedqc": lambda: refine_epoch(models["fedqc"], ae, [flagged], images_l, labels_l, alpha=1.0,
                                      batch_size=batch, optimiser=opts["fedqc"], generator=gen, rv_weight=3.0),
    }
    for run in runs.values():  # warm-up
        run()
    best = {k: 0.0 for k in runs}
    for _ in range(2):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            best[name] = max(best[name], 2 * n / (time.perf_counter() - start))  # flagged + labelled slices
    return {"flagged_slices": n, "batch": batch, "bare_img_s": best["bare"], "fedqc_img_s": best["fedqc"],
            "ratio": best["fedqc"] / best["bare"]}


def run_view(config, view, data: Path, device, args) -> tuple[dict, dict | None]:
    from fedqc.data.site import load_site_split, stack_slices
    from fedqc.models.factory import new_autoencoder
    from fedqc.qc.thresholds import ThresholdFitError

    cache = data / "cache"
    row: dict = {"view": view}
    start = time.perf_counter()
    lab = load_site_split(config.site("labelled"), view, config, progress=None, cache_dir=cache / "labelled")
    row["prep_labelled_s"] = time.perf_counter() - start
    start = time.perf_counter()
    site = load_site_split(config.site("site"), view, config, progress=None, cache_dir=cache / "site")
    row["prep_s"] = time.perf_counter() - start
    pool = site.pool
    row.update(pool_cases=len(pool), pool_slices=int(sum(len(c.images) for c in pool)),
               labelled_train_slices=int(sum(len(c.images) for c in lab.train)))
    start = time.perf_counter()
    trained = method.train_supervised(config, lab.train, lab.val, device, progress=None)
    models = segmenters_from_states(config, trained.candidate_states, device)
    ae = new_autoencoder(config)
    ae.load_state_dict(trained.autoencoder_state)
    ae = ae.to(device).eval()
    row["supervised_training_s"] = time.perf_counter() - start
    start, th, row["fence_source"] = time.perf_counter(), None, config.qc.threshold_source
    if row["fence_source"] == "labelled-val":
        try:
            th = fit_fences(config, models, ae, lab.val, "labelled-val", device)
        except ThresholdFitError:  # too few labelled validation cases: the site's own pool
            row["fence_source"] = "unlabelled (too few labelled-val cases)"
    if th is None:
        th = fit_fences(config, models, ae, pool, "unlabelled", device)
    row["fences_s"] = time.perf_counter() - start
    seconds, calls = dict(CLOCK.seconds), dict(CLOCK.calls)
    start = time.perf_counter()
    refined, log = method.refine(config, models, ae, {"site": pool}, {"site": th}, lab.train, device, progress=None)
    row["refine_s"] = time.perf_counter() - start
    row.update(scoring_s=CLOCK.seconds["scoring"] - seconds.get("scoring", 0.0),
               epochs_s=CLOCK.seconds["epochs"] - seconds.get("epochs", 0.0),
               scoring_passes=CLOCK.calls["scoring"] - calls.get("scoring", 0), epochs_run=len(log.epochs),
               flagged_initial=log.flagged_initial.get("site", 0), flagged_final=log.flagged_final.get("site", 0),
               flagged_cases_per_epoch=[e["flagged_before"] for e in log.epochs])
    start = time.perf_counter()
    n_ood = sum(predict_case(config, refined, ae, case, th, device).ood for case in pool)
    row.update(selection_s=time.perf_counter() - start, ood_after=int(n_ood))
    row["site_total_s"] = row["prep_s"] + row["fences_s"] + row["refine_s"] + row["selection_s"]
    if row["epochs_run"]:  # one epoch = refine_epoch for every candidate + re-scoring the pool
        pass_s = row["scoring_s"] / row["scoring_passes"]
        row["per_epoch_s"] = row["epochs_s"] / row["epochs_run"] + pass_s
        row["projected_k10_s"] = row["site_total_s"] - row["refine_s"] + pass_s + 10 * row["per_epoch_s"]
    compare = None
    if args.loop_slices > 0 and pool:
        images, labels = stack_slices(lab.train)
        compare = {"view": view, **loop_compare(models[0], ae, pool, images, labels, args.loop_slices,
                                                config.refine.batch_size, device)}
    return row, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=100, help="subjects of the site (unlabelled)")
    parser.add_argument("--labelled-subjects", type=int, default=16)
    parser.add_argument("--preset", default="consortium", help="simulator preset (consortium, quickstart, tiny)")
    parser.add_argument("--data", default=None, help="data folder (default /tmp/fedqc-bench-refine/<preset-sizes>)")
    parser.add_argument("--simulate-only", action="store_true")
    parser.add_argument("--keep-cache", action="store_true", help="reuse the preprocessed cache (default: cold)")
    parser.add_argument("--views", default="SA,LA")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing", type=float, default=1.5, help="mm (configs/simulation.yaml)")
    parser.add_argument("--model", default="unet", help="segmenter preset")
    parser.add_argument("--epochs", type=int, default=None, help="supervised epochs (default 15 CUDA, 3 CPU)")
    parser.add_argument("--ae-epochs", type=int, default=None, help="default 15 CUDA, 3 CPU")
    parser.add_argument("--m-best", type=int, default=3)
    parser.add_argument("--k-semi", type=int, default=3, help="refinement epochs (fedqc's default is 10)")
    parser.add_argument("--fences", default="labelled-val", choices=["labelled-val", "unlabelled"])
    parser.add_argument("--classes", default="rv", choices=["rv", "foreground"])
    parser.add_argument("--tukey-factor", type=float, default=1.5, help="qc.tukey_factor (0: tight fences, "
                        "more cases flagged)")
    parser.add_argument("--loop-slices", type=int, default=None, help="slices for the loop comparison "
                        "(default 640 CUDA, 32 CPU; 0 skips it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from fedqc.config import config_from_dict
    from fedqc.core.device import select_device, set_torch_threads

    data = Path(args.data or f"/tmp/fedqc-bench-refine/{args.preset}-L{args.labelled_subjects}-N{args.subjects}"
                             f"-s{args.seed}")
    simulate_s = simulate(data, args.preset, args.subjects, args.labelled_subjects, args.seed)
    print(f"data: {data} (simulated in {simulate_s:.1f} s)", flush=True)
    if args.simulate_only:
        return
    set_torch_threads(args.threads)
    device = select_device(args.device)
    cuda = device.type == "cuda"
    args.loop_slices = (640 if cuda else 32) if args.loop_slices is None else args.loop_slices
    args.epochs = (15 if cuda else 3) if args.epochs is None else args.epochs
    args.ae_epochs = (15 if cuda else 3) if args.ae_epochs is None else args.ae_epochs
    if not args.keep_cache:
        shutil.rmtree(data / "cache", ignore_errors=True)
    config = config_from_dict({
        "sites": [{"name": "labelled", "root": str(data / "labelled"), "labelled": True},
                  {"name": "site", "root": str(data / "site"), "labelled": False}],
        "views": args.views.split(","), "preprocess": {"spacing_mm": args.spacing, "size_px": args.size},
        "model": {"preset": args.model},
        "train": {"epochs": args.epochs, "m_best": args.m_best, "device": str(device), "seed": args.seed},
        "qc": {"ae_epochs": args.ae_epochs, "classes": args.classes, "threshold_source": args.fences,
               "tukey_factor": args.tukey_factor},
        "refine": {"k_semi": args.k_semi}}, base_dir=data)
    method.score_cases = CLOCK.wrap(method.score_cases, "scoring")
    method.refine_epoch = CLOCK.wrap(method.refine_epoch, "epochs")
    rows, compares = [], []
    for view in config.views:
        row, compare = run_view(config, view, data, device, args)
        rows.append(row)
        compares += [compare] if compare else []
    stages = ("prep_s", "fences_s", "scoring_s", "epochs_s", "refine_s", "selection_s", "site_total_s",
              "supervised_training_s")
    total = {"view": "all", **{k: sum(r[k] for r in rows) for k in stages + ("pool_cases", "pool_slices")}}
    print(f"\nPer-site refinement, {device}, site of {args.subjects} subjects ({args.preset}), {args.model} "
          f"{args.size} px, m = {args.m_best}, K_semi <= {args.k_semi}, fences {args.fences}\n")
    print("| view | pool cases | slices | fences from | flagged (initial -> final) | epochs | prep s | fences s "
          "| OoD scoring s (passes) | refine epochs s | refine total s | selection s | site total s "
          "| supervised training s |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows + [total]:
        flags = f"{r['flagged_initial']} -> {r['flagged_final']}" if "flagged_initial" in r else ""
        print(f"| {r['view']} | {r['pool_cases']} | {r['pool_slices']} | {r.get('fence_source', '')} | {flags} "
              f"| {r.get('epochs_run', '')} | {r['prep_s']:.1f} | {r['fences_s']:.1f} | {r['scoring_s']:.1f}"
              + (f" ({r['scoring_passes']})" if "scoring_passes" in r else "")
              + f" | {r['epochs_s']:.1f} | {r['refine_s']:.1f} | {r['selection_s']:.1f} | {r['site_total_s']:.1f} | "
              f"{r['supervised_training_s']:.1f} |")
    for r in rows:
        if "per_epoch_s" in r:
            print(f"- {r['view']}: {r['per_epoch_s']:.1f} s per refinement epoch (refine_epoch x {args.m_best} + "
                  f"re-scoring), flagged cases per epoch {r['flagged_cases_per_epoch']}; all 10 epochs of "
                  f"fedqc's default K_semi at that rate: site total ~{r['projected_k10_s']:.0f} s")
    if compares:
        print("\n| view | refinement loop | flagged slices | batch | bare img/s | fedqc img/s | ratio |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for c in compares:
            print(f"| {c['view']} | refine_epoch vs bare | {c['flagged_slices']} | {c['batch']} | "
                  f"{c['bare_img_s']:.1f} | {c['fedqc_img_s']:.1f} | {c['ratio']:.3f} |")
    if args.json:
        meta = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "simulate_s": simulate_s,
                "load_average_1min": round(os.getloadavg()[0], 2)}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "args": vars(args), "views": rows, "total": total, "loop": compares},
                      handle, indent=1)


if __name__ == "__main__":
    main()
