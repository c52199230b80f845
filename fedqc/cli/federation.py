"""``fedqc-server`` and ``fedqc-client``: their YAML files, validated, mapped onto the launchers.

server.yaml (the coordinator; see ``server/server.example.yaml``)::

    method: ../configs/simulation.yaml   # the fedqc config: federation/train/qc/refine/... sections
    run_dir: runs/consortium
    host: 0.0.0.0
    port: 9093
    tls: {ca_cert: certs/ca.pem, server_cert: certs/server.pem, server_key: certs/server.key}
    site_keys: [keys/centre1.pub, keys/centre3.pub]   # non-empty: only these sites may join

site.yaml (one hospital; see ``client/site.example.yaml``)::

    site: {name: centre3-ge, root: /data/MnM2, filter: {VENDOR: GE}, labelled: false}
    superlink: coordinator.example.org:9093
    ca_cert: certs/ca.pem
    private_key: keys/centre3          # when the coordinator allow-lists sites
    work_dir: fedqc-site               # predictions, QC report, fences, cache: all stay here
    device: auto

The method's settings travel from the coordinator in the run config; only weights and counts
travel back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fedqc.config import SiteConfig, load_config, read_yaml
from fedqc.config.schema import build
from fedqc.core.errors import ConfigError


@dataclass(frozen=True)
class TlsPaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ServerFile:
    method: Path
    run_dir: Path = Path("fedqc-run")
    host: str = "0.0.0.0"
    port: int = 9093
    tls: TlsPaths | None = None
    site_keys: tuple[Path, ...] = ()
    startup_timeout_s: float = 60.0


@dataclass(frozen=True)
class SiteFile:
    site: SiteConfig
    superlink: str = "127.0.0.1:9093"
    ca_cert: Path | None = None
    private_key: Path | None = None
    work_dir: Path = Path("fedqc-site")
    device: str = "auto"
    port: int = 9094
    max_retries: int | None = None
    max_wait_s: float | None = None


def _read(path: Path, cls: type):
    data, path = read_yaml(path)
    return build(cls, data, "", path), path


def _exists(path: Path | None, key: str, source: Path) -> None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(key, f"file not found: {path}", source)


def server_command(config_path: Path, run_dir: Path | None, insecure: bool, resume: Path | None) -> int:
    from fedqc.fl.from_config import federation_settings
    from fedqc.fl.launch import run_server
    from fedqc.fl.settings import ServerSettings, TlsFiles

    server, source = _read(config_path, ServerFile)
    method = load_config(server.method, check_paths=False)
    if server.tls is None and not insecure:
        raise ConfigError("tls", "TLS is on by default: give ca_cert, server_cert and server_key "
                                 "(see server/README.md), or --insecure for loopback tests only", source)
    tls = None
    if server.tls is not None and not insecure:
        for key in ("ca_cert", "server_cert", "server_key"):
            _exists(getattr(server.tls, key), f"tls.{key}", source)
        tls = TlsFiles(server.tls.ca_cert, server.tls.server_cert, server.tls.server_key)
    for i, key in enumerate(server.site_keys):
        _exists(key, f"site_keys[{i}]", source)
    settings = ServerSettings(host=server.host, port=server.port, tls=tls, site_public_keys=server.site_keys,
                              startup_timeout_s=server.startup_timeout_s,
                              federation=federation_settings(method))
    target = Path(resume or run_dir or server.run_dir)
    code = run_server(source, target, insecure, settings=settings, resume=resume is not None)
    if (target / "log.json").is_file():
        from fedqc.evaluation.figures import round_log_pngs

        round_log_pngs(target)
    return code


def client_command(config_path: Path, insecure: bool) -> int:
    from fedqc.fl.from_config import node_config
    from fedqc.fl.launch import run_client
    from fedqc.fl.settings import ClientSettings

    site, source = _read(config_path, SiteFile)
    if not site.site.root.is_dir():
        raise ConfigError("site.root", f"data folder not found: {site.site.root}", source)
    if site.ca_cert is None and not insecure:
        raise ConfigError("ca_cert", "TLS is on by default: give the consortium's CA certificate "
                                     "(see client/README.md), or --insecure for loopback tests only", source)
    _exists(site.ca_cert, "ca_cert", source)
    _exists(site.private_key, "private_key", source)
    node = node_config(site.site, ("SA", "LA"), device=site.device)
    node.pop("views")  # the coordinator's config decides the views
    settings = ClientSettings(site_id=site.site.name, superlink=site.superlink, work_dir=site.work_dir,
                              root_certificates=None if insecure else site.ca_cert, private_key=site.private_key,
                              node_config=node, port=site.port, max_retries=site.max_retries,
                              max_wait_s=site.max_wait_s)
    return run_client(source, insecure, settings=dataclasses.replace(settings))
