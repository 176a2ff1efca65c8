#!/usr/bin/env bash
# S3 (and STS) emulator (moto server) for the sluice-storage-s3 tests.
#
#   bash .ci/emulators/s3.sh start   # installs moto if missing, starts it, prints exports
#   bash .ci/emulators/s3.sh stop    # stops what `start` started
#
# `start` runs `moto_server` on http://127.0.0.1:$MOTO_PORT in the background, with a pid
# file and a log under $STATE, waits (at most 60 s) until it answers, and prints the export
# the tests read. moto serves S3 and STS (AssumeRoleWithWebIdentity) on the same port; it
# does not check signatures. Both commands are idempotent.
set -euo pipefail

STATE="${TMPDIR:-/tmp}/sluice-moto"
MOTO_PORT="${MOTO_PORT:-5000}"
# 5.2.1 answers CompleteMultipartUpload with the wrong XML root element
# (getmoto/moto#10055), which the AWS SDK for Rust rejects; 5.2.5 is known good.
MOTO_MIN="5.2.5"
URL="http://127.0.0.1:$MOTO_PORT"

log() { printf 's3.sh: %s\n' "$*" >&2; }

running() { # pidfile
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

have_moto() { # moto with its server extra, at least $MOTO_MIN
  python3 - "$MOTO_MIN" >/dev/null 2>&1 <<'PY'
import re, sys
import moto, moto.server  # noqa: F401  (the server extra's imports)
version = lambda v: tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", v).groups())
sys.exit(version(moto.__version__) < version(sys.argv[1]))
PY
}

install_moto() {
  if have_moto; then return; fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    log "pip not found; installing python3-pip with apt-get"
    apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
  fi
  log "installing moto[server]>=$MOTO_MIN with pip"
  python3 -m pip install --quiet "moto[server]>=$MOTO_MIN" >&2 ||
    python3 -m pip install --quiet --break-system-packages "moto[server]>=$MOTO_MIN" >&2
  hash -r
}

start() {
  mkdir -p "$STATE"
  install_moto
  if ! running "$STATE/moto.pid"; then
    # The module of the python3 that has moto (a moto_server on PATH may be another one's).
    nohup python3 -m moto.server -H 127.0.0.1 -p "$MOTO_PORT" >"$STATE/moto.log" 2>&1 &
    echo $! >"$STATE/moto.pid"
  fi
  local ok=""
  for _ in $(seq 1 60); do
    if curl -s -o /dev/null --max-time 2 "$URL/moto-api/"; then ok=1; break; fi
    if ! running "$STATE/moto.pid"; then break; fi
    sleep 1
  done
  if [[ -z "$ok" ]]; then
    log "moto did not answer on $URL within 60 s; log: $STATE/moto.log"
    tail -n 20 "$STATE/moto.log" >&2 || true
    return 1
  fi
  echo "export SLUICE_TEST_S3_ENDPOINT=$URL"
}

stop() {
  if running "$STATE/moto.pid"; then
    kill "$(cat "$STATE/moto.pid")" 2>/dev/null || true
  fi
  rm -f "$STATE/moto.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
