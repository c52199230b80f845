"""The real method federated: `fedqc simulate` (simulation engine) and `fedqc-server` / `fedqc-client`
(real SuperLink and SuperNodes on loopback), on tiny simulated hospitals, one or two rounds per phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedqc.cli.main import main
from fedqc.config import config_from_dict
from fedqc.fl import processes, run_state
from fedqc.models.factory import new_autoencoder, new_segmenter
from fedqc.site.contract import candidate_prefix
from tests.conftest import tiny_config_dict
from tests.fl.test_privacy import audit_problems

pytestmark = pytest.mark.slow

FEDERATION = {"supervised_rounds": 2, "ae_rounds": 1, "local_epochs": 1, "min_sites": 2, "timeout_s": 300}


def method_config(tiny_data: Path) -> dict:
    # Fences at the quartiles so that refinement surely has flagged cases.
    return tiny_config_dict(tiny_data, views=["SA"], federation=FEDERATION,
                            qc={"tukey_factor": 0.0}, refine={"k_semi": 2})


def parameter_shapes(data: dict, m_best: int) -> dict[str, list[int]]:
    config = config_from_dict(data)
    seg = {f"seg/SA/{k}": list(v.shape) for k, v in new_segmenter(config).state_dict().items()}
    shapes = {**seg, **{f"ae/SA/{k}": list(v.shape) for k, v in new_autoencoder(config).state_dict().items()}}
    for i in range(m_best):
        shapes.update({candidate_prefix(i) + k: v for k, v in seg.items()})
    return shapes


def test_simulated_federation_every_phase_report_and_privacy(tiny_data, tmp_path):
    data = method_config(tiny_data)
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    assert main(["simulate", "--config", str(config), "--out", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "centre2" in report and "full" in report and "{M}+QC" in report
    # The QC signal carries the calibration under M, computed from the same test cases it lists.
    assert "Spearman pDC-Dice" in report and "AUROC pDC" in report
    scored = json.loads((run / "report.json").read_text())
    for signal in scored["qc_signal"]:
        cases = [c for c in scored["cases"] if (c["site"], c["view"], c["variant"]) ==
                 (signal["site"], signal["view"], "M")]
        assert signal["calibration"]["n"] == len(cases) == signal["flags"]["n"]
    assert {p.name for p in (run / "plots").glob("*.png")} == {"global_val_dice.png", "flagged_per_site.png",
                                                               "alpha.png"}
    phases = [row["phase"] for row in json.loads((run / "log.json").read_text())]
    assert {"supervised", "qc-autoencoder", "refine", "predict"} <= set(phases)
    # Refinement changed the global model: the refined candidate 0 differs from the supervised one.
    state = run_state.read_json(run / run_state.STATE)
    final = run_state.load_arrays(run / state["weights"])
    supervised = run_state.load_arrays(run_state.supervised_checkpoint(run, state["candidates"][0]))
    assert any(not np.array_equal(final[candidate_prefix(0) + k], v) for k, v in supervised.items())
    # Every message each site sent: model-shaped weights and allowed scalar metrics, nothing else.
    shapes = parameter_shapes(data, m_best=2)
    audits = sorted((run / "audit").glob("*.jsonl"))
    assert [a.stem for a in audits] == ["centre1", "centre2"]
    for audit in audits:
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        assert len(entries) >= 6
        problems = [p for e in entries for p in audit_problems(e, audit.stem, shapes)]
        assert problems == []
    # Predictions and the QC report stay at the site.
    assert len(list((run / "sites" / "centre2" / "predictions").glob("*_pred.nii.gz"))) == 16
    assert (run / "sites" / "centre2" / "predictions" / "qc.csv").is_file()
    # The finished run scored again with another selection, without federating: the earlier
    # report is kept beside the new one; a folder that is not a finished run is refused.
    log_before = (run / "log.json").read_text()
    assert main(["simulate", "--config", str(config), "--out", str(run), "--report-only",
                 "--set", "qc.selection=paper"]) == 0
    assert (run / "report.previous.md").read_text() == report
    assert "{M}+QC" in (run / "report.md").read_text()
    assert (run / "log.json").read_text() == log_before  # no round ran
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "nothing"), "--report-only"]) == 2
    assert not (tmp_path / "nothing" / "report.md").exists()


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    """The installed console script (``fedqc-server`` / ``fedqc-client``) beside this Python."""
    script = Path(sys.executable).parent / f"fedqc-{args[0]}"
    return subprocess.Popen([str(script), *args[1:]], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_server_and_clients_on_loopback(tiny_data, tmp_path):
    data = method_config(tiny_data)
    data["federation"]["supervised_rounds"] = 1
    data["refine"]["k_semi"] = 1
    method = tmp_path / "method.yaml"
    method.write_text(yaml.safe_dump(data))
    port = processes.free_port()
    server_yaml = tmp_path / "server.yaml"
    server_yaml.write_text(yaml.safe_dump({"method": str(method), "run_dir": str(tmp_path / "run"),
                                           "host": "127.0.0.1", "port": port}))
    started = []
    ports = [port]
    server = _spawn(["server", "--config", str(server_yaml), "--insecure"], tmp_path / "server.log")
    started.append(server)
    try:
        processes.wait_for_port("127.0.0.1", port, 60, server)
        for site in data["sites"]:
            site_port = processes.free_port()
            ports.append(site_port)
            site_yaml = tmp_path / f"{site['name']}.yaml"
            site_yaml.write_text(yaml.safe_dump({
                "site": site, "superlink": f"127.0.0.1:{port}", "work_dir": str(tmp_path / site["name"]),
                "port": site_port, "max_retries": 3, "max_wait_s": 60}))
            started.append(_spawn(["client", "--config", str(site_yaml), "--insecure"], tmp_path / f"{site['name']}.log"))
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                processes.stop_tree(proc)
    assert "INSECURE" in (tmp_path / "server.log").read_text().upper()
    assert len(list((tmp_path / "centre2" / "predictions").glob("*_pred.nii.gz"))) == 16
    assert (tmp_path / "run" / "summary.json").is_file()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(processes.alive(p.pid) for p in started):
        time.sleep(0.2)
    assert [p.pid for p in started if processes.alive(p.pid)] == []
    assert [p for p in ports if not processes.port_is_free("127.0.0.1", p)] == []
