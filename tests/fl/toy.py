"""A tiny but real SiteAlgo on synthetic data: proves the plumbing before the real method lands.

Each site draws 16x16 images of a bright disc on noise, with a site-specific intensity shift
and contrast (its "scanner"), from its ``seed``. The segmenter is conv-BN-ReLU-conv-conv
(``seg/SA/conv.weight``, ``seg/SA/bn.running_mean``, ...; run config ``width``, default 4, sets
its channels), the QC autoencoder conv-ReLU-conv on one-hot masks (``ae/SA/...``). Every Task is
honoured with the real algorithm's contract: FedProx's proximal term, alpha in REFINE, m_best
candidates ``m<i>/seg/SA/...``, ``local-epochs`` 0 with no weights returns initial weights,
PREDICT writes ``predictions.npz`` into the site's work dir. Only weights and allowed metrics are
returned.

node_config: ``site-id``, ``seed`` (int), ``labelled`` (bool, default true), ``shift`` (float),
``num-cases`` (int, default 24), ``flag-below`` (pseudo-Dice under which a case is flagged,
default 0.9), ``work-dir``, ``fail-task`` (a Task value this site fails on, for fault tests: the
exception message names a private path, which must never reach the coordinator), ``leak``
(bool: SUPERVISED also returns the site's images as an array; the plumbing must refuse to send it),
``delay-s`` / ``delay-task`` (sleep this long in the first such task, after writing ``<work-dir>/busy``:
lets fault tests kill a site mid-round; a ``delayed`` marker in the work dir keeps a restarted site
from sleeping again), ``poison`` (``scale``: SUPERVISED returns global + 1000 x its step; ``nan``:
one NaN in its weights; a broken or hostile site that the coordinator must refuse).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedqc.site.contract import (
    ConfigKey,
    MetricKey,
    Scalar,
    SiteReply,
    Task,
    Weights,
    candidate_prefix,
)

SEG, AE = "seg/SA/", "ae/SA/"
ALGORITHM = "tests.fl.toy:make_toy_site"  # what a toy site's own node config names (site-algorithm)


def toy_nodes(sites):
    """Node configs of toy sites: each names this module as its own site algorithm."""
    return [{"site-algorithm": ALGORITHM, **site} for site in sites]
SIZE = 16


def _segmenter(width: int = 4) -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, width, 3, padding=1), bn=nn.BatchNorm2d(width),
                                     relu=nn.ReLU(), mid=nn.Conv2d(width, width, 3, padding=1),
                                     head=nn.Conv2d(width, 2, 1)))


def _autoencoder() -> nn.Module:
    return nn.Sequential(OrderedDict(enc=nn.Conv2d(2, 4, 3, padding=1), relu=nn.ReLU(),
                                     dec=nn.Conv2d(4, 2, 3, padding=1)))


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-case foreground Dice of binary masks (N, H, W); 1 when both are empty."""
    inter = (pred * target).sum((1, 2))
    total = pred.sum((1, 2)) + target.sum((1, 2))
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def _state(model: nn.Module, prefix: str) -> Weights:
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load(model: nn.Module, weights: Mapping[str, np.ndarray], prefix: str) -> None:
    state = {k[len(prefix):]: torch.as_tensor(np.asarray(v)) for k, v in weights.items() if k.startswith(prefix)}
    model.load_state_dict(state)


def make_toy_site(node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]) -> ToySiteAlgo:
    """Factory with the ``make_site_algo`` signature (``tests.fl.toy:make_toy_site``)."""
    return ToySiteAlgo(node_config, run_config)


