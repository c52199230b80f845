"""One exchange with the sites over a Flower Grid, with deadlines and the autoencoder hand-over.

Flower's own sampling loop waits forever for nodes; here every wait has a deadline and fails
with a message that says what was missing. Replies are sorted into answers, failures (error
replies, named by site) and missing sites (no reply before ``round_timeout_s``).

The frozen QC autoencoder travels in its own ``qc-ae`` record, at most once per site and run:
with the site's first refine/predict task (``push``), or when the site's reply says it lacks it
(``needs-ae``; it restarted, or ``on-request`` delivery), in which case the task is resent to that
site with the autoencoder attached.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedqc.core.errors import FedqcError
from fedqc.core.types import VIEWS
from fedqc.fl import records, trace
from fedqc.fl.aggregation import ViewCounts
from fedqc.fl.settings import FederationSettings
from fedqc.site.contract import ConfigKey, MetricKey, Scalar, Task, Weights, view_metric_key

INIT = "init"  # the first task: every site introduces itself; one returns freshly initialised weights
INIT_WEIGHTS = "init-weights"  # INIT: this site returns its initial weights
AE_HASH = "ae-hash"
TRANSFER_DTYPE = "transfer-dtype"
NORM_PATTERN = "norm-pattern"  # FedBN: non-empty regular expression of site-local names
EVALUATE_FIRST = "evaluate-first"  # validate the received weights before training (same message)
_MESSAGE_TYPES = {Task.SUPERVISED: MessageType.TRAIN, Task.QC_AUTOENCODER: MessageType.TRAIN,
                  Task.REFINE: MessageType.TRAIN, Task.EVALUATE: MessageType.EVALUATE,
                  Task.PREDICT: MessageType.QUERY, INIT: MessageType.QUERY, Task.FENCES: MessageType.EVALUATE}


class FederationError(FedqcError):
    """The federation cannot go on (too few sites, nothing to aggregate); the message says why."""


@dataclass
class SiteAnswer:
    """What one site sent back for a task (already unpacked from Flower records)."""

    node_id: int
    site: str
    metrics: dict[str, float | int]
    val_metrics: dict[str, float | int]
    weights: Weights | None
    reply_bytes: int
    needs_ae: bool = False
    secagg_key: str = ""


@dataclass
class Outcome:
    """The result of one exchange with every connected site."""

    answers: list[SiteAnswer] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    sent_bytes: int = 0
    model_bytes: int = 0
    ae_sent_to: list[str] = field(default_factory=list)
    ae_sent_to_nodes: set[int] = field(default_factory=set)
    seconds: float = 0.0


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """A short content hash of flat weights (lets a site check a cached autoencoder)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


