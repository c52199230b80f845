"""What one hospital holds during a federated run: its config, its data per view, its device.

:class:`SiteState` reads and caches the site's cases lazily per view and moves weights between
the coordinator's flat arrays and torch modules. The tasks (:mod:`fedqc.site.tasks`) work on it;
:class:`fedqc.site.algorithm.FedqcSite` dispatches the coordinator's messages to them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedqc.config import Config, config_from_dict, to_dict
from fedqc.config.flat import decode_value, unflatten
from fedqc.core.errors import DataError
from fedqc.core.types import View
from fedqc.data.site import (
    SiteSplit,
    load_site_split,
    plan_site_split,
    site_cases,
    stack_slices,
)
from fedqc.site.contract import Scalar, Weights

NODE_SITE_KEYS = ("root", "filter", "labelled", "layout", "test-fraction", "unlabelled-fraction", "label-remap")


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


def fence_shortfalls(config: Config, *, federated: bool, whole_consortium: bool = True) -> list[str]:
    """What keeps the QC fences from being fitted, found from the subject split alone (no image read).

    * ``qc.threshold_source: consortium`` (``whole_consortium``: ``config`` lists every site): the
      labelled sites' validation cases of each view together must number at least
      :data:`fedqc.qc.thresholds.MIN_VALUES`.
    * ``unlabelled`` in a federation (``federated``): each site fits its own fences, so a labelled
      site needs that many cases in its own pool or, failing that, in its validation split.

    Returns one line per problem (empty: nothing to refuse).
    """
    from fedqc.qc.thresholds import MIN_VALUES

    source = "consortium" if config.qc.threshold_source in ("consortium", "labelled-val") else "unlabelled"
    problems = []
    for view in config.views:
        counts = {}
        for site in config.labelled_sites:
            plan = plan_site_split(site, view, config)
            counts[site.name] = (len(plan["val"]), len(plan["pool"]))
        if source == "consortium" and whole_consortium:
            total = sum(v for v, _ in counts.values())
            if total < MIN_VALUES:
                per_site = ", ".join(f"{name}: {v}" for name, (v, _) in counts.items())
                problems.append(f"{view}: {total} labelled validation case(s) ({per_site}); the consortium "
                                f"fences (qc.threshold_source: {config.qc.threshold_source}) need at least "
                                f"{MIN_VALUES}: add labelled subjects, raise train.val_fraction, or set "
                                "qc.threshold_source: unlabelled")
        if source == "unlabelled" and federated:
            for name, (val, pool) in counts.items():
                if val < MIN_VALUES and pool < MIN_VALUES:
                    problems.append(f"site {name!r} {view}: {val} validation case(s) and {pool} unlabelled "
                                    f"case(s); its own QC fences need at least {MIN_VALUES} of either: add "
                                    "labelled subjects, raise train.val_fraction or the site's "
                                    "unlabelled_fraction, or use qc.threshold_source: consortium")
    return problems


def config_digest(config: Config) -> str:
    """A short hash of everything a site's run is configured with (its own site entry included)."""
    text = json.dumps(to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_digest(modules: torch.nn.Module | list[torch.nn.Module]) -> str:
    """A short hash of the weights of ``modules`` (names and float32 values, device-independent)."""
    digest = hashlib.sha256()
    for module in modules if isinstance(modules, list) else [modules]:
        for name, value in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()[:16]


class SiteState:
    """A hospital during a run: lazily reads and caches its data per view; weights in and out.

    One instance belongs to one run (the ClientApp builds one per run and node), so what it
    remembers in memory is this run's. What it keeps in its work dir (fences, the frozen
    autoencoder) is stamped with :meth:`run_key` and refused or refitted under another run's.

    Built only for a site whose cases exist: a filter matching no case, a view without cases or a
    labelled site too small for its fences is refused here, before any task runs.
    """

    def __init__(self, config: Config, node_config: Mapping[str, Scalar]):
        from fedqc.core.device import select_device

        self.config = config
        self.site = config.sites[0]
        self.work_dir = Path(str(node_config.get("work-dir", "fedqc-site")))
        self.device = select_device(str(node_config.get("device", config.train.device)))
        self._splits: dict[View, SiteSplit] = {}
        self._labelled: dict[View, tuple[np.ndarray, np.ndarray]] = {}
        self._config_digest = config_digest(config)
        self.autoencoder_digests: dict[View, str] = {}  # the frozen autoencoder received in this run
        self.fences_checked: dict[View, dict] = {}  # fences fitted or verified in this run
        self._check_cases()

    def _check_cases(self) -> None:
        for view in self.config.views:
            site_cases(self.site, [view])  # a DataError naming the root and the filter
        problems = fence_shortfalls(self.config, federated=True, whole_consortium=False)
        if problems:
            raise DataError(self.site.root, "; ".join(problems))

    def run_key(self, view: View, autoencoder: torch.nn.Module) -> dict[str, str]:
        """What the site's kept state for ``view`` belongs to: this run's config and frozen autoencoder."""
        return {"config": self._config_digest, "ae": state_digest(autoencoder)}

    # -- data ------------------------------------------------------------------------------------

    def split(self, view: View) -> SiteSplit:
        if view not in self._splits:
            self._splits[view] = load_site_split(self.site, view, self.config, with_test_labels=False,
                                                 progress=None, cache_dir=self.work_dir / "cache")
        return self._splits[view]

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
