"""DP-SGD with Opacus, one patient being the privacy unit, and a site's privacy budget across a run.

:class:`PrivateTraining` is the option :func:`fedqc.train.supervised.train_epochs` and
:func:`fedqc.train.autoencoder.autoencoder_epochs` take (``privacy=``): the same loops, with

* batches drawn by Poisson sampling of patients (each patient joins a step with probability
  ``q = batch_size / slices``, all its slices with it), the sampling Opacus's accountant assumes;
* per-sample gradients from Opacus's :class:`~opacus.GradSampleModule`, summed per patient (a
  patient is one "sample" of DP-SGD: its slices together are clipped to ``max_grad_norm``);
* clipping, Gaussian noise and the step by Opacus's :class:`~opacus.optimizers.DPOptimizer`, each
  step recorded by Opacus's RDP accountant;
* losses that are sums of per-slice terms (the generalised Dice per slice instead of pooled over
  the batch): a pooled loss makes one patient's gradient depend on the others in the batch, which
  the clipping bound does not cover.

:class:`PrivacyBudget` is a site's ledger: the accountant's history persisted as JSON (a federated
site runs each message in a fresh process), the noise multiplier calibrated once to the planned
steps of the whole run, and the check that the next round still fits the budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedqc.core.errors import ConfigError
from fedqc.core.io import atomic_write

ACCOUNTANT = "rdp"
PRIVACY_UNIT = "patient"


def check_dp_model(model: torch.nn.Module, key: str, in_size_px: int, in_channels: int = 1) -> None:
    """Refuse a network Opacus cannot train privately, naming the config key.

    Opacus's :class:`~opacus.validators.ModuleValidator` lists the layers it refuses (batch norm
    mixes patients within a batch); a trial per-sample backward on two tiny inputs catches the rest
    (MONAI's DynUNet passes the validator but its per-sample gradients fail).

    Raises:
        ConfigError: naming ``key`` and the first problems found.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:3])
        raise ConfigError(key, f"{type(model).__name__} cannot train under privacy.dp: {listed} "
                          "(batch norm mixes patients in a batch; use instance or group norm)")
    trial = GradSampleModule(model, loss_reduction="sum")
    try:
        x = torch.randn(2, in_channels, in_size_px, in_size_px, device=next(model.parameters()).device)
        out = trial(x)
        (out.float() if isinstance(out, torch.Tensor) else out[0].float()).sum().backward()
    except RuntimeError as exc:
        raise ConfigError(key, f"{type(model).__name__} cannot train under privacy.dp: Opacus's per-sample "
                          f"gradients fail ({str(exc)[:160]})") from None
    finally:
        trial._close()
        model.zero_grad(set_to_none=True)


