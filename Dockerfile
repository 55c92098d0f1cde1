# The broker as a container image: one static, stripped binary and nothing else (about 2.5 MB).
# The binary is built on the host first; the build context is a directory holding only it, so
# the image builds offline (FROM scratch pulls nothing) and the context stays tiny:
#
#   RUSTFLAGS='-C target-feature=+crt-static' \
#     cargo build --release --target x86_64-unknown-linux-gnu --bin pubsub
#   mkdir -p .ci/image
#   objcopy --strip-all target/x86_64-unknown-linux-gnu/release/pubsub .ci/image/pubsub
#   podman build -t pubsub -f Dockerfile .ci/image
#   podman run --rm -p 127.0.0.1:8000:8000 pubsub
#
# (On this project's sandboxed VMs podman also needs `--runtime runc --ulimit nofile=10000:10000
# --ulimit nproc=4096:4096`: crun cannot start containers there, and podman's default limits
# for root are over the hard limits the sandbox allows.)
#
# .ci/container-test.sh does all of this and checks the result (health, a publish seen over
# SSE, a clean stop on SIGTERM). Static glibc is fine here: with HOST=0.0.0.0 the address is
# parsed, not looked up, so no NSS module or resolver is needed at run time (a name such as
# HOST=localhost resolves too, from the /etc/hosts podman writes); mimalloc is linked in
# statically like everything else.
#
# No HEALTHCHECK: scratch has no shell and no curl to run one. Probe /health from outside
# instead, e.g. `curl -fsS http://127.0.0.1:8000/health` against the published port, or an
# orchestrator's HTTP probe (Kubernetes `httpGet: {path: /health, port: 8000}`).
FROM scratch

COPY --chmod=0555 pubsub /pubsub

# Every other setting (API_KEY, QUEUE_SIZE, MEMORY_LIMIT, ...) is an environment variable too:
# `podman run -e API_KEY=... ...`; `podman run IMAGE --help` lists them. Inside the container
# the server binds 0.0.0.0, so it warns at startup when API_KEY is unset, even if the host
# publishes the port on loopback only.
ENV HOST=0.0.0.0 PORT=8000
EXPOSE 8000

# nobody:nogroup by number: scratch has no /etc/passwd to look a name up in.
USER 65534:65534

# SIGTERM starts the drain: WebSockets are told and closed with 1001, and the process exits 0
# after logging `shutdown complete` (within SHUTDOWN_GRACE_MS, 2 s by default, well inside
# podman's and Kubernetes' default 10 s and 30 s stop timeouts).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/pubsub"]
