"""``fedqc-server`` and ``fedqc-client``: their YAML files, validated, mapped onto the launchers.

server.yaml (the coordinator; see ``server/server.example.yaml``)::

    method: ../configs/simulation.yaml   # the fedqc config: federation/train/qc/refine/... sections
    run_dir: runs/consortium
    host: 0.0.0.0
    port: 9093
    tls: {ca_cert: certs/ca.crt, server_cert: certs/server.crt, server_key: certs/server.key}
    site_keys: [keys/centre1.pub, keys/centre3.pub]   # non-empty: only these sites may join

site.yaml (one hospital; see ``client/site.example.yaml``)::

    site: {name: centre3-ge, root: /data/MnM2, filter: {VENDOR: GE}, labelled: false}
    superlink: coordinator.example.org:9093
    ca_cert: certs/ca.crt
    private_key: keys/centre3          # when the coordinator allow-lists sites
    work_dir: fedqc-site               # predictions, QC report, fences, cache: all stay here
    device: auto

The method's settings travel from the coordinator in the run config; only weights and counts
travel back. ``fedqc-client check`` (:func:`check_command`) tries everything a site can try
before joining.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedqc.config import SiteConfig, load_config, read_yaml
from fedqc.config.schema import build
from fedqc.core.errors import ConfigError, FedqcError


def _check_port(port: int, key: str = "port") -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"{port} is not a TCP port: use 1..65535")


def parse_address(address: str, key: str = "superlink") -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` too) as (host, port); ConfigError naming ``key`` otherwise."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9.\-_]+):(\d+)", address.strip())
    if not match:
        raise ConfigError(key, f"'{address}' is not HOST:PORT (e.g. coordinator.example.org:9093), "
                               "without a URL prefix")
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    _check_port(int(port), key)
    return host, int(port)


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

    def __post_init__(self) -> None:
        _check_port(self.port)
        if not self.host:
            raise ConfigError("host", "give the interface to listen on (0.0.0.0 for all, 127.0.0.1 for loopback)")
        if self.startup_timeout_s <= 0:
            raise ConfigError("startup_timeout_s", "must be > 0")


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
    connect_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check_port(self.port)
        parse_address(self.superlink)
        if self.max_retries is not None and self.max_retries < 0:
            raise ConfigError("max_retries", "must be >= 0")
        if self.max_wait_s is not None and self.max_wait_s <= 0:
            raise ConfigError("max_wait_s", "must be > 0")
        if self.connect_timeout_s <= 0:
            raise ConfigError("connect_timeout_s", "must be > 0 (seconds to wait for the first connection)")


def _read(path: Path, cls: type):
    data, path = read_yaml(path)
    return build(cls, data, "", path), path


def _exists(path: Path | None, key: str, source: Path) -> None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(key, f"file not found: {path}", source)


def server_run_dir(config_path: Path, run_dir: Path | None) -> Path:
    """Where the coordinator's run goes (for its error log before the whole config is read)."""
    if run_dir is not None:
        return Path(run_dir)
    try:
        server, _ = _read(config_path, ServerFile)
    except FedqcError:
        return Path("fedqc-run")
    return server.run_dir


def server_command(config_path: Path, run_dir: Path | None, insecure: bool, resume: bool = False) -> int:
    """``fedqc-server --config C [--run-dir D] [--resume]``."""
    from fedqc.fl.from_config import federation_settings
    from fedqc.fl.launch import RunLock, run_server
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
    target = Path(run_dir or server.run_dir).resolve()
    with RunLock(target):  # held through the figures too
        code = run_server(source, target, insecure, settings=settings, resume=resume)
        if (target / "log.json").is_file():
            from fedqc.evaluation.figures import round_log_pngs

            round_log_pngs(target)
    return code


def _site_settings(site: SiteFile, source: Path, insecure: bool):
    from fedqc.fl.from_config import node_config
    from fedqc.fl.settings import ClientSettings

    node = node_config(site.site, ("SA", "LA"), device=site.device)
    node.pop("views")  # the coordinator's config decides the views
    return ClientSettings(site_id=site.site.name, superlink=site.superlink, work_dir=site.work_dir,
                          root_certificates=None if insecure else site.ca_cert, private_key=site.private_key,
                          node_config=node, port=site.port, max_retries=site.max_retries,
                          max_wait_s=site.max_wait_s)


