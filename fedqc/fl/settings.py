"""The handful of values the federation plumbing needs, as frozen dataclasses (no Flower import).

``fedqc.config`` maps the user's YAML onto these; tests and the self-test build them directly.

* :class:`FederationSettings`: the protocol the coordinator runs (rounds per phase, strategy,
  m_best, timeouts, what the sites are asked to build). Written to ``RUN/federation.json`` and read
  back by the ServerApp, wherever it runs.
* :class:`ServerSettings`: where the SuperLink listens and its TLS / authentication files.
* :class:`ClientSettings`: one hospital's SuperNode: SuperLink address, CA certificate, site key,
  and the node config its site algorithm is built from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedqc.core.errors import ConfigError
from fedqc.fl.run_state import atomic_write

Scalar = bool | int | float | str

# Normalisation layers by name: torch BatchNorm / InstanceNorm / GroupNorm / LayerNorm modules named
# bn*, norm*, *_norm, MONAI's ADN block (".adn.N."), and their running statistics.
DEFAULT_NORM_PATTERN = (
    r"(^|[./_])(bn\d*|norm\d*|batch_?norm\d*|instance_?norm\d*|group_?norm\d*|layer_?norm\d*|N)[./]"
    r"|running_mean$|running_var$|num_batches_tracked$"
)


@dataclass(frozen=True)
class FederationSettings:
    """The multi-phase protocol the ServerApp runs.

    Attributes:
        supervised_rounds: FedAvg rounds of Task.SUPERVISED on the segmenters (labelled sites).
        ae_rounds: rounds of Task.QC_AUTOENCODER; the autoencoder is frozen afterwards.
        refine_rounds: K_semi, the most Task.REFINE rounds; fewer when no site flags a case.
        predict: end with one Task.PREDICT exchange (sites write predictions and QC reports).
        local_epochs: epochs per round at each site (several: every exchange costs seconds).
        refine_local_epochs: a refine round's local epochs (Task.REFINE, the control's rounds and
            both halves of a sequential round); 0: ``local_epochs``.
        strategy: ``fedavg``; ``fedprox`` (sites add the proximal term, ``proximal_mu``);
            ``fedbn`` (names matching ``norm_pattern`` stay at each site: never averaged, never
            overwritten there; the autoencoder ``ae/...`` is always shared).
        proximal_mu: FedProx mu, sent to sites as ``proximal-mu`` (0 unless strategy is fedprox).
        norm_pattern: regular expression (``re.search``) naming normalisation-layer weights.
        m_best: global segmenters kept by federated validation score (weighted mean VAL_DICE).
        alpha: ``inverse`` (alpha = 1/k) or ``linear`` (alpha = (K - k + 1) / K) over refine rounds.
        fence_source: ``consortium``: before refinement, one Task.FENCES exchange gathers the labelled
            sites' pDC / pHD quartiles on their validation cases; the pooled fences
            (:func:`fedqc.qc.fences.pooled_fences`) go to every site with REFINE and PREDICT.
            ``unlabelled``: each site fits fences on its own pool (the paper's).
        tukey_factor: the fences' factor (1.5 in the paper), for the pooled fences.
        segmenter_examples: send the candidates with Task.QC_AUTOENCODER, so that labelled sites
            train the corrective R on the candidates' own predictions of their slices as well
            (``qc.segmenter_examples``; :func:`fedqc.train.autoencoder.segmenter_examples`).
        control: after refinement, as many rounds of the compute-matched control ``M+sup``: the
            labelled sites' share of refinement (Eq. 2's supervised term, alpha 0) from the same
            candidates, stored as ``ctl/m<i>/...`` (for the report; a deployment leaves it off).
        min_sites: sites that must be connected to start a round and must answer to aggregate.
        start_sites: sites that must be connected before the first round (INIT); 0: ``min_sites``.
            A consortium that starts whole but tolerates losing sites later sets it above
            ``min_sites`` (Flower's ``min_available_nodes`` against its ``min_train_nodes``).
        node_wait_s: how long to wait for ``min_sites`` (``start_sites`` at INIT) to connect before failing.
        round_timeout_s: how long to wait for the replies of one round.
        refine_aggregation: ``sequential`` (default: two exchanges per round, the semi-supervised
            term alone at every site that flags, F-weighted, then the labelled sites' supervised
            term from that point, N-weighted; measured to cost the labelled sites far less,
            docs/FEDERATION.md), ``eq2`` (:func:`fedqc.fl.aggregation.eq2_average`: the round's step
            is the first-order step of Eq. 2 over the consortium) or ``slices`` (FedAvg weighted by
            the slices each site used).
        refine_server_lr: a server learning rate on each refine round's aggregated semi-supervised
            step (the first half of a sequential round; the whole refine exchange otherwise):
            ``w + lr * (mean - w)`` (:func:`fedqc.fl.aggregation.server_step`). 1: FedAvg's mean step.
            The supervised half and the control are never scaled, so the control stays compute-matched.
        aggregation: ``mean`` (FedAvg, and ``refine_aggregation`` in refine rounds), or ``median`` /
            ``trimmed-mean`` (:func:`fedqc.fl.robust.robust_average`, unweighted, in every phase,
            refine rounds included: ``refine_aggregation`` then has no effect).
        trim_fraction: for ``trimmed-mean``, the fraction of sites dropped at each end per coordinate
            (``int(trim_fraction * n)``, as Flower's FedTrimmedAvg), in [0, 0.5).
        norm_factor: reject an update whose norm exceeds this multiple of the round's median update
            norm (three or more updates); 0 disables the rule, otherwise >= 1.
        transfer_dtype: ``float32``, or ``float16`` / ``bfloat16`` to halve the bytes of weights
            on the wire (both directions; the server keeps float32 and aggregates in float64).
        ae_delivery: ``push`` sends the frozen autoencoder with each site's first refine/predict
            message; ``on-request`` sends it only to a site that asks (sites that cache it on disk).
        initial_weights: ``.npz`` of ``seg/...`` and ``ae/...`` arrays; empty: one site returns
            its freshly initialised weights (``local-epochs`` 0, ``weights`` None) first.
        seed: sent to sites as ``seed``.
        site_run_config: flat scalars every site's factory receives in ``run_config`` (the model and
            training settings from the YAML, flattened to dotted keys).
        audit_replies: record the keys, types and shapes of every reply a site sends under
            ``RUN/audit/`` (simulation and tests; a hospital records into its own work dir).
        torch_threads: torch threads per site process (0: leave torch's default).
        site_cache_size: site algorithms kept alive per process (simulation reuses processes).
    """

    supervised_rounds: int = 2
    ae_rounds: int = 1
    refine_rounds: int = 2
    predict: bool = True
    local_epochs: int = 1
    refine_local_epochs: int = 0
    strategy: Literal["fedavg", "fedprox", "fedbn"] = "fedavg"
    proximal_mu: float = 0.0
    norm_pattern: str = DEFAULT_NORM_PATTERN
    m_best: int = 3
    alpha: Literal["inverse", "linear"] = "inverse"
    fence_source: Literal["consortium", "unlabelled"] = "consortium"
    tukey_factor: float = 1.5
    segmenter_examples: bool = False
    control: bool = False
    min_sites: int = 1
    start_sites: int = 0
    node_wait_s: float = 300.0
    round_timeout_s: float = 3600.0
    transfer_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    refine_aggregation: Literal["slices", "eq2", "sequential"] = "sequential"
    refine_server_lr: float = 1.0
    aggregation: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: float = 0.2
    norm_factor: float = 10.0
    ae_delivery: Literal["push", "on-request"] = "push"
    initial_weights: str = ""
    seed: int = 0
    site_run_config: Mapping[str, Scalar] = field(default_factory=dict)
    audit_replies: bool = False
    torch_threads: int = 0
    site_cache_size: int = 8
    # privacy.secure_aggregation: weight rounds as pairwise-masked sums (fedqc.fl.secagg).
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        checks = {
            "supervised_rounds": self.supervised_rounds >= 0,
            "ae_rounds": self.ae_rounds >= 0,
            "refine_rounds": self.refine_rounds >= 0,
            "local_epochs": self.local_epochs >= 1,
            "refine_local_epochs": self.refine_local_epochs >= 0,
            "strategy": self.strategy in ("fedavg", "fedprox", "fedbn"),
            "proximal_mu": self.proximal_mu >= 0,
            "m_best": self.m_best >= 1,
            "alpha": self.alpha in ("inverse", "linear"),
            "min_sites": self.min_sites >= 1,
            "start_sites": self.start_sites == 0 or self.start_sites >= self.min_sites,
            "node_wait_s": self.node_wait_s > 0,
            "round_timeout_s": self.round_timeout_s > 0,
            "transfer_dtype": self.transfer_dtype in ("float32", "float16", "bfloat16"),
            "refine_aggregation": self.refine_aggregation in ("slices", "eq2", "sequential"),
            "refine_server_lr": 0.0 < self.refine_server_lr < float("inf"),
            "aggregation": self.aggregation in ("mean", "median", "trimmed-mean"),
            "trim_fraction": 0.0 <= self.trim_fraction < 0.5,
            "norm_factor": self.norm_factor == 0 or 1.0 <= self.norm_factor < float("inf"),
            "ae_delivery": self.ae_delivery in ("push", "on-request"),
            "site_cache_size": self.site_cache_size >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"federation.{key}", f"invalid value {getattr(self, key)!r}")
        for key, value in self.site_run_config.items():
            if not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"federation.site_run_config.{key}", "values must be flat scalars")

    def alpha_at(self, k: int) -> float:
        """Weight of the semi-supervised term at refine round ``k`` (1-based)."""
        from fedqc.train.losses import alpha_schedule

        return alpha_schedule(k, self.alpha, self.refine_rounds)

    def to_json(self, path: Path) -> Path:
        """Write these settings to ``path``, private (read back with :meth:`from_json`)."""
        return atomic_write(Path(path), json.dumps(dataclasses.asdict(self), indent=2).encode())

    @classmethod
    def from_json(cls, path: str | Path) -> FederationSettings:
        """Read settings written by :meth:`to_json`."""
        return from_mapping(cls, json.loads(Path(path).read_text()), "federation")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the consortium's CA and the SuperLink's certificate (see :mod:`fedqc.fl.certs`)."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


@dataclass(frozen=True)
class ServerSettings:
    """Where the coordinator's SuperLink listens and how it admits sites.

    Attributes:
        host: interface to bind (``127.0.0.1`` for loopback tests, ``0.0.0.0`` in production).
        port: the SuperLink's one HTTP port (Fleet, Control and ServerApp APIs, Flower 1.42).
        tls: CA and server certificate; None is only accepted with ``insecure``.
        site_public_keys: OpenSSH ECDSA public keys of allow-listed sites; non-empty turns on
            SuperNode authentication (needs TLS).
        startup_timeout_s: how long to wait for the SuperLink's port.
        federation: the protocol to run.
    """

    host: str = "127.0.0.1"
    port: int = 9093
    tls: TlsFiles | None = None
    site_public_keys: tuple[Path, ...] = ()
    startup_timeout_s: float = 60.0
    federation: FederationSettings = field(default_factory=FederationSettings)


@dataclass(frozen=True)
class ClientSettings:
    """One hospital's SuperNode.

    Attributes:
        site_id: the site's name (letters, digits, ``-`` and ``_``); it is sent with every reply.
        superlink: the coordinator's ``host:port``.
        work_dir: the site's private folder (Flower home, logs, cached QC autoencoder).
        root_certificates: the consortium CA (PEM); None only with ``insecure``.
        private_key: the site's OpenSSH ECDSA key, when the coordinator authenticates sites.
        node_config: flat scalars the site factory receives as ``node_config`` (data root,
            labelled, device, site config path, ...); ``site-id`` and ``work-dir`` are added.
        port: the SuperNode's local ClientApp API port (one per SuperNode on a machine).
        max_retries: reconnection attempts before giving up (None: Flower's default, forever).
        max_wait_s: give up reconnecting after this long (None: never).
    """

    site_id: str
    superlink: str = "127.0.0.1:9093"
    work_dir: Path = Path("fedqc-site")
    root_certificates: Path | None = None
    private_key: Path | None = None
    node_config: Mapping[str, Scalar] = field(default_factory=dict)
    port: int = 9094
    max_retries: int | None = None
    max_wait_s: float | None = None

    def __post_init__(self) -> None:
        if not self.site_id or not all(c.isalnum() or c in "-_" for c in self.site_id):
            raise ConfigError("site_id", f"{self.site_id!r}: use letters, digits, '-' and '_' only")

    def full_node_config(self) -> dict[str, Scalar]:
        """The node config the SuperNode starts with: ``node_config`` plus site-id and work-dir."""
        return {**self.node_config, "site-id": self.site_id,
                "work-dir": str(Path(self.work_dir).expanduser().resolve())}


def from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build a settings dataclass from a plain mapping, naming unknown keys.

    Args:
        cls: a dataclass from this module.
        data: its fields; nested dataclass fields as mappings, paths as strings.
        where: the key path for error messages.

    Raises:
        ConfigError: an unknown key or an invalid value.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown key; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kind = str(fields[name].type)
        if name == "federation" and isinstance(value, Mapping):
            value = from_mapping(FederationSettings, value, f"{where}.federation")
        elif name == "tls" and isinstance(value, Mapping):
            value = TlsFiles(**{k: Path(v) if v else None for k, v in value.items()})
        elif "tuple[Path" in kind:
            value = tuple(Path(v) for v in value)
        elif "Path" in kind and value is not None:
            value = Path(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(where, str(exc)) from None
