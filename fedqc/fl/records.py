"""Flat name -> array weights, metrics and config <-> Flower records, and the message layout.

Weights travel as one :class:`~flwr.app.ArrayRecord` per message holding **one packed Array**
(:data:`PACKED`): a JSON index (each weight's name, dtype, shape, offset) followed by every
array's bytes, 8-byte aligned. Flower 1.42 moves each Array (and each 5 MB chunk) as its own
object, one request per object on every hop (ServerApp -> SuperLink -> SuperNode -> the message's
``flwr-clientapp`` process, and back): a 126-array segmenter was 255 objects per message, one
packed Array is 7 (docs/PERFORMANCE.md 4c). Floating arrays are float32 by default. With
``float16`` they are cast on the wire; ``bfloat16`` (which numpy lacks) travels as the upper 16
bits of each float32, rounded to nearest even, with ``bfloat16`` as its dtype in the index. Either
halves the bytes; receivers always get float32 back. Integer arrays (e.g. BatchNorm's
``num_batches_tracked``) travel unchanged. :func:`record_to_weights` also reads a plain
ArrayRecord of one Array per weight.

A message's :class:`~flwr.app.RecordDict` holds at most these records:

server -> site: ``config`` (ConfigRecord), ``weights`` (ArrayRecord), ``qc-ae`` (ArrayRecord,
the frozen autoencoder, sent once per site).
site -> server: ``weights``, ``metrics`` and ``val-metrics`` (MetricRecords whose keys are
:class:`~fedqc.site.contract.MetricKey` values) and ``control`` (ConfigRecord with only
:data:`CONTROL_KEYS`: the site's name, and whether it needs the autoencoder again).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedqc.site.contract import ALLOWED_METRIC_KEYS, Scalar, Weights

CONFIG = "config"
WEIGHTS = "weights"
QC_AE = "qc-ae"
METRICS = "metrics"
VAL_METRICS = "val-metrics"
CONTROL = "control"
REPLY_RECORDS = frozenset({WEIGHTS, METRICS, VAL_METRICS, CONTROL})

SITE_ID = "site-id"
NEEDS_AE = "needs-ae"
SECAGG_KEY = "secagg-public-key"
CONTROL_KEYS = frozenset({SITE_ID, NEEDS_AE})

TRANSFER_DTYPES = ("float32", "float16", "bfloat16")
_BF16 = "bfloat16"


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.require(values, dtype=np.float32, requirements="C").view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


PACKED = "packed"  # the one Array of a weights record
PACKED_DTYPE = "fedqc-packed-v1"  # its dtype field: a JSON index, then the arrays' bytes
_ALIGN = 8
_NUMERIC = frozenset(np.dtype(t).name for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64))


def _wire_array(value: np.ndarray, transfer_dtype: str) -> tuple[np.ndarray, str]:
    """The array as it travels, and the dtype its index entry names."""
    value = np.asarray(value)  # np.ascontiguousarray would turn 0-d arrays into 1-d
    if not np.issubdtype(value.dtype, np.floating):
        wire = np.require(value, dtype=value.dtype.newbyteorder("<"), requirements="C")
        return wire, wire.dtype.name
    if transfer_dtype == _BF16:
        return _to_bf16_bits(value), _BF16
    wire = np.require(value, dtype=np.dtype(transfer_dtype).newbyteorder("<"), requirements="C")
    return wire, wire.dtype.name


def weights_to_record(weights: Mapping[str, np.ndarray], transfer_dtype: str = "float32") -> ArrayRecord:
    """Pack flat weights into an ArrayRecord of one packed Array, casting floating arrays to ``transfer_dtype``.

    Args:
        weights: name -> array (any numeric dtype; floating arrays are sent as float32 or less).
        transfer_dtype: ``float32``, ``float16`` or ``bfloat16``.

    Raises:
        ValueError: an unknown transfer dtype.
    """
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer dtype must be one of {TRANSFER_DTYPES}, got {transfer_dtype!r}")
    index, parts, offset = [], [], 0
    for name, value in weights.items():
        wire, dtype = _wire_array(value, transfer_dtype)
        raw = wire.tobytes()
        index.append([name, dtype, list(wire.shape), offset, len(raw)])
        pad = -len(raw) % _ALIGN
        parts.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    head = json.dumps(index, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + 8) % _ALIGN)  # the payload starts 8-byte aligned
    data = struct.pack("!Q", len(head)) + head + b"".join(parts)
    return ArrayRecord({PACKED: Array(dtype=PACKED_DTYPE, shape=(len(data),), stype="fedqc", data=data)})


def _packed_index(array: Array) -> tuple[list, int]:
    """The index of a packed Array and where its payload starts.

    Raises:
        ValueError: the index does not account for every byte (arrays back to back, 8-byte
            aligned, nothing after the last): no byte travels that the index does not name.
    """
    data = array.data
    (size,) = struct.unpack("!Q", data[:8])
    index = json.loads(data[8:8 + size])
    expected = 0
    for entry in index:
        name, dtype, shape, offset, nbytes = entry
        if dtype != _BF16 and (dtype not in _NUMERIC or np.dtype(dtype).kind not in "biuf"):
            raise ValueError(f"packed weights: {name!r} has dtype {dtype!r}; only numeric arrays travel")
        itemsize = 2 if dtype == _BF16 else np.dtype(dtype).itemsize
        if offset != expected or nbytes != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"packed weights: the entry of {name!r} does not match its bytes")
        expected = offset + nbytes + (-nbytes % _ALIGN)
    if len(data) - 8 - size != expected:
        raise ValueError(f"packed weights: {len(data) - 8 - size} payload bytes, the index names {expected}")
    return index, 8 + size


def _is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED] and record[PACKED].dtype == PACKED_DTYPE


def record_to_weights(record: ArrayRecord) -> Weights:
    """Unpack a weights record (packed, or one Array per weight) to flat weights; floating (and
    bfloat16) arrays come back float32, each its own writable array."""
    weights: Weights = {}
    if _is_packed(record):
        index, start = _packed_index(record[PACKED])
        payload = np.frombuffer(record[PACKED].data, dtype=np.uint8, offset=start).copy()  # one copy, writable
        for name, dtype, shape, offset, nbytes in index:
            raw = payload[offset:offset + nbytes]
            value = raw.view(np.dtype("<u2" if dtype == _BF16 else dtype).newbyteorder("<")).reshape(shape)
            if dtype == _BF16:
                value = _from_bf16_bits(value)
            elif np.issubdtype(value.dtype, np.floating):
                value = value.astype(np.float32, copy=False)
            weights[name] = value
        return weights
    for name, array in record.items():
        value = array.numpy()
        if array.dtype == _BF16:
            value = _from_bf16_bits(value)
        elif np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32, copy=False)
        weights[name] = value
    return weights


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array data in a record as serialised (the packed index included)."""
    return sum(len(array.data) for array in record.values())


