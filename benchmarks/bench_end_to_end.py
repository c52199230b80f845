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
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedqc.fl.processes import tree_rss_mib


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
    peak, samples = [0.0], []
    started = time.monotonic()
    with open(out / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedqc.cli", "simulate", "--config", str(config),
                                 "--out", str(out / "run")], stdout=log, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                rss = tree_rss_mib(proc.pid)
                peak[0] = max(peak[0], rss)
                samples.append((round(time.monotonic() - started, 1), round(rss)))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        sampler.join(timeout=5)
    wall = time.monotonic() - started
    summary = json.loads((out / "run" / "summary.json").read_text()) if code == 0 else {}
    result = {"command": f"fedqc simulate --config {args.config}", "exit_code": code, "wall_s": round(wall, 1),
              "federation_s": summary.get("seconds"), "peak_rss_mib": round(peak[0]),
              "rss_samples": samples[::10]}
    (out / "bench_end_to_end.json").write_text(json.dumps(result, indent=2))
    print("| command | wall s | federation s | peak RSS of the process tree MiB |\n|---|---:|---:|---:|\n"
          f"| `{result['command']}` | {result['wall_s']} | {result['federation_s']} | {result['peak_rss_mib']} |")
    if code != 0:
        raise SystemExit(f"the command failed ({code}); see {out / 'run.log'}")


if __name__ == "__main__":
    main()
