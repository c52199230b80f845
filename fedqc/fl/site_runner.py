"""A site's side of one message: rebuild the weights, call its SiteAlgo, pack what may leave.

The ClientApp (:mod:`fedqc.fl.client_app`) hands every message here. In order:

1. the site's node config (in simulation, looked up by partition id) and its SiteAlgo. In
   deployment (the node config names ``site-worker``, as fedqc-client's SuperNode does) it is the
   site's long-lived worker (:class:`fedqc.site.worker.RemoteSite`): this process, fresh for every
   message, then imports neither torch nor MONAI and only forwards arrays and config. Otherwise
   (simulation, whose Ray actors are long-lived; a SuperNode started without a worker) it is built
   in this process by the factory the site's own node config names (``site-algorithm``; never the
   coordinator's run config: :func:`fedqc.site.algorithm.site_factory`) and cached. Either way the
   steps below are the same code;
2. the weights: the received global weights, plus the frozen autoencoder (received now, or
   kept in ``context.state`` / the site's work dir), plus, with FedBN, the site's own
   normalisation layers kept in ``context.state``;
3. ``algo.run(task, weights, config)``, after ``algo.run(EVALUATE, ...)`` when the server asks
   for validation of the received weights in the same message;
4. the reply: only arrays named like those received (minus site-local and autoencoder arrays)
   and metrics with allowed keys. A failure replies with an Error naming the exception type only;
   the traceback stays in the site's log.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message

from fedqc.core.types import view_of
from fedqc.fl import appdir, records, run_state, secagg
from fedqc.fl.aggregation import local_names
from fedqc.fl.rounds import (
    AE_HASH,
    EVALUATE_FIRST,
    INIT,
    INIT_WEIGHTS,
    NORM_PATTERN,
    TRANSFER_DTYPE,
    view_counts,
)
from fedqc.site.contract import MetricKey, SiteAlgo, SiteReply, Task, Weights
from fedqc.site.worker import WORKER_KEY, RemoteSite

SITE_ERROR = 4100  # Error code of a reply whose site algorithm raised
_STATE_AE, _STATE_AE_HASH, _STATE_LOCAL = "fedqc-qc-ae", "fedqc-qc-ae-hash", "fedqc-local"
_CANDIDATE = re.compile(r"^m\d+/")
_ALGOS: OrderedDict[tuple[int, int], SiteAlgo] = OrderedDict()
_THREADS_SET: list[int] = []
logger = logging.getLogger("fedqc.site.algorithm")


def node_config_of(context: Context) -> dict:
    """The site's node config; in simulation, the entry of its partition id."""
    node_config = dict(context.node_config)
    sites_file = str(context.run_config.get(appdir.SIMULATION_SITES, ""))
    if sites_file and "partition-id" in node_config:
        node_config = json.loads(Path(sites_file).read_text())[int(node_config["partition-id"])]
    return node_config


def site_id_of(context: Context) -> str:
    """The site's name from its node config (``node-<id>`` when it has none)."""
    return str(node_config_of(context).get("site-id", f"node-{context.node_id}"))


def site_algo(context: Context) -> SiteAlgo:
    """The site's SiteAlgo: its worker's when the node config names one (``site-worker``: the
    ClientApp then imports neither torch nor the site's code), else built once per (run, node) in
    this process and cached (LRU)."""
    run_config = dict(context.run_config)
    threads = int(run_config.get(appdir.TORCH_THREADS, 0) or 0)
    worker = str(node_config_of(context).get(WORKER_KEY, "") or "")
    if worker:
        return RemoteSite(worker, context.run_id, run_config, appdir.site_run_config(run_config), threads)
    from fedqc.site.algorithm import site_factory  # torch, MONAI: in-process only

    if threads and not _THREADS_SET:
        import torch

        torch.set_num_threads(threads)
        _THREADS_SET.append(threads)
    key = (context.run_id, context.node_id)
    if key in _ALGOS:
        _ALGOS.move_to_end(key)
        return _ALGOS[key]
    node_config = node_config_of(context)
    factory = site_factory(node_config, run_config)  # the hospital's choice; refuses the coordinator's
    algo = factory(node_config, appdir.site_run_config(run_config))
    _ALGOS[key] = algo
    while len(_ALGOS) > int(run_config.get(appdir.SITE_CACHE_SIZE, 8) or 8):
        _ALGOS.popitem(last=False)
    return algo