def unit_index(unit_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Per slice, the 0-based index of its privacy unit (a patient), in order of first appearance."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(str(u), len(seen)) for u in unit_ids], dtype=np.int64)


@dataclass
class PrivateTraining:
    """DP-SGD settings of one training call, sharing the site's accountant.

    Attributes:
        noise_multiplier: sigma (noise std = sigma x max_grad_norm).
        max_grad_norm: per-patient clip.
        units: (N,) patient index of each slice.
        batch_size: expected slices per step (sets q = batch_size / N).
        accountant: Opacus's accountant every step is recorded in.
        noise_seed: seeds the noise generator (None: Opacus's default generator).
    """

    noise_multiplier: float
    max_grad_norm: float
    units: np.ndarray
    batch_size: int
    accountant: object
    noise_seed: int | None = None
    _units_t: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_units(self) -> int:
        return int(self.units.max()) + 1 if len(self.units) else 0

    @property
    def sample_rate(self) -> float:
        """q: the probability that a patient joins a step."""
        return min(1.0, self.batch_size / max(len(self.units), 1))

    @property
    def expected_units(self) -> float:
        """Patients per step on average (Opacus's ``expected_batch_size``)."""
        return self.sample_rate * self.num_units

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(1.0 / self.sample_rate)) if len(self.units) else 0

    def wrap(self, model: torch.nn.Module, optimiser: torch.optim.Optimizer):
        """Opacus's per-sample gradient module and DP optimiser around ``model`` / ``optimiser``.

        The module wraps ``model`` itself (its weights are trained in place). Call
        :meth:`unwrap` afterwards to remove Opacus's hooks.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        device = next(model.parameters()).device
        self._units_t = torch.as_tensor(self.units, device=device)
        gsm = GradSampleModule(model, loss_reduction="mean")
        generator = None
        if self.noise_seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.noise_seed)
        dp_optimiser = DPOptimizer(optimiser, noise_multiplier=self.noise_multiplier,
                                   max_grad_norm=self.max_grad_norm,
                                   expected_batch_size=max(1, round(self.expected_units)),
                                   loss_reduction="mean", generator=generator)
        dp_optimiser.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return gsm, dp_optimiser

    @staticmethod
    def unwrap(gsm: torch.nn.Module) -> None:
        gsm._close()

    def row_units(self, rows: int) -> torch.Tensor:
        """The patient of each of ``rows`` training rows: the slices, repeated when the rows are the
        slices followed by one derived example per slice (the QC autoencoder's segmenter examples)."""
        units = self._units_t if self._units_t is not None else torch.as_tensor(self.units)
        if rows % max(len(units), 1):
            raise ValueError(f"{rows} rows are not a whole number of copies of the {len(units)} slices")
        return units.repeat(rows // max(len(units), 1))

    def batches(self, generator: torch.Generator, row_units: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """One epoch's steps: the row indices of the patients each step's Poisson draw took."""
        device = generator.device
        units = row_units if row_units is not None else self.row_units(len(self.units))
        units = units.to(device)
        for _ in range(self.steps_per_epoch):
            chosen = torch.rand(self.num_units, generator=generator, device=device) < self.sample_rate
            yield torch.nonzero(chosen[units], as_tuple=False).flatten()

    def per_unit_gradients(self, gsm: torch.nn.Module, idx: torch.Tensor,
                           row_units: torch.Tensor | None = None) -> None:
        """Replace each parameter's per-row gradients by per-patient sums (rows: the step's patients).

        An empty step (no patient drawn) gets zero rows: Opacus then adds the noise alone.
        """
        all_units = row_units if row_units is not None else self.row_units(len(self.units))
        units = all_units.to(idx.device)[idx] if len(idx) else idx
        _, local = torch.unique(units, return_inverse=True) if len(idx) else (None, idx)
        rows = int(local.max()) + 1 if len(idx) else 0
        for p in gsm.parameters():
            if not p.requires_grad:
                continue
            sample = getattr(p, "grad_sample", None)
            if sample is None or len(idx) == 0:  # no patient drawn, or a parameter this step did not use
                p.grad_sample = torch.zeros((rows, *p.shape), device=p.device, dtype=p.dtype)
                continue
            grouped = torch.zeros((rows, *p.shape), device=p.device, dtype=sample.dtype)
            # Opacus scaled the rows by the batch size (loss_reduction "mean"); summing a patient's
            # rows gives the gradient of the sum of its slices' losses.
            grouped.index_add_(0, local, sample)
            p.grad_sample = grouped


# -- a site's budget -------------------------------------------------------------------------------


def new_accountant():
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of DP-SGD phases ``(noise_multiplier, sample_rate, steps)`` (Opacus RDP)."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, steps in history if steps > 0):
        return math.inf
    accountant = new_accountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def calibrate_phases(epsilon: float, delta: float, plan: Sequence[tuple[str, float, int]],
                     tolerance: float = 0.005) -> dict[str, float]:
    """A noise multiplier per phase whose composition (Opacus's RDP accountant) spends ``epsilon``.

    Each phase first gets the sigma at which it alone spends ``(epsilon / K, delta / K)`` (K phases:
    by basic composition they would spend at most ``(epsilon, delta)`` together); RDP composes far
    tighter, so all of them are then scaled by one factor until the composition spends ``epsilon``.
    One sigma for every phase would let the phase with the highest sample rate (the LA view: few
    slices, many passes) set the noise of all: split this way, the SA segmenter trains at far less.
    """
    phases = [(name, q, n) for name, q, n in plan if n > 0]
    if not phases:
        return {}
    k = len(phases)
    base = {name: calibrate_noise(epsilon / k, delta / k, [(q, n)]) for name, q, n in phases}

    def eps(scale: float) -> float:
        return epsilon_of([(scale * base[name], q, n) for name, q, n in phases], delta)

    low, high = 0.0, 1.0
    while high - low > 1e-4 and epsilon - eps(high) > tolerance:
        mid = (low + high) / 2
        if eps(mid) > epsilon:
            low = mid
        else:
            high = mid
    return {name: high * sigma for name, sigma in base.items()}


def calibrate_noise(epsilon: float, delta: float, plan: Sequence[tuple[float, int]],
                    tolerance: float = 0.005) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose planned steps spend <= epsilon.

    Args:
        plan: ``(sample_rate, steps)`` of every DP-SGD phase the run will take.

    Raises:
        ConfigError: the plan cannot fit epsilon (no steps never happens; huge sigma always fits).
    """
    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, q, n) for q, n in plan], delta)

    low, high = 0.0, 10.0
    while eps(high) > epsilon:
        low, high = high, 2 * high
        if high > 1e5:
            raise ConfigError("privacy.dp.epsilon", f"{epsilon} cannot be reached for this plan")
    while True:
        mid = (low + high) / 2
        if eps(mid) > epsilon:
            low = mid
        else:
            high = mid
        if high - low < 1e-4 or epsilon - eps(high) < tolerance:
            return high


@dataclass
class PrivacyBudget:
    """A site's DP budget over one run: the accountant's history, persisted after every round.

    Attributes:
        epsilon: the budget.
        delta: the target delta.
        noise_multiplier: sigma of a phase without its own (the config's, when it gives one).
        max_grad_norm: per-patient clip.
        history: ``(sigma, q, steps)`` entries, Opacus's accountant history.
        path: the JSON file it lives in (None: memory only, e.g. ``fedqc train``).
        planned: ``(phase, q, steps)`` of every DP-SGD phase the run plans.
        phase_noise: phase -> sigma (:func:`calibrate_phases`; empty when the config fixes sigma).
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    history: list = field(default_factory=list)
    path: Path | None = None
    planned: list = field(default_factory=list)
    run_key: str = ""
    phase_noise: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | None, *, epsilon: float, delta: float, max_grad_norm: float,
             noise_multiplier: float | None, plan: Sequence[tuple[str, float, int]],
             run_key: str = "") -> PrivacyBudget:
        """The ledger at ``path`` if it belongs to this run (``run_key``), else a fresh one for ``plan``
        (``(phase, q, steps)``): sigma per phase calibrated (:func:`calibrate_phases`) unless the config
        fixes ``noise_multiplier``."""
        if path is not None and Path(path).is_file():
            data = json.loads(Path(path).read_text())
            if data.get("run_key") == run_key:
                return cls(data["epsilon"], data["delta"], data["noise_multiplier"], data["max_grad_norm"],
                           [tuple(h) for h in data["history"]], Path(path), [tuple(p) for p in data["planned"]],
                           run_key, dict(data.get("phase_noise") or {}))
        phase_noise = {} if noise_multiplier is not None else calibrate_phases(epsilon, delta, plan)
        sigma = noise_multiplier if noise_multiplier is not None else max(phase_noise.values(), default=1.0)
        budget = cls(epsilon, delta, float(sigma), max_grad_norm, [], None if path is None else Path(path),
                     [tuple(p) for p in plan], run_key, phase_noise)
        budget.save()
        return budget

    def noise_of(self, phase: str) -> float:
        return float(self.phase_noise.get(phase, self.noise_multiplier))

    def spent(self) -> float:
        return epsilon_of(self.history, self.delta)

    def would_spend(self, steps: Sequence[tuple[str, float, int]]) -> float:
        """Epsilon after the steps ``(phase, q, steps)`` on top of what is spent."""
        return epsilon_of([*self.history, *((self.noise_of(p), q, n) for p, q, n in steps)], self.delta)

    @property
    def clipping_only(self) -> bool:
        """``noise_multiplier: 0`` was asked for: per-patient clipping without noise, no guarantee
        (epsilon is infinite). For measurement only: such a site never stops for its budget."""
        return self.noise_multiplier == 0 and not self.phase_noise

    def fits(self, steps: Sequence[tuple[str, float, int]]) -> bool:
        if self.clipping_only:
            return True
        return self.would_spend(steps) <= self.epsilon * (1 + 1e-9)

    def training(self, units: np.ndarray, batch_size: int, seed: int | None = None,
                 phase: str = "") -> PrivateTraining:
        """The DP-SGD option of one training call of ``phase``, recording into this ledger."""
        accountant = new_accountant()
        return PrivateTraining(self.noise_of(phase), self.max_grad_norm, units, batch_size, accountant, seed)

    def record(self, private: PrivateTraining) -> None:
        """Add the steps ``private`` took to the ledger (Opacus's accountant history) and save."""
        self.history.extend(tuple(h) for h in private.accountant.history)
        self.history = _merged(self.history)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        data = {"run_key": self.run_key, "accountant": ACCOUNTANT, "unit": PRIVACY_UNIT,
                "epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "history": [list(h) for h in self.history],
                "planned": [list(p) for p in self.planned], "phase_noise": self.phase_noise,
                "spent": self.spent()}
        atomic_write(self.path, json.dumps(data, indent=2) + "\n")


def _merged(history: Sequence[tuple]) -> list[tuple]:
    """Entries of one (sigma, q) merged (RDP composes by adding: the order of phases does not matter)."""
    out: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        out[(sigma, q)] = out.get((sigma, q), 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in out.items()]
