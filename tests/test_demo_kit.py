"""The one-machine demo kit (``server/demo.sh`` and its YAML files; server/README.md, "Try it on one
machine"). Fast checks only: the files load with fedqc's own loaders and fit together, and the script
parses. The demo itself (minutes, real Flower processes) is not run here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedqc.cli.federation import ServerFile, SiteFile, _read, parse_address
from fedqc.config import load_config

SERVER = Path(__file__).resolve().parents[1] / "server"
DEMO = SERVER.parent / "runs" / "demo"  # where the templates' paths point (demo.sh re-roots them)
SITES = ("demo-site-1.yaml", "demo-site-2.yaml")


def _script() -> str:
    return (SERVER / "demo.sh").read_text()


def test_the_script_parses_and_names_only_files_that_exist():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    result = subprocess.run([bash, "-n", str(SERVER / "demo.sh")], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    script = _script()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert "trap cleanup EXIT" in script
    named = set(re.findall(r"demo-[a-z0-9-]+\.yaml", script))
    assert {"demo-server.yaml", "demo-method.yaml", *SITES} <= named
    for name in named:
        assert (SERVER / name).is_file(), name


def test_the_method_config_is_tiny():
    config = load_config(SERVER / "demo-method.yaml", check_paths=False)
    assert config.model.preset == "tiny" and config.views == ("SA",)
    assert config.preprocess.size_px <= 64
    fed = config.federation
    assert 1 <= fed.supervised_rounds <= 2 and 1 <= fed.ae_rounds <= 2 and 1 <= config.refine.k_semi <= 2
    assert fed.min_sites == 2 and config.train.m_best <= fed.supervised_rounds


def test_the_server_and_site_files_load_and_fit_together():
    server, _ = _read(SERVER / "demo-server.yaml", ServerFile)
    assert server.method == SERVER / "demo-method.yaml"
    assert server.host == "127.0.0.1" and server.tls is not None
    assert server.run_dir.is_relative_to(DEMO) and server.tls.ca_cert.is_relative_to(DEMO)
    sites = [_read(SERVER / name, SiteFile)[0] for name in SITES]
    assert [s.site.name for s in sites] == ["site1", "site2"]
    assert [s.site.labelled for s in sites] == [True, False]
    assert {str(s.private_key) + ".pub" for s in sites} == {str(k) for k in server.site_keys}
    for site in sites:
        assert parse_address(site.superlink) == ("127.0.0.1", server.port)
        assert site.ca_cert == server.tls.ca_cert
        assert site.work_dir.is_relative_to(DEMO) and site.site.root.is_relative_to(DEMO)
    ports = [server.port, *(s.port for s in sites)]
    assert len(set(ports)) == len(ports)
    assert len({s.work_dir for s in sites}) == len(sites)


def test_the_simulated_sites_are_big_enough_for_the_fences(tiny_data):
    """The data demo.sh simulates (the tiny preset at its --subjects-per-centre) passes the site's
    fence check that runs before any training (fedqc.site.state.fence_shortfalls)."""
    import dataclasses

    from fedqc.site.state import fence_shortfalls

    subjects = re.search(r"simulate-data --preset tiny --subjects-per-centre (\d+)", _script())
    assert subjects is not None and int(subjects.group(1)) == 8  # what the tiny_data fixture simulates
    config = load_config(SERVER / "demo-method.yaml", check_paths=False)
    sites = tuple(_read(SERVER / name, SiteFile)[0].site for name in SITES)
    config = dataclasses.replace(config, sites=tuple(dataclasses.replace(s, root=tiny_data) for s in sites))
    assert fence_shortfalls(config, federated=True) == []
