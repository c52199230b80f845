"""The operators' commands without a federation (issue 15): config errors, the run-folder lock, the old
``--resume RUN_DIR`` form, the certificate kit's refusal to replace a CA, internal errors kept off the
terminal, and what the terminal shows of Flower's output. Fast: no Flower daemon starts here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedqc.fl import certs
from fedqc.fl.launch import RunLock, TerminalFilter, outcome_line


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING: --insecure")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_out_of_range_ports_are_config_errors_naming_the_key_and_the_file(tmp_path, capsys, write_config):
    from fedqc.cli.main import client_main, server_main
    from tests.conftest import tiny_config_dict

    method = write_config(tiny_config_dict(tmp_path))
    server = tmp_path / "server.yaml"
    server.write_text(yaml.safe_dump({"method": str(method), "run_dir": str(tmp_path / "run"), "port": 99999}))
    assert server_main(["--config", str(server), "--insecure"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(server) in line and "config key 'port': 99999 is not a TCP port" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written

    for keys, named in (({"port": 0}, "config key 'port'"), ({"superlink": "https://host:9093"}, "config key 'superlink'"),
                        ({"superlink": "host:70000"}, "config key 'superlink'")):
        site = tmp_path / "site.yaml"
        site.write_text(yaml.safe_dump({"site": {"name": "a", "root": str(tmp_path)}, **keys}))
        assert client_main(["--config", str(site), "--insecure"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(site) in line and named in line


def test_the_old_resume_form_names_the_new_one(capsys):
    from fedqc.cli.main import server_main

    for argv in (["--config", "s.yaml", "--resume", "runs/x"], ["--config", "s.yaml", "--resume=runs/x"]):
        assert server_main(argv) == 2
        line = _one_line(capsys.readouterr().err)
        assert "--resume takes no folder" in line and "--run-dir runs/x --resume" in line


def test_resume_without_a_saved_round_is_refused_in_one_line(tmp_path, capsys, write_config):
    from fedqc.cli.main import server_main
    from tests.conftest import tiny_config_dict

    method = write_config(tiny_config_dict(tmp_path))
    server = tmp_path / "server.yaml"
    server.write_text(yaml.safe_dump({"method": str(method), "run_dir": str(tmp_path / "run"), "port": 9}))
    assert server_main(["--config", str(server), "--insecure", "--resume"]) == 2
    assert "nothing to resume (no state.json)" in _one_line(capsys.readouterr().err)


def test_a_locked_run_folder_is_refused_by_another_process_naming_the_holder(tmp_path):
    import os

    run = tmp_path / "run"
    script = ("import sys; from fedqc.fl.launch import RunLock\n"
              "try:\n    RunLock(sys.argv[1]).__enter__()\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    with RunLock(run), RunLock(run):  # re-entrant in the holder
        other = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, check=False, timeout=60)
        assert other.returncode == 3
        assert f"{run.resolve()} is in use by another fedqc-server (PID {os.getpid()}" in other.stdout
    again = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, check=False, timeout=60)
    assert again.returncode == 0, again.stdout  # released with the holder


def test_the_certificate_kit_refuses_to_replace_a_ca_unless_forced(tmp_path, capsys):
    out = tmp_path / "certs"
    assert certs.main([str(out), "--host", "coordinator.example.org", "--site", "centre1"]) == 0
    printed = capsys.readouterr().out
    assert "ca.key" in printed and "never copy it to a site" in printed
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"ca.crt", "ca.key", "server.crt", "server.key", "keys/centre1", "keys/centre1.pub"}
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert certs.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert "ca.crt" in err and "--force" in err and "nothing was written" in err
    assert {p: p.read_bytes() for p in before} == before
    assert certs.main([str(out), "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != before[out / "ca.crt"]


def test_an_internal_error_goes_to_a_log_file_not_the_terminal(tmp_path, capsys, monkeypatch):
    from fedqc.cli import federation
    from fedqc.cli.main import server_main

    def broken(*args, **kwargs):
        raise OverflowError("int too large to convert")

    monkeypatch.setattr(federation, "server_command", broken)
    server = tmp_path / "server.yaml"
    server.write_text(yaml.safe_dump({"method": "m.yaml", "run_dir": str(tmp_path / "run")}))
    assert server_main(["--config", str(server)]) == 1
    line = _one_line(capsys.readouterr().err)
    log = tmp_path / "run" / "logs" / "fedqc-server-error.log"
    assert f"internal error: OverflowError: int too large to convert; traceback in {log}" in line
    assert "Traceback (most recent call last)" in log.read_text() and "def broken" not in line


FLOWER_FAILURE = """\
INFO :      waiting for sites: 0 connected, 1 required
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/x/flwr/server/run_serverapp.py", line 60, in run
    server_app(grid=grid, context=context)
           ^^^^^^^^^^^^^^^
fedqc.fl.rounds.FederationError: only 0 of the 1 required sites connected within 3 s
  a second line of the message

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/y.py", line 1, in z
KeyError: 'k'
\x1b[91mERROR \x1b[0m:     Exit Code: 201

An unhandled exception occurred in the ServerApp.

For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/201.html>
INFO :      next line
"""


def test_the_terminal_gets_flowers_progress_but_no_traceback():
    shown = TerminalFilter()
    kept = [line for line in FLOWER_FAILURE.splitlines(keepends=True) if shown(line)]
    assert kept == ["INFO :      waiting for sites: 0 connected, 1 required\n", "INFO :      next line\n"]


def test_the_final_line_says_what_happened(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "completed", "seconds": 41.6, "exchanges": 7}')
    done = outcome_line({"status": "finished:completed", "status-details": "N/A"}, run)
    assert done.startswith("federation completed: 7 exchanges in 42 s") and "N/A" not in done
    failed = outcome_line({"status": "finished:failed", "status-details": "ServerApp failed with exception: "
                           "only 0 of the 2 required sites connected within 60 s (connected: [])"}, run, "s.yaml")
    assert failed.startswith("federation failed: only 0 of the 2 required sites connected within 60 s")
    assert "What to do: start the missing sites' fedqc-client" in failed
    assert f"fedqc-server --config s.yaml --run-dir {run} (no round was saved" in failed
    (run / "state.json").write_text("{}")
    assert f"--run-dir {run} --resume" in outcome_line({"status": "finished:failed"}, run, "s.yaml")


@pytest.mark.parametrize("doc", ["server/README.md", "server/server.example.yaml", "client/README.md",
                                 "client/site.example.yaml"])
def test_the_kits_name_the_files_the_tool_writes(doc):
    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    assert ".pem" not in text
    if doc == "server/README.md":
        for needed in ("ca.crt", "ca.key", "server.crt", "--force", "--site", "mkdir -p keys", "--run-dir",
                       "--resume"):
            assert needed in text, needed
        assert "--resume RUN_DIR`" not in text.replace("old `--resume RUN_DIR` form", "")


def test_the_example_configs_are_valid():
    from fedqc.cli.federation import ServerFile, SiteFile, _read

    root = Path(__file__).resolve().parents[2]
    server, _ = _read(root / "server" / "server.example.yaml", ServerFile)
    assert server.tls.ca_cert.name == "ca.crt" and server.tls.server_cert.name == "server.crt"
    site, _ = _read(root / "client" / "site.example.yaml", SiteFile)
    assert site.ca_cert.name == "ca.crt"
