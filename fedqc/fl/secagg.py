"""Secure aggregation by pairwise additive masking (``privacy.secure_aggregation``; docs/PRIVACY.md).

Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with ``flwr.client.mod.secaggplus_mod``)
is built on Flower's legacy compatibility layer: the workflow refuses any context that is not a
``LegacyContext`` and drives a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit``) through a
``ClientManager``; the mod takes over every TRAIN message, expects its own stage config record in
each, and reads the reply as a legacy ``FitRes``. fedqc's rounds are Message API exchanges with
their own records (:mod:`fedqc.fl.rounds`), so this module does what SecAgg+ does at its core, in
fedqc's own messages:

* every site holds an X25519 key pair for the run (its work dir, 0600), and sends the public key
  with its INIT reply;
* for a weight-aggregation round the coordinator sends each participant the public keys of all
  participants and a round tag; each pair (i, j) derives a shared 256-bit seed by Diffie-Hellman
  (X25519, HKDF-SHA256 over the tag), expanded by ChaCha20 into one uint64 per weight coordinate;
* a site sends ``q_i + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)`` (mod 2^64), where
  ``q_i = round(n_i * w_i * 2^SCALE_BITS)``: uniformly random to anyone without the seeds;
* the masks cancel in the sum: the coordinator learns ``sum_i n_i w_i`` (and the counts ``n_i``,
  which sites report in the clear) and never one site's weights.

Dropouts: no secret sharing of the seeds (SecAgg+'s Shamir shares) is done here, so a round whose
participant set is not complete cannot be unmasked; the coordinator discards it and keeps the
global weights (the round log says which site was missing). The coordinator is trusted to hand out
the keys it received (honest-but-curious): an active coordinator that forges keys could unmask.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedqc.core.io import atomic_write
from fedqc.site.contract import Weights

PEERS = "secagg-peers"  # task config: JSON {node id: public key hex} of the round's participants
TAG = "secagg-tag"  # task config: the round's tag (mixed into every pairwise seed)
PUBLIC_KEY = "secagg-public-key"  # INIT reply control record: the site's public key (hex)
SCALE_BITS = 24  # fixed-point precision of n_i * w_i (2^-24 ~ 6e-8)
MIN_PARTICIPANTS = 2


class SecureAggregationError(ValueError):
    """A masked round cannot be built or unmasked; the message says why."""


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def site_key(work_dir: str | Path, run_id: int) -> X25519PrivateKey:
    """The site's private key for ``run_id``, made on first use and kept (0600) in its work dir."""
    path = Path(work_dir) / "secagg" / f"run-{int(run_id)}.key"
    if path.is_file():
        return X25519PrivateKey.from_private_bytes(path.read_bytes())
    key = X25519PrivateKey.generate()
    atomic_write(path, key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption()))
    return key


def public_hex(key: X25519PrivateKey) -> str:
    return _raw(key.public_key()).hex()


def pair_seed(own: X25519PrivateKey, peer_hex: str, tag: str) -> bytes:
    """The 32-byte seed that sites ``own`` and ``peer`` share for round ``tag``."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_hex)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"fedqc-secagg/{tag}".encode()).derive(shared)


def _stream(seed: bytes, count: int) -> np.ndarray:
    """``count`` uniformly random uint64 from ChaCha20 keyed by ``seed``."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (8 * count)), dtype=np.uint64).copy()


def quantise(weights: Mapping[str, np.ndarray], n: float | Mapping[str, float]) -> dict[str, np.ndarray]:
    """``round(n * w * 2^SCALE_BITS)`` as uint64 (two's complement), per name (``n`` one weight, or
    one per name: a refinement round weights each view by its own slices)."""
    out = {}
    for name, value in weights.items():
        factor = float(n[name] if isinstance(n, Mapping) else n)
        scaled = np.rint(np.asarray(value, dtype=np.float64) * factor * 2.0**SCALE_BITS)
        if scaled.size and np.max(np.abs(scaled)) >= 2.0**62:
            raise SecureAggregationError(f"array {name!r} times {factor} overflows the fixed-point range")
        out[name] = scaled.astype(np.int64).view(np.uint64)
    return out


def mask(weights: Mapping[str, np.ndarray], n: float | Mapping[str, float], own_id: int, own: X25519PrivateKey,
         peers: Mapping[int, str], tag: str) -> Weights:
    """This site's masked update: quantised ``n * weights`` plus its pairwise masks (int64 on the wire).

    Args:
        weights: the site's update (every name the round aggregates; zeros when it has none).
        n: its aggregation weight (0: it contributes nothing but its masks), or one per name.
        own_id: its node id in ``peers``.
        own: its private key.
        peers: node id -> public key hex of every participant (itself included).
        tag: the round's tag.

    Raises:
        SecureAggregationError: fewer than two participants, or this site not among them.
    """
    if own_id not in peers:
        raise SecureAggregationError(f"node {own_id} is not among the round's participants")
    if len(peers) < MIN_PARTICIPANTS:
        raise SecureAggregationError(f"{len(peers)} participant(s): a masked sum needs at least {MIN_PARTICIPANTS}")
    if peers[own_id] != public_hex(own):
        raise SecureAggregationError("the coordinator sent this site a public key that is not its own")
    names = sorted(weights)
    q = quantise(weights, n)
    flat = np.concatenate([q[k].ravel() for k in names]) if names else np.zeros(0, np.uint64)
    for peer, key in sorted(peers.items()):
        if peer == own_id:
            continue
        stream = _stream(pair_seed(own, key, tag), flat.size)
        flat = flat + stream if own_id < peer else flat - stream  # uint64: wraps mod 2^64
    out, start = {}, 0
    for name in names:
        size = q[name].size
        out[name] = flat[start:start + size].reshape(q[name].shape).view(np.int64)
        start += size
    return out


def unmask_sum(masked: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``sum_i n_i w_i`` (float64) from every participant's masked update: the masks cancel.

    Raises:
        SecureAggregationError: the updates do not name the same arrays.
    """
    if not masked:
        raise SecureAggregationError("nothing to unmask")
    names = set(masked[0])
    if any(set(m) != names for m in masked):
        raise SecureAggregationError("masked updates name different arrays")
    out = {}
    for name in names:
        total = np.zeros(np.shape(masked[0][name]), dtype=np.uint64)
        for m in masked:
            total = total + np.asarray(m[name]).view(np.uint64)
        out[name] = total.view(np.int64).astype(np.float64) / 2.0**SCALE_BITS
    return out


def peers_config(keys: Mapping[int, str], tag: str) -> dict[str, str]:
    """The task config entries of a masked round."""
    return {PEERS: json.dumps({str(k): v for k, v in sorted(keys.items())}), TAG: tag}


def peers_of(config: Mapping) -> dict[int, str]:
    return {int(k): str(v) for k, v in json.loads(str(config[PEERS])).items()}
