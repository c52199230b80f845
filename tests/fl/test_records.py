"""Flat weights, metrics and config <-> Flower records; wire sizes of float32 / float16 / bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedqc.fl import records
from fedqc.site.contract import MetricKey


def _model_weights(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 128, 3), torch.nn.Linear(128, 4096))
    return {f"seg/SA/{k}": v.numpy().copy() for k, v in model.state_dict().items()}


def test_float32_roundtrip_is_exact_and_keeps_integer_buffers():
    weights = _model_weights()
    back = records.record_to_weights(records.weights_to_record(weights))
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
    assert back["seg/SA/1.num_batches_tracked"].dtype == np.int64
    assert back["seg/SA/1.num_batches_tracked"].shape == ()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_transfer_returns_float32_close_to_the_original(dtype):
    weights = _model_weights()
    back = records.record_to_weights(records.weights_to_record(weights, dtype))
    for name, value in weights.items():
        if np.issubdtype(value.dtype, np.floating):
            assert back[name].dtype == np.float32
            np.testing.assert_allclose(back[name], value, rtol=1e-2 if dtype == "bfloat16" else 1e-3, atol=1e-3)
        else:
            np.testing.assert_array_equal(back[name], value)
        assert back[name].shape == value.shape


def test_bfloat16_matches_torch_rounding_and_keeps_special_values():
    values = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.14159, -2.5e-3, 1e30, np.inf, -np.inf, np.nan],
                      dtype=np.float32)
    back = records.record_to_weights(records.weights_to_record({"w": values}, "bfloat16"))["w"]
    expected = torch.tensor(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back[:-1], expected[:-1])
    assert np.isnan(back[-1])


def test_half_precision_halves_the_bytes_on_the_wire():
    weights = _model_weights()
    model_bytes = records.weights_nbytes(weights)
    sizes = {d: records.record_nbytes(records.weights_to_record(weights, d)) for d in records.TRANSFER_DTYPES}
    assert model_bytes > 2_000_000
    assert model_bytes <= sizes["float32"] < 1.01 * model_bytes  # the packed index and alignment only
    for dtype in ("float16", "bfloat16"):
        assert sizes[dtype] < 0.51 * sizes["float32"]
    print(f"\nmodel {model_bytes} B; ArrayRecord float32 {sizes['float32']} B, float16 {sizes['float16']} B, "
          f"bfloat16 {sizes['bfloat16']} B")


def test_unknown_transfer_dtype_is_refused():
    with pytest.raises(ValueError, match="transfer dtype"):
        records.weights_to_record({"w": np.zeros(2, np.float32)}, "int8")


def test_metrics_only_allowed_keys_and_numbers():
    record = records.metrics_to_record({MetricKey.NUM_EXAMPLES: 3, MetricKey.VAL_DICE: 0.5, MetricKey.ALPHA: True})
    assert records.record_to_metrics(record) == {"num-examples": 3, "val-dice": 0.5, "alpha": 1}
    with pytest.raises(ValueError, match="not allowed"):
        records.metrics_to_record({"case-0001-dice": 0.7})
    with pytest.raises(TypeError, match="number"):
        records.metrics_to_record({MetricKey.TRAIN_LOSS: "low"})


def test_config_roundtrip_and_flatness():
    config = {"task": "refine", "alpha": 0.5, "phase-round": 2, "evaluate-first": False}
    assert records.record_to_config(records.config_to_record(config)) == config
    with pytest.raises(TypeError, match="flat scalar"):
        records.config_to_record({"nested": {"a": 1}})


def test_reply_content_holds_only_the_allowed_records():
    content = records.reply_content("A", {MetricKey.NUM_EXAMPLES: 2}, {"seg/w": np.ones(3, np.float32)},
                                    {MetricKey.VAL_DICE: 0.9}, needs_ae=True, transfer_dtype="float16")
    assert set(content) <= records.REPLY_RECORDS
    described = records.describe_content(content)
    assert described["weights"]["items"]["seg/w"] == {"dtype": "float16", "shape": [3], "nbytes": 6}
    assert described["control"]["items"][records.SITE_ID]["value"] == "A"
    assert set(described["control"]["items"]) == records.CONTROL_KEYS
    assert described["val-metrics"]["items"]["val-dice"] == {"type": "float", "value": 0.9}


def test_run_config_and_node_config_files_survive_flowers_parsers(tmp_path):
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from fedqc.fl import appdir
    from fedqc.fl.launch import SuperNode
    from fedqc.fl.settings import ClientSettings

    tricky = {"path": str(tmp_path / "dir with space" / "é"), "quoted": 'say "hi" \\ back', "flow": "{a: 'b', c: [1, 2]}",
              "n": 3, "x": 0.5, "flag": True, "dotted.key": "v"}
    app = appdir.write_app(tmp_path, tricky)
    assert get_fused_config_from_dir(app, {}) == tricky
    node = SuperNode(ClientSettings(site_id="A", work_dir=tmp_path / "site", node_config=tricky), insecure=True)
    command = node.command()
    node_config_file = command[command.index("--node-config") + 1]
    assert parse_config_args([node_config_file]) == {**tricky, "site-id": "A", "work-dir": str(tmp_path / "site")}


def test_weights_travel_as_one_packed_array_whatever_their_number():
    """Flower moves each Array as its own object on every hop: a model is one Array, not one per weight."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    weights = {f"{view}/{k}": v for i, view in enumerate(("SA", "LA", "m0/SA"))
               for k, v in _model_weights(seed=i).items()}
    assert len(weights) > 30
    record = records.weights_to_record(weights)
    assert list(record.keys()) == [records.PACKED]
    plain = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
    assert len(get_all_nested_objects(record)) < 6 < len(weights) < len(get_all_nested_objects(plain))
    back = records.record_to_weights(record)
    assert list(back) == list(weights)  # the order survives (aggregation sums in a fixed order)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].flags.writeable and back[name].dtype == value.dtype and back[name].shape == value.shape
    assert records.record_to_weights(plain).keys() == weights.keys()  # a plain record still reads


