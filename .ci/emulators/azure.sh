#!/usr/bin/env bash
# Azure Blob Storage emulator (Azurite) for the sluice-storage-azure tests.
#
#   bash .ci/emulators/azure.sh start   # installs Azurite if missing, starts it, prints exports
#   bash .ci/emulators/azure.sh stop    # stops what `start` started
#
# `start` runs, each in the background with a pid file and a log under $STATE:
#   - azurite-blob on http://127.0.0.1:$AZURITE_PORT (shared key / SAS tests);
#   - azurite-blob on https://127.0.0.1:$AZURITE_OAUTH_PORT with `--oauth basic` and a
#     certificate signed by a throwaway CA made here with openssl (bearer token and user
#     delegation SAS tests);
#   - a tiny HTTPS token endpoint on $AZURITE_TOKEN_PORT that stands in for Entra ID
#     (AZURE_AUTHORITY_HOST): it exchanges the test's federated token for a JWT that
#     Azurite's basic OAuth check accepts.
# Both commands are idempotent. The exports printed by `start` are what the tests read.
set -euo pipefail

STATE="${TMPDIR:-/tmp}/sluice-azurite"
AZURITE_PORT="${AZURITE_PORT:-10000}"
AZURITE_OAUTH_PORT="${AZURITE_OAUTH_PORT:-10010}"
AZURITE_TOKEN_PORT="${AZURITE_TOKEN_PORT:-10011}"
# The federated token the test writes to AZURE_FEDERATED_TOKEN_FILE; the token endpoint
# refuses any other assertion, so a passing test proves the credential sent the file's content.
FEDERATED_TOKEN="sluice-test-federated-token"
CLIENT_ID="00000000-0000-0000-0000-00000000c11e"
TENANT_ID="00000000-0000-0000-0000-0000000000aa"

log() { printf 'azure.sh: %s\n' "$*" >&2; }

running() { # pidfile
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

find_azurite() {
  if command -v azurite-blob >/dev/null 2>&1; then
    command -v azurite-blob
  elif [[ -x "$STATE/npm/node_modules/.bin/azurite-blob" ]]; then
    echo "$STATE/npm/node_modules/.bin/azurite-blob"
  else
    return 1
  fi
}

install_azurite() {
  if find_azurite >/dev/null; then return; fi
  command -v npm >/dev/null 2>&1 || {
    log "npm not found; installing nodejs and npm with apt-get"
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  }
  log "installing Azurite into $STATE/npm"
  mkdir -p "$STATE/npm"
  npm install --prefix "$STATE/npm" --no-audit --no-fund --loglevel=error azurite >&2
}

make_certs() {
  if [[ -f "$STATE/tls/server.pem" && -f "$STATE/tls/ca.pem" ]]; then return; fi
  mkdir -p "$STATE/tls"
  (
    cd "$STATE/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sluice test CA" \
      -keyout ca.key -out ca.pem \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem 2>/dev/null
  )
}

write_token_server() {
  cat >"$STATE/token-server.js" <<'JS'
// Stand-in for the Entra ID token endpoint (POST /{tenant}/oauth2/v2.0/token), test use only.
const https = require("https");
const fs = require("fs");
const [certFile, keyFile, port, assertion, clientId, tenantId] = process.argv.slice(2);
const b64url = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) }, (req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", () => {
    const form = new URLSearchParams(body);
    const reply = (status, obj) => {
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(obj));
    };
    if (req.method !== "POST" || req.url !== `/${tenantId}/oauth2/v2.0/token`) {
      return reply(404, { error: "not_found", error_description: `no route ${req.method} ${req.url}` });
    }
    if (form.get("client_assertion") !== assertion || form.get("client_id") !== clientId) {
      return reply(401, { error: "invalid_client", error_description: "unexpected client assertion or client id" });
    }
    const now = Math.floor(Date.now() / 1000);
    const claims = {
      aud: "https://storage.azure.com", iss: `https://sts.windows.net/${tenantId}/`,
      iat: now - 60, nbf: now - 60, exp: now + 3600,
      oid: "00000000-0000-0000-0000-0000000000b0", tid: tenantId, appid: clientId,
    };
    const jwt = `${b64url({ alg: "none", typ: "JWT" })}.${b64url(claims)}.c2lnbmF0dXJl`;
    reply(200, { token_type: "Bearer", expires_in: 3600, ext_expires_in: 3600, access_token: jwt });
  });
}).listen(Number(port), "127.0.0.1");
JS
}

