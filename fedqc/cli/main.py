"""Command-line entry points: ``fedqc`` (sub-commands), ``fedqc-server`` and ``fedqc-client``.

Heavy libraries (torch, MONAI, Flower) are imported inside the commands so ``--help`` is instant.
Every user-facing failure is a :class:`fedqc.core.errors.FedqcError`, printed as one clear line
(exit status 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _cmd_simulate_data(args: argparse.Namespace) -> int:
    from fedqc.data.simulator import simulate_dataset

    out = simulate_dataset(Path(args.out), preset=args.preset, subjects_per_centre=args.subjects_per_centre,
                           seed=args.seed, shift_strength=args.shift_strength)
    print(f"simulated data written to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fedqc.cli.commands import train_command

    return train_command(Path(args.config), Path(args.out), overrides=parse_overrides(args.set))


def _cmd_refine(args: argparse.Namespace) -> int:
    from fedqc.cli.commands import refine_command

    return refine_command(Path(args.config), Path(args.run), overrides=parse_overrides(args.set))


def _cmd_predict(args: argparse.Namespace) -> int:
    from fedqc.cli.commands import predict_command

    return predict_command(Path(args.run), Path(args.data), Path(args.out), stage=args.stage)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedqc.cli.commands import evaluate_command

    return evaluate_command(Path(args.data), Path(args.pred), json_path=None if args.json is None else Path(args.json))


def _cmd_ablation(args: argparse.Namespace) -> int:
    from fedqc.cli.commands import ablation_command

    return ablation_command(Path(args.config), Path(args.out), seeds=args.seeds, overrides=parse_overrides(args.set),
                            report_from=[Path(p) for p in args.report_from or ()],
                            transductive=not args.no_transductive)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedqc.cli.commands import simulate_command

    return simulate_command(Path(args.config), None if args.out is None else Path(args.out),
                            overrides=parse_overrides(args.set), report_only=args.report_only)


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, object]:
    """``--set train.epochs=2`` pairs, values parsed as YAML scalars."""
    import yaml

    from fedqc.core.errors import ConfigError

    result: dict[str, object] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(pair, "--set expects KEY=VALUE, e.g. --set train.epochs=2")
        result[key.strip()] = yaml.safe_load(value)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedqc",
        description="Federated, quality-control-driven adaptation of cardiac MRI segmentation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate-data", help="write a simulated multi-centre cine-MRI data set (M&Ms-2 layout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subjects-per-centre", type=int, default=None, help="subjects per centre (preset default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic per seed)")
    p.add_argument("--preset", default="consortium", help="consortium preset (see docs/SIMULATOR.md)")
    p.add_argument("--shift-strength", type=float, default=None,
                   help="scale of the shifted centres' scanner effects (0: like the reference scanner)")
    p.set_defaults(func=_cmd_simulate_data)

    set_help = "override a config value, e.g. --set train.epochs=2 (repeatable)"
    p = sub.add_parser("train", help="train segmenters and QC autoencoders on the labelled sites (centralised)")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("refine", help="detect OoD cases on the unlabelled sites and refine the segmenters")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--run", required=True, help="run directory written by 'fedqc train'")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_refine)

    p = sub.add_parser("predict", help="QC-based candidate selection; write predictions, qc.csv and overlays")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", required=True, help="data folder (M&Ms-2 layout, flat, or a NIfTI folder)")
    p.add_argument("--out", required=True, help="output folder for predictions")
    p.add_argument("--stage", choices=("refined", "supervised"), default="refined",
                   help="which checkpoints to use (refined falls back to supervised when absent)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="Dice and Hausdorff (mm) of predictions against labels")
    p.add_argument("--data", required=True, help="data folder with _gt labels")
    p.add_argument("--pred", required=True, help="folder of *_pred.nii.gz")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ablation", help="the paper's ablation (M, {M}+QC, full, references) over seeds")
    p.add_argument("--config", required=True, help="YAML config (labelled + shifted unlabelled sites)")
    p.add_argument("--out", required=True, help="output folder for JSON and the markdown report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--report-from", nargs="+", default=None, metavar="DIR",
                   help="only rebuild the report from the seed*_VIEW.json files of earlier runs")
    p.add_argument("--no-transductive", action="store_true",
                   help="skip the transductive refinement (refining on the test cases themselves)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_ablation)

    p = sub.add_parser("simulate", help="run the whole federation on this machine (Flower simulation engine)")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--report-only", action="store_true",
                   help="score a finished run in --out again (report.md / report.json) without federating: "
                        "e.g. after changing an inference-time key such as qc.selection; the sites' "
                        "predictions/ folders are not rewritten")
    p.set_defaults(func=_cmd_simulate)
    return parser


def _run(func: Callable[[], int]) -> int:
    from fedqc.core.errors import FedqcError

    try:
        return func()
    except FedqcError as exc:
        print(f"fedqc: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedqc: interrupted; files already written are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


def _line_buffered() -> None:
    """Progress lines reach a log file or pipe as they are printed, not in 8 KB blocks."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def _private_files() -> None:
    """Tighten the umask so that every file this process and its children (Flower's daemons, Ray)
    create is readable by its owner only: predictions, QC reports and logs are patient data."""
    current = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                current = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if current is None:  # no /proc: read it by setting it (briefly permissive, before any thread exists)
        current = os.umask(0o077)
    os.umask(current | 0o077)


