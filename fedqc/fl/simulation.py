"""The same ServerApp and ClientApp on Flower's simulation engine (Ray, kept on 127.0.0.1).

Flower gives virtual nodes only a partition id; the sites' node configs are written to
``RUN/simulation-sites.json`` and looked up by partition id (:func:`fedqc.fl.site_runner.node_config_of`).
Each concurrently running ClientApp gets ``cores // concurrent`` torch threads and as many Ray
CPUs, so clients never oversubscribe the machine.

Flower 1.42's public ``flwr.simulation.run_simulation`` accepts no run config; this module calls
the function behind it with the run's generated app folder (:mod:`fedqc.fl.appdir`), which is how
``flwr run`` feeds a simulation too. The pinned ``flwr==1.42.*`` keeps that call stable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedqc.fl import appdir, run_state
from fedqc.fl.settings import FederationSettings, Scalar

_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
              "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@dataclass(frozen=True)
class SimulationConfig:
    """A simulated federation.

    Attributes:
        sites: one node config per virtual site (``site-id`` required; a ``work-dir`` under
            ``RUN/sites/<site-id>`` is added when missing).
        federation: the protocol settings.
        cores: CPU cores to use (default: all).
        concurrent_clients: ClientApps running at once (default: min(sites, cores)).
        gpus_per_client: GPU share of each running ClientApp (e.g. 0.5: two per GPU; 0: CPU only).
    """

    sites: Sequence[Mapping[str, Scalar]]
    federation: FederationSettings = dataclasses.field(default_factory=FederationSettings)
    cores: int | None = None
    concurrent_clients: int | None = None
    gpus_per_client: float = 0.0


def _resources(config: SimulationConfig) -> tuple[int, int]:
    cores = config.cores or os.cpu_count() or 1
    concurrent = max(1, min(config.concurrent_clients or cores, len(config.sites), cores))
    return cores, max(1, cores // concurrent)


def prepare(config: SimulationConfig, run_dir: Path, resume: bool = False) -> dict[str, Scalar]:
    """Write settings, site configs and the app folder into ``run_dir``; returns the run config."""
    run_dir = run_state.private_dir(Path(run_dir).resolve())
    names = [str(site.get("site-id", "")) for site in config.sites]
    if not config.sites or "" in names or len(set(names)) != len(names):
        raise ValueError(f"simulation sites need unique, non-empty site-id values, got {names}")
    sites = [{**site, "work-dir": str(site.get("work-dir") or run_dir / "sites" / str(site["site-id"]))}
             for site in config.sites]
    sites_file = run_dir / "simulation-sites.json"
    run_state.write_json(sites_file, sites)
    _, threads = _resources(config)
    settings = dataclasses.replace(config.federation, torch_threads=config.federation.torch_threads or threads)
    settings.to_json(run_dir / "federation.json")
    run_config = appdir.run_config(settings, run_dir, resume=resume, simulation_sites=sites_file)
    appdir.write_app(run_dir, run_config)
    return run_config


def run_simulation(config: SimulationConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Run the whole protocol on Flower's simulation engine; returns the run directory.

    Args:
        config: sites and protocol settings.
        run_dir: where the run directory goes (created; ``RUN/summary.json`` on success).
        resume: continue an interrupted run in ``run_dir``.

    Raises:
        fedqc.fl.rounds.FederationError: the protocol could not go on (e.g. too few sites answered).
        RuntimeError: the simulation engine failed.
    """
    os.environ.update({k: v for k, v in _QUIET_ENV.items() if k not in os.environ})
    import warnings

    # Ray's "Tip: in future versions ... RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" tells the user nothing; setting
    # that variable would change which GPUs a num_gpus=0 actor sees, so only the message is dropped.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\._private\.worker")
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from fedqc.fl.client_app import app as client_app
    from fedqc.fl.server_app import app as server_app

    run_dir = Path(run_dir).resolve()
    run_config = prepare(config, run_dir, resume)
    cores, threads = _resources(config)
    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
    run.override_config, run.primary_task_id, run.federation_id = dict(run_config), 1, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    backend_config = {
        "client_resources": {"num_cpus": threads, "num_gpus": config.gpus_per_client},
        "init_args": {"num_cpus": cores, "_node_ip_address": "127.0.0.1", "include_dashboard": False,
                      "logging_level": "warning", "log_to_driver": True},
    }
    if not config.gpus_per_client:
        backend_config["init_args"]["num_gpus"] = 0  # else Ray counts the GPUs itself
    server_context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config))
    _run_simulation(num_supernodes=len(config.sites), exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app, backend_config=backend_config,
                    server_app_context=server_context, app_dir=str(run_dir / "app"), is_app=True, run=run)
    if not (run_dir / run_state.SUMMARY).is_file():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above")
    return run_dir


def summary(run_dir: Path) -> dict:
    """The ``summary.json`` of a finished run."""
    return json.loads((Path(run_dir) / run_state.SUMMARY).read_text())
