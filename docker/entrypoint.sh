#!/usr/bin/env bash
# Container entrypoint for the hotcold images.
#   (no argument) | serve [FLAGS] | -FLAG ...  -> `hotcold serve`, HOTCOLD_* variables mapped onto its flags
#   generate | perplexity | profile | loadtest  -> that hotcold subcommand, arguments unchanged
#   healthcheck                                 -> exit 0 when GET /health answers 200
#   anything else                               -> run as a command (e.g. bash)
# Before hotcold starts, the cache volume is seeded with links to the model baked into the image, so a
# fresh (even bind-mounted, empty) volume needs no download and the container starts offline.
set -euo pipefail

SEED=${HOTCOLD_SEED:-/opt/hotcold/seed}

seed_cache() {
    local cache=${HOTCOLD_CACHE:-}
    if [[ -z "$cache" || ! -d "$SEED" ]]; then
        return 0
    fi
    if ! mkdir -p "$cache" 2>/dev/null || [[ ! -w "$cache" ]]; then
        echo "hotcold-entrypoint: warning: $cache is not writable by uid $(id -u);" \
            "using the image's built-in cache read-only" >&2
        export HOTCOLD_CACHE="$SEED"
        return 0
    fi
    local rel
    while IFS= read -r -d '' rel; do
        rel=${rel#./}
        if [[ ! -e "$cache/$rel" ]]; then  # missing, or a dangling link from an older image
            mkdir -p "$(dirname "$cache/$rel")"
            ln -sfn "$SEED/$rel" "$cache/$rel"
        fi
    done < <(cd "$SEED" && find . -type f -print0)
}

serve() {
    local args=() extra=()
    add() { if [[ -n "${2:-}" ]]; then args+=("$1" "$2"); fi; }
    add --model "${HOTCOLD_MODEL:-}"
    add --plan "${HOTCOLD_PLAN:-}"
    add --host "${HOTCOLD_HOST:-0.0.0.0}"
    add --port "${HOTCOLD_PORT:-8000}"
    add --served-model-name "${HOTCOLD_SERVED_MODEL_NAME:-}"
    add --max-num-seqs "${HOTCOLD_MAX_NUM_SEQS:-}"
    add --max-model-len "${HOTCOLD_MAX_MODEL_LEN:-}"
    add --max-queue "${HOTCOLD_MAX_QUEUE:-}"
    add --api-key "${HOTCOLD_API_KEY:-}"
    read -r -a extra <<< "${HOTCOLD_EXTRA_ARGS:-}"  # further flags, split on whitespace
    seed_cache
    exec hotcold serve "${args[@]}" "${extra[@]}" "$@"
}

healthcheck() {
    exec python3 -c '
import os, sys, urllib.request
url = "http://127.0.0.1:%s/health" % os.environ.get("HOTCOLD_PORT", "8000")
try:
    urllib.request.urlopen(url, timeout=float(os.environ.get("HOTCOLD_HEALTH_TIMEOUT", "4")))
except Exception as exc:
    sys.exit("unhealthy: %s: %s" % (url, exc))
'
}

case "${1:-serve}" in
    serve) shift $(($# > 0 ? 1 : 0)); serve "$@" ;;
    -*) serve "$@" ;;
    healthcheck) healthcheck ;;
    generate | perplexity | profile | loadtest) seed_cache; exec hotcold "$@" ;;
    *) exec "$@" ;;
esac
