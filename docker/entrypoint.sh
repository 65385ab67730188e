#!/usr/bin/env bash
# Container entrypoint: serve the model with live delta updates.
#
# Environment (defaults in brackets):
#   JLSERVE_MODEL             checkpoint directory [/models/smollm2]
#   JLSERVE_PREPARE           if the model directory holds no checkpoint, build this one
#                             offline first: "smollm2" or "" for none [smollm2]
#   JLSERVE_STATE_DIR         applied deltas and version history [/state]
#   JLSERVE_ADMIN_TOKEN_FILE  admin bearer token (a compose/k8s secret) [/run/secrets/jlserve_admin_token]
#   JLSERVE_API_KEY_FILE      optional key file for the inference routes
#   JLSERVE_HOST / JLSERVE_PORT  [0.0.0.0 / 8000]
#   JLSERVE_WATCH             optional directory whose new delta files are applied
#   JLSERVE_SWAP_POLICY       drain | preempt [drain]
#   JLSERVE_DRAIN_TIMEOUT     seconds a drain waits for running requests [30]
# Arguments are passed to vLLM's engine (e.g. --tensor-parallel-size 2).
set -euo pipefail

model="${JLSERVE_MODEL:-/models/smollm2}"
prepare="${JLSERVE_PREPARE-smollm2}"
state="${JLSERVE_STATE_DIR:-/state}"
token_file="${JLSERVE_ADMIN_TOKEN_FILE:-/run/secrets/jlserve_admin_token}"
jlserve="${JLSERVE_BIN:-jlserve}"

if [[ ! -f "$model/config.json" ]]; then
  if [[ -z "$prepare" ]]; then
    echo "entrypoint: no checkpoint in $model and JLSERVE_PREPARE is empty" >&2
    exit 2
  fi
  echo "entrypoint: preparing $prepare into $model"
  "$jlserve" model prepare "$prepare" --out "$model"
fi
if [[ ! -r "$token_file" ]]; then
  echo "entrypoint: admin token file $token_file is missing or unreadable (mount it as a secret)" >&2
  exit 2
fi

args=(serve --model "$model" --state-dir "$state"
      --host "${JLSERVE_HOST:-0.0.0.0}" --port "${JLSERVE_PORT:-8000}"
      --admin-token-file "$token_file" --swap-policy "${JLSERVE_SWAP_POLICY:-drain}"
      --drain-timeout "${JLSERVE_DRAIN_TIMEOUT:-30}")
[[ -n "${JLSERVE_WATCH:-}" ]] && args+=(--watch "$JLSERVE_WATCH")
# The key stays in its file (read by the server), never in an environment or argv.
[[ -n "${JLSERVE_API_KEY_FILE:-}" ]] && args+=(--api-key-file "$JLSERVE_API_KEY_FILE")
exec "$jlserve" "${args[@]}" -- "$@"
