"""One hospital's side of the federated protocol (a :class:`fedqc.site.contract.SiteAlgo`), Flower-free.

The coordinator sends tasks with weights; the site runs the method's stages (:mod:`fedqc.site.tasks`) on its own
data and answers with weights and scalar counts only. Images, masks, reconstructions, per-case
scores and the site's fences never leave it: fences are fitted and kept under the site's work
directory, predictions and the QC report are written there.

Weight names: ``seg/<view>/<param>`` (one segmenter per view), ``ae/<view>/<param>`` (QC
autoencoder), and in REFINE / PREDICT ``m<i>/seg/<view>/<param>`` for the m_best candidates.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping

import numpy as np

from fedqc.core.errors import FedqcError
from fedqc.site import tasks as site_tasks
from fedqc.site.contract import (
    ConfigKey,
    MetricKey,
    Scalar,
    SiteReply,
    Task,
)
from fedqc.site.state import SiteState, site_config

SITE_ALGORITHM = "site-algorithm"  # node-config key: the code this hospital runs on its data
BUILTIN_ALGORITHMS = {"fedqc": "fedqc.site.algorithm:make_site_algo"}
# Run-config keys by which a coordinator could try to choose a site's code: always refused.
COORDINATOR_CODE_KEYS = ("site-factory", "site-algorithm", "site.site-algorithm")


class SiteCodeRefused(FedqcError):
    """The coordinator tried to choose the code a hospital runs on its data."""


def site_factory(node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]):
    """The factory of the site algorithm this hospital chose, never one the coordinator names.

    The hospital's own node config (its ``site.yaml`` / SuperNode ``--node-config``) names it:
    ``site-algorithm`` = ``fedqc`` (the default, fedqc's own method) or an explicit
    ``module:function`` of code the hospital installed and vetted. A run config that carries a
    code key (:data:`COORDINATOR_CODE_KEYS`) is refused.

    Raises:
        SiteCodeRefused: the run config names site code.
    """
    named = [k for k in COORDINATOR_CODE_KEYS if k in run_config]
    if named:
        raise SiteCodeRefused(f"the coordinator's run config names site code ({named[0]} = "
                              f"{run_config[named[0]]!r}); this site runs only the algorithm its own config names "
                              f"({SITE_ALGORITHM} = {node_config.get(SITE_ALGORITHM, 'fedqc')!r})")
    spec = str(node_config.get(SITE_ALGORITHM, "fedqc") or "fedqc")
    spec = BUILTIN_ALGORITHMS.get(spec, spec)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SiteCodeRefused(f"{SITE_ALGORITHM} = {spec!r}: use 'fedqc' or module:function")
    return getattr(importlib.import_module(module), name)


def make_site_algo(node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar]) -> FedqcSite:
    """Build a hospital's site from its node config and the run's flattened settings.

    ``node_config``: ``site-id``, ``work-dir``, ``root``, ``filter`` (JSON object), ``labelled``,
    optional ``layout``, ``test-fraction``, ``label-remap`` (JSON), ``device``, ``views`` (e.g. "SA,LA").
    ``run_config``: the fedqc config sections flattened to dotted keys (``train.epochs`` ...).
    """
    return FedqcSite(site_config(node_config, run_config), node_config)


class FedqcSite(SiteState):
    """A hospital's :class:`~fedqc.site.contract.SiteAlgo`: each task of the protocol, on its own data."""

    # -- protocol ----------------------------------------------------------------------------------

    def run(self, task: Task, weights: Mapping[str, np.ndarray] | None, config: Mapping[str, Scalar]) -> SiteReply:
        started = time.perf_counter()
        epochs = int(config.get(ConfigKey.LOCAL_EPOCHS, 1))
        task = Task(task)
        if weights is None and epochs == 0 and task in (Task.SUPERVISED, Task.QC_AUTOENCODER):
            seed = int(config.get(ConfigKey.SEED, self.config.train.seed))  # the seed fedqc train would use
            return SiteReply(weights=site_tasks.initial_weights(self, task, seed))
        handler = {Task.SUPERVISED: site_tasks.supervised, Task.QC_AUTOENCODER: site_tasks.autoencoder,
                   Task.EVALUATE: site_tasks.evaluate, Task.REFINE: site_tasks.refine,
                   Task.PREDICT: site_tasks.predict, Task.FENCES: site_tasks.fences}[task]
        reply = handler(self, dict(weights or {}), config, epochs)
        reply.metrics[MetricKey.SECONDS.value] = round(time.perf_counter() - started, 3)
        return reply


__all__ = ["FedqcSite", "make_site_algo", "site_config", "site_factory"]
