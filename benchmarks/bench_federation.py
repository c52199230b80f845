"""Flower's cost per round: the real method through the Deployment Engine vs the same work without Flower.

One hospital of N simulated subjects (default 50, the consortium preset at the chosen config's image
size) trains the shared segmenters for R supervised rounds of E local epochs:

* **deployment, per message** (``--modes per-message``; how fedqc ran before issue 13): a real
  SuperLink and one real SuperNode on 127.0.0.1 (``run_local_federation``), the real site algorithm
  (``fedqc.site.algorithm:make_site_algo``) inside Flower's fresh ClientApp process of each message,
  which imports torch, rebuilds the site from its disk cache and trains;
* **deployment, worker** (``--modes worker``; fedqc-client's default): the same, but the SuperNode's
  long-lived site worker (``fedqc.site.worker``) holds the site and does the work; each message's
  ClientApp only forwards arrays and config (no torch import);
* **simulation** (``--modes simulation``, optional): Flower's simulation engine in this process, whose
  Ray actor runs the site in-process through the same ClientApp code (no worker, no socket);
* **local**: the same site algorithm in this process, the same tasks with the same configs
  (validation of the received weights first, then training), no Flower: the work itself.

Both deployment modes run side by side in one invocation (default), one after the other.
Reported: seconds per round each way, the overhead ratio ``deployment / local - 1``, Flower's fixed
cost per exchange (the round's wall time minus the site's own reported work), and bytes sent per
client per round against the model's size. Rounds after the first are compared (the first also
builds the site's cache in both modes).

    python benchmarks/bench_federation.py --out runs/bench_federation              # ~50 subjects, both modes
    python benchmarks/bench_federation.py --subjects 4 --rounds 2 --config configs/quickstart.yaml --out /tmp/bf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np


def _site(config_path: Path, data: Path, subjects: int, preset: str, seed: int):
    from fedqc.config import load_config
    from fedqc.data.simulator import simulate_dataset

    if not (data / "done").is_file():
        simulate_dataset(data, preset=preset, subjects_per_centre=subjects, seed=seed)
        (data / "done").write_text("ok")
    config = load_config(config_path, check_paths=False)
    site = dataclasses.replace(config.sites[0], name="bench", root=data, filter={"CENTRE": 1}, labelled=True)
    return dataclasses.replace(config, sites=(site,), simulated=None), site


def local_rounds(settings, node: dict, rounds: int) -> list[dict]:
    """The site's work for ``rounds`` supervised rounds, in this process."""
    from fedqc.fl.appdir import run_config, site_run_config
    from fedqc.site.algorithm import site_factory
    from fedqc.site.contract import ConfigKey, Task

    started = time.perf_counter()
    algo = site_factory(node, {})(node, site_run_config(run_config(settings, Path(node["work-dir"]))))
    init = algo.run(Task.SUPERVISED, None, {ConfigKey.LOCAL_EPOCHS.value: 0, ConfigKey.SEED.value: settings.seed})
    weights = {k: v for k, v in init.weights.items() if not k.startswith("ae/")}
    times = [{"round": 0, "seconds": round(time.perf_counter() - started, 3), "what": "build + initial weights"}]
    for r in range(1, rounds + 1):
        config = {ConfigKey.PHASE_ROUND.value: r, ConfigKey.SERVER_ROUND.value: r + 1, ConfigKey.SEED.value: settings.seed,
                  ConfigKey.LOCAL_EPOCHS.value: settings.local_epochs, ConfigKey.PROXIMAL_MU.value: 0.0,
                  ConfigKey.NUM_CANDIDATES.value: 0}
        started = time.perf_counter()
        if r > 1:
            algo.run(Task.EVALUATE, weights, config)
        reply = algo.run(Task.SUPERVISED, weights, config)
        weights = {k: v for k, v in reply.weights.items() if k in weights}
        times.append({"round": r, "seconds": round(time.perf_counter() - started, 3)})
    return times


