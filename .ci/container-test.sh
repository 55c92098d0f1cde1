#!/usr/bin/env bash
# The container image, end to end, with Debian's podman and runc: build the static, stripped
# binary, build the image (FROM scratch, offline), run it with a port on loopback, and check
# /health, a publish seen by an SSE subscriber, a clean drain on SIGTERM (exit 0, `shutdown
# complete`), the user and the limits it runs with, and the image's size. Run from the repo root
# as root; it cleans up the container and the image it made, pass or fail.
#
# On these machines podman needs `--runtime runc` (crun cannot start containers here) and both
# `--ulimit nofile=...` and `--ulimit nproc=...`: podman's defaults for root ask for 1048576 of
# each, over the hard limits this sandbox allows, and runc fails with "error setting rlimits".
# cgroupfs (no systemd), the file events backend and overlay storage are what podman picks by
# itself here, so no other setting is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  apt-get install -y -qq podman runc >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq podman runc >/dev/null; }
fi

tag="localhost/pubsub:ci-$$"
name="pubsub-ci-$$"
sse=$(mktemp)
sse_pid=""
cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "container test: FAILED; container log:"
    timeout 20 podman logs "$name" 2>&1 | tail -30 || true
    echo "SSE output:"
    cat "$sse" 2>/dev/null || true
  fi
  if [ -n "$sse_pid" ]; then kill "$sse_pid" 2>/dev/null || true; fi
  timeout 60 podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  timeout 60 podman rmi -f "$tag" >/dev/null 2>&1 || true
  rm -f "$sse"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fail() { echo "container test: $*" >&2; exit 1; }

# 1. The static binary, stripped, alone in the build context.
target_dir=${CARGO_TARGET_DIR:-target}
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" \
  cargo build --release --target x86_64-unknown-linux-gnu --bin pubsub
mkdir -p .ci/image
rm -f .ci/image/pubsub
objcopy --strip-all "$target_dir/x86_64-unknown-linux-gnu/release/pubsub" .ci/image/pubsub
# (Output is captured before grep -q reads it: with pipefail, a producer cut off by grep's early
# exit would fail the pipeline.)
headers=$(readelf -lW -d .ci/image/pubsub)
grep -q 'program interpreter' <<<"$headers" && fail "the binary is not static"
grep -q NEEDED <<<"$headers" && fail "the binary needs shared libraries"

# 2. The image: FROM scratch, so nothing is pulled.
timeout 300 podman build --runtime runc -t "$tag" -f Dockerfile .ci/image
size=$(timeout 20 podman image inspect --format '{{.Size}}' "$tag")
echo "container test: image $tag is $size bytes"
timeout 20 podman image ls "$tag"
[ "$size" -lt 10000000 ] || fail "image is $size bytes, expected under 10 MB"
config=$(timeout 20 podman image inspect --format '{{.Config.User}} {{.Config.StopSignal}}' "$tag")
[ "$config" = "65534:65534 SIGTERM" ] || fail "image user and stop signal are '$config'"

# 3. Run it, the port published on loopback only; podman picks a free host port.
# The limits are the README's, lowered to this shell's hard limits if those are smaller (a
# container cannot be given more than podman itself has here).
cap() {
  local hard
  hard=$(ulimit -H "$1")
  if [ "$hard" = unlimited ] || [ "$hard" -ge "$2" ]; then echo "$2"; else echo "$hard"; fi
}
nofile=$(cap -n 10000)
nproc=$(cap -u 4096)
timeout 60 podman run -d --name "$name" --runtime runc \
  --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" \
  -p 127.0.0.1::8000 "$tag" >/dev/null
addr=$(timeout 20 podman port "$name" 8000/tcp)
addr=${addr%%$'\n'*}
case "$addr" in 127.0.0.1:[0-9]*) ;; *) fail "unexpected published address '$addr'" ;; esac
url="http://$addr"
echo "container test: running at $url"

timeout 20 bash -c "until curl -fsS --max-time 2 '$url/health' >/dev/null 2>&1; do sleep 0.2; done" \
  || fail "/health did not answer within 20 s"
health=$(curl -fsS --max-time 5 "$url/health")
grep -q '"status":"ok"' <<<"$health" || fail "unexpected /health: $health"
logs=$(timeout 20 podman logs "$name" 2>&1)
grep -q 'listening on 0.0.0.0:8000' <<<"$logs" || fail "the server is not listening on 0.0.0.0:8000"

# It runs as nobody, with the limits it was given.
pid=$(timeout 20 podman inspect --format '{{.State.Pid}}' "$name")
grep -Eq '^Uid:\s+65534\s' "/proc/$pid/status" || fail "the server does not run as uid 65534"
grep -Eq "^Max open files\\s+$nofile\\s+$nofile" "/proc/$pid/limits" || fail "nofile limit not applied"

code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -X POST "$url/topics" \
  -H 'content-type: application/json' -d '{"name":"c"}')
[ "$code" = 201 ] || fail "creating the topic gave $code"

# An SSE subscriber, left open through the stop below so that the drain has a client to tell.
curl -sS -N --max-time 30 "$url/topics/c/events" >"$sse" 2>/dev/null &
sse_pid=$!
timeout 10 bash -c "until grep -q 'event: subscribed' '$sse'; do sleep 0.1; done" \
  || fail "the SSE subscription was not confirmed within 10 s"

published=$(curl -sS --max-time 5 -w ' %{http_code}' -X POST "$url/topics/c/messages" \
  -H 'content-type: application/json' -d '{"payload":"hi"}')
echo "container test: publish -> $published"
case "$published" in *'"seq":1'*' 201') ;; *) fail "unexpected publish answer: $published" ;; esac
timeout 10 bash -c "until grep -q '\"payload\":\"hi\"' '$sse' && grep -qx 'id: 1' '$sse'; do sleep 0.1; done" \
  || fail "the SSE subscriber did not get the event"
echo "container test: the SSE subscriber got the event"

# 4. Stop: SIGTERM (the image's STOPSIGNAL), a drain, exit 0.
timeout 60 podman stop -t 10 "$name" >/dev/null
exit_code=$(timeout 30 podman wait "$name")
inspected=$(timeout 20 podman inspect --format '{{.State.ExitCode}}' "$name")
if [ "$exit_code" != 0 ] || [ "$inspected" != 0 ]; then
  fail "exit code $exit_code (inspect: $inspected), expected 0"
fi
logs=$(timeout 20 podman logs "$name" 2>&1)
grep -q 'shutting down: draining 1 connection(s)' <<<"$logs" || fail "no drain in the log"
grep -q 'shutdown complete' <<<"$logs" || fail "no 'shutdown complete' in the log"
timeout 10 bash -c "while kill -0 $sse_pid 2>/dev/null; do sleep 0.1; done" || true
grep -q 'event: shutdown' "$sse" || fail "the SSE subscriber was not told of the shutdown"
echo "container test: stopped with exit code 0 after draining"

echo "container test: ok in $(($(date +%s) - started)) s (image $size bytes)"