def test_a_zero_dim_and_integer_weights_survive_packing():
    weights = {"step": np.array(7, dtype=np.int64), "w": np.arange(5, dtype=np.float32).reshape(5, 1),
               "odd": np.ones(3, dtype=np.float16)}
    back = records.record_to_weights(records.weights_to_record(weights, "bfloat16"))
    assert back["step"].shape == () and back["step"].dtype == np.int64 and int(back["step"]) == 7
    np.testing.assert_array_equal(back["w"], weights["w"])
    assert back["odd"].dtype == np.float32


def test_a_packed_record_with_bytes_its_index_does_not_name_is_refused():
    """What the privacy audit lists is all that travels: extra bytes behind the index are an error."""
    record = records.weights_to_record({"w": np.ones(4, np.float32)})
    packed = record[records.PACKED]
    smuggled = ArrayRecord({records.PACKED: Array(dtype=packed.dtype, shape=(len(packed.data) + 8,), stype=packed.stype,
                                                  data=packed.data + b"patient1")})
    for read in (records.record_to_weights, records.describe_arrays):
        with pytest.raises(ValueError, match="payload bytes"):
            read(smuggled)


def test_a_packed_record_naming_a_non_numeric_dtype_is_refused():
    """Raw bytes are never viewed as Python objects (dtype 'O' would turn them into pointers)."""
    import json
    import struct

    head = json.dumps([["w", "object", [1], 0, 8]]).encode()
    head += b" " * (-(len(head) + 8) % 8)
    data = struct.pack("!Q", len(head)) + head + b"\0" * 8
    forged = ArrayRecord({records.PACKED: Array(dtype=records.PACKED_DTYPE, shape=(len(data),), stype="fedqc",
                                                data=data)})
    with pytest.raises(ValueError, match="only numeric"):
        records.record_to_weights(forged)


def test_the_trace_writes_one_json_line_per_event_only_when_asked(tmp_path, monkeypatch):
    import json

    from fedqc.fl import trace

    path = tmp_path / "trace.jsonl"
    monkeypatch.delenv(trace.ENV, raising=False)
    trace.event("push", start=1.0)
    assert not path.exists()
    monkeypatch.setenv(trace.ENV, str(path))
    trace.event("push", start=1.0, nodes={"m1": 3})
    trace.event("reply", reply_to="m1")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["push", "reply"] and events[0]["nodes"] == {"m1": 3}
    assert 0 < trace.process_start() <= events[0]["t"]
