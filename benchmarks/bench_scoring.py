"""The QC scoring pass: segment -> reconstruct -> pDC/pHD for m_best candidates over a site's cases.

A synthetic site (short-axis stacks of 8-12 slices at (10, 1.25, 1.25) mm and long-axis single slices,
cardiac masks of bench_qc_metrics.py rendered as noisy images) is scored by m candidates (snapshots of
the last m epochs of one briefly trained segmenter) and a briefly trained QC autoencoder. Passes:

* ``fedqc``: ``fedqc.qc.scoring.score_cases`` as fit_thresholds / refine / the site's REFINE task call
  it; timed end to end only.
* ``per-case``: the same steps with fedqc's ``segment`` / ``reconstruct`` / ``pseudo_scores_batch``,
  each step timed (case by case, candidate by candidate, labels to the host, CPU metrics).
* ``batched``: the same fedqc functions over all slices at once: one upload, large network batches,
  metrics on the device (``fedqc.qc.metrics_torch``, stacks padded with background slices) or on the
  CPU (``--metric cpu``); only the (n, m) scores come back.

Time is split into segmenter forward (with softmax and argmax), autoencoder forward, metric step and
host<->device copies (CUDA synchronised after every step). "site slices/s" counts each slice of the
site once (through all m candidates); "metric slices/s" counts slice pairs (slices x m). The torch
metric values are checked against the CPU path on a sample. Makes no assertions.

    python benchmarks/bench_scoring.py --json scoring.json                  # CUDA defaults, ~30-40 s
    python benchmarks/bench_scoring.py --device cpu --threads 1 --n-sa 3 --n-la 4 --size 64 \\
        --train-cases 4 --train-epochs 1 --ae-epochs 1 --repeats 1         # a tiny CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qc_metrics import LA_SPACING_MM, SA_SPACING_MM, heart_stack

from fedqc.qc.metrics import pseudo_scores_batch
from fedqc.qc.scoring import (
    QC_CLASSES,
    reconstruct,
    score_cases,
    scores_on_device,
    scores_on_host,
    segment,
)

STEPS = ("copy_h2d", "segmenter", "autoencoder", "metrics", "copy_d2h")


@dataclass
class SynthCase:
    """What score_cases reads of a PreparedCase."""

    case_id: str
    images: np.ndarray  # (Z, H, W) float32, z-scored
    labels: np.ndarray  # (Z, H, W) uint8
    spacing_mm: tuple[float, float, float]


def make_site(rng: np.random.Generator, n_sa: int, n_la: int, size: int) -> list[SynthCase]:
    cases = []
    for i, (n_slices, spacing) in enumerate([(None, SA_SPACING_MM)] * n_sa + [(1, LA_SPACING_MM)] * n_la):
        labels = heart_stack(rng, n_slices or int(rng.integers(8, 13)), size)
        image = np.array([0.2, 1.0, 0.35, 0.85], np.float32)[labels]
        image += 0.12 * rng.standard_normal(labels.shape).astype(np.float32)
        cases.append(SynthCase(f"case{i:04d}", (image - image.mean()) / image.std(), labels, spacing))
    return cases


def train_candidates(train: list[SynthCase], preset: str, size: int, epochs: int, ae_epochs: int, m: int,
                     device: torch.device, seed: int = 0) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """m snapshots (the last m epochs) of one briefly trained segmenter, and a briefly trained autoencoder."""
    from fedqc.core.device import make_generator, seed_everything
    from fedqc.models import build_qc_autoencoder, build_segmenter
    from fedqc.train.autoencoder import autoencoder_one_epoch
    from fedqc.train.supervised import as_device_tensors, train_one_epoch

    images = np.concatenate([c.images for c in train])[:, None]
    images, labels = as_device_tensors(images, np.concatenate([c.labels for c in train]), device)
    seed_everything(seed)
    seg = build_segmenter(preset, size).to(device)
    opt, gen = torch.optim.Adam(seg.parameters(), lr=2e-3), make_generator(seed, device)
    states = [{k: v.detach().clone() for k, v in seg.state_dict().items()}]
    for _ in range(epochs):
        train_one_epoch(seg, images, labels, opt, batch_size=16, generator=gen)
        states.append({k: v.detach().clone() for k, v in seg.state_dict().items()})
    snapshots = states[1:] or states  # trained snapshots (or the fresh model); newest first below
    models = []
    for state in (snapshots[::-1] + [snapshots[-1]] * m)[:m]:
        model = build_segmenter(preset, size).to(device)
        model.load_state_dict(state)
        models.append(model.eval())
    ae = build_qc_autoencoder(size).to(device)
    ae_opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    for _ in range(ae_epochs):
        autoencoder_one_epoch(ae, labels, ae_opt, batch_size=32, generator=gen)
    return models, ae.eval()


class Timer:
    """Seconds per step; CUDA is synchronised at the end of every step."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, step: str):
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[step] += time.perf_counter() - start


