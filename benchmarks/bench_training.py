"""Training throughput: fedqc's inner loop (``train_one_epoch``) against a bare PyTorch loop.

Both loops train the same freshly built model on the same pre-loaded batches with the same loss (Eq. 1,
deep-supervised for dynunet) and Adam; the bare loop has no shuffling, clipping or bookkeeping. Each
measurement is repeated with the two loops interleaved and the best run kept, which damps noise on a
shared machine. Augmentation cost is measured apart (augmenter alone, and the loop with augmentation).
On CUDA, bf16 autocast + channels_last and torch.compile variants are measured as well.

    python benchmarks/bench_training.py                 # CPU defaults: < 1 min
    python benchmarks/bench_training.py --steps 30 --batch-size 20 --repeats 3   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model, opt, images, labels, batch_size, autocast, channels_last) -> None:
    """The reference: a plain loop over contiguous batches."""
    from fedqc.core.device import autocast_context
    from fedqc.train.losses import deep_supervised, supervised_loss

    device = images.device
    for first in range(0, images.shape[0], batch_size):
        x, y = images[first:first + batch_size], labels[first:first + batch_size]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, autocast):
            out = model(x)
        loss = deep_supervised(supervised_loss, out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def images_per_second(run: Callable[[], None], n_images: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return n_images / (time.perf_counter() - start)


def bench_variant(preset: str, size: int, batch: int, steps: int, repeats: int, device: torch.device,
                  autocast: bool, channels_last: bool, compile_model: bool) -> dict:
    from fedqc.core.device import make_generator
    from fedqc.models import build_segmenter
    from fedqc.train.augment import BatchAugmenter
    from fedqc.train.supervised import train_one_epoch

    n = batch * steps
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(n, 1, size, size, device=device, generator=gen)
    labels = torch.randint(0, 4, (n, size, size), device=device, generator=gen, dtype=torch.uint8)
    models, opts = {}, {}
    for name in ("bare", "fedqc"):
        torch.manual_seed(0)
        model = build_segmenter(preset, size).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opts[name] = torch.optim.Adam(model.parameters(), lr=1e-4)
        models[name] = torch.compile(model) if compile_model else model
    generator = make_generator(0, device)
    augmenter = BatchAugmenter(seed=0, device=device)
    def loops(imgs: torch.Tensor, labs: torch.Tensor) -> dict[str, Callable[[], object]]:
        return {
            "bare": lambda: bare_loop(models["bare"], opts["bare"], imgs, labs.long(), batch, autocast,
                                      channels_last),
            "fedqc": lambda: train_one_epoch(models["fedqc"], imgs, labs, opts["fedqc"], batch_size=batch,
                                             generator=generator, autocast=autocast, channels_last=channels_last),
            "fedqc+aug": lambda: train_one_epoch(models["fedqc"], imgs, labs, opts["fedqc"], batch_size=batch,
                                                 generator=generator, augmenter=augmenter, autocast=autocast,
                                                 channels_last=channels_last),
        }

    for run in loops(images[:batch], labels[:batch]).values():  # warm-up: allocator, cuDNN, compilation
        run()
    timed = loops(images, labels)
    best = {name: 0.0 for name in timed}
    for _ in range(repeats):
        for name, run in timed.items():
            best[name] = max(best[name], images_per_second(run, n, device))
    aug_ips = max(images_per_second(lambda: [augmenter(images[i:i + batch], labels[i:i + batch])
                                             for i in range(0, n, batch)], n, device) for _ in range(repeats))
    return {
        "preset": preset, "size": size, "batch": batch, "device": str(device),
        "variant": ("bf16" if autocast and device.type == "cuda" else "fp32")
        + ("+channels_last" if channels_last else "") + ("+compile" if compile_model else ""),
        "bare_img_s": round(best["bare"], 2), "fedqc_img_s": round(best["fedqc"], 2),
        "ratio": round(best["fedqc"] / best["bare"], 3),
        "fedqc_aug_img_s": round(best["fedqc+aug"], 2),
        "augment_only_img_s": round(aug_ips, 1),
        "augment_share_of_step": round(best["fedqc+aug"] / aug_ips, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["unet", "dynunet"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 20 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run; default 3 CPU, 30 CUDA")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant on CUDA")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    from fedqc.core.device import select_device, set_torch_threads

    set_torch_threads(args.threads)
    device = select_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (20 if cuda else 8)
    steps = args.steps or (30 if cuda else 3)
    variants = [(False, False, False)]  # (autocast, channels_last, compile)
    if cuda:
        torch.backends.cudnn.benchmark = True
        variants += [(True, False, False), (True, True, False)] + ([] if args.no_compile else [(True, False, True)])
    results = []
    for preset in args.presets:
        for autocast, channels_last, compile_model in variants:
            preset_batch = batch if preset != "dynunet" or cuda else max(2, batch // 2)
            try:
                results.append(bench_variant(preset, args.size, preset_batch, steps, args.repeats, device,
                                             autocast, channels_last, compile_model))
            except Exception as err:  # a variant failing (e.g. compile) must not hide the others
                results.append({"preset": preset, "variant": f"compile={compile_model}", "error": repr(err)})
    print("| preset | variant | batch | bare img/s | fedqc img/s | ratio | fedqc+aug img/s | augment-only img/s "
          "| aug share |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['preset']} | {r['variant']} | error: {r['error'][:80]} |")
            continue
        print(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['bare_img_s']} | {r['fedqc_img_s']} "
              f"| {r['ratio']} | {r['fedqc_aug_img_s']} | {r['augment_only_img_s']} "
              f"| {r['augment_share_of_step']:.1%} |")
    payload = {"device": str(device), "threads": torch.get_num_threads(), "steps": steps,
               "load_average_1min": round(os.getloadavg()[0], 2), "results": results}
    print(json.dumps(payload, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)


if __name__ == "__main__":
    main()
