"""How arrays cross between the thin ClientApp and the site worker: three ways, same arrays, one run.

* **frames** (what :mod:`fedqc.site.worker` does): a JSON header, then each array's bytes over the
  Unix socket, received straight into a preallocated numpy buffer (``recv_into``);
* **pickle**: ``pickle.dumps(arrays, protocol=5)`` over the same socket, ``pickle.loads`` on the other
  side (what ``multiprocessing.connection`` would do);
* **file**: ``np.savez`` into the site's work dir (through ``core.io.atomic_write``: temp file, fsync,
  rename), the path over the socket, ``np.load`` on the other side.

Each way sends a model-sized dict of float32 arrays to an echo peer and receives it back (one
exchange's two transfers). Reported: median seconds per round trip and the ratio to ``frames``.

    python benchmarks/bench_worker_transport.py --mib 8 64 --repeats 5 --out /tmp/bwt
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fedqc.core.io import atomic_write
from fedqc.site import worker


def _arrays(mib: float, count: int = 60) -> dict[str, np.ndarray]:
    per = max(1, int(mib * 2**20 / 4 / count))
    rng = np.random.default_rng(0)
    return {f"seg/SA/layer{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(count)}


def _pickle_send(sock: socket.socket, arrays) -> None:
    worker._send_frame(sock, pickle.dumps(arrays, protocol=5))


def _pickle_recv(sock: socket.socket):
    return pickle.loads(worker._recv_frame(sock, limit=2**40))


def _file_send(sock: socket.socket, arrays, folder: Path, name: str) -> None:
    path = folder / f"{name}.npz"
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    worker._send_json(sock, {"path": str(path)})


def _file_recv(sock: socket.socket):
    path = Path(worker._recv_json(sock)["path"])
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    path.unlink()
    return arrays


def _ways(folder: Path):
    return {
        "frames": (lambda s, a, n: worker.send_message(s, {}, a), lambda s: worker.recv_message(s)[1]),
        "pickle": (lambda s, a, n: _pickle_send(s, a), _pickle_recv),
        "file": (lambda s, a, n: _file_send(s, a, folder, n), _file_recv),
    }


def round_trip_s(way: str, arrays, folder: Path, repeats: int) -> list[float]:
    send, recv = _ways(folder)[way]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def echo() -> None:
        for _ in range(repeats):
            send(b, recv(b), "reply")

    peer = threading.Thread(target=echo)
    peer.start()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        send(a, arrays, "request")
        back = recv(a)
        times.append(time.perf_counter() - started)
        assert all(np.array_equal(back[k], v) for k, v in arrays.items())
    peer.join()
    a.close()
    b.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="+", default=[8.0, 64.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = []
    lines = ["| arrays (MiB) | frames (s) | pickle (s) | file (s) | pickle / frames | file / frames |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        for mib in args.mib:
            arrays = _arrays(mib)
            row = {"mib": mib}
            for way in ("frames", "pickle", "file"):
                row[way] = statistics.median(round_trip_s(way, arrays, Path(folder), args.repeats))
            result.append(row)
            lines.append(f"| {mib:g} | {row['frames']:.3f} | {row['pickle']:.3f} | {row['file']:.3f} | "
                         f"{row['pickle'] / row['frames']:.2f} | {row['file'] / row['frames']:.2f} |")
    atomic_write(args.out / "bench_worker_transport.json", json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