def _autoencoder(msg: Message, context: Context, config: Mapping) -> Weights | None:
    """The frozen autoencoder: from this message (then kept), the state, or the work dir."""
    wanted = str(config.get(AE_HASH, ""))
    work_dir = str(node_config_of(context).get("work-dir", ""))
    cached = Path(work_dir) / f"qc-ae-{wanted}.npz" if work_dir and wanted else None
    if records.QC_AE in msg.content:
        ae = records.record_to_weights(msg.content[records.QC_AE])
        context.state[_STATE_AE] = records.weights_to_record(ae)
        context.state[_STATE_AE_HASH] = ConfigRecord({"hash": wanted})
        if cached is not None:
            run_state.private_dir(cached.parent)
            run_state.save_arrays(cached, ae)
        return ae
    if _STATE_AE in context.state and context.state[_STATE_AE_HASH].get("hash") == wanted:
        return records.record_to_weights(context.state[_STATE_AE])
    if cached is not None and cached.is_file():
        return run_state.load_arrays(cached)
    return None


def _with_local_norms(weights: Weights, context: Context, pattern: str) -> Weights:
    """FedBN: replace normalisation-layer arrays by the site's own, when it has them."""
    if _STATE_LOCAL not in context.state:
        return weights
    local = records.record_to_weights(context.state[_STATE_LOCAL])
    merged = dict(weights)
    for name in local_names(weights, pattern):
        own = local.get(name, local.get(_CANDIDATE.sub("", name)))
        if own is not None and own.shape == weights[name].shape:
            merged[name] = own
    return merged


def _keep_local_norms(weights: Weights, context: Context, pattern: str) -> Weights:
    """FedBN: store the normalisation-layer arrays in ``context.state``; return the rest."""
    local = {n: weights[n] for n in local_names(weights, pattern)}
    if local:
        kept = records.record_to_weights(context.state[_STATE_LOCAL]) if _STATE_LOCAL in context.state else {}
        kept.update(local)
        context.state[_STATE_LOCAL] = records.weights_to_record(kept)
    return {n: v for n, v in weights.items() if n not in local}


def _initial_weights(algo: SiteAlgo, config: Mapping) -> SiteReply:
    """INIT: the freshly initialised segmenters and autoencoder (no data read, no training)."""
    if not config.get(INIT_WEIGHTS):
        return SiteReply(metrics={})
    seg = algo.run(Task.SUPERVISED, None, {**config, "task": Task.SUPERVISED.value})
    ae = algo.run(Task.QC_AUTOENCODER, None, {**config, "task": Task.QC_AUTOENCODER.value})
    return SiteReply(weights={**(seg.weights or {}), **(ae.weights or {})}, metrics={})


def _outgoing(reply_weights: Weights | None, received: Weights | None, task: str) -> Weights | None:
    """The arrays allowed to leave: named like those received, never the frozen autoencoder."""
    if reply_weights is None or task == INIT:
        return reply_weights
    if task in (Task.EVALUATE, Task.PREDICT, Task.FENCES):
        return None
    if task == Task.REFINE:  # the autoencoder is frozen: it never travels back
        reply_weights = {n: v for n, v in reply_weights.items() if not n.startswith("ae/")}
    extra = sorted(set(reply_weights) - set(received or {}))
    if extra:
        raise ValueError(f"the site algorithm returned arrays the server did not send: {extra[:5]}")
    return {n: np.asarray(v) for n, v in reply_weights.items()}


