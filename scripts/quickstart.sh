#!/usr/bin/env bash
# Brings up a local Tessera on embedded defaults (sled store, disk key manager, self-signed
# root): a server, one agent joined with a generated join token, an entry for the current
# user (unix:uid:<uid>), and shows this shell, as a workload, fetching its X509-SVID from the
# agent over the SPIFFE Workload API.
#
#   scripts/quickstart.sh        build, start server and agent (if not running), fetch an SVID
#   scripts/quickstart.sh stop   stop both (state stays in the quickstart dir)
#
# Environment: QUICKSTART_DIR (default target/quickstart), TESSERA_AGENT_API_PORT (8081),
# TESSERA_HEALTH_PORT (8080), TESSERA_AGENT_HEALTH_PORT (8082).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${QUICKSTART_DIR:-$PWD/target/quickstart}"
AGENT_API_PORT="${TESSERA_AGENT_API_PORT:-8081}"
HEALTH_PORT="${TESSERA_HEALTH_PORT:-8080}"
AGENT_HEALTH_PORT="${TESSERA_AGENT_HEALTH_PORT:-8082}"
SERVER="$PWD/target/debug/tessera-server"
AGENT="$PWD/target/debug/tessera-agent"
SOCK="$DIR/admin.sock"
AGENT_SOCK="$DIR/agent.sock"
PIDFILE="$DIR/server.pid"
AGENT_PIDFILE="$DIR/agent.pid"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() { alive "$PIDFILE"; }

stop_one() { # pidfile name
  if alive "$1"; then
    pid="$(cat "$1")"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "Tessera $2 stopped."
  else
    echo "Tessera $2 is not running."
  fi
  rm -f "$1"
}

if [ "${1:-}" = "stop" ]; then
  stop_one "$AGENT_PIDFILE" agent
  stop_one "$PIDFILE" server
  echo "(State kept in $DIR; remove it to start from scratch.)"
  exit 0
fi

command -v openssl >/dev/null || { echo "openssl is needed (apt-get install openssl)" >&2; exit 1; }

echo "==> Building tessera-server and tessera-agent"
# `--examples` (there are none): the feature set the test suite builds with, so a checkout
# that has run scripts/test.sh compiles nothing here.
cargo build --bins --examples --quiet

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
"$SERVER" bundle show >"$DIR/bundle.pem"

if alive "$AGENT_PIDFILE"; then
  echo "==> Agent already running (pid $(cat "$AGENT_PIDFILE"))"
else
  NODE_ID="spiffe://example.org/node/quickstart"
  if [ ! -f "$DIR/agent/agent-svid.pem" ]; then
    echo "==> Generating a join token for the agent (node alias $NODE_ID)"
    TOKEN="$("$SERVER" token generate --spiffe-id "$NODE_ID" --output json | sed -n 's/.*"token": "\([0-9a-f]*\)".*/\1/p')"
    cat >"$DIR/agent.toml" <<TOML
trust_domain = "example.org"
server_address = "127.0.0.1:$AGENT_API_PORT"
data_dir = "$DIR/agent"
socket_path = "$AGENT_SOCK"
trust_bundle_path = "$DIR/bundle.pem"
join_token = "$TOKEN"
health_address = "127.0.0.1:$AGENT_HEALTH_PORT"
sync_interval = "1s"
TOML
    echo "==> Registering spiffe://example.org/quickstart/me for unix:uid:$(id -u) (you)"
    "$SERVER" entry create --spiffe-id spiffe://example.org/quickstart/me --parent-id "$NODE_ID" \
      --selector "unix:uid:$(id -u)" >/dev/null
  fi
  echo "==> Starting tessera-agent (config $DIR/agent.toml, log $DIR/agent.log)"
  nohup "$AGENT" run --config "$DIR/agent.toml" >>"$DIR/agent.log" 2>&1 &
  echo $! >"$AGENT_PIDFILE"
fi

echo "==> Fetching this shell's X509-SVID over the SPIFFE Workload API"
for _ in $(seq 1 100); do
  if out="$("$AGENT" api fetch x509 --socket "$AGENT_SOCK" --write "$DIR/svid" 2>&1)"; then break; fi
  alive "$AGENT_PIDFILE" || { echo "agent exited; see $DIR/agent.log" >&2; tail -5 "$DIR/agent.log" >&2; exit 1; }
  sleep 0.2
done
echo "$out"
echo "$out" | grep -q "spiffe://example.org/quickstart/me" || { echo "no SVID for spiffe://example.org/quickstart/me" >&2; exit 1; }

echo "==> Verifying it with openssl against the trust bundle"
openssl verify -CAfile "$DIR/svid/bundle.0.pem" "$DIR/svid/svid.0.pem"

cat <<MSG

Tessera is running:
  server admin socket  $SOCK     (export TESSERA_ADMIN_SOCKET=$SOCK)
  agent socket         $AGENT_SOCK   (SPIFFE Workload API + Envoy SDS)
  Agent API            127.0.0.1:$AGENT_API_PORT (mTLS)
  health               http://127.0.0.1:$HEALTH_PORT/ready (server), http://127.0.0.1:$AGENT_HEALTH_PORT/ready (agent)
  SVID files           $DIR/svid/{svid.0.pem,svid.0.key,bundle.0.pem}

Try:  $AGENT api fetch jwt --socket $AGENT_SOCK --audience my-service
      $AGENT api watch --socket $AGENT_SOCK
      $SERVER entry show
Envoy: point an SDS config source at the agent socket (a cluster with
      address.pipe.path = $AGENT_SOCK, HTTP/2) and ask for the secret
      "spiffe://example.org/quickstart/me" (or "default") and the validation context "ALL";
      a complete example is deploy/examples/envoy-sds.yaml.
Stop: scripts/quickstart.sh stop
MSG