def describe_arrays(record: ArrayRecord) -> dict[str, dict]:
    """Each weight's dtype, shape and bytes as they travel (from the index of a packed record)."""
    if _is_packed(record):
        index, _ = _packed_index(record[PACKED])
        return {name: {"dtype": dtype, "shape": list(shape), "nbytes": nbytes}
                for name, dtype, shape, _, nbytes in index}
    return {k: {"dtype": a.dtype, "shape": list(a.shape), "nbytes": len(a.data)} for k, a in record.items()}


def weights_nbytes(weights: Mapping[str, np.ndarray]) -> int:
    """Bytes of the raw arrays (the model size to compare the wire size with)."""
    return int(sum(np.asarray(v).nbytes for v in weights.values()))


def metrics_to_record(metrics: Mapping[str, Scalar]) -> MetricRecord:
    """Pack allowed scalar metrics (bools become 0/1).

    Raises:
        ValueError: a key outside :data:`~fedqc.site.contract.ALLOWED_METRIC_KEYS`.
        TypeError: a value that is not a number.
    """
    record = MetricRecord()
    for key, value in metrics.items():
        if key not in ALLOWED_METRIC_KEYS:
            raise ValueError(f"metric {key!r} is not allowed to leave a site")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} must be a number to travel, got {type(value).__name__}")
        record[key] = value
    return record


def record_to_metrics(record: MetricRecord) -> dict[str, float | int]:
    """Unpack a MetricRecord to a plain dict."""
    return {key: value for key, value in record.items() if isinstance(value, (int, float))}


def config_to_record(config: Mapping[str, Scalar]) -> ConfigRecord:
    """Pack flat scalar config.

    Raises:
        TypeError: a value that is not a bool, int, float or str.
    """
    for key, value in config.items():
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"config {key!r} must be a flat scalar, got {type(value).__name__}")
    return ConfigRecord(dict(config))


def record_to_config(record: ConfigRecord) -> dict[str, Scalar]:
    """Unpack a ConfigRecord to a plain dict of scalars."""
    return {key: value for key, value in record.items() if isinstance(value, (bool, int, float, str))}


def task_content(config: Mapping[str, Scalar], weights: Mapping[str, np.ndarray] | None = None,
                 ae: Mapping[str, np.ndarray] | None = None, transfer_dtype: str = "float32") -> RecordDict:
    """The RecordDict the server sends a site for one task."""
    content = RecordDict({CONFIG: config_to_record(config)})
    if weights is not None:
        content[WEIGHTS] = weights_to_record(weights, transfer_dtype)
    if ae is not None:
        content[QC_AE] = weights_to_record(ae, transfer_dtype)
    return content


def reply_content(site_id: str, metrics: Mapping[str, Scalar], weights: Mapping[str, np.ndarray] | None = None,
                  val_metrics: Mapping[str, Scalar] | None = None, needs_ae: bool = False,
                  transfer_dtype: str = "float32", secagg_key: str = "") -> RecordDict:
    """The RecordDict a site sends back: only weights, allowed metrics and the control record."""
    content = RecordDict({METRICS: metrics_to_record(metrics)})
    if weights is not None:
        content[WEIGHTS] = weights_to_record(weights, transfer_dtype)
    if val_metrics:
        content[VAL_METRICS] = metrics_to_record(val_metrics)
    control: dict[str, Scalar] = {SITE_ID: site_id}
    if needs_ae:
        control[NEEDS_AE] = True
    if secagg_key:  # INIT under privacy.secure_aggregation: the site's X25519 public key (fedqc.fl.secagg)
        control[SECAGG_KEY] = secagg_key
    content[CONTROL] = config_to_record(control)
    return content


def describe_content(content: RecordDict) -> dict[str, dict]:
    """Keys, types and shapes of every record in a message (what the privacy audit stores).

    Array records list dtype and shape per name; metric and config records list each value with
    its type, so that an audit can check both keys and values.
    """
    described: dict[str, dict] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            items = describe_arrays(record)
        else:
            items = {k: {"type": type(v).__name__, "value": v if isinstance(v, (bool, int, float, str)) else None}
                     for k, v in record.items()}
        described[name] = {"type": type(record).__name__, "items": items}
    return described