wait_for() { # description, curl args...
  local what="$1"; shift
  for _ in $(seq 1 60); do
    if curl -s -o /dev/null --max-time 2 "$@"; then return 0; fi
    sleep 1
  done
  log "$what did not answer within 60 s; logs in $STATE"
  tail -n 20 "$STATE"/*.log >&2 || true
  return 1
}

start() {
  mkdir -p "$STATE"
  install_azurite
  local azurite; azurite=$(find_azurite)
  make_certs
  write_token_server

  if ! running "$STATE/azurite.pid"; then
    rm -rf "$STATE/data" && mkdir -p "$STATE/data"
    nohup "$azurite" --skipApiVersionCheck --blobHost 127.0.0.1 --blobPort "$AZURITE_PORT" \
      --location "$STATE/data" --silent --disableTelemetry >"$STATE/azurite.log" 2>&1 &
    echo $! >"$STATE/azurite.pid"
  fi
  if ! running "$STATE/azurite-oauth.pid"; then
    rm -rf "$STATE/data-oauth" && mkdir -p "$STATE/data-oauth"
    nohup "$azurite" --skipApiVersionCheck --blobHost 127.0.0.1 --blobPort "$AZURITE_OAUTH_PORT" \
      --location "$STATE/data-oauth" --silent --disableTelemetry --oauth basic \
      --cert "$STATE/tls/server.pem" --key "$STATE/tls/server.key" >"$STATE/azurite-oauth.log" 2>&1 &
    echo $! >"$STATE/azurite-oauth.pid"
  fi
  if ! running "$STATE/token.pid"; then
    nohup node "$STATE/token-server.js" "$STATE/tls/server.pem" "$STATE/tls/server.key" \
      "$AZURITE_TOKEN_PORT" "$FEDERATED_TOKEN" "$CLIENT_ID" "$TENANT_ID" >"$STATE/token.log" 2>&1 &
    echo $! >"$STATE/token.pid"
  fi

  wait_for "Azurite" "http://127.0.0.1:$AZURITE_PORT/devstoreaccount1?comp=list"
  wait_for "Azurite (OAuth)" --cacert "$STATE/tls/ca.pem" "https://127.0.0.1:$AZURITE_OAUTH_PORT/devstoreaccount1?comp=list"
  wait_for "token endpoint" --cacert "$STATE/tls/ca.pem" "https://127.0.0.1:$AZURITE_TOKEN_PORT/"

  echo "export SLUICE_TEST_AZURE_ENDPOINT=http://127.0.0.1:$AZURITE_PORT/devstoreaccount1"
  echo "export SLUICE_TEST_AZURE_OAUTH_ENDPOINT=https://127.0.0.1:$AZURITE_OAUTH_PORT/devstoreaccount1"
  echo "export SLUICE_TEST_AZURE_AUTHORITY_HOST=https://127.0.0.1:$AZURITE_TOKEN_PORT"
  echo "export SLUICE_TEST_AZURE_CA_FILE=$STATE/tls/ca.pem"
  echo "export SLUICE_TEST_AZURE_FEDERATED_TOKEN=$FEDERATED_TOKEN"
  echo "export SLUICE_TEST_AZURE_CLIENT_ID=$CLIENT_ID"
  echo "export SLUICE_TEST_AZURE_TENANT_ID=$TENANT_ID"
}

stop() {
  local pidfile
  for pidfile in "$STATE/azurite.pid" "$STATE/azurite-oauth.pid" "$STATE/token.pid"; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