def deployment_rounds(settings, node: dict, run_dir: Path, worker: bool) -> tuple[list[dict], dict]:
    """The same rounds through a real SuperLink and SuperNode; per-round figures from the run's log."""
    from tests.fl.local import run_local_federation

    run = run_local_federation(run_dir, [{"site-id": "bench", **node}], settings, echo=lambda _: None,
                               max_seconds=3600, worker=worker)
    if run.status.get("status") != "finished:completed":
        raise SystemExit(f"deployment run did not complete: {run.status}; see {run_dir}/logs")
    return _rows(run.run_dir), {"wall_s": round(run.seconds, 1), "network": run.status.get("network-traffic")}


def simulation_rounds(settings, node: dict, run_dir: Path) -> tuple[list[dict], dict]:
    """The same rounds on Flower's simulation engine (one virtual site)."""
    from fedqc.fl.simulation import SimulationConfig, run_simulation

    started = time.monotonic()
    run_simulation(SimulationConfig(sites=[{"site-id": "bench", **node}], federation=settings), run_dir)
    return _rows(Path(run_dir)), {"wall_s": round(time.monotonic() - started, 1), "network": None}


def trace_breakdown(path: Path) -> dict[str, float]:
    """Median seconds of each leg of a message's path, from a ``FEDQC_TRACE`` file (:mod:`fedqc.fl.trace`).

    Legs, per message: ``to_process`` (the coordinator's push to the start of the message's
    ``flwr-clientapp`` process: SuperLink, the SuperNode's poll, SuperExec's poll, the spawn),
    ``imports`` (that process's start to the handler: Python and flwr start, Flower pulls the
    message's objects and installs the FAB, then imports fedqc's ClientApp and calls it at once),
    ``handler`` (fedqc's handler: unpack, the worker's round trip with the site's work, pack),
    ``back`` (the handler's return to the coordinator's pull of the reply: Flower pushes the reply
    from the process to the SuperNode, on to the SuperLink, and the coordinator's next pull).
    """
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pushes = {mid: e for e in events if e["event"] == "push" for mid in e["nodes"]}
    apps = {e["reply_to"]: e for e in events if e["event"] == "clientapp"}
    replies = {e["reply_to"]: e for e in events if e["event"] == "reply"}
    legs: dict[str, list[float]] = {k: [] for k in ("to_process", "imports", "handler", "back", "total")}
    for mid, push in pushes.items():
        app, reply = apps.get(mid), replies.get(mid)
        if app is None or reply is None or not app["proc_start"]:
            continue
        legs["to_process"].append(app["proc_start"] - push["start"])
        legs["imports"].append(app["entry"] - app["proc_start"])
        legs["handler"].append(app["exit"] - app["entry"])
        legs["back"].append(reply["t"] - app["exit"])
        legs["total"].append(reply["t"] - push["start"])
    out = {k: round(float(np.median(v)), 3) for k, v in legs.items() if v}
    out["messages"] = len(legs["total"])
    return out