def fedqc_pass(models, ae, cases, qc, device):
    scores = score_cases(models, ae, cases, qc, device)
    return scores.pdc, scores.phd, None


def per_case_pass(models, ae, cases, classes, percentile, device, batch, timer):
    """score_cases step by step (same calls, same order: one upload per case and candidate)."""
    pairs = []
    for case in cases:
        for model in models:
            with timer("copy_h2d"):
                x = torch.as_tensor(case.images, dtype=torch.float32, device=device)
            with timer("segmenter"):
                pred = segment(model, x, device, batch).argmax(1)
            with timer("autoencoder"):
                recon = reconstruct(ae, pred, batch).argmax(1)
            with timer("copy_d2h"):
                pairs.append((pred.to(torch.uint8).cpu().numpy(), recon.to(torch.uint8).cpu().numpy(),
                              case.spacing_mm))
    with timer("metrics"):
        pdc, phd = pseudo_scores_batch(pairs, classes, percentile)
    return pdc.reshape(len(cases), len(models)), phd.reshape(len(cases), len(models)), None


def batched_pass(models, ae, cases, classes, percentile, device, batch, timer, metric, chunk=1024):
    """All slices through each network in large batches; metrics on the device or on the CPU."""
    m = len(models)
    pdc, phd = np.zeros((len(cases), m)), np.zeros((len(cases), m))
    kept = {}
    for planar in (False, True):
        index = [i for i, c in enumerate(cases) if (c.images.shape[0] == 1) == planar]
        if not index:
            continue
        group = [cases[i] for i in index]
        sizes = np.array([c.images.shape[0] for c in group])
        with timer("copy_h2d"):
            host = torch.from_numpy(np.concatenate([c.images for c in group]))
            x = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
        preds, recons = [], []
        for model in models:
            with timer("segmenter"):
                pred = torch.cat([segment(model, x[i:i + chunk], device, batch).argmax(1).to(torch.uint8)
                                  for i in range(0, len(x), chunk)])
            with timer("autoencoder"):
                recon = torch.cat([reconstruct(ae, pred[i:i + chunk], batch).argmax(1).to(torch.uint8)
                                   for i in range(0, len(pred), chunk)])
            preds.append(pred)
            recons.append(recon)
        spacing = np.array([c.spacing_mm for c in group])
        maps = [torch.stack(t) for t in (preds, recons)]  # (m, slices, H, W)
        if metric == "torch":
            with timer("metrics"):
                p, h = scores_on_device(*maps, sizes, spacing, planar, classes, percentile)
            with timer("copy_d2h"):
                p, h = p.cpu().numpy(), h.cpu().numpy()
        else:
            with timer("copy_d2h"):
                maps = [t.cpu().numpy() for t in maps]
            with timer("metrics"):
                p, h = scores_on_host(*maps, sizes, spacing, classes, percentile)
        pdc[index], phd[index] = p.reshape(m, -1).T, h.reshape(m, -1).T
        kept[planar] = (*maps, sizes, spacing) if metric == "torch" else None
    return pdc, phd, kept


