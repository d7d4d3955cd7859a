#!/usr/bin/env bash
# Brings up a local Tessera on embedded defaults (sled store, disk key manager, self-signed
# root) and shows a workload SVID being issued and verified.
#
#   scripts/quickstart.sh        build, start the server (if not running), mint an SVID
#   scripts/quickstart.sh stop   stop the server (state stays in the quickstart dir)
#
# Environment: QUICKSTART_DIR (default target/quickstart), TESSERA_AGENT_API_PORT (8081),
# TESSERA_HEALTH_PORT (8080).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${QUICKSTART_DIR:-$PWD/target/quickstart}"
AGENT_API_PORT="${TESSERA_AGENT_API_PORT:-8081}"
HEALTH_PORT="${TESSERA_HEALTH_PORT:-8080}"
SERVER="$PWD/target/debug/tessera-server"
SOCK="$DIR/admin.sock"
PIDFILE="$DIR/server.pid"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

if [ "${1:-}" = "stop" ]; then
  if running; then
    pid="$(cat "$PIDFILE")"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$PIDFILE"
    echo "Tessera server stopped (state kept in $DIR)."
  else
    rm -f "$PIDFILE"
    echo "Tessera server is not running."
  fi
  exit 0
fi

command -v openssl >/dev/null || { echo "openssl is needed (apt-get install openssl)" >&2; exit 1; }

echo "==> Building tessera-server"
cargo build --bins --quiet

mkdir -p "$DIR"
chmod 700 "$DIR"
if [ ! -f "$DIR/server.toml" ]; then
  cat >"$DIR/server.toml" <<TOML
trust_domain = "example.org"
data_dir = "$DIR/data"

[server]
agent_api_address = "127.0.0.1:$AGENT_API_PORT"
admin_socket = "$SOCK"
health_address = "127.0.0.1:$HEALTH_PORT"

[ca]
key_type = "ec-p256"
ca_ttl = "24h"
default_x509_svid_ttl = "1h"
default_jwt_svid_ttl = "5m"

[key_manager]
type = "disk"

[store]
type = "sled"
TOML
fi

if running; then
  echo "==> Server already running (pid $(cat "$PIDFILE"))"
else
  echo "==> Starting tessera-server (config $DIR/server.toml, log $DIR/server.log)"
  nohup "$SERVER" run --config "$DIR/server.toml" >>"$DIR/server.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 300); do
    "$SERVER" healthcheck --socket "$SOCK" >/dev/null 2>&1 && break
    running || { echo "server exited; see $DIR/server.log" >&2; tail -5 "$DIR/server.log" >&2; exit 1; }
    sleep 0.1
  done
  "$SERVER" healthcheck --socket "$SOCK"
fi

export TESSERA_ADMIN_SOCKET="$SOCK"
echo "==> Minting an X509-SVID for spiffe://example.org/quickstart/web (the key is generated locally)"
"$SERVER" x509 mint --spiffe-id spiffe://example.org/quickstart/web --ttl 1h --write "$DIR/svid"
"$SERVER" bundle show >"$DIR/bundle.pem"

echo "==> Verifying it with openssl against the trust bundle"
openssl verify -CAfile "$DIR/bundle.pem" "$DIR/svid/svid.pem"
openssl x509 -noout -ext subjectAltName -enddate -in "$DIR/svid/svid.pem"

cat <<MSG

Tessera is running:
  admin socket   $SOCK          (export TESSERA_ADMIN_SOCKET=$SOCK)
  Agent API      127.0.0.1:$AGENT_API_PORT (mTLS)
  health         http://127.0.0.1:$HEALTH_PORT/ready   /metrics
  SVID files     $DIR/svid/{svid.pem,key.pem,bundle.pem}

Try:  $SERVER entry show
      $SERVER token generate --spiffe-id spiffe://example.org/node/1
      $SERVER localauthority x509 show
Stop: scripts/quickstart.sh stop
(The node agent, Envoy SDS and the Workload API come with the agent issue; see README.)
MSG
