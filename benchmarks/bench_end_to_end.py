"""End to end: README's main command (``fedqc simulate --config configs/quickstart.yaml``) from no data.

The config is copied into ``OUT/configs/`` so its data root (``../data/quickstart``) resolves to a fresh
``OUT/data/quickstart``: the run includes generating the simulated centres, as on a fresh machine. The
resident memory of the command's whole process tree (Ray's workers and actors included) is sampled
every 0.5 s. Reported: wall time, the federation's own time (from the run's summary), the peak memory.

    python benchmarks/bench_end_to_end.py --out runs/bench_e2e        # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fedqc.fl.processes import run_sampling_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out / "data", ignore_errors=True)
    shutil.rmtree(out / "run", ignore_errors=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    config = out / "configs" / args.config.name
    shutil.copy(args.config, config)
    run = run_sampling_memory([sys.executable, "-m", "fedqc.cli.main", "simulate", "--config", str(config),
                               "--out", str(out / "run")], out / "run.log")
    code = run["exit_code"]
    summary = json.loads((out / "run" / "summary.json").read_text()) if code == 0 else {}
    result = {"command": f"fedqc simulate --config {args.config}", "exit_code": code, "wall_s": run["wall_s"],
              "federation_s": summary.get("seconds"), "peak_rss_mib": run["peak_rss_mib"],
              "rss_samples": run["samples"][::10]}
    (out / "bench_end_to_end.json").write_text(json.dumps(result, indent=2))
    print("| command | wall s | federation s | peak RSS of the process tree MiB |\n|---|---:|---:|---:|\n"
          f"| `{result['command']}` | {result['wall_s']} | {result['federation_s']} | {result['peak_rss_mib']} |")
    if code != 0:
        raise SystemExit(f"the command failed ({code}); see {out / 'run.log'}")


if __name__ == "__main__":
    main()
