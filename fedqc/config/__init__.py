"""fedqc's configuration: typed, frozen dataclasses loaded from YAML and validated once.

A config describes the sites (hospitals) and how every stage of the method runs. Relative paths
are resolved against the config file's folder, so a config and its data can move together.
Every key has a default except ``sites``; see ``configs/*.yaml`` and ``docs/CONFIG.md``.

Sites are how one real M&Ms-2 download becomes several virtual hospitals: each names a data
root and an optional ``filter`` on the metadata CSV (``{VENDOR: Philips}``, ``{CENTRE: 3}``), and
whether its labels may be used for training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedqc.config.schema import build
from fedqc.core.errors import ConfigError
from fedqc.core.types import View

FilterValue = str | int | float | tuple[str | int | float, ...]


@dataclass(frozen=True)
class SimulatedData:
    """Generate the data with fedqc's simulator when ``root`` does not exist yet."""

    preset: Literal["consortium", "quickstart", "tiny"] = "consortium"
    subjects_per_centre: int | None = None
    seed: int = 0
    shift_strength: float | None = None


@dataclass(frozen=True)
class SiteConfig:
    """One hospital: where its data is, which cases are its own, and whether labels may train."""

    name: str
    root: Path
    filter: Mapping[str, FilterValue] = field(default_factory=dict)
    labelled: bool = False
    layout: Literal["auto", "mnms2", "flat", "folder"] = "auto"
    label_remap: Mapping[int, int] = field(default_factory=dict)
    # Subjects held out from adaptation for testing (fraction of this site's subjects).
    test_fraction: float = 0.0
    # Labelled sites: fraction of the non-test subjects whose labels are never read; they form the
    # site's own adaptation pool (a hospital that labelled only part of its archive).
    unlabelled_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"site name {self.name!r} must be non-empty without spaces or slashes")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"sites.{self.name}.test_fraction must be in [0, 1)")
        if not 0.0 <= self.unlabelled_fraction < 1.0:
            raise ValueError(f"sites.{self.name}.unlabelled_fraction must be in [0, 1)")


@dataclass(frozen=True)
class PreprocessConfig:
    spacing_mm: float = 1.25
    size_px: int = 128
    crop: Literal["centre", "heart"] = "centre"
    normalise: Literal["zscore", "percentile"] = "zscore"

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0:
            raise ValueError("preprocess.spacing_mm must be > 0")
        if self.size_px < 32 or self.size_px % 16:
            raise ValueError("preprocess.size_px must be a multiple of 16 and >= 32")


@dataclass(frozen=True)
class ModelConfig:
    """Segmenter: a preset, or any ``monai.networks.nets`` class by name with its arguments."""

    preset: Literal["unet", "unet-bn", "dynunet", "tiny"] = "unet"
    network: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    optimiser: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 1e-5
    m_best: int = 3
    val_fraction: float = 0.2
    augment: bool = True
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.m_best < 1:
            raise ValueError("train.epochs >= 0, train.batch_size >= 1 and train.m_best >= 1 are required")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("train.val_fraction must be in (0, 1)")


