"""What one hospital holds during a federated run: its config, its data per view, its device.

:class:`SiteState` reads and caches the site's cases lazily per view and moves weights between
the coordinator's flat arrays and torch modules. The tasks (:mod:`fedqc.site.tasks`) work on it;
:class:`fedqc.site.algorithm.FedqcSite` dispatches the coordinator's messages to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedqc.config import Config, config_from_dict
from fedqc.config.flat import decode_value, unflatten
from fedqc.core.types import View
from fedqc.data.site import SiteSplit, load_site_split, stack_slices
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


class SiteState:
    """A hospital during a run: lazily reads and caches its data per view; weights in and out."""

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
