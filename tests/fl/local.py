"""A whole federation on this machine's loopback: one SuperLink and N SuperNodes, real processes.

Test harness, not shipped in the package. Used by the deployment tests and by the self-test
(``python -m tests.fl.local --selftest [--tls] [--auth]`` from the repository root), which proves the plumbing with the toy site algorithm: one round per phase,
then every process is stopped and the ports are checked free.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from fedqc.fl import appdir, certs, processes, run_state
from fedqc.fl.launch import Echo, SuperLink, SuperNode
from fedqc.fl.settings import ClientSettings, FederationSettings, Scalar, ServerSettings
from tests.fl.toy import ALGORITHM


@dataclass
class LocalRun:
    """What a loopback federation did.

    Attributes:
        run_dir: its run directory.
        run_id: Flower's run id.
        status: the run's ``flwr ls`` entry (status, network traffic, compute time).
        summary: ``RUN/summary.json`` (None when the protocol did not finish).
        seconds: wall time from the first process started to the last stopped.
        pids: every PID started or seen as a descendant when stopping.
        ports: every port used.
    """

    run_dir: Path
    run_id: str = ""
    status: dict = field(default_factory=dict)
    summary: dict | None = None
    seconds: float = 0.0
    pids: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)


def toy_sites(count: int = 2) -> list[dict[str, Scalar]]:
    """Node configs of ``count`` toy sites; the last one is unlabelled when there are three or more."""
    return [{"site-algorithm": ALGORITHM, "site-id": f"site{i}", "seed": i + 1, "shift": 0.5 * i, "flag-below": 0.99,
             "labelled": not (count >= 3 and i == count - 1)} for i in range(count)]


def one_round_each(**changes: object) -> FederationSettings:
    """Toy protocol settings with one round per phase."""
    base = {"supervised_rounds": 1, "ae_rounds": 1, "refine_rounds": 1, "local_epochs": 2, "m_best": 1,
            "fence_source": "unlabelled", "node_wait_s": 120, "round_timeout_s": 300,
            "refine_aggregation": "eq2"}  # one exchange per refine round; sequential: tests/fl/test_simulation.py
    return FederationSettings(**{**base, **changes})


def run_local_federation(run_dir: Path, sites: Sequence[Mapping[str, Scalar]], federation: FederationSettings,
                         tls: bool = False, auth: bool = False, echo: Echo = print,
                         max_seconds: float = 900, worker: bool = True) -> LocalRun:
    """Start a SuperLink and one SuperNode per site on 127.0.0.1, run the protocol, stop everything.

    Args:
        run_dir: the run directory (certificates go to ``RUN/pki``, sites to ``RUN/sites/<id>``).
        sites: node configs (``site-id`` required).
        federation: the protocol settings.
        tls: TLS with a CA and server certificate generated here (else insecure).
        auth: SuperNode authentication with site keys generated here (needs ``tls``).
        echo: where the run's log lines go.
        max_seconds: stop the run after this long.
        worker: each SuperNode with its long-lived site worker (fedqc-client's default); False: the
            site runs inside each message's ClientApp process.
    """
    run_dir = run_state.private_dir(Path(run_dir).resolve())
    result = LocalRun(run_dir=run_dir)
    started = time.monotonic()
    tls_files = certs.make_tls_files(run_dir / "pki") if tls else None
    keys = {str(s["site-id"]): certs.make_site_key(run_dir / "pki" / "keys", str(s["site-id"]))
            for s in sites} if auth else {}
    port = processes.free_port()
    server = ServerSettings(host="127.0.0.1", port=port, tls=tls_files, federation=federation,
                            site_public_keys=tuple(pub for _, pub in keys.values()))
    federation.to_json(run_dir / "federation.json")
    app = appdir.write_app(run_dir, appdir.run_config(federation, run_dir))
    link = SuperLink(run_dir, server, insecure=not tls)
    nodes: list[SuperNode] = []
    result.ports.append(port)
    try:
        with ExitStack() as stack:
            stack.enter_context(link)
            result.pids.append(link.proc.pid)
            for site in sites:
                site_id = str(site["site-id"])
                client = ClientSettings(
                    site_id=site_id, superlink=link.address, work_dir=run_dir / "sites" / site_id,
                    root_certificates=tls_files.ca_cert if tls_files else None,
                    private_key=keys[site_id][0] if keys else None,
                    node_config={k: v for k, v in site.items() if k != "site-id"},
                    port=processes.free_port(), max_retries=20, max_wait_s=120)
                result.ports.append(client.port)
                node = SuperNode(client, insecure=not tls, worker=worker)
                stack.enter_context(node)
                nodes.append(node)
                result.pids.append(node.proc.pid)
            result.run_id = link.submit(app, echo=echo, max_seconds=max_seconds)
            result.status = link.status(result.run_id)
        run_state.write_json(run_dir / "flower-run.json", result.status)
    finally:
        for owner in [link, *nodes]:
            result.pids.extend(p for p in owner.stopped_pids if p not in result.pids)
        result.pids.extend(link.cli_pids)
        result.seconds = time.monotonic() - started
    summary = run_dir / run_state.SUMMARY
    result.summary = json.loads(summary.read_text()) if summary.is_file() else None
    return result


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.3) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """The self-test: a toy federation on loopback, one round per phase; 0 when it completed cleanly."""
    parser = argparse.ArgumentParser(prog="python -m tests.fl.local", description=__doc__)
    parser.add_argument("--selftest", action="store_true", required=True)
    parser.add_argument("--tls", action="store_true", help="TLS with certificates generated for the test")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the run directory here")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedqc-selftest-"))
    run = run_local_federation(out, toy_sites(args.sites), one_round_each(min_sites=args.sites),
                               tls=args.tls or args.auth, auth=args.auth)
    leftovers = [p for p in run.pids if processes.alive(p)]
    busy = [p for p in run.ports if not processes.port_is_free("127.0.0.1", p)]
    print(json.dumps({"run_dir": str(out), "status": run.status.get("status"), "seconds": round(run.seconds, 1),
                      "exchanges": (run.summary or {}).get("exchanges"), "leftover_pids": leftovers,
                      "busy_ports": busy, "network": run.status.get("network-traffic")}, indent=2))
    ok = run.status.get("status") == "finished:completed" and not leftovers and not busy
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