@dataclass(frozen=True)
class QCConfig:
    """QC autoencoder and pseudo-metrics (pDC / pHD) and the OoD fences."""

    ae_epochs: int = 40
    ae_batch_size: int = 32
    ae_lr: float = 2e-4
    ae_latent_channels: int = 100
    ae_dropout: float = 0.1
    # plain: the paper's R, trained to reproduce ground-truth masks; corrective: trained to repair
    # corrupted ones (fedqc.train.corrupt), a better pseudo-label on bad predictions (docs/QC.md).
    autoencoder: Literal["plain", "corrective"] = "corrective"
    # With a corrective R, also train it on the candidate segmenters' own predictions of labelled
    # training slices under an appearance shift (fedqc.train.autoencoder.segmenter_examples). Off:
    # measured worse for the full method on README's main command (docs/RESULTS.md).
    segmenter_examples: bool = False
    # With a corrective R, also move whole masks (a shift with a small rotation, an elastic warp) and
    # train R to put them back. R sees only the mask, so where a moved mask belongs is unknowable to
    # it: learning to undo the move blurs every reconstruction, good masks' too (docs/QC.md, measured).
    whole_mask_warps: bool = True
    # QC-based selection (fedqc.qc.selection): margin (M kept unless another candidate's pDC beats
    # it by more than selection_margin), guarded (the same, only while M passes the fences), or the
    # paper's. margin: measured best over 6 runs, 48 site-views (docs/QC.md, docs/RESULTS.md).
    selection: Literal["paper", "guarded", "margin"] = "margin"
    selection_margin: float = 0.05
    # Post-DAE as a last resort, per site: where the median pDC of the selection over a site's cases
    # is below this floor (the segmenter has failed there), R's reconstruction of each selection is
    # the output (Larrazabal et al.'s post-processing). 0: off (docs/QC.md).
    reconstruction_floor: float = 0.0
    # A third QC score beside pDC / pHD: tta scores each candidate's consistency under the flips and
    # contrast changes it was trained to ignore (pTC, fedqc.qc.consistency) and gives it a lower Tukey
    # fence from the same in-distribution reference; a candidate must pass all three. off: pDC / pHD
    # alone (the paper's). tta: measured over three federated seeds, shifted SA flag recall 0.44 -> 0.84
    # at precision 0.97, full - control +0.057 -> +0.077 (docs/QC.md, docs/RESULTS.md "pTC").
    consistency: Literal["off", "tta"] = "tta"
    classes: Literal["rv", "foreground"] = "rv"
    hausdorff: Literal["max", "p95"] = "max"
    tukey_factor: float = 1.5
    # consortium: fences from the labelled sites' validation cases (in-distribution behaviour; in the
    # federation pooled from per-site quartiles, docs/FEDERATION.md); unlabelled: each site's own pool
    # (the paper's). "labelled-val" is the old name of consortium.
    threshold_source: Literal["consortium", "unlabelled", "labelled-val"] = "consortium"

    def __post_init__(self) -> None:
        if not self.tukey_factor >= 0:
            raise ValueError("qc.tukey_factor must be >= 0 (1.5 in the paper)")
        if self.threshold_source == "labelled-val":
            object.__setattr__(self, "threshold_source", "consortium")
        if not self.selection_margin >= 0:
            raise ValueError("qc.selection_margin must be >= 0")
        if not 0 <= self.reconstruction_floor <= 1:
            raise ValueError("qc.reconstruction_floor must be in [0, 1] (a pDC; 0 turns it off)")


@dataclass(frozen=True)
class RefineConfig:
    k_semi: int = 10
    alpha: Literal["inverse", "linear"] = "inverse"
    rv_weight: float = 3.0
    lr: float = 2e-4
    batch_size: int = 16
    largest_component: bool = False
    # Eq. 2's pseudo-label only where R is confident (its largest class probability >= this); 0: all
    # pixels (the paper's, the default). 0.99 gained +0.020 at the shifted sites with README's R but
    # silently kept no pixel of a weaker R (docs/RESULTS.md, "What R's output teaches").
    pseudo_label_confidence: float = 0.0
    # How alpha reaches a step with no supervised term (an unlabelled site's federated round): "lr"
    # scales Adam's learning rate by alpha, so the step shrinks as alpha decays; "loss" scales the loss
    # alone, which Adam normalises away (the step is the same at every alpha: the behaviour before).
    # Steps with a supervised term keep alpha in the loss, as Eq. 2 (docs/FEDERATION.md).
    semi_only_alpha: Literal["lr", "loss"] = "lr"
    # Eq. 2 epochs per refinement round k, on every path: centralised, epochs of the loop per k (null:
    # 1, the paper's); federated, each site's local epochs in a refine round and in the control's
    # (null: federation.local_epochs). Measured: 1 is worse federated (docs/RESULTS.md, "A fresh install").
    local_epochs: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.pseudo_label_confidence < 1.0:
            raise ValueError("refine.pseudo_label_confidence must be in [0, 1)")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise ValueError("refine.local_epochs must be >= 1 (or null)")