def _rows(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "log.json").read_text())
    out = []
    for row in rows:
        site = row["sites"].get("bench", {})
        work = site.get("metrics", {}).get("seconds", 0.0) + site.get("val_metrics", {}).get("seconds", 0.0)
        out.append({"phase": row["phase"], "round": row["round"], "seconds": row["seconds"],
                    "site_work_s": round(work, 3), "sent_bytes": row["sent_bytes_per_site"],
                    "reply_bytes": site.get("reply_bytes", 0), "model_bytes": row["model_bytes"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/simulation.yaml"))
    parser.add_argument("--subjects", type=int, default=50)
    parser.add_argument("--preset", default="consortium")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", default="per-message,worker",
                        help="modes, comma-separated: per-message (site inside each message's ClientApp), "
                             "worker (the long-lived site worker), simulation (Flower's simulation engine)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trace", action="store_true",
                        help="also time each leg of every message's path (FEDQC_TRACE, fedqc.fl.trace)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"per-message", "worker", "simulation"}:
        raise SystemExit(f"--modes: use per-message, worker and/or simulation, not {args.modes!r}")

    import torch

    from fedqc.fl.from_config import federation_settings, node_config

    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    config, site = _site(args.config, out / "data", args.subjects, args.preset, seed=0)
    settings = dataclasses.replace(federation_settings(config), supervised_rounds=args.rounds, ae_rounds=0,
                                   refine_rounds=0, predict=False, local_epochs=args.local_epochs, min_sites=1,
                                   torch_threads=args.threads, node_wait_s=300, round_timeout_s=3600)
    node = {**node_config(site, config.views), "work-dir": str(out / "local-site")}
    local = local_rounds(settings, node, args.rounds)
    deploy_node = {k: v for k, v in node.items() if k != "work-dir"}
    steady_local = float(np.mean([r["seconds"] for r in local[2:]] or [local[-1]["seconds"]]))
    result = {"config": str(args.config), "subjects": args.subjects, "rounds": args.rounds,
              "local_epochs": args.local_epochs, "threads": args.threads, "local_rounds": local,
              "round_s_local": round(steady_local, 2), "modes": {}}
    lines = ["| mode | subjects | local epochs | round, local (s) | round, deployment (s) | overhead | fixed cost per "
             "exchange (s) | INIT exchange (s) | run wall (s) | sent / model | reply / model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        if mode == "simulation":
            deployed, run = simulation_rounds(settings, deploy_node, out / "simulation")
        else:
            trace_file = out / f"trace-{mode}.jsonl"
            if args.trace:
                trace_file.unlink(missing_ok=True)
                os.environ["FEDQC_TRACE"] = str(trace_file)
            deployed, run = deployment_rounds(settings, deploy_node, out / f"deployment-{mode}", worker=mode == "worker")
            os.environ.pop("FEDQC_TRACE", None)
        sup = [r for r in deployed if r["phase"] == "supervised"]
        steady_deploy = float(np.mean([r["seconds"] for r in sup[1:]] or [sup[-1]["seconds"]]))
        fixed = float(np.mean([r["seconds"] - r["site_work_s"] for r in deployed if r["phase"] != "init"]))
        init = next(r["seconds"] for r in deployed if r["phase"] == "init")
        entry = {
            "deployment_rounds": deployed, "deployment": run,
            "round_s_deployment": round(steady_deploy, 2),
            "overhead_ratio": round(steady_deploy / steady_local - 1, 3),
            "fixed_cost_per_exchange_s": round(fixed, 2), "init_exchange_s": init,
            "bytes_sent_per_round_vs_model": round(sup[-1]["sent_bytes"] / sup[-1]["model_bytes"], 4),
            "bytes_replied_per_round_vs_model": round(sup[-1]["reply_bytes"] / sup[-1]["model_bytes"], 4),
            "model_mib": round(sup[-1]["model_bytes"] / 2**20, 2),
        }
        if args.trace and mode != "simulation":
            entry["legs_median_s"] = trace_breakdown(out / f"trace-{mode}.jsonl")
            print(f"{mode}: median seconds per leg of a message's path: {entry['legs_median_s']}")
        result["modes"][mode] = entry
        lines.append(f"| {mode} | {args.subjects} | {args.local_epochs} | {steady_local:.1f} | {steady_deploy:.1f} | "
                     f"{100 * entry['overhead_ratio']:.0f}% | {fixed:.1f} | {init:.1f} | {run['wall_s']:.0f} | "
                     f"{entry['bytes_sent_per_round_vs_model']:.3f} | {entry['bytes_replied_per_round_vs_model']:.3f} |")
    if {"per-message", "worker"} <= set(result["modes"]):
        before, after = result["modes"]["per-message"], result["modes"]["worker"]
        result["fixed_cost_worker_vs_per_message"] = round(after["fixed_cost_per_exchange_s"]
                                                           / before["fixed_cost_per_exchange_s"], 3)
    from fedqc.core.io import atomic_write

    atomic_write(out / "bench_federation.json", json.dumps(result, indent=2))
    print("\n".join(lines))
    if "fixed_cost_worker_vs_per_message" in result:
        print(f"fixed cost per exchange, worker / per message: {result['fixed_cost_worker_vs_per_message']:.2f}")


if __name__ == "__main__":
    main()
