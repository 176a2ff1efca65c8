#!/usr/bin/env bash
# Times system exports (ndjson and ndjson.gz) of the large data set through the HTTP API and
# reports the server's peak RSS, with ratios against naive pipelines timed in the same run.
#
#   bash bench/export-large.sh            # loads ../shared/data's large set into a scratch dir
#
# Needs: curl, jq, gzip (Debian packages). Builds sluice in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
SETS=("$DATA/r4-615-patients" "$DATA/r4-100-patients-groups" "$DATA/r4-79-patients-hiv")
for tool in curl jq gzip; do command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }; done

cargo build --release -q -p sluice
BIN=target/release/sluice
WORK=$(mktemp -d)
PID=""
FILES=()
for s in "${SETS[@]}"; do FILES+=("$s"/*.ndjson.gz); done
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

echo "== load"
$BIN load --data-dir "$WORK/data" "${SETS[@]}" | head -1

echo "== baselines over the same resources (source files)"
t0=$(now); cat "${FILES[@]}" | gzip -dc > /dev/null; t1=$(now)
base_plain=$(secs "$t0" "$t1")
t0=$(now); cat "${FILES[@]}" | gzip -dc | gzip -1 > /dev/null; t1=$(now)
base_gz=$(secs "$t0" "$t1")
printf 'zcat > /dev/null            %6.2f s\nzcat | gzip -1 > /dev/null  %6.2f s\n' "$base_plain" "$base_gz"

$BIN serve --data-dir "$WORK/data" --listen 127.0.0.1:0 > "$WORK/out" 2> "$WORK/log" &
PID=$!
until grep -q listening "$WORK/out" 2>/dev/null; do
  kill -0 "$PID" 2>/dev/null || { cat "$WORK/log"; exit 1; }
  sleep 0.1
done
BASE=$(sed -n 's/^sluice listening on //p' "$WORK/out")

export_once() { # format -> prints seconds, resources, bytes
  local loc t0 t1 code
  t0=$(now)
  loc=$(curl -si "$BASE/fhir/\$export?_outputFormat=$1" | tr -d '\r' | sed -n 's/^content-location: //Ip')
  while :; do
    code=$(curl -s -o "$WORK/manifest" -w '%{http_code}' "$loc")
    [ "$code" = 200 ] && break
    [ "$code" = 202 ] || { cat "$WORK/manifest"; exit 1; }
    sleep 0.05   # the benchmark polls faster than Retry-After to time the export itself
  done
  t1=$(now)
  local n bytes
  n=$(jq '[.output[].count] | add' "$WORK/manifest")
  bytes=$(du -sb "$WORK/data/exports/$(ls -t "$WORK/data/exports" | head -1)" | cut -f1)
  echo "$(secs "$t0" "$t1") $n $bytes"
}

echo "== system export through the API"
read -r s n b < <(export_once ndjson)
printf 'ndjson     %6.2f s  %7d resources  %8.0f resources/s  %6.1f MB  (%.2fx the zcat baseline)\n' \
  "$s" "$n" "$(echo "$n / $s" | bc -l)" "$(echo "$b / 1000000" | bc -l)" "$(echo "$s / $base_plain" | bc -l)"
echo "server peak RSS so far: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$PID/status)"
read -r s n b < <(export_once ndjson.gz)
printf 'ndjson.gz  %6.2f s  %7d resources  %8.0f resources/s  %6.1f MB  (%.2fx the zcat|gzip -1 baseline)\n' \
  "$s" "$n" "$(echo "$n / $s" | bc -l)" "$(echo "$b / 1000000" | bc -l)" "$(echo "$s / $base_gz" | bc -l)"
echo "server peak RSS: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$PID/status)"
