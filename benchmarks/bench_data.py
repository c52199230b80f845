"""Data pipeline: a site's cases prepared from NIfTI (load, resample, crop, normalise) vs from its cache.

Every federated message in deployment starts a fresh ClientApp process, which rebuilds the site:
without the per-site cache (``fedqc.data.cache``) each round would redo the NIfTI I/O and resampling
of every case. Measured on one simulated site (both views, labels read as for a labelled site):

* ``no cache``: ``prepare_case`` straight from the NIfTI files (the baseline);
* ``cold cache``: the same, writing the cache (the first round);
* ``warm cache``: reading the cache (every later round).

The training loop's share of time outside the network (the "idle fraction" of the device) is
measured by ``bench_training.py`` (fedqc loop vs bare loop, with and without augmentation).

    python benchmarks/bench_data.py --out runs/bench_data                  # 50 subjects, ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=50)
    parser.add_argument("--preset", default="consortium")
    parser.add_argument("--size-px", type=int, default=128)
    parser.add_argument("--spacing-mm", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from fedqc.config import PreprocessConfig, SiteConfig
    from fedqc.data.simulator import simulate_dataset
    from fedqc.data.site import prepare_case, site_cases, spec_from_config

    out = args.out.resolve()
    data = out / "data"
    if not (data / "done").is_file():
        simulate_dataset(data, preset=args.preset, subjects_per_centre=args.subjects, seed=0, progress=None)
        (data / "done").write_text("ok")
    site = SiteConfig(name="bench", root=data, filter={"CENTRE": 1}, labelled=True)
    cases = site_cases(site, ["SA", "LA"])
    spec = spec_from_config(PreprocessConfig(spacing_mm=args.spacing_mm, size_px=args.size_px))

    def prepare(cache: Path | None) -> float:
        started = time.perf_counter()
        for case in cases:
            prepare_case(case, spec, True, cache_dir=cache)
        return time.perf_counter() - started

    cache = out / "cache"
    no_cache = min(prepare(None) for _ in range(args.repeats))
    cold = []
    for _ in range(args.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        cold.append(prepare(cache))
    warm = min(prepare(cache) for _ in range(args.repeats))
    slices = sum(prepare_case(c, spec, False, cache_dir=cache).images.shape[0] for c in cases)
    result = {"subjects": args.subjects, "cases": len(cases), "slices": slices, "size_px": args.size_px,
              "no_cache_s": round(no_cache, 2), "cold_cache_s": round(min(cold), 2), "warm_cache_s": round(warm, 3),
              "speedup_warm_vs_no_cache": round(no_cache / warm, 1),
              "cache_mib": round(sum(p.stat().st_size for p in cache.iterdir()) / 2**20, 1)}
    (out / "bench_data.json").write_text(json.dumps(result, indent=2))
    print("| cases | slices | no cache s | cold cache s | warm cache s | warm vs no cache | cache MiB |\n"
          "|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {len(cases)} | {slices} | {no_cache:.2f} | {min(cold):.2f} | {warm:.3f} | "
          f"{result['speedup_warm_vs_no_cache']}x | {result['cache_mib']} |")


if __name__ == "__main__":
    main()