@dataclass(frozen=True)
class FederationConfig:
    strategy: Literal["fedavg", "fedprox", "fedbn"] = "fedavg"
    proximal_mu: float = 0.01
    supervised_rounds: int = 5
    ae_rounds: int = 3
    local_epochs: int = 2
    min_sites: int = 1
    # Sites that must be connected before the first round (0: min_sites): start whole, tolerate dropouts.
    start_sites: int = 0
    timeout_s: float = 600.0
    half_precision_transfer: bool = False
    refine_aggregation: Literal["slices", "eq2", "sequential"] = "sequential"
    # A server learning rate on each refine round's aggregated semi-supervised step (1: the mean step).
    refine_server_lr: float = 1.0
    # Poisoned or broken updates (docs/FEDERATION.md): robust aggregation and the norm-outlier rule.
    aggregation: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: float = 0.2
    norm_factor: float = 10.0
    # The compute-matched control M+sup (refinement's supervised share alone, as many rounds) for the
    # report; `fedqc simulate` always runs it, a deployment only when asked.
    control: bool = False

    def __post_init__(self) -> None:
        if self.start_sites != 0 and self.start_sites < self.min_sites:
            raise ConfigError("start_sites", f"got {self.start_sites!r}; must be 0 (= min_sites) or at least "
                              f"min_sites ({self.min_sites}): the first round cannot start with fewer sites "
                              "than every round needs")
        if not 0.0 < self.refine_server_lr < float("inf"):
            raise ConfigError("refine_server_lr", f"got {self.refine_server_lr!r}; must be a positive number "
                              "(1: the sites' mean step; 2 with two flagging sites: the sum of their steps)")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError("trim_fraction", f"got {self.trim_fraction!r}; must be in [0, 0.5)")
        if not (self.norm_factor == 0 or 1.0 <= self.norm_factor < float("inf")):
            raise ConfigError("norm_factor", f"got {self.norm_factor!r}; must be 0 (off) or a number >= 1 "
                              "(a site is rejected above norm_factor x the median update norm)")


