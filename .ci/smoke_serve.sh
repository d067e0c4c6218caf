#!/usr/bin/env bash
# Smoke of the README's serve command, exactly as written: `make serve`.
#
# Start it in the background (its own process group), wait for /health (it may first fetch and
# convert the Qwen pair, then load and calibrate: minutes), run the README's streamed chat
# completion with curl and check it holds data frames and [DONE], then SIGTERM the server and
# require exit 0 within the drain timeout. Any failure exits non-zero (CI turns red).
#
#   .ci/smoke_serve.sh            # from the repository root (or anywhere: it cd's there)
#
# Env: SMOKE_PORT (default 8000, the README's port), SMOKE_READY_TIMEOUT (s, default 1800),
#      SMOKE_DRAIN_TIMEOUT (s, default 30 = server.shutdown_timeout) and SMOKE_LOG.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${SMOKE_PORT:-8000}"
URL="http://127.0.0.1:${PORT}"
READY_TIMEOUT="${SMOKE_READY_TIMEOUT:-1800}"
DRAIN_TIMEOUT="${SMOKE_DRAIN_TIMEOUT:-30}"
LOG="${SMOKE_LOG:-$(mktemp -t smoke_serve.XXXXXX.log)}"
MAKE_PID=""

fail() {
    echo "smoke_serve: FAIL: $*" >&2
    echo "---- last lines of the server log ($LOG) ----" >&2
    tail -n 40 "$LOG" >&2 || true
    exit 1
}

cleanup() {  # never leave the server behind, whatever happened
    if [[ -n "$MAKE_PID" ]] && kill -0 "$MAKE_PID" 2>/dev/null; then
        kill -KILL -- "-$MAKE_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

child_of() {  # the first child of pid $1, from /proc (no procps needed)
    local stat
    for stat in /proc/[0-9]*/stat; do
        # field 4 of /proc/PID/stat is the parent pid (the command name, field 2, has no spaces
        # here: it is make's recipe, i.e. python or specdec)
        if [[ "$(cut -d' ' -f4 "$stat" 2>/dev/null)" == "$1" ]]; then
            cut -d' ' -f1 "$stat"
            return
        fi
    done
}

if curl -s -o /dev/null "$URL/health"; then
    fail "something already listens on $URL"
fi

echo "smoke_serve: make serve (log: $LOG)"
setsid make serve >"$LOG" 2>&1 &
MAKE_PID=$!

echo "smoke_serve: waiting up to ${READY_TIMEOUT}s for $URL/health"
deadline=$((SECONDS + READY_TIMEOUT))
until [[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health" || true)" == "200" ]]; do
    kill -0 "$MAKE_PID" 2>/dev/null || fail "make serve exited before /health was 200"
    ((SECONDS < deadline)) || fail "/health not 200 after ${READY_TIMEOUT}s"
    sleep 2
done
echo "smoke_serve: ready after ${SECONDS}s"

# The README's curl command, verbatim apart from the port and a bounded wait.
BODY="$(curl -sS -N --max-time 600 "$URL/v1/chat/completions" \
    -H 'Content-Type: application/json' -d '{
  "model": "qwen2.5-coder-1.5b-instruct", "stream": true, "max_tokens": 128,
  "messages": [{"role": "user", "content": "Write a Python function that reverses a list."}]}')" \
    || fail "the streamed chat completion failed"
frames="$(grep -c '^data: {' <<<"$BODY" || true)"
((frames >= 2)) || fail "expected data frames, got: ${BODY:0:500}"
grep -q '^data: \[DONE\]$' <<<"$BODY" || fail "no [DONE] frame in: ${BODY: -500}"
if grep -q '^data: {"error"' <<<"$BODY"; then fail "an error frame in the stream: ${BODY: -500}"; fi
echo "smoke_serve: streamed $frames data frames and [DONE]"

# SIGTERM the server itself (make's child: the recipe execs it); make then exits with the
# server's status, which must be 0 within the drain timeout.
SERVER_PID="$(child_of "$MAKE_PID")"
[[ -n "$SERVER_PID" ]] || fail "no server process under make (pid $MAKE_PID)"
echo "smoke_serve: SIGTERM to the server (pid $SERVER_PID)"
kill -TERM "$SERVER_PID"
deadline=$((SECONDS + DRAIN_TIMEOUT + 15))
while kill -0 "$MAKE_PID" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "still running ${DRAIN_TIMEOUT}s+15s after SIGTERM"
    sleep 0.5
done
set +e
wait "$MAKE_PID"
status=$?
set -e
MAKE_PID=""
((status == 0)) || fail "make serve exited $status after SIGTERM (want 0)"
grep -q '"event":"stopped"' "$LOG" || fail "the server did not log its clean stop"
echo "smoke_serve: OK (exit 0 after SIGTERM)"
