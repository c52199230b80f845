"""One hospital's side of the federated protocol (a :class:`fedqc.site.contract.SiteAlgo`), Flower-free.

The coordinator sends tasks with weights; the site runs the method's stages (:mod:`fedqc.site.tasks`) on its own
data and answers with weights and scalar counts only. Images, masks, reconstructions, per-case
scores and the site's fences never leave it: fences are fitted and kept under the site's work
directory, predictions and the QC report are written there.

Weight names: ``seg/<view>/<param>`` (one segmenter per view), ``ae/<view>/<param>`` (QC
autoencoder), and in REFINE / PREDICT ``m<i>/seg/<view>/<param>`` for the m_best candidates.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedqc.config import Config, config_from_dict
from fedqc.core.types import View
from fedqc.data.site import SiteSplit, load_site_split, stack_slices
from fedqc.site.contract import (
    ConfigKey,
    MetricKey,
    Scalar,
    SiteReply,
    Task,
    Weights,
    candidate_prefix,
)

NODE_SITE_KEYS = ("root", "filter", "labelled", "layout", "test-fraction", "label-remap")


def make_site_algo(node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]) -> FedqcSite:
    """Build a hospital's site from its node config and the run's flattened settings.

    ``node_config``: ``site-id``, ``work-dir``, ``root``, ``filter`` (JSON object), ``labelled``,
    optional ``layout``, ``test-fraction``, ``label-remap`` (JSON), ``device``, ``views`` (e.g. "SA,LA").
    ``run_config``: the fedqc config sections flattened to dotted keys (``train.epochs`` ...).
    """
    return FedqcSite(site_config(node_config, run_config), node_config)


def unflatten(flat: Mapping[str, Scalar]) -> dict[str, Any]:
    """``{"train.epochs": 3}`` -> ``{"train": {"epochs": 3}}``; flow-YAML lists and mappings are decoded."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, str) and value[:1] in "[{":
            value = yaml.safe_load(value)
        node[parts[-1]] = value
    return nested


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Inverse of :func:`unflatten`: lists and mappings below the sections become flow-style YAML.

    (Flow YAML quotes with single quotes: Flower's run-config parser stops at a double quote.)
    """
    flat: dict[str, Scalar] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not prefix:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (Mapping, list, tuple)):
            flat[name] = encode_value(value)
        elif value is not None:
            flat[name] = value
    return flat


def encode_value(value: Any) -> str:
    """A list or mapping as one line of flow-style YAML (no double quotes)."""
    plain = json.loads(json.dumps(value))  # tuples -> lists, mapping proxies -> dicts
    return yaml.safe_dump(plain, default_flow_style=True, width=1 << 30).strip()


def decode_value(value: Any) -> Any:
    return yaml.safe_load(value) if isinstance(value, str) and value else {}


def site_config(node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]) -> Config:
    """The site's own :class:`Config`: the run's settings with this one site."""
    data = unflatten({k: v for k, v in run_config.items() if not k.startswith(("sites", "simulated"))})
    site: dict[str, Any] = {"name": str(node_config.get("site-id", "site"))}
    for key in NODE_SITE_KEYS:
        if key in node_config:
            value = node_config[key]
            if key in ("filter", "label-remap") and isinstance(value, str):
                value = decode_value(value)
            site[key.replace("-", "_")] = value
    if "views" in node_config:
        data["views"] = [v.strip() for v in str(node_config["views"]).split(",") if v.strip()]
    data["sites"] = [site]
    return config_from_dict(data)


class FedqcSite:
    """A hospital: lazily reads and caches its data per view, answers the coordinator's tasks."""

    def __init__(self, config: Config, node_config: Mapping[str, Scalar]):
        from fedqc.core.device import select_device

        self.config = config
        self.site = config.sites[0]
        self.work_dir = Path(str(node_config.get("work-dir", "fedqc-site")))
        self.device = select_device(str(node_config.get("device", config.train.device)))
        self._splits: dict[View, SiteSplit] = {}
        self._labelled: dict[View, tuple[np.ndarray, np.ndarray]] = {}

    # -- data ------------------------------------------------------------------------------------

    def split(self, view: View) -> SiteSplit:
        if view not in self._splits:
            self._splits[view] = load_site_split(self.site, view, self.config, with_test_labels=False,
                                                 progress=None, cache_dir=self.work_dir / "cache")
        return self._splits[view]

    # -- protocol ----------------------------------------------------------------------------------

    def run(self, task: Task, weights: Mapping[str, np.ndarray] | None, config: Mapping[str, Scalar]) -> SiteReply:
        from fedqc.site import tasks as site_tasks

        started = time.perf_counter()
        epochs = int(config.get(ConfigKey.LOCAL_EPOCHS, 1))
        task = Task(task)
        if weights is None and epochs == 0 and task in (Task.SUPERVISED, Task.QC_AUTOENCODER):
            return SiteReply(weights=site_tasks.initial_weights(self, task, int(config.get(ConfigKey.SEED, 0))))
        handler = {Task.SUPERVISED: site_tasks.supervised, Task.QC_AUTOENCODER: site_tasks.autoencoder,
                   Task.EVALUATE: site_tasks.evaluate, Task.REFINE: site_tasks.refine,
                   Task.PREDICT: site_tasks.predict}[task]
        reply = handler(self, dict(weights or {}), config, epochs)
        reply.metrics[MetricKey.SECONDS.value] = round(time.perf_counter() - started, 3)
        return reply

    # -- weights ---------------------------------------------------------------------------------

    def load_module(self, module: torch.nn.Module, weights: Mapping[str, np.ndarray], prefix: str) -> torch.nn.Module:
        state = {k[len(prefix):]: torch.as_tensor(np.asarray(v)) for k, v in weights.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"no weights named {prefix}* in the coordinator's message")
        module.load_state_dict(state)
        return module.to(self.device)

    @staticmethod
    def export(module: torch.nn.Module, prefix: str) -> Weights:
        return {prefix + k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

    def labelled_slices(self, view: View) -> tuple[np.ndarray, np.ndarray]:
        """The site's labelled training slices of ``view``, stacked once per process."""
        if view not in self._labelled:
            self._labelled[view] = stack_slices(self.split(view).train)
        return self._labelled[view]


def with_seed(config: Config, seed: int) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


__all__ = ["FedqcSite", "candidate_prefix", "flatten", "make_site_algo", "site_config", "unflatten"]
