"""Scale: the simulated federation with 2, 4, 8, 16 sites, and with more cases per site.

Each point is a real ``fedqc simulate`` run (the real method on Flower's simulation engine) with a
short protocol (short axis only; 1 supervised round, 1 autoencoder round, 1 refinement round,
inference, report) on quickstart-preset data. Sites are the simulator's 4 centres of as many data sets as needed (seeds
0, 1, ...), half of them labelled. While a run goes, the resident memory of its whole process tree
(the command, Ray's workers and actors) is sampled every 0.5 s; the peak is reported with the wall
time per round (from the run's log) and the total.

Ratios are against the first point of each series (2 sites; the fewest cases per site), so the
table says directly whether time and memory grow linearly.

    python benchmarks/bench_scale.py --out runs/bench_scale                       # ~15 min on 2 cores
    python benchmarks/bench_scale.py --sites 2 --cases-series --out /tmp/bs          # one point
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from fedqc.fl.processes import run_sampling_memory


def config_for(n_sites: int, subjects: int, data: Path) -> dict:
    """A quickstart-like config with ``n_sites`` sites over data sets of 4 centres each."""
    sites = []
    for i in range(n_sites):
        root = data / f"set{i // 4}-n{subjects}"
        sites.append({"name": f"site{i:02d}", "root": str(root), "filter": {"CENTRE": i % 4 + 1},
                      "labelled": i % 4 in (0, 1), "test_fraction": 0.25 if i % 4 in (0, 1) else 0.5})
    return {"sites": sites, "views": ["SA"], "preprocess": {"spacing_mm": 2.0, "size_px": 96},
            "model": {"preset": "unet"}, "train": {"batch_size": 16, "lr": 0.002, "m_best": 2, "val_fraction": 0.25},
            "qc": {"ae_lr": 0.001, "classes": "rv", "threshold_source": "labelled-val"},
            "refine": {"k_semi": 1, "lr": 0.0002},
            "federation": {"supervised_rounds": 1, "ae_rounds": 1, "local_epochs": 1, "min_sites": n_sites}}


def ensure_data(data: Path, n_sites: int, subjects: int) -> None:
    from fedqc.data.simulator import simulate_dataset

    for k in range((n_sites + 3) // 4):
        root = data / f"set{k}-n{subjects}"
        if not root.is_dir():
            simulate_dataset(root, preset="quickstart", subjects_per_centre=subjects, seed=k, progress=None)


def run_point(n_sites: int, subjects: int, out: Path) -> dict:
    run_dir = out / f"sites{n_sites}-n{subjects}"
    config = out / f"sites{n_sites}-n{subjects}.yaml"
    config.write_text(yaml.safe_dump(config_for(n_sites, subjects, out / "data")))
    ensure_data(out / "data", n_sites, subjects)
    run = run_sampling_memory([sys.executable, "-m", "fedqc.cli.main", "simulate", "--config", str(config),
                               "--out", str(run_dir)], out / f"sites{n_sites}-n{subjects}.log")
    code, wall, peak = run["exit_code"], run["wall_s"], run["peak_rss_mib"]
    if code != 0:
        raise SystemExit(f"{n_sites} sites x {subjects} subjects failed ({code}); see {out}/sites{n_sites}-n{subjects}.log")
    rows = json.loads((run_dir / "log.json").read_text())
    rounds = [r for r in rows if r["phase"] in ("supervised", "qc-autoencoder", "refine")]
    cases = sum(int(s["metrics"].get("num-cases", 0)) for r in rows if r["phase"] == "predict"
                for s in r["sites"].values())
    return {"sites": n_sites, "subjects_per_centre": subjects, "wall_s": round(wall, 1),
            "federation_s": round(sum(r["seconds"] for r in rows), 1),
            "round_s": round(sum(r["seconds"] for r in rounds) / len(rounds), 2),
            "peak_rss_mib": peak, "predicted_cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--subjects", type=int, default=12, help="subjects per centre in the sites series "
                        "(at least 12: a labelled site's validation split needs 4 cases for its fences)")
    parser.add_argument("--cases-series", type=int, nargs="*", default=[12, 24],
                        help="subjects per centre for the cases series (4 sites); empty: skip")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    done: dict[tuple[int, int], dict] = {}

    def point(n_sites: int, subjects: int) -> dict:
        if (n_sites, subjects) not in done:
            done[n_sites, subjects] = run_point(n_sites, subjects, out)
            print(json.dumps(done[n_sites, subjects]), flush=True)
        return done[n_sites, subjects]

    series = {"sites": [point(n, args.subjects) for n in args.sites],
              "cases": [point(4, s) for s in args.cases_series]}
    lines = []
    for name, points in series.items():
        if not points:
            continue
        base = points[0]
        lines += [f"\n{name} series (ratios against the first row)\n",
                  "| sites | subjects/centre | wall s | round s | round ratio | peak RSS MiB | memory ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in points:
            lines.append(f"| {p['sites']} | {p['subjects_per_centre']} | {p['wall_s']} | {p['round_s']} | "
                         f"{p['round_s'] / base['round_s']:.2f} | {p['peak_rss_mib']} | "
                         f"{p['peak_rss_mib'] / base['peak_rss_mib']:.2f} |")
    (out / "bench_scale.json").write_text(json.dumps({"omp_threads": env_threads, **series}, indent=2))
    (out / "bench_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
