"""The cost of privacy: DP-SGD per local epoch against plain training, and secure aggregation per round.

DP-SGD: the same ``train_epochs`` / ``autoencoder_epochs`` call (one local epoch, same model, data,
batch size and seed) without and with ``privacy=`` (Opacus per-sample gradients, per-patient sums,
clipping, noise, accounting); runs interleaved, best of ``--repeats`` kept.

Secure aggregation: per round, what the masked path adds over the plain one for the same updates of
``--sites`` sites: each site's masking (Diffie-Hellman with every peer, ChaCha20 masks) against nothing,
and the coordinator's unmasked sum against FedAvg's weighted mean; the bytes on the wire (int64 masked
against float32 plain); and the masked path's extra seconds as a share of the round's local epoch.

    nice -n 10 python benchmarks/bench_privacy.py                    # CPU defaults, about 2 min
    python benchmarks/bench_privacy.py --accountant-only             # the accountant's figures only
    python benchmarks/bench_privacy.py --size 64 --slices 48 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def dp_epoch_cost(args) -> dict:
    from fedqc.models.factory import dp_ready
    from fedqc.models.qc_autoencoder import build_qc_autoencoder
    from fedqc.models.segmenter import build_segmenter
    from fedqc.train.autoencoder import autoencoder_epochs, autoencoder_optimiser
    from fedqc.train.privacy import PrivacyBudget, unit_index
    from fedqc.train.supervised import OptimiserConfig, build_optimiser, train_epochs

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.slices, 1, args.size, args.size)).astype(np.float32)
    labels = rng.integers(0, 4, size=(args.slices, args.size, args.size)).astype(np.uint8)
    units = unit_index([f"p{i // args.slices_per_patient}" for i in range(args.slices)])
    budget = PrivacyBudget(epsilon=8.0, delta=1e-4, noise_multiplier=1.0, max_grad_norm=1.0)
    schedule = OptimiserConfig()
    torch.manual_seed(0)
    seg0 = dp_ready(build_segmenter(args.preset, args.size), fix_norm=False)
    ae0 = dp_ready(build_qc_autoencoder(args.size, latent_channels=100))

    def seg(private: bool):
        model = copy.deepcopy(seg0)
        opt = build_optimiser(model, 1e-3, schedule)
        return lambda: train_epochs(model, images, labels, opt, first_epoch=0, epochs=1, total_epochs=1, lr=1e-3,
                                    schedule=schedule, batch_size=args.batch_size, seed=0, augment=False,
                                    privacy=budget.training(units, args.batch_size, seed=0) if private else None)

    def ae(private: bool):
        model = copy.deepcopy(ae0)
        opt = autoencoder_optimiser(model, 2e-4)
        return lambda: autoencoder_epochs(model, labels, opt, first_epoch=0, epochs=1, batch_size=args.batch_size,
                                          seed=0, privacy=budget.training(units, args.batch_size, seed=0)
                                          if private else None)

    out = {}
    for name, make in (("segmenter", seg), ("autoencoder", ae)):
        make(False)()  # warm-up
        plain, private = [], []
        for _ in range(args.repeats):  # interleaved: the shared machine's load hits both alike
            plain.append(best_of(1, make(False)))
            private.append(best_of(1, make(True)))
        out[name] = {"plain_s": round(min(plain), 3), "dp_s": round(min(private), 3),
                     "ratio": round(min(private) / min(plain), 2)}
    return out


def secagg_round_cost(args, epoch_seconds: float) -> dict:
    from fedqc.fl import secagg
    from fedqc.fl.aggregation import Update, weighted_average
    from fedqc.models.segmenter import build_segmenter

    model = build_segmenter(args.preset, args.size)
    reference = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    updates = {i: {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(v.dtype) for k, v in reference.items()}
               for i in range(args.sites)}
    counts = {i: float(100 + 10 * i) for i in updates}
    keys = {i: secagg.X25519PrivateKey.generate() for i in updates}
    peers = {i: secagg.public_hex(k) for i, k in keys.items()}
    plain = best_of(args.repeats, lambda: weighted_average(
        [Update(str(i), updates[i], counts[i]) for i in updates], reference))
    mask_s = best_of(args.repeats, lambda: secagg.mask(updates[0], counts[0], 0, keys[0], peers, "bench"))
    masked = [secagg.mask(updates[i], counts[i], i, keys[i], peers, "bench") for i in updates]
    unmask_s = best_of(args.repeats, lambda: {k: v / sum(counts.values())
                                              for k, v in secagg.unmask_sum(masked).items()})
    float_bytes = sum(v.size * 4 for v in reference.values())
    masked_bytes = sum(v.nbytes for v in masked[0].values())
    return {"sites": args.sites, "parameters": int(sum(v.size for v in reference.values())),
            "plain_aggregate_s": round(plain, 4), "site_mask_s": round(mask_s, 4),
            "coordinator_unmask_s": round(unmask_s, 4),
            "coordinator_ratio": round(unmask_s / plain, 2),
            "wire_bytes_ratio_vs_float32": round(masked_bytes / float_bytes, 2),
            "extra_s_per_round_share_of_local_epoch": round((mask_s + unmask_s - plain) / epoch_seconds, 4)}


def accountant_figures(args) -> dict:
    """The accountant's figures of the simulated consortium's schedule (configs/simulation.yaml) at one
    labelled site: the noise multiplier that spends epsilon 1 / 3 / 8 over every planned DP-SGD step,
    and what each phase alone would spend at that noise (no training: Opacus's RDP accountant only)."""
    from pathlib import Path

    from fedqc.config import load_config
    from fedqc.train.privacy import calibrate_noise, calibrate_phases, epsilon_of
    from fedqc.train.stages import dp_plan
    from fedqc.train.supervised import view_passes

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "simulation.yaml", check_paths=False)
    cases = 2 * args.train_subjects  # ED and ES
    slices = {"SA": cases * args.sa_slices_per_case, "LA": cases}
    passes = view_passes(slices)
    fed = config.federation
    plan = dp_plan(config, slices, passes, fed.supervised_rounds * fed.local_epochs, fed.ae_rounds * fed.local_epochs)
    delta = 1.0 / sum(slices.values())
    out = {"slices": slices, "passes": passes, "delta": delta,
           "plan": {name: {"q": round(q, 4), "steps": n} for name, q, n in plan}, "epsilon": {}}
    for target in (1.0, 3.0, 8.0):
        phase_noise = calibrate_phases(target, delta, plan)
        one = calibrate_noise(target, delta, [(q, n) for _, q, n in plan])
        out["epsilon"][str(target)] = {
            "per_phase_noise": {name: round(s, 3) for name, s in phase_noise.items()},
            "spent_per_phase_noise": round(epsilon_of([(phase_noise[p], q, n) for p, q, n in plan], delta), 4),
            "one_noise_for_all": round(one, 3),
            "spent_one_noise": round(epsilon_of([(one, q, n) for _, q, n in plan], delta), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="unet")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--slices-per-patient", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-subjects", type=int, default=14, help="a labelled consortium site's training subjects")
    parser.add_argument("--sa-slices-per-case", type=int, default=10)
    parser.add_argument("--accountant-only", action="store_true", help="only the accountant's figures (seconds)")
    args = parser.parse_args()
    if args.accountant_only:
        print(json.dumps(accountant_figures(args), indent=2))
        return
    torch.set_num_threads(args.threads)
    dp = dp_epoch_cost(args)
    result = {"config": vars(args), "accountant": accountant_figures(args), "dp_sgd_per_local_epoch": dp,
              "secure_aggregation_per_round": secagg_round_cost(args, dp["segmenter"]["plain_s"])}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