def check_torch_metrics(kept: dict, classes, percentile, n_sample: int) -> dict:
    """metrics_torch on the device vs the CPU path: first candidate, first n_sample cases of each group."""
    worst = {"pdc": 0.0, "phd_mm": 0.0, "cases": 0}
    for planar, (preds, recons, sizes, spacing) in kept.items():
        sizes, spacing = sizes[:n_sample], spacing[:n_sample]
        preds, recons = preds[:1, :sizes.sum()], recons[:1, :sizes.sum()]
        on_device = [t.cpu().numpy() for t in scores_on_device(preds, recons, sizes, spacing, planar, classes,
                                                            percentile)]
        on_cpu = scores_on_host(preds.cpu().numpy(), recons.cpu().numpy(), sizes, spacing, classes, percentile)
        worst["pdc"] = max(worst["pdc"], float(np.abs(on_device[0] - on_cpu[0]).max()))
        worst["phd_mm"] = max(worst["phd_mm"], float(np.abs(on_device[1] - on_cpu[1]).max()))
        worst["cases"] += len(sizes)
    return worst


def run_pass(name, fn, repeats, device) -> tuple[dict, tuple]:
    best, out = None, None
    for _ in range(repeats):
        timer = Timer(device)
        start = time.perf_counter()
        result = fn(timer)
        timer.sync()
        total = time.perf_counter() - start
        if best is None or total < best["total_s"]:
            best, out = {"pass": name, "total_s": total, **{s: timer.seconds.get(s, 0.0) for s in STEPS}}, result
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-sa", type=int, default=200, help="short-axis stacks (8-12 slices each)")
    parser.add_argument("--n-la", type=int, default=200, help="long-axis single slices")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--preset", default="unet", help="segmenter preset (unet, dynunet, tiny)")
    parser.add_argument("--m-best", type=int, default=3)
    parser.add_argument("--train-cases", type=int, default=40, help="SA stacks to train on (+ as many LA)")
    parser.add_argument("--train-epochs", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    parser.add_argument("--ae-epochs", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    parser.add_argument("--classes", default="rv", choices=sorted(QC_CLASSES))
    parser.add_argument("--hausdorff", default="max", choices=["max", "p95"])
    parser.add_argument("--batch-size", type=int, default=None, help="network batch: fedqc's 32 for the "
                        "fedqc/per-case passes; the batched pass uses this (default 256 CUDA, 32 CPU)")
    parser.add_argument("--metric", default="auto", choices=["auto", "torch", "cpu"],
                        help="metric step of the batched pass (auto: torch on CUDA, cpu otherwise)")
    parser.add_argument("--passes", default="fedqc,per-case,batched")
    parser.add_argument("--check-cases", type=int, default=16, help="cases per group in the value check")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the batched pass (best kept)")
    parser.add_argument("--repeats-per-case", type=int, default=1, help="timed runs of the fedqc / per-case passes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from fedqc.config import QCConfig
    from fedqc.core.device import select_device, set_torch_threads

    set_torch_threads(args.threads)
    device = select_device(args.device)
    cuda = device.type == "cuda"
    metric = args.metric if args.metric != "auto" else ("torch" if cuda else "cpu")
    big_batch = args.batch_size or (256 if cuda else 32)
    epochs = args.train_epochs if args.train_epochs is not None else (8 if cuda else 1)
    ae_epochs = args.ae_epochs if args.ae_epochs is not None else (8 if cuda else 1)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    train = make_site(rng, args.train_cases, args.train_cases, args.size)
    site = make_site(rng, args.n_sa, args.n_la, args.size)
    models, ae = train_candidates(train, args.preset, args.size, epochs, ae_epochs, args.m_best, device, args.seed)
    setup_s = time.perf_counter() - t0
    qc = QCConfig(classes=args.classes, hausdorff=args.hausdorff)
    classes, percentile = QC_CLASSES[args.classes], (95.0 if args.hausdorff == "p95" else None)
    passes = {
        "fedqc": lambda cases, timer: fedqc_pass(models, ae, cases, qc, device),
        "per-case": lambda cases, timer: per_case_pass(models, ae, cases, classes, percentile, device, 32, timer),
        "batched": lambda cases, timer: batched_pass(models, ae, cases, classes, percentile, device, big_batch,
                                                     timer, metric),
    }
    n_slices = sum(c.images.shape[0] for c in site)
    warm = site[:2] + site[args.n_sa:args.n_sa + 2]
    rows, scores = [], {}
    for name in args.passes.split(","):
        passes[name](warm, Timer(device))  # warm-up: allocator, cuDNN, kernels
        repeats = args.repeats if name == "batched" else args.repeats_per_case
        row, (pdc, phd, kept) = run_pass(name, lambda t, fn=passes[name]: fn(site, t), repeats, device)
        scores[name] = (pdc, phd)
        nets, copies = row["segmenter"] + row["autoencoder"], row["copy_h2d"] + row["copy_d2h"]
        timed = nets + copies + row["metrics"]
        row.update(cases=len(site), slices=n_slices, m=len(models), site_slices_per_s=n_slices / row["total_s"],
                   metric_slices_per_s=(n_slices * len(models) / row["metrics"]) if row["metrics"] else None,
                   share_networks=nets / row["total_s"] if timed else None,
                   share_metrics=row["metrics"] / row["total_s"] if timed else None,
                   share_copies=copies / row["total_s"] if timed else None,
                   share_other=(row["total_s"] - timed) / row["total_s"] if timed else None,
                   metric=metric if name == "batched" else "cpu", pdc_mean=float(np.mean(pdc)))
        if kept and all(kept.values()):
            row["torch_vs_cpu_max_abs_diff"] = check_torch_metrics(kept, classes, percentile, args.check_cases)
        rows.append(row)
    ref = next(iter(scores.values()))
    for row in rows:
        pdc, phd = scores[row["pass"]]
        row["vs_first_pass_max_abs_diff"] = {"pdc": float(np.abs(pdc - ref[0]).max()),
                                             "phd_mm": float(np.abs(phd - ref[1]).max())}
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    print(f"\nQC scoring pass, {device}, {args.preset} {args.size} px, m = {len(models)}, {args.n_sa} SA stacks + "
          f"{args.n_la} LA slices = {n_slices} slices, classes {args.classes}, HD {args.hausdorff}\n")
    print("| pass | metric | total s | site slices/s | metric slices/s | networks % | metrics % | copies % "
          "| other % | H2D s | seg s | AE s | metric s | D2H s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mps = "-" if r["metric_slices_per_s"] is None else f"{r['metric_slices_per_s']:,.0f}"
        steps = " | ".join(f"{r[s]:.3f}" if r["share_networks"] is not None else "-" for s in STEPS)
        print(f"| {r['pass']} | {r['metric']} | {r['total_s']:.3f} | {r['site_slices_per_s']:,.0f} | {mps} | "
              f"{pct(r['share_networks'])} | {pct(r['share_metrics'])} | {pct(r['share_copies'])} | "
              f"{pct(r['share_other'])} | {steps} |")
    for r in rows:
        d = r["vs_first_pass_max_abs_diff"]
        check = r.get("torch_vs_cpu_max_abs_diff")
        print(f"- {r['pass']}: mean pDC {r['pdc_mean']:.3f}; max |diff| vs {rows[0]['pass']}: pDC {d['pdc']:.2e}, "
              f"pHD {d['phd_mm']:.2e} mm" + (f"; torch vs CPU metrics on {check['cases']} cases: pDC "
                                             f"{check['pdc']:.1e}, pHD {check['phd_mm']:.1e} mm" if check else ""))
    if args.json:
        meta = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
                "machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "setup_s": setup_s,
                "load_average_1min": round(os.getloadavg()[0], 2)}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