def site_work_dir(config_path: Path) -> Path:
    """The site's work dir from its YAML (for the error log), ``fedqc-site`` when unreadable."""
    try:
        site, _ = _read(config_path, SiteFile)
    except FedqcError:
        return Path("fedqc-site")
    return site.work_dir


def client_command(config_path: Path, insecure: bool) -> int:
    """``fedqc-client --config site.yaml``: join the federation until stopped."""
    from fedqc.fl.launch import run_client

    site, source = _read(config_path, SiteFile)
    if not site.site.root.is_dir():
        raise ConfigError("site.root", f"data folder not found: {site.site.root}", source)
    if site.ca_cert is None and not insecure:
        raise ConfigError("ca_cert", "TLS is on by default: give the consortium's CA certificate "
                                     "(see client/README.md), or --insecure for loopback tests only", source)
    _exists(site.ca_cert, "ca_cert", source)
    _exists(site.private_key, "private_key", source)
    settings = _site_settings(site, source, insecure)
    return run_client(source, insecure, settings=dataclasses.replace(settings),
                      connect_timeout_s=site.connect_timeout_s)


# -- fedqc-client check --------------------------------------------------------------------------

class _Report:
    """What ``check`` found: one line per item, problems collected for the verdict."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.problems: list[str] = []
        self.slices: dict[str, dict[str, int]] = {}  # view -> slices per split part

    def ok(self, topic: str, text: str) -> None:
        self.echo(f"  ok       {topic}: {text}")

    def note(self, topic: str, text: str) -> None:
        self.echo(f"  note     {topic}: {text}")

    def problem(self, topic: str, text: str) -> None:
        self.echo(f"  PROBLEM  {topic}: {text}")
        self.problems.append(f"{topic}: {text}")


def check_command(config_path: Path, insecure: bool = False, method_path: Path | None = None,
                  try_join: bool = False, echo: Callable[[str], None] = print) -> int:
    """``fedqc-client check``: everything a site can check before joining; 0 when all is well, 2 otherwise.

    The site YAML (and its files), every case (counts per view, labelled or not, bad files listed),
    the QC fences' needs, the site key's form (and, with ``try_join``, whether the coordinator
    accepts it), the TLS connection and certificate, the device, and a rough time per round.
    ``method_path``: the coordinator's method config (preprocessing, model, training); fedqc's
    defaults otherwise.
    """
    report = _Report(echo)
    site, source = _read(config_path, SiteFile)
    echo(f"fedqc-client check of {source} (site {site.site.name})")
    report.ok("config", f"valid; labelled: {str(site.site.labelled).lower()}, work_dir {site.work_dir}")
    if site.ca_cert is None and not insecure:
        report.problem("ca_cert", "not set: TLS is on by default; give the consortium's CA certificate (ca.crt)")
    elif site.ca_cert is not None and not site.ca_cert.is_file():
        report.problem("ca_cert", f"file not found: {site.ca_cert}")
    config = _check_config(site, method_path, report)
    if config is not None:
        _check_data(site, config, report)
    _check_key(site, report)
    tls_ok = _check_tls(site, insecure, report)
    if try_join and tls_ok:
        _try_join(site, source, insecure, report)
    elif site.private_key is not None:
        report.note("registration", "whether the coordinator registered this key can only be known by joining: "
                                    "run check with --try-join, or ask the coordinator to confirm "
                                    f"{site.private_key}.pub is under site_keys")
    if config is not None:
        _check_device_and_time(site, config, report)
    if report.problems:
        echo(f"{len(report.problems)} problem(s):")
        for line in report.problems:
            echo(f"  - {line}")
        return 2
    echo("all checks passed: this site is ready to join (fedqc-client --config "
         f"{source}{' --insecure' if insecure else ''})")
    return 0


def _check_config(site: SiteFile, method_path: Path | None, report: _Report):
    from fedqc.config import Config

    if not site.site.root.is_dir():
        report.problem("site.root", f"data folder not found: {site.site.root}")
        return None
    try:
        if method_path is None:
            return Config(sites=(site.site,))
        method = load_config(method_path, check_paths=False)
        return dataclasses.replace(method, sites=(site.site,))
    except FedqcError as exc:
        report.problem("method", str(exc))
        return None


def _check_data(site: SiteFile, config, report: _Report) -> None:
    from fedqc.core.errors import DataError
    from fedqc.data.site import BadCasesError, load_site_split, site_cases

    found_views = []
    for view in config.views:
        try:
            cases = site_cases(site.site, [view])
        except DataError:
            report.note(f"data {view}", f"no {view} case under {site.site.root} with this filter")
            continue
        found_views.append(view)
        labelled = sum(c.label is not None for c in cases)
        subjects = len({c.subject for c in cases})
        try:
            split = load_site_split(site.site, view, config, progress=None)
        except BadCasesError as exc:
            report.problem(f"data {view}", f"{len(exc.errors)} of {len(cases)} case(s) unusable:")
            for error in exc.errors:
                report.echo(f"             {error}")
            continue
        except DataError as exc:
            report.problem(f"data {view}", str(exc))
            continue
        slices = {part: sum(c.images.shape[0] for c in getattr(split, part)) for part in ("train", "val", "pool", "test")}
        usage = "" if site.site.labelled else ", unused for training: labelled is false"
        report.ok(f"data {view}", f"{len(cases)} cases of {subjects} subjects ({labelled} with a label file{usage}), all "
                                  f"readable; train {len(split.train)} / val {len(split.val)} / pool "
                                  f"{len(split.pool)} / test {len(split.test)} cases; slices "
                                  + ", ".join(f"{k} {v}" for k, v in slices.items()))
        report.slices[view] = slices
    if not found_views:
        report.problem("data", f"no case under {site.site.root} matches the filter {dict(site.site.filter)} in any "
                               f"view of {list(config.views)}")
        return
    import inspect

    from fedqc.site.state import fence_shortfalls

    # This site alone: the consortium's count of validation cases is the coordinator's to check.
    alone = {"whole_consortium": False} if "whole_consortium" in inspect.signature(fence_shortfalls).parameters else {}
    if alone or site.site.labelled:
        try:
            for line in fence_shortfalls(dataclasses.replace(config, views=tuple(found_views)), federated=True,
                                         **alone):
                report.problem("qc fences", line)
        except FedqcError as exc:
            report.problem("qc fences", str(exc))


def _check_key(site: SiteFile, report: _Report) -> None:
    if site.private_key is None:
        report.note("site key", "none (private_key unset): fine only when the coordinator does not allow-list sites")
        return
    path = site.private_key
    if not path.is_file():
        report.problem("private_key", f"file not found: {path} (make it: mkdir -p keys && ssh-keygen -t ecdsa -b 384 "
                                      f"-N \"\" -f {path})")
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        report.problem("private_key", f"{path} is not an unencrypted OpenSSH private key ({exc}); make one with "
                                      "ssh-keygen -t ecdsa -b 384 -N \"\"")
        return
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        report.problem("private_key", f"{path} is a {type(key).__name__.replace('_', '')}, Flower needs an ECDSA key "
                                      "(ssh-keygen -t ecdsa -b 384)")
        return
    if path.stat().st_mode & 0o077:
        report.problem("private_key", f"{path} is readable by others: chmod 600 {path}")
    public = path.with_name(path.name + ".pub")
    mine = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()
    if public.is_file():
        if public.read_bytes().split()[:2] != mine[:2]:
            report.problem("private_key", f"{public} does not belong to {path}: the coordinator would register "
                                          "the wrong key; regenerate the pair or send the right .pub")
            return
        report.ok("site key", f"{path} is an OpenSSH ECDSA {key.curve.name} key; {public} matches (send only the "
                              ".pub to the coordinator)")
    else:
        report.ok("site key", f"{path} is an OpenSSH ECDSA {key.curve.name} key (no {public.name} next to it: "
                              f"ssh-keygen -y -f {path} > {public})")


def _check_tls(site: SiteFile, insecure: bool, report: _Report, timeout_s: float = 10.0) -> bool:
    import socket
    import ssl

    host, port = parse_address(site.superlink)
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        report.problem("connection", f"cannot resolve host '{host}' ({exc.strerror}): check superlink in site.yaml")
        return False
    except ConnectionRefusedError:
        report.problem("connection", f"nothing listens at {where}: is fedqc-server running there, is the port right?")
        return False
    except TimeoutError:
        report.problem("connection", f"no answer from {where} within {timeout_s:.0f} s: a firewall, or a wrong host")
        return False
    except OSError as exc:
        report.problem("connection", f"cannot connect to {where}: {exc.strerror or exc}")
        return False
    with raw:
        if insecure:
            report.note("connection", f"{where} accepts connections; --insecure: no TLS check")
            return True
        if site.ca_cert is None or not site.ca_cert.is_file():
            report.problem("tls", f"{where} accepts connections, but TLS cannot be checked without ca_cert")
            return False
        context = ssl.create_default_context(cafile=str(site.ca_cert))
        try:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                cert = tls.getpeercert() or {}
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message or str(exc)
            if "mismatch" in why:
                report.problem("tls", f"the certificate of {where} does not name '{host}' ({why}): use the host "
                                      "name it holds in superlink, or ask the coordinator for a certificate with it")
            else:
                report.problem("tls", f"the certificate of {where} is not vouched for by ca_cert {site.ca_cert} "
                                      f"({why}): get the consortium's current ca.crt from the coordinator")
            return False
        except ssl.SSLError as exc:
            report.problem("tls", f"TLS handshake with {where} failed ({exc.reason or exc}): does the coordinator "
                                  "run with TLS on this port?")
            return False
        except (OSError, TimeoutError) as exc:
            report.problem("tls", f"TLS handshake with {where} failed: {exc}")
            return False
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    report.ok("tls", f"{where} presents a certificate signed by your CA, for {', '.join(names) or '?'}, valid until "
                     f"{cert.get('notAfter', '?')}")
    return True


def _try_join(site: SiteFile, source: Path, insecure: bool, report: _Report, timeout_s: float = 30.0) -> None:
    """Start a SuperNode for a moment (in a temporary folder) to see whether the coordinator admits this site."""
    import shutil
    import tempfile
    import time

    from fedqc.fl import processes
    from fedqc.fl.launch import SuperNode, explain_supernode_exit, plain

    folder = Path(tempfile.mkdtemp(prefix="fedqc-check-"))
    settings = dataclasses.replace(_site_settings(site, source, insecure), work_dir=folder,
                                   port=processes.free_port(), max_retries=2, max_wait_s=10.0)
    node = SuperNode(settings, insecure, worker=False)  # joining only: no site to run
    try:
        node.spawn()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and node.proc.poll() is None:
            if "SuperNode ID:" in plain(node.log_path.read_text(errors="replace")):
                report.ok("registration", f"the coordinator at {site.superlink} admitted this site (a SuperNode "
                                          "joined and left at once)")
                return
            time.sleep(0.3)
        text = node.log_path.read_text(errors="replace") if node.log_path.is_file() else ""
        report.problem("registration", explain_supernode_exit(text, settings, insecure, node.proc.poll(),
                                                              node.log_path))
    finally:
        node.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _check_device_and_time(site: SiteFile, config, report: _Report) -> None:
    import time

    import torch

    from fedqc.core.device import select_device
    from fedqc.models.factory import new_segmenter

    try:
        device = select_device(site.device)
    except FedqcError as exc:
        report.problem("device", str(exc))
        return
    if device.type == "cuda":
        report.ok("device", f"{device} ({torch.cuda.get_device_name(device)})")
    else:
        report.ok("device", f"cpu ({torch.get_num_threads()} threads; no GPU{' found' if site.device == 'auto' else ' asked for'})")
    size = config.preprocess.size_px
    batch = max(1, min(config.train.batch_size, 8))
    model = new_segmenter(config).to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-6)
    images = torch.randn(batch, 1, size, size, device=device)

    def step() -> None:
        optimiser.zero_grad()
        out = model(images)
        out = out[0] if isinstance(out, (list, tuple)) else out
        out.float().mean().backward()
        optimiser.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, steps = time.perf_counter(), 2
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_slice = (time.perf_counter() - started) / (steps * batch)
    slices = report.slices
    epochs = config.federation.local_epochs
    if site.site.labelled:
        work = sum(s["train"] for s in slices.values())
        what = f"a supervised round ({epochs} local epoch(s) over {work} training slices)"
    else:
        work = sum(s["pool"] for s in slices.values()) * config.train.m_best
        what = f"a refine round ({epochs} local epoch(s) over {work // max(config.train.m_best, 1)} pool slices x " \
               f"{config.train.m_best} candidates)"
    estimate = per_slice * work * epochs
    report.ok("time", f"{per_slice * 1000:.1f} ms per slice forward+backward on {device.type} (model "
                      f"'{config.model.preset}', {size} px); {what}: about {estimate:.0f} s, plus Flower's few "
                      "seconds per exchange (a rough estimate)")
