"""The fedqc ServerApp: reads its settings from the run config and runs the protocol.

Run config (see :mod:`fedqc.fl.appdir`): ``run-dir``, ``settings`` (``RUN/federation.json``) and
``resume``. Everything else is :func:`fedqc.fl.protocol.run_federation`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedqc.fl import appdir
from fedqc.fl.protocol import run_federation
from fedqc.fl.settings import FederationSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the whole multi-phase protocol of this run."""
    config = context.run_config
    settings = FederationSettings.from_json(str(config[appdir.SETTINGS]))
    run_federation(grid, settings, Path(str(config[appdir.RUN_DIR])), resume=bool(config.get(appdir.RESUME, False)))
