"""A site worker on a GPU keeps its CUDA context and data across messages (the deployment check of gpu.sh).

One simulated hospital runs in a real site worker (``fedqc.site.worker``, started as fedqc-client
does, ``device`` from ``--device``); this process plays the thin ClientApp (``RemoteSite``) and
sends ``--messages`` supervised tasks, each with the previous reply's weights. Reported per
message: the round trip, the site's own work (its ``seconds`` metric), and what the worker still
holds afterwards (its PID, whether CUDA is initialised, the CUDA memory allocated by torch). A
worker that kept its CUDA context answers every message from the same PID with CUDA initialised,
and the messages after the first cost no CUDA start-up: ``first / later`` round trip is the gain a
per-message process (a new CUDA context and data upload per message) would lose.

    python benchmarks/bench_worker_gpu.py --device cuda --out /tmp/bwg        # on a GPU machine
    python benchmarks/bench_worker_gpu.py --device cpu --subjects 4 --messages 2 --out /tmp/bwg   # a CPU dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_federation import _site
    from fedqc.core.io import atomic_write
    from fedqc.fl.appdir import run_config, site_run_config
    from fedqc.fl.from_config import federation_settings, node_config
    from fedqc.fl.launch import SiteWorkerProcess
    from fedqc.site import worker
    from fedqc.site.contract import ConfigKey, Task

    out = args.out.resolve()
    config, site = _site(args.config, out / "data", args.subjects, "quickstart", seed=0)
    settings = dataclasses.replace(federation_settings(config), local_epochs=1)
    node = {**node_config(site, config.views, device=args.device), "work-dir": str(out / "site")}
    proc = SiteWorkerProcess(out / "site", {**node, "site-id": "bench"}).start()
    rows = []
    try:
        remote = worker.RemoteSite(proc.folder, 1, {}, site_run_config(run_config(settings, out)))
        started = time.perf_counter()
        init = remote.run(Task.SUPERVISED, None, {ConfigKey.LOCAL_EPOCHS.value: 0, ConfigKey.SEED.value: 0})
        weights = {k: v for k, v in init.weights.items() if not k.startswith("ae/")}
        rows.append({"message": "init", "round_trip_s": round(time.perf_counter() - started, 3),
                     **worker.WorkerClient(proc.folder).ping()})
        for r in range(1, args.messages + 1):
            task = {ConfigKey.PHASE_ROUND.value: r, ConfigKey.SERVER_ROUND.value: r + 1, ConfigKey.SEED.value: 0,
                    ConfigKey.LOCAL_EPOCHS.value: 1, ConfigKey.PROXIMAL_MU.value: 0.0,
                    ConfigKey.NUM_CANDIDATES.value: 0}
            started = time.perf_counter()
            reply = remote.run(Task.SUPERVISED, weights, task)
            trip = time.perf_counter() - started
            weights = {k: v for k, v in reply.weights.items() if k in weights}
            rows.append({"message": f"supervised {r}", "round_trip_s": round(trip, 3),
                         "site_work_s": reply.metrics.get("seconds"), **worker.WorkerClient(proc.folder).ping()})
    finally:
        proc.stop()
    pids = {row["pid"] for row in rows}
    later = [row["round_trip_s"] for row in rows[2:]]
    result = {"device": args.device, "subjects": args.subjects, "rows": rows, "one_process": len(pids) == 1,
              "first_vs_later_round_trip": round(rows[1]["round_trip_s"] / (sum(later) / len(later)), 3)
              if later else None}
    atomic_write(out / "bench_worker_gpu.json", json.dumps(result, indent=2))
    print("| message | round trip (s) | site work (s) | worker pid | CUDA initialised | CUDA MiB allocated |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cuda = row.get("cuda") or {}
        print(f"| {row['message']} | {row['round_trip_s']:.2f} | {row.get('site_work_s') or ''} | {row['pid']} | "
              f"{cuda.get('initialized', False)} | {cuda.get('allocated_mib', '')} |")
    print(f"- one worker process for every message: {result['one_process']}; first / later supervised round trip: "
          f"{result['first_vs_later_round_trip']}")


if __name__ == "__main__":
    main()