def _secure(out: Weights | None, received: Weights | None, task: str, metrics: Mapping, pattern: str,
            config: Mapping, context: Context) -> tuple[Weights | None, str]:
    """Secure aggregation at the site: INIT sends its public key; a weight round's update (zeros
    with weight 0 when it has none: its masks must still cancel the others') leaves masked."""
    key = secagg.site_key(str(node_config_of(context).get("work-dir", "") or "."), context.run_id)
    if task == INIT:
        return out, secagg.public_hex(key)
    if secagg.PEERS not in config:
        return out, ""
    names = _outgoing(received, received, task) or {}
    if task == Task.QC_AUTOENCODER:  # the candidates come along as inputs (segmenter examples), not to aggregate
        names = {n: v for n, v in names.items() if n.startswith("ae/")}
    if pattern:
        names = {n: v for n, v in names.items() if n not in local_names(names, pattern)}
    update = {name: (out[name] if out and name in out else np.zeros_like(value)) for name, value in names.items()}
    n = secure_weights(update, out, metrics)
    return secagg.mask(update, n, int(context.node_id), key, secagg.peers_of(config), str(config[secagg.TAG])), ""


def secure_weights(names: Iterable[str], out: Weights | None, metrics: Mapping) -> dict[str, float]:
    """Each name's weight in this site's masked sum: its view's own slices when the reply has per-view
    counts (REFINE), else the reply's NUM_EXAMPLES; 0 for a name the site did not train (it sends
    zeros there, so that its masks still cancel the others')."""
    total = float(metrics.get(MetricKey.NUM_EXAMPLES.value, 0))
    counts = view_counts(metrics)

    def weight(name: str) -> float:
        if not out or name not in out:
            return 0.0
        view = view_of(name)
        return counts[view].num_examples if view in counts else total

    return {name: weight(name) for name in names}


def handle(msg: Message, context: Context) -> Message:
    """Run the task a message carries and build the reply (see the module docstring)."""
    site_id = site_id_of(context)
    config = records.record_to_config(msg.content[records.CONFIG])
    task = str(config.get("task", ""))
    dtype = str(config.get(TRANSFER_DTYPE, "float32"))
    try:
        algo = site_algo(context)
        weights = records.record_to_weights(msg.content[records.WEIGHTS]) if records.WEIGHTS in msg.content else None
        received = weights
        if task in (Task.REFINE, Task.PREDICT, Task.FENCES):
            ae = _autoencoder(msg, context, config)
            if ae is None:
                return Message(records.reply_content(site_id, {}, needs_ae=True), reply_to=msg)
            weights = {**(weights or {}), **ae}
        pattern = str(config.get(NORM_PATTERN, ""))
        if pattern and weights is not None:
            weights = _with_local_norms(weights, context, pattern)
        val_metrics = None
        if config.get(EVALUATE_FIRST) and weights is not None:
            val_metrics = algo.run(Task.EVALUATE, weights, {**config, "task": Task.EVALUATE.value}).metrics
        reply = _initial_weights(algo, config) if task == INIT else algo.run(Task(task), weights, config)
        out = _outgoing(reply.weights, received, task)
        if pattern and out:
            out = _keep_local_norms(out, context, pattern)
        secagg_key = ""
        if config.get(secagg.TAG) is not None:  # privacy.secure_aggregation (fedqc.fl.secagg)
            out, secagg_key = _secure(out, received, task, reply.metrics, pattern, config, context)
        content = records.reply_content(site_id, reply.metrics, out, val_metrics, transfer_dtype=dtype,
                                        secagg_key=secagg_key)
    except Exception as exc:
        logger.exception("site %s: task %s failed", site_id, task)
        kind = getattr(exc, "remote_type", None) or type(exc).__name__  # a worker's failure: what the site raised
        reason = f"site {site_id}: {kind} during {task or 'an unknown task'} (details in the site's log)"
        return Message(Error(code=SITE_ERROR, reason=reason), reply_to=msg)
    return Message(content, reply_to=msg)