class SiteExchange:
    """Sends tasks to the connected sites and collects their answers.

    Args:
        grid: the ServerApp's Grid.
        settings: deadlines, minimum sites, transfer dtype, autoencoder delivery.
    """

    def __init__(self, grid: Grid, settings: FederationSettings):
        self.grid = grid
        self.settings = settings
        self.site_names: dict[int, str] = {}
        self.ae_holders: set[int] = set()

    def name(self, node_id: int) -> str:
        """The site's name once it has answered, else ``node-<id>``."""
        return self.site_names.get(node_id, f"node-{node_id}")

    def wait_for_sites(self, minimum: int | None = None) -> list[int]:
        """Connected node ids once at least ``minimum`` (default ``min_sites``) are connected.

        Raises:
            FederationError: fewer connected after ``node_wait_s``.
        """
        minimum = self.settings.min_sites if minimum is None else minimum
        deadline = time.monotonic() + self.settings.node_wait_s
        last_report = 0.0
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(nodes)} of the {minimum} required sites connected within "
                    f"{self.settings.node_wait_s:.0f} s (connected: {[self.name(n) for n in nodes]}); "
                    "check that the sites' SuperNodes run and reach the SuperLink")
            if time.monotonic() - last_report > 30:
                log(INFO, "waiting for sites: %d connected, %d required", len(nodes), minimum)
                last_report = time.monotonic()
            time.sleep(1.0)

    def run(self, task: str, config: Mapping[str, Scalar], weights: Mapping[str, np.ndarray] | None,
            ae: Mapping[str, np.ndarray] | None = None, nodes: Iterable[int] | None = None,
            min_answers: int | None = None, per_node: Mapping[int, Mapping[str, Scalar]] | None = None) -> Outcome:
        """Send ``task`` to every connected site (or ``nodes``) and gather the answers.

        Args:
            task: a Task value, or ``init``.
            config: flat config for the sites (the task, rounds, epochs, alpha, ...).
            weights: the global weights the task needs (None: none).
            ae: the frozen autoencoder, for tasks that need it (sent once per site).
            nodes: restrict to these node ids (default: all connected after :meth:`wait_for_sites`).
            min_answers: answers required (default ``min_sites``).
            per_node: config entries added for some node ids only.

        Raises:
            FederationError: fewer than ``min_answers`` answered.
        """
        started = time.monotonic()
        targets = list(nodes) if nodes is not None else self.wait_for_sites()
        config = {**config, ConfigKey.TASK.value: task, TRANSFER_DTYPE: self.settings.transfer_dtype}
        if ae is not None:
            config[AE_HASH] = weights_digest(ae)
        outcome = Outcome(model_bytes=records.weights_nbytes(weights or {}))
        push = ae is not None and self.settings.ae_delivery == "push"
        pending = {n: push and n not in self.ae_holders for n in targets}
        deadline = started + self.settings.round_timeout_s
        while pending:
            replies = self._send(task, config, weights, ae, pending, outcome, deadline, per_node or {})
            pending = {}
            for node, reply in replies:
                if reply.has_error():
                    reason = str(reply.error.reason)
                    named = re.match(r"site ([A-Za-z0-9_-]+): ", reason)
                    if named and node not in self.site_names:
                        self.site_names[node] = named.group(1)
                    outcome.failed[self.name(node)] = reason[:500]
                    continue
                answer = self._unpack(node, reply)
                if answer.needs_ae and ae is not None:
                    if node in outcome.ae_sent_to_nodes:
                        outcome.failed[answer.site] = "asked again for the autoencoder it was just sent"
                    else:
                        pending[node] = True
                    continue
                if ae is not None:
                    self.ae_holders.add(node)
                outcome.answers.append(answer)
        # Replies arrive in any order; sums in a fixed order keep aggregation reproducible to the bit.
        outcome.answers.sort(key=lambda a: (a.site, a.node_id))
        answered = {a.node_id for a in outcome.answers}
        failed_names = set(outcome.failed)
        outcome.missing = [self.name(n) for n in targets if n not in answered and self.name(n) not in failed_names]
        outcome.seconds = time.monotonic() - started
        for site, reason in outcome.failed.items():
            log(WARNING, "%s: site %s failed: %s", task, site, reason)
        if outcome.missing:
            log(WARNING, "%s: no reply within the deadline from: %s", task, ", ".join(outcome.missing))
        required = self.settings.min_sites if min_answers is None else min_answers
        if len(outcome.answers) < required:
            raise FederationError(
                f"{task}: only {len(outcome.answers)} of the required {required} sites answered "
                f"(missing: {outcome.missing}, failed: {sorted(outcome.failed)})")
        return outcome

    def _send(self, task: str, config: Mapping[str, Scalar], weights: Mapping[str, np.ndarray] | None,
              ae: Mapping[str, np.ndarray] | None, with_ae: Mapping[int, bool], outcome: Outcome,
              deadline: float, per_node: Mapping[int, Mapping[str, Scalar]]) -> list[tuple[int, Message]]:
        """Send and gather; each reply comes with the node it answers for.

        An error the SuperLink writes itself (e.g. a node that stopped sending heartbeats) has the
        SuperLink as its source: the node is found from the message the reply answers.
        """
        messages = []
        for node, attach in with_ae.items():
            node_config = {**config, **per_node.get(node, {})}
            content = records.task_content(node_config, weights, ae if attach else None, self.settings.transfer_dtype)
            outcome.sent_bytes = max(outcome.sent_bytes, sum(
                records.record_nbytes(content[k]) for k in (records.WEIGHTS, records.QC_AE) if k in content))
            if attach:
                outcome.ae_sent_to_nodes.add(node)
                outcome.ae_sent_to.append(self.name(node))
            messages.append(Message(content, dst_node_id=node, message_type=_MESSAGE_TYPES[task]))
        replies = send_and_receive(self.grid, messages, deadline)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return [(sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]

    def _unpack(self, node: int, reply: Message) -> SiteAnswer:
        content = reply.content
        control = records.record_to_config(content[records.CONTROL]) if records.CONTROL in content else {}
        site = str(control.get(records.SITE_ID, f"node-{node}"))
        self.site_names[node] = site
        weights = records.record_to_weights(content[records.WEIGHTS]) if records.WEIGHTS in content else None
        return SiteAnswer(
            node_id=node, site=site,
            metrics=records.record_to_metrics(content[records.METRICS]) if records.METRICS in content else {},
            val_metrics=(records.record_to_metrics(content[records.VAL_METRICS])
                         if records.VAL_METRICS in content else {}),
            weights=weights,
            reply_bytes=records.record_nbytes(content[records.WEIGHTS]) if records.WEIGHTS in content else 0,
            needs_ae=bool(control.get(records.NEEDS_AE, False)),
            secagg_key=str(control.get(records.SECAGG_KEY, "")),
        )


PULL_INTERVAL_S = 0.3  # Flower's Grid.send_and_receive sleeps 3 s between pulls


def send_and_receive(grid: Grid, messages: list[Message], deadline: float) -> list[Message]:
    """Push ``messages``, then pull their replies every :data:`PULL_INTERVAL_S` until all came or ``deadline``.

    What ``Grid.send_and_receive`` does, with a short pull interval: its fixed 3 s sleep made every
    exchange wait 1.5 s on average (3 s at worst) after the last reply had arrived. A pull is one
    small request to the SuperLink (in simulation, a look-up in memory).
    """
    pushed_at = time.time()
    pending = set(grid.push_messages(messages))
    tracing = trace.enabled()
    if tracing:
        trace.event("push", start=pushed_at, type=messages[0].metadata.message_type if messages else "",
                    nodes={str(m.metadata.message_id): int(m.metadata.dst_node_id) for m in messages})
    replies: list[Message] = []
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        for reply in pulled if tracing else ():
            trace.event("reply", reply_to=str(reply.metadata.reply_to_message_id))
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(PULL_INTERVAL_S)
    return replies


def num_examples(answer: SiteAnswer) -> float:
    """A site's aggregation weight (NUM_EXAMPLES; 0 when it did not report one)."""
    return float(answer.metrics.get(MetricKey.NUM_EXAMPLES.value, 0))


def view_counts(metrics: Mapping[str, Scalar]) -> dict[str, ViewCounts]:
    """A reply's counts per view (``num-examples-SA``, ``num-labelled-SA``, ...; REFINE sends them);
    empty when the site reported only totals."""
    out = {}
    for view in VIEWS:
        key = view_metric_key(view, MetricKey.NUM_EXAMPLES)
        if key in metrics:
            out[view] = ViewCounts(float(metrics[key]),
                                   float(metrics.get(view_metric_key(view, MetricKey.NUM_LABELLED), 0)))
    return out