class ToySiteAlgo:
    """One synthetic hospital (see the module docstring)."""

    def __init__(self, node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]):
        self.site = str(node_config.get("site-id", "toy"))
        self.labelled = bool(node_config.get("labelled", True))
        self.flag_below = float(node_config.get("flag-below", 0.9))
        self.work_dir = str(node_config.get("work-dir", ""))
        self.lr = float(run_config.get("lr", 0.05))
        self.width = int(run_config.get("width", 4))
        self.fail_task = str(node_config.get("fail-task", ""))
        self.leak = bool(node_config.get("leak", False))
        self.poison = str(node_config.get("poison", ""))
        self.delay_s = float(node_config.get("delay-s", 0.0))
        self.delay_task = str(node_config.get("delay-task", Task.SUPERVISED.value))
        rng = np.random.default_rng(int(node_config.get("seed", 0)))
        n = int(node_config.get("num-cases", 24))
        yy, xx = np.mgrid[:SIZE, :SIZE]
        masks = np.stack([((yy - rng.uniform(5, 11)) ** 2 + (xx - rng.uniform(5, 11)) ** 2 < rng.uniform(6, 16))
                          for _ in range(n)]).astype(np.int64)
        shift, contrast = float(node_config.get("shift", 0.0)), 1.0 + 0.3 * rng.standard_normal()
        images = contrast * masks + shift + 0.3 * rng.standard_normal(masks.shape)
        self.images = torch.tensor(images[:, None], dtype=torch.float32)
        self.masks = torch.tensor(masks)
        split = max(1, n // 4)
        self.train_idx, self.val_idx = np.arange(split, n), np.arange(split)

    # -- tasks ------------------------------------------------------------------------------------

    def _fences(self, weights, config, epochs) -> SiteReply:
        """The toy flags by its own rule (``flag-below``): it reports no quartiles for consortium fences."""
        return SiteReply(metrics={MetricKey.NUM_CASES.value: 0})

    def run(self, task: Task, weights: Mapping[str, np.ndarray] | None, config: Mapping[str, Scalar]) -> SiteReply:
        """Do ``task`` (see :class:`fedqc.site.contract.SiteAlgo`)."""
        started = time.perf_counter()
        if task == self.fail_task:
            raise RuntimeError(f"toy failure reading /private/{self.site}/patient-0001.nii.gz")
        torch.manual_seed(int(config.get(ConfigKey.SEED, 0)) + int(config.get(ConfigKey.SERVER_ROUND, 0)))
        epochs = int(config.get(ConfigKey.LOCAL_EPOCHS, 1))
        if weights is None and epochs == 0 and task in (Task.SUPERVISED, Task.QC_AUTOENCODER):
            torch.manual_seed(int(config.get(ConfigKey.SEED, 0)))
            model, prefix = (_segmenter(self.width), SEG) if task == Task.SUPERVISED else (_autoencoder(), AE)
            return SiteReply(weights=_state(model, prefix), metrics={})
        if self.delay_s > 0 and task == self.delay_task:  # real work only, not INIT's initial weights
            self._delay_once()
        handlers = {Task.SUPERVISED: self._supervised, Task.QC_AUTOENCODER: self._autoencoder,
                    Task.EVALUATE: self._evaluate, Task.REFINE: self._refine, Task.PREDICT: self._predict,
                    Task.FENCES: self._fences}
        reply = handlers[Task(task)](weights or {}, config, epochs)
        reply.metrics[MetricKey.SECONDS.value] = time.perf_counter() - started
        return reply

    def _supervised(self, weights: Mapping, config: Mapping, epochs: int) -> SiteReply:
        if not self.labelled:
            return SiteReply(metrics={MetricKey.NUM_EXAMPLES.value: 0})
        model = _segmenter(self.width)
        _load(model, weights, SEG)
        loss = self._fit(model, self.train_idx, epochs, float(config.get(ConfigKey.PROXIMAL_MU, 0.0)))
        out = _state(model, SEG)
        if self.poison == "scale":
            out = {k: (weights[k] + 1000.0 * (v - weights[k])).astype(v.dtype) if v.dtype.kind == "f" else v
                   for k, v in out.items()}
        elif self.poison == "nan":
            out[SEG + "conv.weight"].flat[0] = np.nan
        if self.leak:
            out[SEG + "images"] = self.images.numpy()
        return SiteReply(weights=out, metrics={MetricKey.NUM_EXAMPLES.value: len(self.train_idx),
                                                              MetricKey.TRAIN_LOSS.value: loss})

    def _autoencoder(self, weights: Mapping, config: Mapping, epochs: int) -> SiteReply:
        if not self.labelled:
            return SiteReply(metrics={MetricKey.NUM_EXAMPLES.value: 0})
        ae = _autoencoder()
        _load(ae, weights, AE)
        onehot = nn.functional.one_hot(self.masks[self.train_idx], 2).permute(0, 3, 1, 2).float()
        optimiser = torch.optim.SGD(ae.parameters(), lr=self.lr)
        for _ in range(epochs):
            optimiser.zero_grad()
            loss = nn.functional.mse_loss(torch.softmax(ae(onehot), 1), onehot)
            loss.backward()
            optimiser.step()
        return SiteReply(weights=_state(ae, AE), metrics={MetricKey.NUM_EXAMPLES.value: len(self.train_idx),
                                                          MetricKey.TRAIN_LOSS.value: float(loss)})

    def _evaluate(self, weights: Mapping, config: Mapping, epochs: int) -> SiteReply:
        if not self.labelled:
            return SiteReply(metrics={MetricKey.NUM_EXAMPLES.value: 0})
        model = _segmenter(self.width)
        _load(model, weights, SEG)
        model.eval()
        with torch.no_grad():
            logits = model(self.images[self.val_idx])
            loss = nn.functional.cross_entropy(logits, self.masks[self.val_idx])
            dice = _dice(logits.argmax(1).float(), self.masks[self.val_idx].float()).mean()
        return SiteReply(metrics={MetricKey.NUM_EXAMPLES.value: len(self.val_idx), MetricKey.VAL_LOSS.value: float(loss),
                                  MetricKey.VAL_DICE.value: float(dice)})

    def _refine(self, weights: Mapping, config: Mapping, epochs: int) -> SiteReply:
        alpha = float(config.get(ConfigKey.ALPHA, 1.0))
        ae = _autoencoder()
        _load(ae, weights, AE)
        models = self._candidates(weights, config)
        # control: the supervised term alone (nothing flagged); semi-only: the semi-supervised term
        # alone (a sequential round's two halves, as the real site).
        control, semi_only = bool(config.get(ConfigKey.CONTROL, False)), bool(config.get(ConfigKey.SEMI_ONLY, False))
        flagged = np.zeros(len(self.images), bool) if control else self._flags(models, ae)
        idx = self.train_idx if self.labelled and not semi_only else np.array([], int)
        trains = bool(flagged.any()) or (control and len(idx) > 0)
        out: Weights = {}
        semi_loss = 0.0
        for i, model in enumerate(models):
            if trains:
                semi_loss = self._fit(model, idx, epochs, 0.0,
                                      pseudo=(self.images[flagged], ae, alpha) if flagged.any() else None)
            out.update(_state(model, candidate_prefix(i) + SEG))
        count = int(flagged.sum()) + len(idx)
        return SiteReply(weights=out if trains else None, metrics={
            MetricKey.NUM_EXAMPLES.value: count if trains else 0, MetricKey.NUM_FLAGGED.value: int(flagged.sum()),
            MetricKey.NUM_LABELLED.value: len(idx) if trains else 0,
            MetricKey.NUM_CASES.value: len(self.images), MetricKey.ALPHA.value: alpha,
            MetricKey.SEMI_LOSS.value: semi_loss})

    def _predict(self, weights: Mapping, config: Mapping, epochs: int) -> SiteReply:
        ae = _autoencoder()
        _load(ae, weights, AE)
        models = self._candidates(weights, config)
        flagged = self._flags(models, ae)
        with torch.no_grad():
            prediction = models[0].eval()(self.images).argmax(1).numpy().astype(np.uint8)
        if self.work_dir:
            from pathlib import Path

            Path(self.work_dir).mkdir(parents=True, exist_ok=True)
            np.savez(Path(self.work_dir) / "predictions.npz", masks=prediction, flagged=flagged)
        return SiteReply(metrics={MetricKey.NUM_CASES.value: len(self.images), MetricKey.NUM_FLAGGED.value: int(flagged.sum())})

    # -- helpers ----------------------------------------------------------------------------------

    def _delay_once(self) -> None:
        from pathlib import Path

        work = Path(self.work_dir or ".")
        if (work / "delayed").exists():
            return
        work.mkdir(parents=True, exist_ok=True)
        (work / "busy").write_text(str(time.time()))
        time.sleep(self.delay_s)
        (work / "delayed").write_text(str(time.time()))

    def _candidates(self, weights: Mapping, config: Mapping) -> list[nn.Module]:
        models = []
        for i in range(int(config.get(ConfigKey.NUM_CANDIDATES, 1))):
            model = _segmenter(self.width)
            _load(model, weights, candidate_prefix(i) + SEG)
            models.append(model)
        return models

    def _flags(self, models: list[nn.Module], ae: nn.Module) -> np.ndarray:
        """A case is flagged when every candidate's pseudo-Dice (prediction vs its reconstruction) is low."""
        with torch.no_grad():
            low = []
            for model in models:
                pred = model.eval()(self.images).argmax(1)
                recon = ae(nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float()).argmax(1)
                low.append((_dice(pred.float(), recon.float()) < self.flag_below).numpy())
        return np.logical_and.reduce(low)

    def _fit(self, model: nn.Module, idx: np.ndarray, epochs: int, mu: float,
             pseudo: tuple[torch.Tensor, nn.Module, float] | None = None) -> float:
        anchor = [p.detach().clone() for p in model.parameters()]
        optimiser = torch.optim.SGD(model.parameters(), lr=self.lr)
        model.train()
        loss = torch.zeros(())
        for _ in range(epochs):
            optimiser.zero_grad()
            loss = torch.zeros(())
            if len(idx):
                loss = loss + nn.functional.cross_entropy(model(self.images[idx]), self.masks[idx])
            if pseudo is not None:
                images, ae, alpha = pseudo
                probs = torch.softmax(model(images), 1)
                with torch.no_grad():
                    target = torch.softmax(ae(nn.functional.one_hot(probs.argmax(1), 2).permute(0, 3, 1, 2).float()), 1)
                loss = loss + alpha * nn.functional.mse_loss(probs, target)
            if mu > 0:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss.backward()
            optimiser.step()
        return float(loss.detach())
