"""A site's side of one message, with real Flower Message / Context objects and the toy algorithm."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedqc.fl import appdir, records, site_runner
from fedqc.fl.rounds import (
    AE_HASH,
    EVALUATE_FIRST,
    INIT,
    INIT_WEIGHTS,
    NORM_PATTERN,
    weights_digest,
)
from fedqc.fl.settings import DEFAULT_NORM_PATTERN
from fedqc.site.contract import ConfigKey, MetricKey, Task, candidate_prefix
from tests.fl.toy import ALGORITHM


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield


def _context(tmp_path, node_id: int = 11, **node) -> Context:
    node_config = {"site-algorithm": ALGORITHM, "site-id": "A", "seed": 1, "work-dir": str(tmp_path / "site"), **node}
    return Context(run_id=7, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config={"site.lr": 0.1})


def _send(context: Context, task: str, weights=None, ae=None, **config) -> Message:
    config = {ConfigKey.TASK.value: task, ConfigKey.LOCAL_EPOCHS.value: 1, **config}
    msg = Message(records.task_content(config, weights, ae), dst_node_id=context.node_id, message_type="train")
    return site_runner.handle(msg, context)


def _initial(tmp_path):
    reply = _send(_context(tmp_path, node_id=99), INIT, **{ConfigKey.LOCAL_EPOCHS.value: 0, INIT_WEIGHTS: True})
    weights = records.record_to_weights(reply.content[records.WEIGHTS])
    return {k: v for k, v in weights.items() if k.startswith("seg/")}, {k: v for k, v in weights.items() if k.startswith("ae/")}


def test_init_returns_segmenter_and_autoencoder_weights(tmp_path):
    seg, ae = _initial(tmp_path)
    assert "seg/SA/conv.weight" in seg and "ae/SA/enc.weight" in ae


def test_supervised_reply_with_validation_of_the_received_weights(tmp_path):
    seg, _ = _initial(tmp_path)
    reply = _send(_context(tmp_path), Task.SUPERVISED, seg, **{EVALUATE_FIRST: True})
    assert set(reply.content) == {records.WEIGHTS, records.METRICS, records.VAL_METRICS, records.CONTROL}
    assert set(records.record_to_weights(reply.content[records.WEIGHTS])) == set(seg)
    assert MetricKey.VAL_DICE.value in reply.content[records.VAL_METRICS]
    assert reply.content[records.CONTROL][records.SITE_ID] == "A"


def test_the_algorithm_is_built_once_per_node_and_cached(tmp_path):
    seg, _ = _initial(tmp_path)
    context = _context(tmp_path, node_id=12)
    _send(context, Task.EVALUATE, seg)
    first = site_runner.site_algo(context)
    _send(context, Task.EVALUATE, seg)
    assert site_runner.site_algo(context) is first


def test_refine_without_the_autoencoder_asks_for_it_then_keeps_it(tmp_path):
    seg, ae = _initial(tmp_path)
    candidates = {candidate_prefix(0) + k: v for k, v in seg.items()}
    config = {AE_HASH: weights_digest(ae), ConfigKey.NUM_CANDIDATES.value: 1, ConfigKey.ALPHA.value: 1.0}
    context = _context(tmp_path, node_id=13, **{"flag-below": 2.0})
    asked = _send(context, Task.REFINE, candidates, **config)
    assert asked.content[records.CONTROL][records.NEEDS_AE] is True
    assert records.WEIGHTS not in asked.content
    answered = _send(context, Task.REFINE, candidates, ae, **config)
    sent = records.record_to_weights(answered.content[records.WEIGHTS])
    assert set(sent) == set(candidates)  # the frozen autoencoder never travels back
    assert answered.content[records.METRICS][MetricKey.NUM_FLAGGED.value] == 24
    again = _send(context, Task.PREDICT, candidates, **config)  # kept in context.state
    assert records.NEEDS_AE not in again.content[records.CONTROL]
    fresh = _context(tmp_path, node_id=14)  # a restarted node: cached in its work dir by hash
    assert records.NEEDS_AE not in _send(fresh, Task.PREDICT, candidates, **config).content[records.CONTROL]
    other = _send(_context(tmp_path, node_id=15), Task.PREDICT, candidates, **{**config, AE_HASH: "different"})
    assert other.content[records.CONTROL][records.NEEDS_AE] is True


def test_fedbn_keeps_normalisation_layers_at_the_site(tmp_path):
    seg, _ = _initial(tmp_path)
    context = _context(tmp_path, node_id=16)
    first = _send(context, Task.SUPERVISED, seg, **{NORM_PATTERN: DEFAULT_NORM_PATTERN})
    sent = records.record_to_weights(first.content[records.WEIGHTS])
    assert "seg/SA/conv.weight" in sent and not any(".bn." in k or "/bn." in k for k in sent)
    local = records.record_to_weights(context.state["fedqc-local"])
    assert set(local) == {k for k in seg if "/bn." in k}
    poisoned = {**seg, "seg/SA/bn.weight": np.full_like(seg["seg/SA/bn.weight"], 100.0)}
    _send(context, Task.SUPERVISED, poisoned, **{NORM_PATTERN: DEFAULT_NORM_PATTERN})
    assert np.all(records.record_to_weights(context.state["fedqc-local"])["seg/SA/bn.weight"] < 50)


def test_a_failure_replies_with_the_exception_type_only(tmp_path):
    seg, _ = _initial(tmp_path)
    reply = _send(_context(tmp_path, node_id=17, **{"fail-task": "supervised"}), Task.SUPERVISED, seg)
    assert reply.has_error() and reply.error.code == site_runner.SITE_ERROR
    assert "RuntimeError" in reply.error.reason and "/private" not in reply.error.reason


def test_arrays_the_server_did_not_send_never_leave(tmp_path):
    seg, _ = _initial(tmp_path)
    reply = _send(_context(tmp_path, node_id=18, leak=True), Task.SUPERVISED, seg)
    assert reply.has_error() and "ValueError" in reply.error.reason


def test_simulation_node_config_by_partition_id(tmp_path):
    sites = tmp_path / "sites.json"
    sites.write_text('[{"site-id": "P0"}, {"site-id": "P1", "seed": 5}]')
    context = Context(run_id=7, node_id=3, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                      run_config={appdir.SIMULATION_SITES: str(sites)})
    assert site_runner.node_config_of(context) == {"site-id": "P1", "seed": 5}


def test_init_without_the_weights_request_only_introduces_the_site(tmp_path):
    reply = _send(_context(tmp_path, node_id=19), INIT, **{ConfigKey.LOCAL_EPOCHS.value: 0})
    assert set(reply.content) == {records.METRICS, records.CONTROL}


def test_a_run_config_that_names_site_code_is_refused(tmp_path):
    """The hospital pins its code: a coordinator naming a site factory gets an error reply, nothing runs."""
    context = _context(tmp_path, node_id=31)
    context.run_config["site-factory"] = "evil.module:steal"
    reply = _send(context, "supervised")
    assert reply.has_error()
    assert "SiteCodeRefused" in reply.error.reason
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())


def test_the_site_algorithm_comes_from_the_sites_own_node_config():
    from fedqc.site.algorithm import SiteCodeRefused, make_site_algo, site_factory
    from tests.fl.toy import make_toy_site

    assert site_factory({}, {}) is make_site_algo  # the default: fedqc's own method
    assert site_factory({"site-algorithm": ALGORITHM}, {}) is make_toy_site
    with pytest.raises(SiteCodeRefused, match="site-algorithm"):
        site_factory({"site-algorithm": "no-colon"}, {})
    with pytest.raises(SiteCodeRefused, match="coordinator's run config names site code"):
        site_factory({}, {"site.site-algorithm": "tests.fl.toy:make_toy_site"})
