"""A site's DP budget across a federated run (``privacy.dp``): the ledger in its work dir, each round's
check that the budget still holds the round, and the one scalar it reports (its spent epsilon).

Flower starts a fresh process per message, so the ledger (Opacus's accountant history,
:class:`fedqc.train.privacy.PrivacyBudget`) lives in ``WORK/privacy/ledger.json``, stamped with the
site's config digest: a resumed or repeated run of the same configuration keeps spending the same
budget (the patients are the same); another configuration starts its own ledger. The noise
multipliers are calibrated once, at the site's first DP round, one per phase (the segmenter and R of
every view, :func:`fedqc.train.stages.dp_plan`), each phase getting an equal share of
``privacy.dp.epsilon`` (:func:`fedqc.train.privacy.calibrate_phases`). A round that would overspend is not trained: the site replies that
its budget is spent, with no weights.
"""

from __future__ import annotations

import logging
import secrets

from fedqc.site.contract import MetricKey, SiteReply
from fedqc.site.state import SiteState
from fedqc.train.privacy import PrivacyBudget, PrivateTraining
from fedqc.train.stages import dp_delta, dp_phase, dp_plan, dp_steps, slice_units

M = MetricKey
logger = logging.getLogger("fedqc.site")


def site_budget(site: SiteState, passes: dict[str, int]) -> PrivacyBudget | None:
    """The site's ledger (None without ``privacy.dp`` or labels)."""
    dp = site.config.privacy.dp
    if dp is None or not site.site.labelled:
        return None
    slices = {view: len(site.labelled_slices(view)[0]) for view in site.config.views}
    fed = site.config.federation
    plan = dp_plan(site.config, slices, passes, fed.supervised_rounds * fed.local_epochs,
                   fed.ae_rounds * fed.local_epochs)
    return PrivacyBudget.open(site.work_dir / "privacy" / "ledger.json", epsilon=dp.epsilon,
                              delta=dp_delta(site.config, sum(slices.values())), max_grad_norm=dp.max_grad_norm,
                              noise_multiplier=dp.noise_multiplier, plan=plan, run_key=site._config_digest)


def round_steps(site: SiteState, epochs: int, passes: dict[str, int],
                autoencoder: bool) -> list[tuple[str, float, int]]:
    """``(phase, q, steps)`` of one round of ``epochs`` local epochs over every view."""
    steps = []
    for view in site.config.views:
        n = len(site.labelled_slices(view)[0])
        if n:
            steps.append(dp_steps(site.config, view, n, epochs, passes[view], autoencoder=autoencoder))
    return steps


def training(site: SiteState, budget: PrivacyBudget | None, view: str, autoencoder: bool) -> PrivateTraining | None:
    """The DP-SGD option for one view's training call (noise from an unpredictable seed: the
    coordinator knows the training seed)."""
    if budget is None:
        return None
    batch = site.config.qc.ae_batch_size if autoencoder else site.config.train.batch_size
    return budget.training(slice_units(site.split(view).train), batch, seed=secrets.randbits(62),
                           phase=dp_phase(view, autoencoder))


def spent_reply(site: SiteState, budget: PrivacyBudget, task: str) -> SiteReply:
    """The reply of a site whose budget cannot hold another round: no weights, its spent epsilon."""
    spent = budget.spent()
    logger.warning("site %s: privacy budget spent (epsilon %.3f of %.3f, delta %.2g): no %s update",
                   site.site.name, spent, budget.epsilon, budget.delta, task)
    return SiteReply(metrics={M.NUM_EXAMPLES.value: 0, M.DP_EPSILON.value: round(spent, 6),
                              M.DP_BUDGET_SPENT.value: 1})


def spent_metrics(budget: PrivacyBudget | None) -> dict[str, float | int]:
    """What the site reports of its budget: its spent epsilon only."""
    return {} if budget is None else {M.DP_EPSILON.value: round(budget.spent(), 6)}