def _start() -> None:
    _line_buffered()
    _private_files()


def main(argv: Sequence[str] | None = None) -> int:
    _start()
    args = build_parser().parse_args(argv)
    return _run(lambda: args.func(args))


def _run_federation(prog: str, func: Callable[[], int], log_dir: Callable[[], Path]) -> int:
    """``fedqc-server`` / ``fedqc-client``: one line per failure, never a traceback on the terminal.

    SIGTERM and SIGHUP stop everything the command started, as Ctrl-C does (exit 128 + signal). A
    fedqc error is one line (exit 2). Anything else is a fault of fedqc itself: its traceback goes to
    ``<log_dir>/logs/<prog>-error.log`` and the terminal gets one line naming that file (exit 1).
    """
    from fedqc.core.errors import FedqcError
    from fedqc.fl.processes import stop_on_signals

    try:
        with stop_on_signals():
            return func()
    except FedqcError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(f"{prog}: stopped ({exc.args[0] if exc.args else 'SIGINT'}); files already written are kept",
              file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 (a bug: the traceback to a file, one line to the operator)
        path = _write_traceback(prog, log_dir)
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}; traceback in {path} (please report it)",
              file=sys.stderr)
        return 1


def _write_traceback(prog: str, log_dir: Callable[[], Path]) -> Path:
    import tempfile
    import time
    import traceback

    text = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {prog} (PID {os.getpid()})\n{traceback.format_exc()}"
    for folder in _log_folders(log_dir):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = folder / f"{prog}-error.log"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as handle:
                handle.write(text)
            return path
        except OSError:
            continue
    return Path(tempfile.gettempdir())


def _log_folders(log_dir: Callable[[], Path]) -> list[Path]:
    import tempfile

    folders = []
    try:
        folders.append(Path(log_dir()).expanduser().resolve() / "logs")
    except Exception:  # noqa: BLE001, S110 (the config itself may be what failed: the fallback below)
        pass
    return folders + [Path(tempfile.gettempdir()) / f"fedqc-{os.getuid()}"]


def _old_resume_form(argv: Sequence[str]) -> str | None:
    """``--resume RUN_DIR`` (before --run-dir existed alone) -> the message that names the new form."""
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--resume=") else (
            argv[i + 1] if arg == "--resume" and i + 1 < len(argv) and not argv[i + 1].startswith("-") else None)
        if value:
            return (f"fedqc-server: error: --resume takes no folder: continue the run in {value} with "
                    f"'fedqc-server --config CONFIG --run-dir {value} --resume'")
    return None


def server_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedqc-server",
        description="The coordinator: starts a SuperLink, submits the fedqc run and streams its progress.",
    )
    parser.add_argument("--config", required=True, help="server YAML (see server/server.example.yaml)")
    parser.add_argument("--run-dir", default=None, metavar="RUN_DIR",
                        help="run directory (default: run_dir of the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in the run directory from its last completed round")
    parser.add_argument("--insecure", action="store_true", help="no TLS: loopback testing only")
    argv = list(sys.argv[1:] if argv is None else argv)
    old = _old_resume_form(argv)
    if old:
        print(old, file=sys.stderr)
        return EXIT_USER_ERROR
    args = parser.parse_args(argv)
    _start()
    run_dir = None if args.run_dir is None else Path(args.run_dir)

    def go() -> int:
        from fedqc.cli.federation import server_command

        return server_command(Path(args.config), run_dir=run_dir, insecure=args.insecure, resume=args.resume)

    def log_dir() -> Path:
        from fedqc.cli.federation import server_run_dir

        return server_run_dir(Path(args.config), run_dir)

    return _run_federation("fedqc-server", go, log_dir)


def client_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedqc-client",
        description="One hospital: starts a SuperNode that runs fedqc on local data; only weights and "
                    "scalar counts leave the site. 'fedqc-client check --config site.yaml' checks the "
                    "config, the data, the key, the TLS connection and the device before joining.",
    )
    parser.add_argument("action", nargs="?", choices=("join", "check"), default="join",
                        help="join (default): run this site's SuperNode; check: check everything, join nothing")
    parser.add_argument("--config", required=True, help="site YAML (see client/site.example.yaml)")
    parser.add_argument("--insecure", action="store_true", help="no TLS: loopback testing only")
    parser.add_argument("--method", default=None, metavar="CONFIG",
                        help="check: the coordinator's method config (preprocessing, model, training) for the "
                             "data check and the time estimate; fedqc's defaults otherwise")
    parser.add_argument("--try-join", action="store_true",
                        help="check: start a SuperNode for a moment to see whether the coordinator admits this "
                             "site's key (the coordinator sees the site come and go)")
    args = parser.parse_args(argv)
    _start()

    def go() -> int:
        from fedqc.cli.federation import check_command, client_command

        if args.action == "check":
            return check_command(Path(args.config), insecure=args.insecure,
                                 method_path=None if args.method is None else Path(args.method),
                                 try_join=args.try_join)
        return client_command(Path(args.config), insecure=args.insecure)

    def log_dir() -> Path:
        from fedqc.cli.federation import site_work_dir

        return site_work_dir(Path(args.config))

    return _run_federation("fedqc-client", go, log_dir)


if __name__ == "__main__":
    sys.exit(main())
