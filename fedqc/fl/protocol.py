"""The coordinator's multi-phase protocol: supervised -> QC autoencoder -> refine -> predict.

1. ``init``: every site introduces itself (name, algorithm built); initial global weights come
   from ``initial_weights`` or from the first site (``local-epochs`` 0, no weights).
2. ``supervised``: rounds of Task.SUPERVISED on ``seg/...`` (FedAvg / FedProx / FedBN). From round
   2 on, each site first validates the weights it received (``evaluate-first``), so round r's
   replies score global round r-1 at no extra exchange; one Task.EVALUATE scores the last round.
   The m_best rounds by weighted-mean VAL_DICE become the candidates ``m0/...``, ``m1/...``.
3. ``qc-autoencoder``: rounds of Task.QC_AUTOENCODER on ``ae/...``; the result is frozen.
4. ``fences`` (``fence_source: consortium``): one Task.FENCES; the labelled sites' quartiles of
   pDC / pHD on their validation cases are pooled into the consortium's fences, sent to every
   site with REFINE and PREDICT (``consortium-fences``).
5. ``refine``: up to K_semi rounds of Task.REFINE on the candidates with alpha per round; stops
   after a round in which no site reports NUM_FLAGGED > 0. ``refine_aggregation: sequential``
   makes each round two exchanges: ``semi-only`` (the flagging sites' semi-supervised term), then
   ``control`` (the labelled sites' supervised term) from the result.
6. ``control`` (``control``): as many rounds of the compute-matched control M+sup (REFINE with
   ``control``: the labelled sites' supervised share only) from the supervised candidates,
   kept as ``ctl/m<i>/...`` for the report.
7. ``predict``: one Task.PREDICT; sites write predictions and QC reports locally.

State, global weights and the round log are written atomically after every round
(:mod:`fedqc.fl.run_state`); ``resume`` continues from the last completed round.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedqc.core.types import CONTROL_PREFIX, VIEWS
from fedqc.fl import progress, run_state
from fedqc.fl import secagg
from fedqc.fl.aggregation import (
    BestRounds,
    Update,
    as_global,
    eq2_average,
    name_totals,
    select,
    server_step,
    split_by_view,
    weighted_average,
    weighted_mean,
)
from fedqc.fl.robust import robust_average, screen_updates
from fedqc.fl.rounds import (
    EVALUATE_FIRST,
    INIT,
    INIT_WEIGHTS,
    NORM_PATTERN,
    FederationError,
    Outcome,
    SiteExchange,
    num_examples,
    view_counts,
)
from fedqc.fl.settings import FederationSettings
from fedqc.qc.thresholds import PTC_QUARTILES, QUARTILES, ThresholdFitError, pooled_fences
from fedqc.site.contract import (
    ConfigKey,
    MetricKey,
    Scalar,
    Task,
    Weights,
    candidate_prefix,
    fence_metric_key,
)

PHASES = ("init", "supervised", "qc-autoencoder", "fences", "refine", "control", "predict", "done")
AE = "ae/"
CONTROL, STASH = CONTROL_PREFIX, "ref/"  # control candidates; refined candidates while the control runs
CANDIDATE = re.compile(r"^m\d+/")


class Protocol:
    """Runs (or resumes) the protocol of one run directory over a Grid.

    Args:
        grid: the ServerApp's Grid.
        settings: the protocol settings.
        run_dir: where state, checkpoints and logs go.
        resume: continue from ``RUN/state.json`` when it exists.
    """

    def __init__(self, grid: Grid, settings: FederationSettings, run_dir: Path, resume: bool = False):
        self.settings = settings
        self.run_dir = run_state.private_dir(Path(run_dir))
        self.sites = SiteExchange(grid, settings)
        state_path = self.run_dir / run_state.STATE
        if resume and state_path.is_file():
            state = run_state.read_json(state_path)
            self.phase, self.phase_round = state["phase"], state["phase_round"]
            self.server_round, self.best = state["server_round"], BestRounds.from_json(state["best"])
            # Rows written after the last state (a kill between the two writes) are redone.
            self.log_rows: list[dict] = [row for row in run_state.read_json(self.run_dir / run_state.LOG)
                                         if row["server_round"] <= self.server_round]
            self.weights = run_state.load_arrays(self.run_dir / state["weights"])
            self.fences = state.get("fences") or {}
            self.secagg_keys = {int(k): v for k, v in (state.get("secagg_keys") or {}).items()}
            log(INFO, "resuming %s at phase %s after round %d", run_dir, self.phase, self.phase_round)
        else:
            self.phase, self.phase_round, self.server_round = "init", 0, 0
            self.best, self.log_rows, self.weights = BestRounds(settings.m_best), [], {}
            self.fences: dict[str, dict] = {}
            self.secagg_keys: dict[int, str] = {}
        self._secagg_nodes: list[int] = []
        self._asked_to_introduce: set[int] = set()

    def run(self) -> dict[str, Any]:
        """Run every remaining phase; returns the summary also written to ``RUN/summary.json``."""
        started = time.monotonic()
        steps = {"init": self._init, "supervised": self._supervised, "qc-autoencoder": self._qc_autoencoder,
                 "fences": self._fences, "refine": self._refine, "control": self._control, "predict": self._predict}
        while self.phase != "done":
            try:
                steps[self.phase]()
            except FederationError as exc:
                self.log_rows.append({"phase": self.phase, "round": self.phase_round + 1,
                                      "server_round": self.server_round, "error": str(exc)})
                self._save()
                raise
            self._next_phase()
        summary = self._summary(time.monotonic() - started)
        run_state.write_json(self.run_dir / run_state.SUMMARY, summary)
        for line in ["time per phase:", *progress.phase_table(summary).splitlines()]:
            log(INFO, "%s", line)
        return summary

    # -- phases -------------------------------------------------------------------------------

    def _init(self) -> None:
        """Every site introduces itself (and builds its algorithm); the first sends initial weights."""
        first = self.sites.wait_for_sites(max(self.settings.start_sites, self.settings.min_sites))[0]
        given = bool(self.settings.initial_weights)
        if given:
            self.weights = run_state.load_arrays(Path(self.settings.initial_weights))
        init = {ConfigKey.LOCAL_EPOCHS.value: 0, ConfigKey.SEED.value: self.settings.seed}
        if self.settings.secure_aggregation:
            init[secagg.TAG] = "init"  # sites answer with their public keys
        outcome = self._exchange(INIT, init, None,
                                 per_node={} if given else {first: {INIT_WEIGHTS: True}})
        if self.settings.secure_aggregation:
            self.secagg_keys = {a.node_id: a.secagg_key for a in outcome.answers if a.secagg_key}
            log(INFO, "secure aggregation: public keys of %d sites", len(self.secagg_keys))
        extra: dict[str, Any] = {"initial_weights": self.settings.initial_weights or None}
        if not given:
            answer = next((a for a in outcome.answers if a.node_id == first and a.weights), None)
            if answer is None and outcome.answers:  # the chosen site missed INIT: ask one that answered
                other = outcome.answers[0].node_id
                again = self.sites.run(INIT, init, None, nodes=[other], min_answers=1,
                                       per_node={other: {INIT_WEIGHTS: True}})
                answer = next((a for a in again.answers if a.weights), None)
            if answer is None:
                raise FederationError(f"no site returned initial weights (asked {self.sites.name(first)}; "
                                      f"failed: {outcome.failed}, missing: {outcome.missing})")
            self.weights = answer.weights
            extra["initial_weights"] = f"site {answer.site}"
        self._record("init", 0, outcome, extra)

    def _supervised(self) -> None:
        rounds = self.settings.supervised_rounds
        for r in range(self.phase_round + 1, rounds + 1):
            config = self._train_config(Task.SUPERVISED, r)
            config[EVALUATE_FIRST] = r > 1
            outcome = self._exchange(Task.SUPERVISED, config, select(self.weights, exclude_prefix=AE))
            extra = self._score(r - 1, outcome, val=True) if r > 1 else {}
            extra.update(self._aggregate(outcome))
            run_state.save_arrays(run_state.supervised_checkpoint(self.run_dir, r), select(self.weights, exclude_prefix=AE))
            self.best.add(r)
            self._keep_best()
            self._record("supervised", r, outcome, extra)
        if rounds and self.best.scores.get(rounds) is None:
            config = self._base_config(Task.EVALUATE, rounds + 1)
            outcome = self._exchange(Task.EVALUATE, config, select(self.weights, exclude_prefix=AE))
            extra = self._score(rounds, outcome, val=False)
            self._keep_best()
            self._record("supervised-evaluate", rounds, outcome, extra)
        self._make_candidates()

    def _qc_autoencoder(self) -> None:
        for r in range(self.phase_round + 1, self.settings.ae_rounds + 1):
            config = self._train_config(Task.QC_AUTOENCODER, r)
            weights = select(self.weights, AE)
            if self.settings.segmenter_examples:  # the candidates' own failures teach a corrective R
                weights.update(self._candidates())
            outcome = self._exchange(Task.QC_AUTOENCODER, config, weights)
            self._record("qc-autoencoder", r, outcome, self._aggregate(outcome))

    def _fences(self) -> None:
        """The consortium's fences, pooled from the labelled sites' quartiles (scalars only)."""
        if self.settings.fence_source != "consortium":
            return
        config = self._base_config(Task.FENCES, 1)
        config[ConfigKey.NUM_CANDIDATES.value] = self._num_candidates()
        outcome = self._exchange(Task.FENCES, config, self._candidates(), ae=select(self.weights, AE))
        self.fences = {}
        for view in VIEWS:
            per_site = [{stat: float(a.metrics[fence_metric_key(view, stat)])
                         for stat in ("n", *QUARTILES, *PTC_QUARTILES) if fence_metric_key(view, stat) in a.metrics}
                        for a in outcome.answers if fence_metric_key(view, "n") in a.metrics]
            if not per_site:
                continue
            try:
                self.fences[view] = dataclasses.asdict(pooled_fences(per_site, self.settings.tukey_factor))
            except ThresholdFitError as exc:
                log(WARNING, "no consortium fences for %s: %s; sites fall back to their own pools", view, exc)
        log(INFO, "consortium fences: %s", {v: (round(f["th_low_pdc"], 3), round(f["th_up_phd"], 1))
                                             for v, f in self.fences.items()})
        self._record("fences", 1, outcome, {"fences": self.fences})

    def _with_fences(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        if self.fences:
            config[ConfigKey.CONSORTIUM_FENCES.value] = json.dumps(self.fences)
        return config

    def _refine(self) -> None:
        last = self.log_rows[-1] if self.log_rows else {}
        if last.get("phase") == "refine" and not any(last["num_flagged"].values()):
            return  # resumed after the round that ended refinement
        sequential = self.settings.refine_aggregation == "sequential"
        for k in range(self.phase_round + 1, self.settings.refine_rounds + 1):
            config = self._with_fences(self._train_config(Task.REFINE, k))
            config[ConfigKey.ALPHA.value] = self.settings.alpha_at(k)
            if sequential:
                config[ConfigKey.SEMI_ONLY.value] = True
            start = self.weights
            outcome = self._exchange(Task.REFINE, config, self._candidates(), ae=select(self.weights, AE))
            flagged = {a.site: int(a.metrics.get(MetricKey.NUM_FLAGGED.value, 0)) for a in outcome.answers}
            extra = {"alpha": config[ConfigKey.ALPHA.value], "num_flagged": flagged,
                     **self._aggregate(outcome, required=False, refinement=True)}
            if self.settings.refine_server_lr != 1.0:
                self.weights = server_step(start, self.weights, self.settings.refine_server_lr)
                extra["server_lr"] = self.settings.refine_server_lr
            if sequential:
                try:
                    outcome = self._second_half(k, outcome, extra)
                except FederationError:
                    self.weights = start  # the failure is saved with the round's starting weights
                    raise
            self._record("refine", k, outcome, extra)
            if not any(flagged.values()):
                log(INFO, "refine: no site flagged a case in round %d; refinement ends", k)
                break

    def _second_half(self, k: int, first: Outcome, extra: dict[str, Any]) -> Outcome:
        """A sequential round's second exchange: the labelled sites' supervised term (the control's
        task) from where the semi-supervised step left the candidates. The round is recorded once,
        after both halves: a kill between them redoes the whole round on resume."""
        second = self._train_config(Task.REFINE, k)
        second[ConfigKey.ALPHA.value] = self.settings.alpha_at(k)  # as the control's task: reported, unused
        second[ConfigKey.CONTROL.value] = True
        sup = self._exchange(Task.REFINE, second, self._candidates(), ae=select(self.weights, AE))
        extra["supervised_half"] = {
            "seconds": round(sup.seconds, 3), "missing": sup.missing, "failed": sup.failed,
            "sites": {a.site: {"metrics": a.metrics, "reply_bytes": a.reply_bytes} for a in sup.answers},
            **self._aggregate(sup, required=False, refinement=True)}
        return dataclasses.replace(first, seconds=first.seconds + sup.seconds)

    def _control(self) -> None:
        """M+sup: refinement's supervised share without its QC-driven part, as many rounds, same candidates."""
        if not self.settings.control:
            return
        rounds = sum(1 for row in self.log_rows if row["phase"] == "refine" and "error" not in row)
        if self.phase_round == 0:  # stash the refined candidates, start from the supervised ones
            refined = self._candidates()
            self.weights = {k: v for k, v in self.weights.items() if not CANDIDATE.match(k)}
            self.weights.update({STASH + k: v for k, v in refined.items()})
            self._make_candidates()
        for k in range(self.phase_round + 1, rounds + 1):
            config = self._train_config(Task.REFINE, k)
            config[ConfigKey.ALPHA.value] = self.settings.alpha_at(k)
            config[ConfigKey.CONTROL.value] = True
            outcome = self._exchange(Task.REFINE, config, self._candidates(), ae=select(self.weights, AE))
            self._record("control", k, outcome, self._aggregate(outcome, required=False, refinement=True))
        control = {CONTROL + k: v for k, v in self._candidates().items()}
        stashed = {k[len(STASH):]: v for k, v in self.weights.items() if k.startswith(STASH)}
        self.weights = {k: v for k, v in self.weights.items()
                        if not (CANDIDATE.match(k) or k.startswith((STASH, CONTROL)))}
        self.weights.update({**stashed, **control})
        self._save()

    def _predict(self) -> None:
        if not self.settings.predict:
            return
        config = self._with_fences(self._base_config(Task.PREDICT, 1))
        config[ConfigKey.NUM_CANDIDATES.value] = self._num_candidates()
        outcome = self._exchange(Task.PREDICT, config, self._candidates(), ae=select(self.weights, AE))
        self._record("predict", 1, outcome, {})

    # -- helpers ------------------------------------------------------------------------------

    def _base_config(self, task: str, phase_round: int) -> dict[str, Scalar]:
        return {ConfigKey.PHASE_ROUND.value: phase_round, ConfigKey.SERVER_ROUND.value: self.server_round + 1,
                ConfigKey.SEED.value: self.settings.seed, ConfigKey.LOCAL_EPOCHS.value: self.settings.local_epochs,
                NORM_PATTERN: self.settings.norm_pattern if self.settings.strategy == "fedbn" else ""}

    def _train_config(self, task: str, phase_round: int) -> dict[str, Scalar]:
        config = self._base_config(task, phase_round)
        mu = self.settings.proximal_mu if self.settings.strategy == "fedprox" else 0.0
        config[ConfigKey.PROXIMAL_MU.value] = mu
        config[ConfigKey.NUM_CANDIDATES.value] = self._num_candidates()
        if task == Task.REFINE and self.settings.refine_local_epochs:
            config[ConfigKey.LOCAL_EPOCHS.value] = self.settings.refine_local_epochs
        return config

    def _exchange(self, task: str, config: Mapping[str, Scalar], weights: Mapping[str, np.ndarray] | None,
                  ae: Mapping[str, np.ndarray] | None = None,
                  per_node: Mapping[int, Mapping[str, Scalar]] | None = None) -> Outcome:
        if task != INIT:
            self._introduce_newcomers()
        self.server_round += 1
        log(INFO, "[%s] round %s: sending to the sites", task, config.get(ConfigKey.PHASE_ROUND.value, 0))
        nodes = None
        if self.settings.secure_aggregation and task in (Task.SUPERVISED, Task.QC_AUTOENCODER, Task.REFINE):
            nodes = [n for n in self.sites.wait_for_sites() if n in self.secagg_keys]
            # A fresh tag per exchange: masks are never reused, even when a round is redone on resume.
            tag = f"{self.server_round}-{secrets.token_hex(8)}"
            config = {**config, **secagg.peers_config({n: self.secagg_keys[n] for n in nodes}, tag)}
            self._secagg_nodes = nodes
        return self.sites.run(task, config, weights, ae=ae, per_node=per_node, nodes=nodes)

    def _introduce_newcomers(self) -> None:
        """Sites that connected after ``init`` (late, or restarted under a new node id) introduce
        themselves first, so that a failure in their first round is reported under the site's name."""
        newcomers = [n for n in self.sites.wait_for_sites()
                     if n not in self.sites.site_names and n not in self._asked_to_introduce]
        if not newcomers:
            return
        self._asked_to_introduce.update(newcomers)  # once per node: a silent one is not asked again
        log(INFO, "%d site(s) connected after init: asking them to introduce themselves", len(newcomers))
        init = {ConfigKey.LOCAL_EPOCHS.value: 0, ConfigKey.SEED.value: self.settings.seed}
        outcome = self.sites.run(INIT, init, None, nodes=newcomers, min_answers=0)
        log(INFO, "introduced: %s", ", ".join(a.site for a in outcome.answers) or "none")

    def _aggregate(self, outcome: Outcome, required: bool = True, refinement: bool = False) -> dict[str, Any]:
        """Check, screen and combine a round's updates into the global weights.

        When every update comes with per-view counts (REFINE replies), each view is combined over
        the sites that trained it, weighted by its own slices (:func:`fedqc.fl.aggregation.split_by_view`).
        ``refinement`` (REFINE rounds: refine, both sequential halves, the control): with
        ``refine_aggregation: eq2`` Eq. 2's step (:func:`~fedqc.fl.aggregation.eq2_average`),
        otherwise the slice-weighted mean.
        """
        for a in outcome.answers:
            if a.metrics.get(MetricKey.DP_BUDGET_SPENT.value):
                log(WARNING, "site %s stopped contributing: its privacy budget is spent (epsilon %s)", a.site,
                    a.metrics.get(MetricKey.DP_EPSILON.value))
        if self.settings.secure_aggregation:
            return self._secure_aggregate(outcome, required)
        offered = [Update(a.site, a.weights, num_examples(a)) for a in outcome.answers
                   if a.weights and num_examples(a) > 0]
        screened = screen_updates(offered, self.weights, self.settings.norm_factor)
        updates, rejected = screened.kept, screened.rejected
        for site, problem in rejected.items():
            log(WARNING, "update of site %s rejected: %s", site, problem)
        if not updates and (required or rejected):
            raise FederationError(f"no usable update this round (rejected: {rejected}, failed: {outcome.failed})")
        if updates:
            self.weights = self._combine(updates, outcome, refinement)
        return {"aggregated_from": [u.site for u in updates], "rejected": rejected,
                "update_norms": screened.norms, "norm_check": screened.norm_check}

    def _combine(self, updates: list[Update], outcome: Outcome, refinement: bool) -> Weights:
        counts = {a.site: view_counts(a.metrics) for a in outcome.answers}
        labelled = {a.site: float(a.metrics.get(MetricKey.NUM_LABELLED.value, 0)) for a in outcome.answers}
        groups = [(None, updates, labelled)]
        if all(counts.get(u.site) for u in updates):  # per-view counts (REFINE replies): each view by its own
            groups = split_by_view(updates, counts)
        weights = self.weights
        for _, members, by_site in groups:  # each group touches only its own names
            if self.settings.aggregation != "mean":  # robust: every phase, unweighted
                weights = robust_average(members, weights, self.settings.aggregation, self.settings.trim_fraction)
            elif refinement and self.settings.refine_aggregation == "eq2":
                weights = eq2_average(members, weights, by_site)
            else:
                weights = weighted_average(members, weights)
        return weights

    def _secure_aggregate(self, outcome: Outcome, required: bool) -> dict[str, Any]:
        """The n-weighted mean from the masked sum (:mod:`fedqc.fl.secagg`); no single update is seen.

        Screening and robust aggregation need individual updates: the config refuses robust
        aggregation with secure aggregation, and the norm rule is not applied (the log says so).
        A round missing any participant's masked update cannot be unmasked: it is discarded.
        """
        note = "not applied: secure aggregation hides individual updates"
        answered = {a.node_id for a in outcome.answers if a.weights}
        missing = sorted(self.sites.name(n) for n in self._secagg_nodes if n not in answered)
        if missing or not outcome.answers:
            log(WARNING, "secure aggregation: no masked update from %s; the round is discarded (global weights "
                "kept)", missing)
            return {"aggregated_from": [], "secure_aggregation": f"discarded: missing {missing}",
                    "norm_check": note}
        total = sum(num_examples(a) for a in outcome.answers)
        contributors = [a.site for a in outcome.answers if num_examples(a) > 0]
        if total <= 0:
            if required:
                raise FederationError("secure aggregation: no site contributed an update this round "
                                      f"(answers: {[a.site for a in outcome.answers]})")
            return {"aggregated_from": [], "secure_aggregation": "no contribution", "norm_check": note}
        if len(contributors) == 1:  # the counts are in the clear: a lone contributor's update is the sum
            log(WARNING, "secure aggregation: only site %s contributed this round; its update is the sum",
                contributors[0])
        sums = secagg.unmask_sum([a.weights for a in outcome.answers])
        # Per view when every site reported per-view counts (REFINE): each view's masked sum is weighted
        # by that view's slices at each site; a view nobody trained keeps its global value.
        totals = name_totals(sums, [view_counts(a.metrics) for a in outcome.answers if num_examples(a) > 0], total)
        mean = {name: value / totals[name] for name, value in sums.items() if totals[name] > 0}
        bad = sorted(name for name, value in mean.items() if not np.all(np.isfinite(value)))
        if bad:
            raise FederationError(f"secure aggregation: the unmasked mean holds NaN/Inf in {bad[:3]}")
        self.weights = as_global(self.weights, mean)
        return {"aggregated_from": contributors, "secure_aggregation": f"masked sum of {len(outcome.answers)} sites",
                "rejected": {}, "norm_check": note}

    def _score(self, round_: int, outcome: Outcome, val: bool) -> dict[str, Any]:
        pairs = []
        for answer in outcome.answers:
            metrics = answer.val_metrics if val else answer.metrics
            if MetricKey.VAL_DICE.value in metrics:
                pairs.append((metrics[MetricKey.VAL_DICE.value], metrics.get(MetricKey.NUM_EXAMPLES.value, 1)))
        score = weighted_mean(pairs)
        self.best.score(round_, score)
        return {"val_score_of_round": round_, "val_score": score}

    def _keep_best(self) -> None:
        run_state.prune_supervised(self.run_dir, self.best.keep())

    def _make_candidates(self) -> None:
        rounds = self.best.best()
        seg = [run_state.load_arrays(run_state.supervised_checkpoint(self.run_dir, r)) for r in rounds] or [
            select(self.weights, exclude_prefix=AE)]
        self.weights = {k: v for k, v in self.weights.items() if not CANDIDATE.match(k)}
        for i, weights in enumerate(seg):
            self.weights.update({candidate_prefix(i) + name: value for name, value in weights.items()})
        log(INFO, "candidates: supervised rounds %s (best first)", rounds or ["initial"])

    def _candidates(self) -> Weights:
        return {k: v for k, v in self.weights.items() if CANDIDATE.match(k)}

    def _num_candidates(self) -> int:
        return len({CANDIDATE.match(k).group(0) for k in self._candidates()})

    def _record(self, phase: str, round_: int, outcome: Outcome, extra: Mapping[str, Any]) -> None:
        self.phase_round = round_ if phase == self.phase else self.phase_round
        self.log_rows.append({
            "phase": phase, "round": round_, "server_round": self.server_round, "seconds": round(outcome.seconds, 3),
            "sites": {a.site: {"metrics": a.metrics, "val_metrics": a.val_metrics, "reply_bytes": a.reply_bytes}
                      for a in outcome.answers},
            "missing": outcome.missing, "failed": outcome.failed, "ae_sent_to": outcome.ae_sent_to,
            "sent_bytes_per_site": outcome.sent_bytes, "model_bytes": outcome.model_bytes, **extra})
        log(INFO, "%s", progress.round_line(self.log_rows[-1], self._planned_rounds(phase)))
        self._save()

    def _planned_rounds(self, phase: str) -> int:
        """The rounds a phase may take (refinement can end sooner), for the progress line."""
        planned = {"supervised": self.settings.supervised_rounds, "qc-autoencoder": self.settings.ae_rounds,
                   "refine": self.settings.refine_rounds,
                   "control": sum(1 for r in self.log_rows if r["phase"] == "refine" and "error" not in r)}
        return int(planned.get(phase, 1))

    def _next_phase(self) -> None:
        self.phase = PHASES[PHASES.index(self.phase) + 1]
        self.phase_round = 0
        self._save()

    def _save(self) -> None:
        """Weights under a new name, the log, then the state that names them: a kill leaves a usable pair."""
        weights = run_state.global_checkpoint(self.run_dir, self.server_round)
        run_state.save_arrays(weights, self.weights)
        run_state.write_json(self.run_dir / run_state.LOG, self.log_rows)
        run_state.write_json(self.run_dir / run_state.STATE, {
            "phase": self.phase, "phase_round": self.phase_round, "server_round": self.server_round,
            "weights": str(weights.relative_to(self.run_dir)), "best": self.best.to_json(),
            "candidates": self.best.best(), "fences": self.fences,
            "secagg_keys": {str(k): v for k, v in self.secagg_keys.items()}})
        run_state.prune_globals(self.run_dir, keep=weights)

    def _summary(self, seconds: float) -> dict[str, Any]:
        per_phase: dict[str, dict[str, float]] = {}
        for row in self.log_rows:
            if "error" in row:
                continue
            entry = per_phase.setdefault(row["phase"], {"rounds": 0, "seconds": 0.0})
            entry["rounds"] += 1
            entry["seconds"] = round(entry["seconds"] + row["seconds"], 3)
        summary = {"status": "completed", "seconds": round(seconds, 3), "exchanges": self.server_round,
                   "failed_rounds": sum("error" in row for row in self.log_rows),
                   "phases": per_phase, "m_best": self.best.best(), "val_scores": self.best.to_json()["scores"]}
        epsilon = dp_epsilon_per_site(self.log_rows)
        if epsilon:
            summary["dp_epsilon"] = epsilon
        return summary


def dp_epsilon_per_site(log_rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per site, the last epsilon it reported (privacy.dp) and whether its budget ran out, from the round log."""
    out: dict[str, dict[str, Any]] = {}
    for row in log_rows:
        for site, entry in (row.get("sites") or {}).items():
            metrics = entry.get("metrics") or {}
            if MetricKey.DP_EPSILON.value in metrics:
                previous = out.get(site, {})
                out[site] = {"epsilon": metrics[MetricKey.DP_EPSILON.value],
                             "budget_spent": bool(previous.get("budget_spent"))
                             or bool(metrics.get(MetricKey.DP_BUDGET_SPENT.value)),
                             "last_phase": row["phase"], "last_round": row["round"]}
    return out


def run_federation(grid: Grid, settings: FederationSettings, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run the whole protocol over ``grid``; see :class:`Protocol`."""
    return Protocol(grid, settings, run_dir, resume).run()