@dataclass(frozen=True)
class AdaptConfig:
    """Label-free test-time adaptation peers (fedqc.adapt), each adapted at a site on its own pool."""

    # Which peers the ablation runs beside fedqc's variants (none by default: today's tables).
    peers: tuple[Literal["adabn", "tent", "post-dae", "dae-tta"], ...] = ()
    epochs: int = 5  # passes over the pool (TENT, DAE-TTA)
    lr: float = 1e-3
    batch_size: int = 16

    def __post_init__(self) -> None:
        repeated = sorted({p for p in self.peers if self.peers.count(p) > 1})
        if repeated:
            raise ConfigError("peers", f"each peer once; repeated: {repeated}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs", "adapt.epochs and adapt.batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError("lr", f"got {self.lr!r}; must be > 0")


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD at the labelled sites (Opacus), the privacy unit being one patient (docs/PRIVACY.md).

    Each site accounts its own budget (Opacus's RDP accountant) over every DP-SGD step of the run:
    the supervised segmenters of every view and the QC autoencoder. ``noise_multiplier`` unset:
    calibrated so that the site's planned steps spend exactly ``epsilon``; set: used as is, and the
    site stops contributing once the next round would overspend ``epsilon``.
    ``delta`` unset: 1 / the site's number of training slices (below 1 / its patients, as a patient-level
    delta must be).
    """

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    # Eq. 2 under DP (docs/PRIVACY.md): "unlabelled-only" (labelled sites, whose patients DP covers,
    # send no refinement update; unlabelled sites refine as usual, their images not covered),
    # "skip" (no site refines) or "unprotected" (every site refines without DP: no guarantee for
    # the patients it touches; for measurement only).
    refinement: Literal["unlabelled-only", "skip", "unprotected"] = "unlabelled-only"

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon < float("inf"):
            raise ConfigError("epsilon", f"got {self.epsilon!r}; must be a positive finite number")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ConfigError("delta", f"got {self.delta!r}; must be in (0, 1) (typically below 1 / patients)")
        if not 0.0 < self.max_grad_norm < float("inf"):
            raise ConfigError("max_grad_norm", f"got {self.max_grad_norm!r}; must be a positive number "
                              "(the per-patient gradient clip)")
        if self.noise_multiplier is not None and not 0.0 <= self.noise_multiplier < float("inf"):
            raise ConfigError("noise_multiplier", f"got {self.noise_multiplier!r}; must be >= 0 (0: clipping only, "
                              "no guarantee) or unset (calibrated to epsilon)")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy at the sites and secure aggregation at the coordinator (docs/PRIVACY.md)."""

    dp: DPConfig | None = None
    # Pairwise-masked sums (fedqc.fl.secagg): the coordinator sees only masked updates whose sum is
    # the true weighted sum. Needs federation.aggregation mean and refine_aggregation slices.
    secure_aggregation: bool = False


@dataclass(frozen=True)
class Config:
    """A whole fedqc run. ``source`` is the YAML file it came from (for relative paths)."""

    sites: tuple[SiteConfig, ...]
    views: tuple[View, ...] = ("SA", "LA")
    simulated: SimulatedData | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("at least one site is required under 'sites'")
        names = [s.name for s in self.sites]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"site names must be unique; repeated: {duplicated}")
        if not self.views or len(set(self.views)) != len(self.views):
            raise ValueError("views must list SA and/or LA once each")
        self._check_privacy()

    def _check_privacy(self) -> None:
        """Combinations privacy refuses, each naming the key to change."""
        refused = {"dynunet": "Opacus's per-sample gradients fail on MONAI's DynUNet",
                   "unet-bn": "its batch norm mixes patients within a batch"}
        if self.privacy.dp is not None and self.model.network is None and self.model.preset in refused:
            raise ConfigError("model.preset", f"'{self.model.preset}' cannot train under privacy.dp: "
                              f"{refused[self.model.preset]}; use 'unet' or 'tiny' (MONAI UNet with instance "
                              "norm: supported), docs/PRIVACY.md", self.source)
        if self.privacy.secure_aggregation:
            fed = self.federation
            if fed.aggregation != "mean":
                raise ConfigError("federation.aggregation", f"'{fed.aggregation}' needs every site's update, "
                                  "which privacy.secure_aggregation hides from the coordinator; use 'mean' "
                                  "or turn secure aggregation off", self.source)
            if fed.refine_aggregation != "slices":
                raise ConfigError("federation.refine_aggregation", f"'{fed.refine_aggregation}' weighs each site "
                                  "by counts known only after the round; under privacy.secure_aggregation use "
                                  "'slices' (the sum a masked round yields)", self.source)

    @property
    def labelled_sites(self) -> tuple[SiteConfig, ...]:
        return tuple(s for s in self.sites if s.labelled)

    def site(self, name: str) -> SiteConfig:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError("sites", f"no site named {name!r}; sites: {[s.name for s in self.sites]}", self.source)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, check_paths: bool = True) -> Config:
    """Read and validate a YAML config file.

    Args:
        path: the YAML file.
        overrides: dotted-key overrides applied before validation, e.g. ``{"train.epochs": 1}``.
        check_paths: check that every site's data root exists (unless the data is simulated).

    Raises:
        ConfigError: naming the file and key for a missing file, bad YAML or any invalid value.
    """
    data, path = read_yaml(path)
    data.pop("source", None)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    config = build(Config, data, "", path)
    if check_paths:
        check_site_roots(config, path)
    return dataclasses.replace(config, source=path)


def check_site_roots(config: Config, source: Path | None) -> None:
    """A site root must exist, unless the config asks for simulated data (made on first use)."""
    if config.simulated is not None:
        return
    for i, site in enumerate(config.sites):
        if not site.root.is_dir():
            raise ConfigError(f"sites[{i}].root", f"data folder not found: {site.root} (site {site.name!r})", source)


def read_yaml(path: str | Path) -> tuple[dict, Path]:
    """A YAML file's top-level mapping and its resolved path; ConfigError naming the file otherwise."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError("<file>", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"not valid YAML: {exc}", path) from None
    if not isinstance(data, dict):
        raise ConfigError("<root>", "the file must hold a mapping of keys", path)
    return data, path


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Validate an in-memory mapping (as in a YAML file living in ``base_dir``)."""
    source = None if base_dir is None else Path(base_dir).resolve() / "<memory>.yaml"
    config = build(Config, dict(data), "", source)
    return dataclasses.replace(config, source=source)


def to_dict(config: Config) -> dict[str, Any]:
    """A plain, YAML-serialisable mapping of ``config`` (paths as strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "source"}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, "cannot override inside a non-mapping value")
    node[parts[-1]] = value
