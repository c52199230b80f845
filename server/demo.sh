#!/usr/bin/env bash
# A coordinator and two hospitals on one machine, over TLS with site keys, on loopback: the whole
# fedqc federation (supervised rounds, QC autoencoder, fences, refinement, prediction) at toy size.
#
#   . .venv/bin/activate && bash server/demo.sh [DEMO_FOLDER]      (default: runs/demo)
#
# 1. simulates a tiny two-centre data set (fedqc simulate-data --preset tiny) into DEMO/data;
# 2. makes a CA, the SuperLink's certificate and two site keys (python -m fedqc.fl.certs) in DEMO/certs;
# 3. copies server/demo-server.yaml and server/demo-site-{1,2}.yaml into DEMO/config with free
#    ports and DEMO's paths (the method config is server/demo-method.yaml);
# 4. starts fedqc-server, checks each site (fedqc-client check), starts two fedqc-client;
# 5. waits for the server to finish, stops the clients by PID, prints where the results are.
# Every process it starts is stopped when it exits, however it exits (Ctrl-C included).
# DEMO_FOLDER must not exist or be empty (the certificate kit never replaces a CA).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
demo_arg="${1:-$repo/runs/demo}"
case "$demo_arg" in /*) demo="$demo_arg" ;; *) demo="$PWD/$demo_arg" ;; esac

say() { printf 'demo: %s\n' "$*"; }
fail() { printf 'demo: error: %s\n' "$*" >&2; exit 2; }

for tool in fedqc fedqc-server fedqc-client python; do
    command -v "$tool" >/dev/null || fail "'$tool' not found: activate fedqc's environment first (. .venv/bin/activate; see README.md)"
done
if [ -e "$demo" ] && [ -n "$(ls -A "$demo" 2>/dev/null)" ]; then
    fail "$demo already holds a demo: remove it (rm -r $demo_arg) or give another folder (bash server/demo.sh runs/demo2)"
fi
mkdir -p "$demo"
demo="$(cd "$demo" && pwd)"
# Three processes share the CPU: one torch thread each keeps them from fighting over the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

pids=()      # every process this script started, stopped on exit
cleanup() {
    local pid left
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            left="$(ps -o args= -p "$pid" 2>/dev/null || true)"
            say "PID $pid ($left) did not stop within 30 s after SIGTERM: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
stopped_by() {   # Ctrl-C, kill, a closed terminal: stop everything, say where the partial run is
    say "stopped by $1: stopping the coordinator and the sites (by PID)"
    cleanup
    say "everything it started is stopped; the partial run is in $demo (start again in a fresh folder)"
    exit "$2"
}
trap cleanup EXIT
trap 'stopped_by SIGINT 130' INT
trap 'stopped_by SIGTERM 143' TERM
trap 'stopped_by SIGHUP 129' HUP

start=$SECONDS

say "1/5 simulating a tiny data set into $demo/data (two centres, 8 subjects each)"
fedqc simulate-data --preset tiny --subjects-per-centre 8 --seed 0 --out "$demo/data" >"$demo/simulate.out"

say "2/5 making a CA, the server certificate and the site keys site1, site2 in $demo/certs"
python -m fedqc.fl.certs "$demo/certs" --site site1 --site site2 >"$demo/certs.out"

say "3/5 writing the server and site configs (free ports, this demo's paths) into $demo/config"
python - "$here" "$repo/runs/demo" "$demo" <<'EOF'
import sys
from pathlib import Path

import yaml

from fedqc.fl.processes import free_port

here, template_demo, demo = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ports = []
while len(ports) < 3:
    port = free_port()
    if port not in ports:
        ports.append(port)


def place(value: str) -> str:
    """A template path (relative to server/) as an absolute path, runs/demo replaced by this demo."""
    path = (here / value).resolve()
    if path.is_relative_to(template_demo):
        path = demo / path.relative_to(template_demo)
    return str(path)


def write(template: str, name: str, change) -> None:
    data = yaml.safe_load((here / template).read_text())
    change(data)
    out = demo / "config" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# from server/{template} by server/demo.sh\n" + yaml.safe_dump(data, sort_keys=False))


def server(data: dict) -> None:
    data["port"] = ports[0]
    for key in ("method", "run_dir"):
        data[key] = place(data[key])
    data["tls"] = {k: place(v) for k, v in data["tls"].items()}
    data["site_keys"] = [place(v) for v in data["site_keys"]]


def site(port: int):
    def change(data: dict) -> None:
        data["superlink"] = f"127.0.0.1:{ports[0]}"
        data["port"] = port
        data["site"]["root"] = place(data["site"]["root"])
        for key in ("ca_cert", "private_key", "work_dir"):
            data[key] = place(data[key])
    return change


write("demo-server.yaml", "server.yaml", server)
write("demo-site-1.yaml", "site1.yaml", site(ports[1]))
write("demo-site-2.yaml", "site2.yaml", site(ports[2]))
EOF

say "4/5 starting the coordinator (fedqc-server; its output below and in $demo/server.out)"
fedqc-server --config "$demo/config/server.yaml" >"$demo/server.out" 2>&1 &
server_pid=$!
pids+=("$server_pid")
tail -n +1 -f --pid="$server_pid" "$demo/server.out" | sed -u 's/^/  server | /' &
echo_pid=$!   # ends by itself once the server has exited and its output is shown
pids+=("$echo_pid")

# The sites join once the run is submitted (the SuperLink listens, their keys are registered).
for _ in $(seq 360); do
    grep -q "started run" "$demo/server.out" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
done
if ! grep -q "started run" "$demo/server.out" 2>/dev/null; then
    kill -0 "$server_pid" 2>/dev/null && fail "the coordinator did not start its run within 180 s: see $demo/server.out and $demo/run/logs/"
    wait "$server_pid" || true
    fail "the coordinator stopped before its run started: see $demo/server.out and $demo/run/logs/"
fi

say "checking both sites before they join (fedqc-client check; reports in $demo/site{1,2}-check.out)"
check_pids=()
for site in site1 site2; do
    fedqc-client check --config "$demo/config/$site.yaml" --method "$here/demo-method.yaml" \
        >"$demo/$site-check.out" 2>&1 &
    check_pids+=("$!")
    pids+=("$!")
done
for i in 0 1; do
    site="site$((i + 1))"
    if ! wait "${check_pids[$i]}"; then
        cat "$demo/$site-check.out" >&2
        fail "fedqc-client check found problems at $site (above)"
    fi
    sed -n '$p' "$demo/$site-check.out" | sed "s/^/  $site | /"
done
for site in site1 site2; do
    say "starting $site (fedqc-client; its output in $demo/$site.out)"
    fedqc-client --config "$demo/config/$site.yaml" >"$demo/$site.out" 2>&1 &
    pids+=("$!")
done

server_code=0
wait "$server_pid" || server_code=$?
wait "$echo_pid" || true
say "5/5 the coordinator exited ($server_code); stopping the sites"
cleanup
for site in site1 site2; do
    sed "s/^/  $site | /" "$demo/$site.out"
done

minutes=$(( (SECONDS - start) / 60 )); seconds=$(( (SECONDS - start) % 60 ))
if [ "$server_code" -ne 0 ]; then
    say "the federation did not complete (fedqc-server exit $server_code) after ${minutes} min ${seconds} s: its last line above says why;"
    say "logs: $demo/server.out, $demo/run/logs/, $demo/site1.out, $demo/site2.out, $demo/sites/*/logs/"
    exit "$server_code"
fi
cat <<EOF
demo: done in ${minutes} min ${seconds} s. Results:
  run folder (the coordinator's): $demo/run
      summary.json, log.json (per round, per site), state.json, checkpoints/, plots/*.png, logs/
  each site's predictions (they never leave the site):
      $demo/sites/site1/predictions/qc.csv    $demo/sites/site1/predictions/qc.html
      $demo/sites/site2/predictions/qc.csv    $demo/sites/site2/predictions/qc.html
      (*_pred.nii.gz beside them; review/ holds the page's thumbnails, overlays/ the flagged cases)
  open a QC review page in a browser:  xdg-open $demo/sites/site2/predictions/qc.html
  run it again:  bash server/demo.sh NEW_FOLDER   (or rm -r $demo first)
EOF
