//! pubsub — an in-memory publish/subscribe broker over WebSocket, in one file.
//!
//! Clients connect to `ws://HOST:PORT/ws` and send JSON messages: `subscribe` (with an optional
//! `last_n` replay), `unsubscribe`, `publish` and `ping`. Every subscriber of a topic receives each
//! event once, in one order, numbered by a per-topic `seq`. REST endpoints on the same port create,
//! delete and list topics (`/topics`) and report `/health` and `/stats`. The wire contract is
//! documented in README.md.
//!
//! Run it with `cargo run --release`; `--help` lists the configuration.
//!
//! The shape of the data path, in one paragraph: the topic registry is a `DashMap`; each topic has
//! a subscriber set swapped atomically with `arc-swap` and one small `Mutex` (its ordering point)
//! that assigns `seq`, appends to the replay ring and pushes the event into each subscriber's
//! bounded, lock-free, drop-oldest queue. An event is serialized once; every subscriber shares its
//! bytes, its WebSocket frame included. Each WebSocket connection is one task that reads
//! requests, answers them in order, and drains its queue into the socket with one write per batch.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::FutureExt;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes, WebSocket};

/// mimalloc, not glibc's malloc: every event is allocated on the publisher's thread and freed
/// on whichever thread wrote it last, a pattern that sends glibc to its slow path on every
/// allocation (7% of server CPU in the fan-in benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// ---- limits and configuration ----

/// Largest HTTP request head (request line plus headers). Anything longer is a scanner or an
/// attack, and bounding it bounds the memory of a connection that has not been authenticated.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Most header lines in one request head; more is answered 431 like an oversized head.
pub(crate) const MAX_HEADERS: usize = 100;

/// Longest topic name, in bytes (names are ASCII).
const MAX_TOPIC_LEN: usize = 128;

/// Longest client-supplied message `id`, in bytes.
const MAX_ID_LEN: usize = 256;

/// Deepest JSON nesting accepted in a client message. serde_json skips over a `RawValue`
/// without a depth limit, so we check once before parsing and answer `BAD_REQUEST` instead of
/// passing a pathological payload on to every subscriber.
pub(crate) const MAX_JSON_DEPTH: usize = 128;

/// Events written per drain before the connection looks at its socket again, so that one busy
/// subscriber cannot keep its task from reading requests for long.
const DRAIN_BATCH: usize = 256;

/// How long a write may stall when heartbeats are off (with heartbeats on it is two intervals):
/// a peer that reads nothing for this long is dropped rather than holding its buffers forever.
const WRITE_STALL_LIMIT: Duration = Duration::from_secs(60);

/// tungstenite's per-connection buffers. The read buffer is allocated up front and kept for
/// the connection's life, so it is small: 10,000 idle connections should cost little. A busy
/// publisher's reads come from `ReadAhead`'s 16 KiB buffer, so 512-byte steps cost a copy
/// per three messages, not a system call. tungstenite writes only Pong and Close replies
/// (events and replies are framed by `Session`), so its write buffer stays small too.
const WS_READ_BUFFER: usize = 512;
const WS_WRITE_BUFFER: usize = 4 * 1024;

/// Upper bounds for the numeric settings, so a typo cannot ask for terabytes up front
/// (every connection allocates its whole queue when it opens).
const MAX_QUEUE_SIZE: usize = 1_000_000;
const MAX_MESSAGE_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// Everything the server can be told at start. `Default` is the documented configuration,
/// read from `SETTINGS`; tests build one and shrink what they need (a queue of 2, a heartbeat
/// of 50 ms).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) log_level: Level,
    /// Events queued per connection before the oldest is dropped.
    pub(crate) queue_size: usize,
    /// Events kept per topic for `last_n` and `since_seq` replays.
    pub(crate) replay_size: usize,
    /// Largest WebSocket message and REST body.
    pub(crate) max_message_bytes: usize,
    /// Open TCP connections of any kind; beyond it new ones get 503.
    pub(crate) max_connections: usize,
    /// Open TCP connections from one client address (0: no cap); beyond it new ones get 503.
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_topics: usize,
    /// Topics one connection may be subscribed to at once.
    pub(crate) max_subscriptions: usize,
    /// Ping interval; zero turns heartbeats (and dead-peer detection) off.
    pub(crate) heartbeat: Duration,
    /// How long shutdown may spend flushing queues before the process exits anyway.
    pub(crate) shutdown_grace: Duration,
    /// Subscribing or publishing to an unknown (valid) topic creates it.
    pub(crate) auto_create: bool,
    /// Bytes the broker may hold on clients' behalf, all together (see `Budget`).
    pub(crate) memory_limit: usize,
    /// The key every request but `GET /health` (and the console page) must present; `None`
    /// leaves the broker open.
    pub(crate) api_key: Option<String>,
    /// Publishes (and replaying subscribes) per second per WebSocket connection, and REST
    /// publishes per second per client address; 0 is no limit.
    pub(crate) rate_limit: u32,
    /// How many may come at once before the rate applies; 0 means `rate_limit`.
    pub(crate) rate_burst: u32,
    /// Deadline for a whole request head, from the connection's start or the previous
    /// response. Not a setting: it exists so tests can shrink it.
    pub(crate) head_timeout: Duration,
    /// The NATS server of cluster mode (feature `cluster`); `None` runs a single node.
    pub(crate) nats_url: Option<String>,
}

/// One setting: its variable, its default, what it means, and how a value is applied. This
/// table is the one place a setting is described: `Config::default`, the parser and `--help`
/// all read it. `apply` gets the trimmed value and says what is wrong with a bad one.
struct Setting {
    name: &'static str,
    default: &'static str,
    meaning: &'static str,
    apply: fn(&mut Config, &str) -> Result<(), String>,
}

/// The settings, in the order `--help` lists them.
const SETTINGS: &[Setting] = &[
    Setting {
        name: "HOST",
        default: "127.0.0.1",
        meaning: "address to bind (0.0.0.0 to serve other machines)",
        apply: |c, v| {
            if v.is_empty() {
                return Err("empty".into());
            }
            c.host = v.to_string();
            Ok(())
        },
    },
    Setting {
        name: "PORT",
        default: "8000",
        meaning: "port (0 = any free port; the chosen address is logged)",
        apply: |c, v| number(v, 0, 65535).map(|n| c.port = n as u16),
    },
    Setting {
        name: "LOG_LEVEL",
        default: "info",
        meaning: "error, warn, info or debug",
        apply: |c, v| {
            c.log_level = match v.to_ascii_lowercase().as_str() {
                "error" => Level::Error,
                "warn" => Level::Warn,
                "info" => Level::Info,
                "debug" => Level::Debug,
                _ => return Err("expected error, warn, info or debug".into()),
            };
            Ok(())
        },
    },
    Setting {
        name: "QUEUE_SIZE",
        default: "1000",
        meaning: "events queued per connection before drop-oldest",
        apply: |c, v| number(v, 1, MAX_QUEUE_SIZE as u64).map(|n| c.queue_size = n as usize),
    },
    Setting {
        name: "REPLAY_SIZE",
        default: "100",
        meaning: "events kept per topic for last_n and since_seq",
        apply: |c, v| number(v, 0, MAX_QUEUE_SIZE as u64).map(|n| c.replay_size = n as usize),
    },
    Setting {
        name: "MAX_MESSAGE_BYTES",
        default: "65536",
        meaning: "largest WebSocket message and REST body",
        apply: |c, v| {
            number(v, 1, MAX_MESSAGE_LIMIT as u64).map(|n| c.max_message_bytes = n as usize)
        },
    },
    Setting {
        name: "MAX_CONNECTIONS",
        default: "10000",
        meaning: "open connections; beyond it new ones get 503",
        apply: |c, v| number(v, 1, u32::MAX as u64).map(|n| c.max_connections = n as usize),
    },
    Setting {
        name: "MEMORY_LIMIT",
        default: "1073741824",
        meaning: "bytes the broker may hold for clients, all together (1 GiB)",
        apply: |c, v| number(v, 65_536, 1 << 48).map(|n| c.memory_limit = n as usize),
    },
    Setting {
        name: "MAX_CONNECTIONS_PER_IP",
        default: "0",
        meaning: "open connections from one address (0 = no cap); beyond it 503",
        apply: |c, v| number(v, 0, u32::MAX as u64).map(|n| c.max_connections_per_ip = n as usize),
    },
    Setting {
        name: "MAX_TOPICS",
        default: "10000",
        meaning: "topics; beyond it creating one gets 429",
        apply: |c, v| number(v, 1, u32::MAX as u64).map(|n| c.max_topics = n as usize),
    },
    Setting {
        name: "MAX_SUBSCRIPTIONS",
        default: "1000",
        meaning: "topics one connection may subscribe to",
        apply: |c, v| number(v, 1, u32::MAX as u64).map(|n| c.max_subscriptions = n as usize),
    },
    Setting {
        name: "HEARTBEAT_SECS",
        default: "30",
        meaning: "heartbeat interval; 0 turns it off",
        apply: |c, v| number(v, 0, 86_400).map(|n| c.heartbeat = Duration::from_secs(n)),
    },
    Setting {
        name: "SHUTDOWN_GRACE_MS",
        default: "2000",
        meaning: "how long shutdown may spend flushing queues",
        apply: |c, v| number(v, 0, 3_600_000).map(|n| c.shutdown_grace = Duration::from_millis(n)),
    },
    Setting {
        name: "API_KEY",
        default: "",
        meaning: "key for REST, WebSocket and SSE (X-API-Key or ?api_key=); empty = open",
        apply: |c, v| {
            c.api_key = (!v.is_empty()).then(|| v.to_string());
            Ok(())
        },
    },
    Setting {
        name: "RATE_LIMIT",
        default: "0",
        meaning: "publishes/s per connection and REST publishes/s per address (0 = none)",
        apply: |c, v| number(v, 0, 1_000_000).map(|n| c.rate_limit = n as u32),
    },
    Setting {
        name: "RATE_BURST",
        default: "0",
        meaning: "requests allowed at once before RATE_LIMIT applies (0 = RATE_LIMIT)",
        apply: |c, v| number(v, 0, 1_000_000).map(|n| c.rate_burst = n as u32),
    },
    Setting {
        name: "AUTO_CREATE",
        default: "false",
        meaning: "subscribing or publishing to an unknown topic creates it",
        apply: |c, v| {
            c.auto_create = match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err("expected true or false".into()),
            };
            Ok(())
        },
    },
    // Listed in every build, so that a build without the feature refuses the setting instead
    // of ignoring it and running a lone node where a cluster was asked for.
    Setting {
        name: "NATS_URL",
        default: "",
        meaning: "cluster mode: nats://host:port of a nats-server -js (build with --features cluster)",
        apply: |c, v| {
            c.nats_url = (!v.is_empty()).then(|| v.to_string());
            #[cfg(feature = "cluster")]
            cluster::check_url(v)?;
            #[cfg(not(feature = "cluster"))]
            if !v.is_empty() {
                return Err(
                    "this build has no cluster mode (cargo build --features cluster)".into(),
                );
            }
            Ok(())
        },
    },
];

/// A whole number within `min..=max`, digits only (`"+5".parse()` would accept a sign).
fn number(value: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = value
        .parse()
        .ok()
        .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
        .ok_or("not a whole number")?;
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

impl Default for Config {
    fn default() -> Self {
        // Placeholders only: every setting's documented default is applied from `SETTINGS`.
        let mut config = Config {
            host: String::new(),
            port: 0,
            log_level: Level::Info,
            queue_size: 0,
            replay_size: 0,
            max_message_bytes: 0,
            max_connections: 0,
            max_connections_per_ip: 0,
            max_topics: 0,
            max_subscriptions: 0,
            heartbeat: Duration::ZERO,
            shutdown_grace: Duration::ZERO,
            auto_create: false,
            memory_limit: 0,
            api_key: None,
            rate_limit: 0,
            rate_burst: 0,
            head_timeout: Duration::from_secs(10),
            nats_url: None,
        };
        for setting in SETTINGS {
            // The defaults are constants, checked by a test; a bad one is a bug, not input.
            (setting.apply)(&mut config, setting.default)
                .unwrap_or_else(|why| panic!("default of {}: {why}", setting.name));
        }
        config
    }
}

impl Config {
    /// Reads the environment, then the command line (`--queue-size 64` or `--queue-size=64`),
    /// which wins. The error names the setting, for the exit-status-2 message.
    pub(crate) fn from_sources(
        env: impl Fn(&str) -> Option<String>,
        args: &[String],
    ) -> Result<Config, String> {
        let mut values: Vec<(&Setting, String)> = Vec::new();
        for setting in SETTINGS {
            if let Some(value) = env(setting.name) {
                values.push((setting, value));
            }
        }
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_string())),
                None => (arg.as_str(), None),
            };
            let setting = flag
                .strip_prefix("--")
                .map(|f| f.to_ascii_uppercase().replace('-', "_"))
                .and_then(|name| SETTINGS.iter().find(|s| s.name == name))
                .ok_or_else(|| format!("unknown argument '{arg}' (see --help)"))?;
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))?,
            };
            values.push((setting, value));
        }
        let mut config = Config::default();
        for (setting, value) in values {
            let value = value.trim();
            (setting.apply)(&mut config, value)
                .map_err(|why| format!("invalid {}='{value}': {why}", setting.name))?;
        }
        Ok(config)
    }
}

fn help() -> String {
    let mut text = String::from(
        "pubsub — an in-memory WebSocket publish/subscribe broker\n\n\
         usage: pubsub [--setting value]...\n\n\
         Each setting is an environment variable or a flag (QUEUE_SIZE=64 is --queue-size 64);\n\
         a flag wins over the variable.\n\n",
    );
    for s in SETTINGS {
        let flag = format!("--{}", s.name.to_ascii_lowercase().replace('_', "-"));
        let _ = writeln!(
            text,
            "  {flag:<22} {:<18} default {:<10} {}",
            s.name, s.default, s.meaning
        );
    }
    text
}

// ---- logging ----

/// One line per record on stderr, filtered by the broker's configured level.
macro_rules! log {
    ($broker:expr, $level:expr, $($arg:tt)*) => {
        if $level <= $broker.config.log_level {
            eprintln!("{} {:<5} {}", now_rfc3339(), $level.name(), format_args!($($arg)*));
        }
    };
}

/// Cluster mode: topics, `seq` and history in NATS JetStream, shared by every node. Declared
/// after `log!`, which it uses.
#[cfg(feature = "cluster")]
#[path = "cluster.rs"]
mod cluster;

// ---- main, run and the shutdown signal ----

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", help());
        return;
    }
    let config = match Config::from_sources(|name| std::env::var(name).ok(), &args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("pubsub: {message}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(collect_when_idle)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pubsub: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let signals = match Signals::new() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("pubsub: cannot install signal handlers: {e}");
                std::process::exit(1);
            }
        };
        let listener = match TcpListener::bind((config.host.as_str(), config.port)).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!(
                    "pubsub: cannot listen on {}:{}: {e}",
                    config.host, config.port
                );
                std::process::exit(1);
            }
        };
        if let Ok(addr) = listener.local_addr() {
            // Printed at every log level: with PORT=0 it is the only way to learn the port.
            let ts = now_rfc3339();
            eprintln!("{ts} INFO  pubsub listening on {addr} (ws://{addr}/ws)");
            if !addr.ip().is_loopback()
                && config.api_key.is_none()
                && config.log_level >= Level::Warn
            {
                eprintln!(
                    "{ts} WARN  {addr} is reachable from other machines and API_KEY is not set: \
                     anyone who can reach it may publish, subscribe and delete topics"
                );
            }
        }
        run(listener, config, signals.first()).await;
    });
}

/// SIGINT and SIGTERM, registered before the server binds so that no signal sent after the
/// startup line can be missed.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// Resolves on the first signal and leaves a watcher that exits at once on a second.
    async fn first(mut self) {
        self.recv().await;
        tokio::spawn(async move {
            self.recv().await;
            eprintln!("pubsub: second signal, exiting now");
            std::process::exit(1);
        });
    }
}

/// Serves `listener` until `shutdown` resolves, then drains: every WebSocket is told, flushed
/// and closed with 1001 within `shutdown_grace`, and `run` returns when the last connection is
/// gone or the grace period is over.
pub(crate) async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let grace = config.shutdown_grace;
    let broker = Arc::new(Broker::new(config));
    #[cfg(feature = "cluster")]
    cluster::start(&broker);
    // `stop` carries the drain deadline to every connection; `alive` receivers are held by
    // connections so that `alive_tx.closed()` says when the last one is gone.
    let (stop_tx, stop_rx) = watch::channel(None::<Instant>);
    let (alive_tx, alive_rx) = watch::channel(());
    let housekeeping = tokio::spawn(return_freed_memory(Arc::clone(&broker.budget)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let conn = Connection {
                        broker: Arc::clone(&broker),
                        stop: stop_rx.clone(),
                        _alive: alive_rx.clone(),
                    };
                    tokio::spawn(conn.serve(stream, peer.ip()));
                }
                Err(e) => {
                    // EMFILE and friends: the listener is fine, the process is momentarily full.
                    log!(broker, Level::Warn, "accept failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    housekeeping.abort();
    let deadline = Instant::now() + grace;
    let open = broker.open_sockets.load(Ordering::Relaxed);
    log!(
        broker,
        Level::Info,
        "shutting down: draining {open} connection(s)"
    );
    // Before the watch: a request that sees the watch fire is then refused (503).
    let _ = broker.drain_deadline.set(deadline);
    let _ = stop_tx.send(Some(deadline));
    // Sessions and SSE streams look at the deadline whenever they wake: this wakes them all.
    // Straight through `notify`, which stores a permit for a task that is not waiting yet:
    // `wake` would skip a task that a publish has just woken and that has already looked.
    for outbox in broker.outboxes.iter() {
        outbox.notify.notify_one();
    }
    drop(alive_rx);
    // A little past the deadline, so that connections which used all of it can still send
    // their Close frames.
    let _ = timeout_at(deadline + Duration::from_millis(250), alive_tx.closed()).await;
    log!(broker, Level::Info, "shutdown complete");
}

/// Idle is idle for the process too. mimalloc keeps the pages a thread freed resident until
/// that thread allocates again, which idle connections never do: 300 connections after a
/// burst of 8 KiB events stayed at 83 MiB of RSS, against 20 MiB before the burst. So once a
/// burst is over (what the budget counts has fallen to half its high point, by 1 MiB or more),
/// and every second while the budget is over three quarters full, this asks every worker to
/// hand its freed pages back, the next time it has nothing to do (`collect_when_idle`, the
/// runtime's park hook): RSS then returns to within 1 MiB of where it was.
async fn return_freed_memory(budget: Arc<Budget>) {
    const FALL: usize = 1 << 20;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut high = 0;
    loop {
        tick.tick().await;
        let used = budget.used();
        let burst_over = high > used + FALL && used < high / 2;
        // Near the limit, events are shed and replaced all the time, freed on one thread and
        // allocated on another: collecting each second keeps that churn from adding up.
        let pressed = used > budget.limit / 4 * 3;
        if burst_over || pressed {
            COLLECT.fetch_add(1, Ordering::Relaxed);
            high = used;
        } else {
            high = high.max(used);
        }
    }
}

/// Bumped when freed memory should go back to the OS; each worker thread compares it with
/// the value it last acted on when it parks.
static COLLECT: AtomicU64 = AtomicU64::new(0);

fn collect_when_idle() {
    thread_local! {
        static DONE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let wanted = COLLECT.load(Ordering::Relaxed);
    if DONE.get() != wanted {
        DONE.set(wanted);
        // SAFETY: `mi_collect` has no preconditions; it works on the calling thread's heap.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

// ---- accepting a connection and routing it ----

/// One accepted TCP connection before it knows what it is: REST requests on a kept-alive
/// connection, a WebSocket after the upgrade, or an SSE stream.
struct Connection {
    broker: Arc<Broker>,
    stop: watch::Receiver<Option<Instant>>,
    /// Dropped with the connection; `run` waits for all of these at shutdown.
    _alive: watch::Receiver<()>,
}

/// Counts an open TCP connection for `MAX_CONNECTIONS` (and, when it is capped, for
/// `MAX_CONNECTIONS_PER_IP`) and uncounts it on every exit path.
struct SocketGuard {
    broker: Arc<Broker>,
    /// The client's address, when connections per address are counted.
    ip: Option<IpAddr>,
}

impl SocketGuard {
    /// Counts the connection, and says which limit it is over, if any.
    fn admit(broker: &Arc<Broker>, ip: IpAddr) -> (SocketGuard, Option<&'static str>) {
        let open = broker.open_sockets.fetch_add(1, Ordering::AcqRel) + 1;
        let cap = broker.config.max_connections_per_ip;
        let from_ip = (cap > 0).then(|| {
            let mut count = broker.per_ip.entry(ip).or_insert(0);
            *count += 1;
            *count
        });
        let guard = SocketGuard {
            broker: Arc::clone(broker),
            ip: from_ip.map(|_| ip),
        };
        let over = if open > broker.config.max_connections {
            Some("too many open connections")
        } else if from_ip.is_some_and(|n| n > cap) {
            Some("too many open connections from your address")
        } else {
            None
        };
        (guard, over)
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.broker.open_sockets.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip
            && let Entry::Occupied(mut count) = self.broker.per_ip.entry(ip)
        {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// What follows a connection's HTTP exchange.
enum Next {
    /// A WebSocket upgrade: its request, and any bytes read past the head.
    Upgrade(Connection, TcpStream, Request, Vec<u8>),
    /// An SSE stream of a topic.
    Events(Connection, TcpStream, String, Replay),
    Done,
}

impl Connection {
    /// The task of one TCP connection: the HTTP exchange, boxed so that its buffers and
    /// futures are freed when it ends. A WebSocket session gets a task of its own, just its
    /// size, and this one ends; an SSE stream is served here.
    async fn serve(self, stream: TcpStream, ip: IpAddr) {
        let (guard, over) = SocketGuard::admit(&self.broker, ip);
        // Awaited in its own statement: a temporary of a `match` scrutinee keeps its room in
        // the task until the match ends, moved into the box or not.
        let next = Box::pin(self.exchange(stream, ip, over)).await;
        match next {
            Next::Upgrade(connection, stream, request, leftover) => {
                let broker = Arc::clone(&connection.broker);
                let handshake = Self::handshake(broker, stream, request, leftover);
                if let Some(ws) = Box::pin(handshake).await {
                    tokio::spawn(Session::start(connection, guard, ws));
                }
            }
            Next::Events(connection, stream, name, replay) => {
                Box::pin(SseStream::serve(connection, stream, name, replay)).await
            }
            Next::Done => {}
        }
    }

    /// Requests and responses on one connection, until it upgrades, streams, or ends.
    async fn exchange(mut self, mut stream: TcpStream, ip: IpAddr, over: Option<&str>) -> Next {
        let broker = Arc::clone(&self.broker);
        let _ = stream.set_nodelay(true);
        if let Some(why) = over {
            let response = Response::error(503, "LIMIT_EXCEEDED", why).closing();
            let _ = response.write_within(&mut stream, 1).await;
            return Next::Done;
        }
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        let mut deadline = Instant::now() + broker.config.head_timeout;
        // The request buffer's share of the budget: a body being read is unread input.
        let mut held = Charged::new(&broker.budget, buf.capacity());
        loop {
            let stop_deadline = *self.stop.borrow();
            let read_until = stop_deadline.map_or(deadline, |d| d.min(deadline));
            let request = match read_head(&mut stream, &mut buf, read_until, &mut self.stop).await {
                HeadRead::Request(request, len) => {
                    buf.drain(..len);
                    request
                }
                HeadRead::Rejected(e) => {
                    let _ = Response::from_http_error(e)
                        .write_within(&mut stream, 1)
                        .await;
                    return Next::Done;
                }
                HeadRead::Closed => return Next::Done,
            };
            if broker.stopping().is_some() {
                let response = Response::error(503, "SHUTTING_DOWN", "the server is shutting down");
                let _ = response.closing().write_within(&mut stream, 1).await;
                return Next::Done;
            }
            if !broker.authorized(&request) {
                let why = "this broker needs its API key: X-API-Key header or ?api_key=";
                let mut response = Response::error(401, "UNAUTHORIZED", why);
                // A body is left unread, so the connection ends after the answer.
                let body = request.content_length.unwrap_or(0) > 0;
                if body || !request.keep_alive() || request.wants_upgrade() {
                    response = response.closing();
                }
                if response.write_within(&mut stream, 10).await.is_err() || response.close {
                    return Next::Done;
                }
                deadline = Instant::now() + broker.config.head_timeout;
                continue;
            }
            if request.path == "/ws" && request.method == "GET" && request.wants_upgrade() {
                drop(held);
                return Next::Upgrade(self, stream, request, buf);
            }
            let keep_alive = request.keep_alive();
            let body_len = match self
                .read_body(&mut stream, &mut buf, &mut held, &request, deadline)
                .await
            {
                Ok(len) => len,
                Err(BodyError::TooLarge) => {
                    let message =
                        format!("body larger than {} bytes", broker.config.max_message_bytes);
                    let response = Response::error(413, "PAYLOAD_TOO_LARGE", &message);
                    let _ = response.closing().write_within(&mut stream, 10).await;
                    return Next::Done;
                }
                Err(BodyError::Closed) => return Next::Done,
            };
            let answer = match &broker.engine {
                Engine::Local => rest(&broker, &request, &buf[..body_len], ip),
                #[cfg(feature = "cluster")]
                Engine::Cluster(c) => {
                    Box::pin(c.rest(&broker, &request, &buf[..body_len], ip)).await
                }
            };
            // Idle is idle: the body's room goes back once it has been handled.
            buf.drain(..body_len);
            if buf.capacity() > 4096 {
                buf.shrink_to(1024);
            }
            held.track(buf.capacity());
            let response = match answer {
                Answer::Respond(response) if keep_alive => response,
                Answer::Respond(response) => response.closing(),
                Answer::Stream(name, replay) => {
                    return Next::Events(self, stream, name, replay);
                }
            };
            // Unsent output: a big /stats read slowly is held until it is written.
            let _unsent = Charged::new(&broker.budget, response.body.len());
            let close = response.close;
            if response.write_within(&mut stream, 10).await.is_err() || close {
                return Next::Done;
            }
            deadline = Instant::now() + broker.config.head_timeout;
        }
    }

    /// Reads the `Content-Length` bytes of body into `buf` (some may already be there), and
    /// returns their length. The limit is checked before anything is allocated or read.
    async fn read_body(
        &self,
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
        held: &mut Charged,
        request: &Request,
        deadline: Instant,
    ) -> Result<usize, BodyError> {
        let len = request.content_length.unwrap_or(0);
        if len > self.broker.config.max_message_bytes as u64 {
            return Err(BodyError::TooLarge);
        }
        let len = len as usize;
        // Room for what arrives, as it arrives: a length the client announces but never sends
        // costs nothing up front.
        while buf.len() < len {
            buf.reserve((len - buf.len()).min(4096));
            held.track(buf.capacity());
            match timeout_at(deadline, stream.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(BodyError::Closed),
            }
        }
        Ok(len)
    }

    /// Completes the WebSocket handshake ourselves (the head is already parsed): the stream,
    /// with any bytes read past the head, ready for a session.
    async fn handshake(
        broker: Arc<Broker>,
        mut stream: TcpStream,
        request: Request,
        leftover: Vec<u8>,
    ) -> Option<Ws> {
        let key = request.header("sec-websocket-key").map(str::trim);
        let version = request.header("sec-websocket-version").map(str::trim);
        if version != Some("13") {
            let why = "unsupported WebSocket version; use 13";
            let response = Response::error(426, "BAD_REQUEST", why)
                .header("Sec-WebSocket-Version", "13")
                .closing();
            let _ = response.write_within(&mut stream, 1).await;
            return None;
        }
        let Some(key) = key.filter(|k| is_websocket_key(k)) else {
            let why = "missing or malformed Sec-WebSocket-Key";
            let response = Response::error(400, "BAD_REQUEST", why).closing();
            let _ = response.write_within(&mut stream, 1).await;
            return None;
        };
        let accept = derive_accept_key(key.as_bytes());
        drop(request);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let written = timeout(Duration::from_secs(10), stream.write_all(head.as_bytes())).await;
        drop(head);
        if !matches!(written, Ok(Ok(()))) {
            return None;
        }
        let limit = broker.config.max_message_bytes;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(WS_WRITE_BUFFER)
            .max_write_buffer_size(WS_WRITE_BUFFER + 2 * limit + 4096)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        // The bytes read past the head, in a buffer of their own (usually none): the head's
        // 1 KiB buffer would otherwise become tungstenite's for the connection's life.
        let ws = WebSocket::from_partially_read(
            ReadAhead::new(stream, &broker.budget),
            leftover.as_slice().to_vec(),
            Role::Server,
            Some(ws_config),
        );
        Some(ws)
    }
}

enum BodyError {
    TooLarge,
    Closed,
}

/// A `Sec-WebSocket-Key` is 16 bytes in base64: 22 characters and `==`.
fn is_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && &b[22..] == b"=="
}

// ---- shared state: the broker, topics, events, outboxes ----

/// State shared by every connection.
pub(crate) struct Broker {
    pub(crate) config: Config,
    /// Topic name → topic. Looked up on every publish; entries are cloned out (`Arc`) and the
    /// map guard dropped at once, never held across an `.await`.
    topics: DashMap<String, Arc<Topic>>,
    /// Number of topics, kept beside the map so `MAX_TOPICS` is checked without a scan.
    topic_count: AtomicUsize,
    /// Topics ever created, so that every incarnation of a name gets its own `epoch`.
    created: AtomicU64,
    /// Every open TCP connection, for `MAX_CONNECTIONS`.
    open_sockets: AtomicUsize,
    /// Open TCP connections per client address, for `MAX_CONNECTIONS_PER_IP`; empty (and
    /// never touched) when that is 0.
    per_ip: DashMap<IpAddr, usize>,
    /// Open WebSocket and SSE connections, for `/health`.
    sessions: AtomicUsize,
    /// Source of connection ids (for logs and server-assigned message ids).
    next_id: AtomicU64,
    /// What the broker holds for clients, against `MEMORY_LIMIT`.
    budget: Arc<Budget>,
    /// Every connection's outbox, so shedding can reach the queues of slow subscribers.
    outboxes: DashMap<u64, Arc<Outbox>>,
    /// One shedder at a time.
    shedding: Mutex<()>,
    /// `SLOW_CONSUMER` notices sent, for `/metrics` (a notice is rare: one per drop streak).
    slow_notices: AtomicU64,
    /// REST publishers' token buckets, per client address (only with `RATE_LIMIT`).
    rest_buckets: DashMap<IpAddr, TokenBucket>,
    started: Instant,
    /// The drain deadline, set when shutdown begins: REST answers 503 from then on, and a
    /// session or SSE stream says goodbye the next time it wakes (the shutdown wakes them
    /// all), with no future of its own waiting for it.
    drain_deadline: OnceLock<Instant>,
    /// Where topics live and publishes get their `seq`.
    engine: Engine,
}

/// Where topics live and publishes get their `seq`: here (`Topic::publish`), or in NATS
/// JetStream, shared by every node of a cluster (cluster.rs). Only `Local` exists without
/// the `cluster` feature, so matching on it costs the single-node path nothing.
enum Engine {
    Local,
    #[cfg(feature = "cluster")]
    Cluster(Box<cluster::Cluster>),
}

impl Broker {
    fn new(config: Config) -> Broker {
        Broker {
            topics: DashMap::new(),
            topic_count: AtomicUsize::new(0),
            created: AtomicU64::new(0),
            open_sockets: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            sessions: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            budget: Arc::new(Budget {
                used: AtomicUsize::new(0),
                limit: config.memory_limit,
            }),
            outboxes: DashMap::new(),
            shedding: Mutex::new(()),
            slow_notices: AtomicU64::new(0),
            rest_buckets: DashMap::new(),
            started: Instant::now(),
            drain_deadline: OnceLock::new(),
            #[cfg(not(feature = "cluster"))]
            engine: Engine::Local,
            #[cfg(feature = "cluster")]
            engine: cluster::engine(&config),
            config,
        }
    }

    /// The drain deadline, once shutdown has begun.
    fn stopping(&self) -> Option<Instant> {
        self.drain_deadline.get().copied()
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.get(name).map(|entry| Arc::clone(entry.value()))
    }

    /// The topic a subscribe or publish names: unknown is `TOPIC_NOT_FOUND`, unless
    /// `AUTO_CREATE` is on, which creates it (within `MAX_TOPICS`).
    fn find_topic(&self, name: &str) -> Result<Arc<Topic>, Reject> {
        if let Some(topic) = self.topic(name) {
            return Ok(topic);
        }
        if !self.config.auto_create {
            return Err(topic_not_found(name));
        }
        match self.create_topic(name) {
            Ok(topic) | Err(Created::Exists(topic)) => Ok(topic),
            Err(Created::Full) => Err(too_many_topics(self.config.max_topics)),
        }
    }

    fn create_topic(&self, name: &str) -> Result<Arc<Topic>, Created> {
        match self.topics.entry(name.to_string()) {
            Entry::Occupied(slot) => Err(Created::Exists(Arc::clone(slot.get()))),
            Entry::Vacant(slot) => {
                if self.topic_count.fetch_add(1, Ordering::AcqRel) >= self.config.max_topics {
                    self.topic_count.fetch_sub(1, Ordering::AcqRel);
                    return Err(Created::Full);
                }
                let n = self.created.fetch_add(1, Ordering::Relaxed) + 1;
                let budget = Arc::clone(&self.budget);
                let topic = Arc::new(Topic::new(name, n, self.config.replay_size, budget));
                slot.insert(Arc::clone(&topic));
                Ok(topic)
            }
        }
    }

    /// Removes the topic and tells each of its subscribers, through their outboxes, so that
    /// the notice takes its place after the topic's events already queued.
    fn delete_topic(&self, name: &str) -> bool {
        let Some((_, topic)) = self.topics.remove(name) else {
            return false;
        };
        self.topic_count.fetch_sub(1, Ordering::AcqRel);
        for outbox in topic.close() {
            outbox.topic_deleted(&topic.shared);
        }
        true
    }
}

/// Why a topic was not created.
enum Created {
    Exists(Arc<Topic>),
    Full,
}

/// The part of a topic that its events point back to: identity (compared by pointer) and the
/// drop counter, which an evicted event must find after the topic itself may be gone.
pub(crate) struct TopicShared {
    dropped: AtomicU64,
    /// Events written to subscribers (replays included), added by each connection once per
    /// run of events of this topic, not once per event.
    delivered: AtomicU64,
    /// Where the topic's events are counted while they live.
    budget: Arc<Budget>,
}

pub(crate) struct Topic {
    name: String,
    /// Fixed at creation and different for every incarnation of the name, so a client
    /// resuming with `since_seq` learns that the `seq` it holds belongs to a deleted topic.
    epoch: String,
    shared: Arc<TopicShared>,
    /// Outboxes of the subscribers, as of the last rebuild: swapped whole (`rcu`) under the
    /// ordering lock. A small set is rebuilt on every change; a large one only once the
    /// changes since (`TopicState::joined` and `left`) amount to a quarter of it, so that
    /// subscribing and unsubscribing cost O(1) amortized however many subscribers there are.
    subscribers: ArcSwap<Vec<Arc<Outbox>>>,
    /// How many subscribers there are, for `/stats` and `/health`, which read it without the lock.
    subscriber_count: AtomicUsize,
    /// Messages published, stored under the ordering lock and read without it (`/stats`,
    /// `/metrics`), so a scrape never contends with publishers.
    published: AtomicU64,
    /// The ordering point: a std `Mutex`, not a tokio one, because nothing awaits while it is
    /// held. It is held only to assign `seq`, append to the ring and make the non-blocking
    /// queue pushes, so every subscriber sees one order (ascending `seq`) however many
    /// publishers run at once, and a subscriber registered here reads the replay at the same
    /// instant — no event can fall between the replay and the live stream, or land in both.
    /// A single writer task per topic would give the same order but add a hop and a wake-up
    /// to every publish; the lock is uncontended in the common one-publisher case.
    state: Mutex<TopicState>,
    /// Set under the ordering lock by `close`; read there by `publish` and `subscribe`, and
    /// without the lock by a connection checking a topic it holds.
    deleted: AtomicBool,
}

struct TopicState {
    next_seq: u64,
    /// The `ts` of the last event: a publisher whose clock read came before another's but
    /// reached the lock after it takes this one, so `ts` never decreases along `seq`.
    last_ts: Timestamp,
    /// The last events, oldest first, with consecutive `seq`s ending at `next_seq - 1`.
    ring: VecDeque<Arc<Event>>,
    replay_size: usize,
    /// Subscribers added since the last rebuild of a large set: delivered to after it.
    joined: Vec<Arc<Outbox>>,
    /// Subscribers removed since the last rebuild of a large set (outbox addresses; each is
    /// still held in `subscribers` or `joined`, so no address is reused while it is here):
    /// skipped on delivery. Empty nearly always, and then delivery does not look at it.
    left: HashSet<usize>,
}

impl TopicState {
    /// The `ts` of the next event, read from the clock as `now`: never before the last one.
    /// Compared by the milliseconds alone: within one, the text is the same.
    fn stamp(&mut self, now: Timestamp) -> Timestamp {
        if now.millis >= self.last_ts.millis {
            self.last_ts = now;
        }
        self.last_ts
    }
}

/// A set this small is copied on every change: cheaper than keeping `joined` and `left`.
const SMALL_SET: usize = 64;

fn address(outbox: &Arc<Outbox>) -> usize {
    Arc::as_ptr(outbox) as usize
}

/// Which past events a subscriber asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// The last `n` the ring holds (0: none).
    Last(usize),
    /// Every event after this `seq` that the ring still holds.
    Since(u64),
}

/// What a subscriber gets at the ordering point: the replay, and how many events it asked
/// for that the ring no longer holds.
struct Backlog {
    events: Vec<Arc<Event>>,
    missed: u64,
}

impl Topic {
    fn new(name: &str, incarnation: u64, replay_size: usize, budget: Arc<Budget>) -> Topic {
        let created = Timestamp::now();
        Topic {
            name: name.to_string(),
            epoch: format!("{}.{incarnation}", created.millis),
            shared: Arc::new(TopicShared {
                dropped: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                budget,
            }),
            subscribers: ArcSwap::from_pointee(Vec::new()),
            subscriber_count: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            state: Mutex::new(TopicState {
                next_seq: 1,
                last_ts: created,
                ring: VecDeque::with_capacity(replay_size.min(1024)),
                replay_size,
                joined: Vec::new(),
                left: HashSet::new(),
            }),
            deleted: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        // Nothing panics while holding the lock; if something ever did, the state is still
        // consistent enough to keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    fn subscriber_count(&self) -> usize {
        self.subscriber_count.load(Ordering::Acquire)
    }

    fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Assigns the next `seq`s to `events` (drafts, in the order given) and delivers them, in
    /// one critical section however many there are: a burst takes the lock once and wakes each
    /// subscriber once. Encoding happens before the lock; under it, only what gives the order.
    /// Returns the first `seq` and the `ts` they share; `None` if the topic was deleted.
    fn publish(&self, mut events: Vec<Arc<Event>>, ts: Timestamp) -> Option<(u64, Timestamp)> {
        let mut state = self.lock();
        if self.is_deleted() {
            return None;
        }
        let first = state.next_seq;
        state.next_seq += events.len() as u64;
        self.published.store(state.next_seq - 1, Ordering::Release);
        let ts = state.stamp(ts);
        for (event, seq) in events.iter_mut().zip(first..) {
            Event::seal(event, seq, ts);
        }
        let evicted = self.deliver(&mut state, events);
        // What the ring evicted is freed outside the critical section.
        drop(state);
        drop(evicted);
        Some((first, ts))
    }

    /// Under the ordering lock: hands sealed `events` to every subscriber, then to the ring.
    /// Returns what the ring evicted (or, without a ring, the events themselves), for the
    /// caller to drop once the lock is released.
    fn deliver(&self, state: &mut TopicState, mut events: Vec<Arc<Event>>) -> Vec<Arc<Event>> {
        let subscribers = self.subscribers.load();
        for outbox in subscribers.iter().chain(&state.joined) {
            // `left` is empty nearly always, and then no lookup is made.
            if state.left.is_empty() || !state.left.contains(&address(outbox)) {
                outbox.push(&events);
            }
        }
        if state.replay_size > 0 {
            for event in &mut events {
                if state.ring.len() == state.replay_size
                    && let Some(oldest) = state.ring.pop_front()
                {
                    state.ring.push_back(std::mem::replace(event, oldest));
                } else {
                    state.ring.push_back(Arc::clone(event));
                }
            }
        }
        events
    }

    /// Registers `outbox` and reads the replay it asked for, at the ordering point.
    fn subscribe(&self, outbox: &Arc<Outbox>, replay: Replay) -> Option<Backlog> {
        outbox.open();
        let mut state = self.lock();
        if self.is_deleted() {
            return None;
        }
        // Back before a rebuild: its old entry is still there, and simply counts again.
        if !state.left.remove(&address(outbox)) {
            let current = self.subscribers.load().len() + state.joined.len();
            state.joined.push(Arc::clone(outbox));
            if current < SMALL_SET || state.joined.len() > current / 4 {
                self.rebuild(&mut state);
            }
        }
        self.subscriber_count.fetch_add(1, Ordering::AcqRel);
        let ring = &state.ring;
        let (skip, missed) = match replay {
            Replay::Last(n) => (ring.len().saturating_sub(n), 0),
            Replay::Since(after) => {
                let oldest = ring.front().map_or(state.next_seq, |event| event.seq);
                let first_wanted = after.saturating_add(1);
                let skip = first_wanted.saturating_sub(oldest).min(ring.len() as u64);
                (skip as usize, oldest.saturating_sub(first_wanted))
            }
        };
        let events = ring.iter().skip(skip).cloned().collect();
        Some(Backlog { events, missed })
    }

    /// When the oldest event of the replay ring was accepted (ms), if it holds any.
    fn oldest_retained(&self) -> Option<u64> {
        self.lock().ring.front().map(|event| event.millis)
    }

    /// Sheds the oldest replay entry; returns when the next oldest was accepted. A later
    /// `last_n` returns fewer events, and `since_seq` counts the shed ones as `missed`.
    fn shed_oldest(&self) -> Option<u64> {
        let mut state = self.lock();
        let shed = state.ring.pop_front();
        let next = state.ring.front().map(|event| event.millis);
        drop(state);
        drop(shed);
        next
    }

    /// Removes a subscriber (a no-op once the topic is deleted: `close` took them all).
    fn unsubscribe(&self, outbox: &Arc<Outbox>) {
        let mut state = self.lock();
        if self.is_deleted() {
            return;
        }
        state.left.insert(address(outbox));
        let held = self.subscribers.load().len() + state.joined.len();
        if held <= SMALL_SET || state.left.len() > held / 4 {
            self.rebuild(&mut state);
        }
        self.subscriber_count.fetch_sub(1, Ordering::AcqRel);
    }

    /// Folds `joined` and `left` into a new snapshot. Called under the ordering lock, after
    /// changes numbering a quarter of the set (or any change to a small one): O(1) amortized.
    fn rebuild(&self, state: &mut TopicState) {
        let joined = std::mem::take(&mut state.joined);
        let left = std::mem::take(&mut state.left);
        self.subscribers.rcu(|current| {
            current
                .iter()
                .chain(&joined)
                .filter(|outbox| !left.contains(&address(outbox)))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Marks the topic deleted (no publish or subscribe succeeds after this) and hands back
    /// the subscribers it had.
    fn close(&self) -> Vec<Arc<Outbox>> {
        let mut state = self.lock();
        self.deleted.store(true, Ordering::Release);
        state.ring.clear();
        self.rebuild(&mut state);
        let subscribers = self.subscribers.swap(Arc::new(Vec::new()));
        self.subscriber_count.store(0, Ordering::Release);
        drop(state);
        subscribers.iter().cloned().collect()
    }
}

/// A message's `id`: the client's (raw JSON, a string literal), or one the server assigns
/// from the publishing connection and its count of unnamed messages.
#[derive(Clone, Copy)]
enum MessageId<'a> {
    Given(&'a str),
    Assigned(u64, u64),
}

/// Appends the decimal digits of `n`, two at a time: every publish writes three or four
/// integers (ids, `seq`), and the profile showed the digit-at-a-time loop at 5% of fan-in CPU.
/// The digits are written in place into 20 bytes appended and then cut back: appending just
/// the digits from a stack buffer was a call to `memcpy` (3% of fan-in CPU), and appending
/// the whole stack buffer stalled on reading back what had just been written to it. The 20
/// bytes never need more room than a 20-digit number would, so what `draft` reserves suffices.
pub(crate) fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let count = n.checked_ilog10().map_or(1, |log| log as usize + 1);
    let len = buf.len();
    buf.extend_from_slice(&[0; 20]);
    let digits = &mut buf[len..len + count];
    let mut at = count;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        digits[..2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        digits[0] = b'0' + n as u8;
    }
    buf.truncate(len + count);
}

/// One published event, serialized once; every subscriber queue holds the same `Arc`.
pub(crate) struct Event {
    topic: Arc<TopicShared>,
    seq: u64,
    /// `ts` in milliseconds, so shedding can find the oldest replay entries across topics.
    millis: u64,
    /// What the budget was charged for this event, given back when it is dropped.
    charged: usize,
    /// The whole WebSocket frame from `start` on: header, then the `event` JSON from
    /// `HEADER_ROOM` on. Server frames are unmasked, so these bytes are the same for every
    /// subscriber: a WebSocket writes them as they are, an SSE stream frames the JSON.
    wire: Vec<u8>,
    start: usize,
    /// Whether the JSON holds a line break, which only a publisher's whitespace can put
    /// there: 0 not looked at yet, 1 no, 2 yes. Found by the first SSE writer that needs to
    /// know (a line break starts another `data:` line), so WebSocket delivery never pays for it.
    line_breaks: AtomicU8,
}

impl Event {
    /// Encodes all of the event but `seq` and `ts`, outside the ordering lock. `id` and
    /// `payload` are raw JSON, copied byte for byte. A draft is not charged to the budget:
    /// its publisher charges the `footprint` of a burst's drafts in one sum, and `seal`
    /// records each one's share, which the event gives back when it is freed.
    fn draft(topic: &Arc<TopicShared>, name: &str, id: MessageId, payload: &str) -> Arc<Event> {
        let id_len = match id {
            MessageId::Given(raw) => raw.len(),
            MessageId::Assigned(..) => ASSIGNED_ID,
        };
        let capacity = event_capacity(name, id_len, payload);
        let mut wire = Vec::with_capacity(capacity);
        wire.extend_from_slice(&[0; HEADER_ROOM]);
        Json::message(&mut wire, "event")
            .plain("topic", name)
            .open("message")
            .id("id", id)
            .raw("payload", payload.as_bytes())
            .close();
        Arc::new(Event {
            topic: Arc::clone(topic),
            seq: 0,
            millis: 0,
            charged: 0,
            wire,
            start: 0,
            line_breaks: AtomicU8::new(0),
        })
    }

    /// Completes a draft at the ordering point: `seq`, `ts` and the frame header, and its
    /// share of the budget, which its publisher has charged. The capacity reserved by
    /// `draft` covers them, so nothing is allocated under the lock. A draft already shared
    /// (which `publish` never makes) is left as it is, uncharged.
    fn seal(event: &mut Arc<Event>, seq: u64, ts: Timestamp) {
        let Some(fresh) = Arc::get_mut(event) else {
            debug_assert!(false, "a draft is never shared before it is sealed");
            return;
        };
        fresh.charged = fresh.footprint();
        fresh.seq = seq;
        fresh.millis = ts.millis;
        Json::resume(&mut fresh.wire).num("seq", seq).ts(ts).end();
        let (header, len) = frame_header(OPCODE_TEXT, fresh.wire.len() - HEADER_ROOM);
        fresh.start = HEADER_ROOM - len;
        fresh.wire[fresh.start..HEADER_ROOM].copy_from_slice(&header[..len]);
    }

    /// What the event costs the budget.
    fn footprint(&self) -> usize {
        std::mem::size_of::<Event>() + self.wire.capacity()
    }

    fn frame(&self) -> &[u8] {
        &self.wire[self.start..]
    }

    /// The event JSON of the contract.
    fn text(&self) -> &[u8] {
        &self.wire[HEADER_ROOM..]
    }

    fn has_line_breaks(&self) -> bool {
        match self.line_breaks.load(Ordering::Relaxed) {
            0 => {
                let found = self.text().iter().any(|b| matches!(b, b'\n' | b'\r'));
                self.line_breaks.store(1 + found as u8, Ordering::Relaxed);
                found
            }
            seen => seen == 2,
        }
    }

    /// The replayed copy's JSON, in two parts: the live JSON up to its closing brace, then
    /// `,"replay":true}`.
    fn replay_parts(&self) -> (&[u8], &'static [u8]) {
        let live = self.text();
        (&live[..live.len() - 1], br#","replay":true}"#)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        self.topic.budget.release(self.charged);
    }
}

/// The longest server-assigned id: `"<u64>-<u64>"`.
const ASSIGNED_ID: usize = 43;

/// The bytes an event's frame needs: the JSON around `name`, the id and the payload (at most
/// 115 bytes of it with 20-digit `seq`), with room for the frame header, so that sealing it
/// under the ordering lock never reallocates.
fn event_capacity(name: &str, id_len: usize, payload: &str) -> usize {
    HEADER_ROOM + 128 + name.len() + id_len + payload.len()
}

/// What publishers hand to one connection: a bounded queue of events with drop-oldest, and
/// the out-of-band notices that must not be dropped with them.
pub(crate) struct Outbox {
    /// Made by the connection's first subscribe: a connection that only publishes never
    /// allocates one (1,000 slots are 16 KiB). Boxed, because its two cache-padded indices
    /// would align the whole outbox to 128 bytes.
    queue: OnceLock<Box<ArrayQueue<Arc<Event>>>>,
    capacity: usize,
    /// Events evicted since the connection last reported them in a `SLOW_CONSUMER` notice.
    /// Kept here rather than in the queue so the notice itself can never be evicted.
    dropped: AtomicU64,
    /// Wakes the connection's task; a `notify_one` with no waiter stores a permit, so a push
    /// between the task's last drain and its next wait is never lost.
    notify: Notify,
    /// Set by the first push after the task last looked at the queue, so the pushes that
    /// follow (the task is already woken) skip the `Notify`: one wake-up per batch, not per
    /// event.
    woken: AtomicBool,
    /// Topics deleted while this connection was subscribed, waiting for their notice.
    /// Bounded by the connection's subscriptions.
    deleted: Mutex<Vec<Arc<TopicShared>>>,
    has_deleted: AtomicBool,
}

impl Outbox {
    fn new(capacity: usize) -> Outbox {
        Outbox {
            queue: OnceLock::new(),
            capacity,
            dropped: AtomicU64::new(0),
            notify: Notify::new(),
            woken: AtomicBool::new(false),
            deleted: Mutex::new(Vec::new()),
            has_deleted: AtomicBool::new(false),
        }
    }

    /// Makes the queue, before the outbox is first registered with a topic.
    fn open(&self) {
        self.queue
            .get_or_init(|| Box::new(ArrayQueue::new(self.capacity)));
    }

    fn pop(&self) -> Option<Arc<Event>> {
        self.queue.get()?.pop()
    }

    fn len(&self) -> usize {
        self.queue.get().map_or(0, |queue| queue.len())
    }

    fn is_slow(&self) -> bool {
        self.len() >= (self.capacity / 2).min(16)
    }

    /// Sheds the oldest queued event, counted and told like a drop-oldest eviction; false
    /// when the queue is empty.
    fn shed_oldest(&self) -> bool {
        let Some(event) = self.pop() else {
            return false;
        };
        self.dropped.fetch_add(1, Ordering::AcqRel);
        event.topic.dropped.fetch_add(1, Ordering::Relaxed);
        self.wake();
        true
    }

    /// Queues `events` in order, evicting the oldest when full, and wakes the task once.
    fn push(&self, events: &[Arc<Event>]) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        for event in events {
            if let Some(evicted) = queue.force_push(Arc::clone(event)) {
                self.dropped.fetch_add(1, Ordering::AcqRel);
                evicted.topic.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.wake();
    }

    /// Pairs with `about_to_look`: either the task sees this push when it looks at the queue,
    /// or this call sees `woken` cleared and notifies (both sides fence, so not both miss).
    fn wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.woken.swap(true, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// Called by the connection's task before it looks at the queue.
    fn about_to_look(&self) {
        self.woken.store(false, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    fn topic_deleted(&self, topic: &Arc<TopicShared>) {
        self.deleted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::clone(topic));
        self.has_deleted.store(true, Ordering::Release);
        self.wake();
    }

    fn take_deleted(&self) -> Vec<Arc<TopicShared>> {
        if !self.has_deleted.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.deleted.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn has_work(&self) -> bool {
        self.len() > 0
            || self.dropped.load(Ordering::Acquire) > 0
            || self.has_deleted.load(Ordering::Acquire)
    }
}

/// The publishing side of one client (a WebSocket connection, or one REST request): the one
/// way a message enters a topic, whichever transport carried it.
struct Publisher {
    /// The connection's id, the first half of the ids it assigns.
    connection: u64,
    /// Messages published without an `id`, for server-assigned ids.
    unnamed: u64,
    /// The topic of the last publish, so a publisher streaming to one topic skips the map.
    last: Option<Arc<Topic>>,
}

/// A publish that was carried out.
struct Published<'a> {
    id: MessageId<'a>,
    seq: u64,
    ts: Timestamp,
}

impl Publisher {
    fn new(connection: u64) -> Publisher {
        Publisher {
            connection,
            unnamed: 0,
            last: None,
        }
    }

    fn publish<'a>(
        &mut self,
        broker: &Broker,
        name: &str,
        id: Option<&'a str>,
        payload: &str,
    ) -> Result<Published<'a>, Reject> {
        let topic = self.topic(broker, name)?;
        let mut events = vec![self.draft(&topic, id, payload)];
        let (seq, ts) = self.publish_all(broker, &topic, &mut events)?;
        let id = match id {
            Some(raw) => MessageId::Given(raw),
            None => MessageId::Assigned(self.connection, self.unnamed),
        };
        Ok(Published { id, seq, ts })
    }

    /// The topic of that name; the last one published to, while it is still the one.
    fn topic(&mut self, broker: &Broker, name: &str) -> Result<Arc<Topic>, Reject> {
        let cached = self
            .last
            .take()
            .filter(|t| t.name == name && !t.is_deleted());
        let topic = match cached {
            Some(topic) => topic,
            None => broker.find_topic(name)?,
        };
        self.last = Some(Arc::clone(&topic));
        Ok(topic)
    }

    /// The event of one message, `id` given (raw JSON) or assigned, ready to publish.
    fn draft(&mut self, topic: &Topic, id: Option<&str>, payload: &str) -> Arc<Event> {
        let id = match id {
            Some(raw) => MessageId::Given(raw),
            None => {
                self.unnamed += 1;
                MessageId::Assigned(self.connection, self.unnamed)
            }
        };
        Event::draft(&topic.shared, &topic.name, id, payload)
    }

    /// Publishes the drafts `events` to `topic` in order, all or none: consecutive `seq`s
    /// from the one returned, and one `ts`. A connection's burst pays for the budget and the
    /// ordering lock once. Refused by the budget, `events` is left as it was, to be tried
    /// one by one; otherwise it is emptied.
    fn publish_all(
        &mut self,
        broker: &Broker,
        topic: &Topic,
        events: &mut Vec<Arc<Event>>,
    ) -> Result<(u64, Timestamp), Reject> {
        let bytes = events.iter().map(|event| event.footprint()).sum();
        broker.make_room(bytes)?;
        broker.budget.charge(bytes);
        let published = topic.publish(std::mem::take(events), Timestamp::now());
        published.ok_or_else(|| {
            // Nothing was sealed: the drafts carry no share of what was charged.
            broker.budget.release(bytes);
            topic_not_found(&topic.name)
        })
    }
}

// ---- the memory budget ----

/// Bytes held on clients' behalf, against `MEMORY_LIMIT`: events (counted once, however many
/// rings and queues hold them), request bodies being read, and output not yet written (REST
/// responses included). One counter, changed when an event is drafted and when its last
/// holder drops it, and when a buffer changes size — never per delivery.
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn has_room(&self, bytes: usize) -> bool {
        self.used().saturating_add(bytes) <= self.limit
    }
}

/// The budget's share of one buffer, kept equal to the buffer's capacity by `track` and
/// given back when dropped.
struct Charged {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charged {
    fn new(budget: &Arc<Budget>, bytes: usize) -> Charged {
        budget.charge(bytes);
        Charged {
            budget: Arc::clone(budget),
            bytes,
        }
    }

    fn track(&mut self, bytes: usize) {
        if bytes > self.bytes {
            self.budget.charge(bytes - self.bytes);
        } else {
            self.budget.release(self.bytes - bytes);
        }
        self.bytes = bytes;
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Broker {
    /// Makes room for `bytes` more, shedding if the budget is full; refuses only when
    /// nothing is left to shed.
    fn make_room(&self, bytes: usize) -> Result<(), Reject> {
        if self.budget.has_room(bytes) {
            return Ok(());
        }
        // One event that needs half the budget is refused rather than paid for with all of it.
        if bytes <= self.budget.limit / 2 {
            self.shed(bytes);
        }
        if self.budget.has_room(bytes) {
            return Ok(());
        }
        let message = "memory limit reached and nothing left to shed; try again later";
        // Over REST this one is 503: the server is full, not the client over a quota.
        Err(Reject {
            status: 503,
            ..reject("LIMIT_EXCEEDED", message)
        })
    }

    /// Frees memory in the order the contract gives: the oldest replay entries across all
    /// topics, then the oldest queued events of the subscribers with the longest queues
    /// (counted as drops, and told as any drop). It sheds a sixteenth of the limit below what
    /// is needed, so that a flood at the limit does not shed on every publish. Rare, and so
    /// allowed to take each topic's lock in turn.
    fn shed(&self, need: usize) {
        let _one = self
            .shedding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let target = (self.budget.limit / 16 * 15).saturating_sub(need);
        if self.budget.used() <= target {
            return; // another shedder just did it
        }
        // Replay entries, oldest first: a heap of each topic's oldest entry.
        let topics: Vec<Arc<Topic>> = self.topics.iter().map(|e| Arc::clone(e.value())).collect();
        let mut oldest: BinaryHeap<Reverse<(u64, usize)>> = topics
            .iter()
            .enumerate()
            .filter_map(|(i, topic)| Some(Reverse((topic.oldest_retained()?, i))))
            .collect();
        while self.budget.used() > target
            && let Some(Reverse((_, i))) = oldest.pop()
        {
            if let Some(next) = topics[i].shed_oldest() {
                oldest.push(Reverse((next, i)));
            }
        }
        // Then queued events of slow subscribers (a queue at least half full, or 16 deep),
        // from the longest queues, one from each in turn.
        let mut queues: Vec<Arc<Outbox>> = self
            .outboxes
            .iter()
            .map(|e| Arc::clone(e.value()))
            .filter(|outbox| outbox.is_slow())
            .collect();
        // Each length read once: they change while this runs, and a sort whose keys change
        // under it may panic (Rust's sort checks that its order is total).
        queues.sort_by_cached_key(|outbox| std::cmp::Reverse(outbox.len()));
        while self.budget.used() > target && !queues.is_empty() {
            queues.retain(|outbox| outbox.shed_oldest());
        }
    }
}

// ---- rate limits and the API key ----

/// A token bucket: `burst` requests at once, refilled at `rate` per second.
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(burst: u32) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: u32, burst: u32) -> Result<(), Duration> {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (1.0 - self.tokens) / f64::from(rate),
        ))
    }

    fn is_full(&self, rate: u32, burst: u32) -> bool {
        let refill = self.last.elapsed().as_secs_f64() * f64::from(rate);
        self.tokens + refill >= f64::from(burst)
    }
}

/// How long to wait, in whole milliseconds rounded up: waiting as long as told is enough.
fn retry_ms(wait: Duration) -> u64 {
    (wait.as_nanos().div_ceil(1_000_000) as u64).max(1)
}

/// `RATE_LIMITED`, with how long to wait.
fn rate_limited(wait: Duration) -> Reject {
    let ms = retry_ms(wait);
    reject(
        "RATE_LIMITED",
        format!("too many requests; retry in {ms} ms"),
    )
}

impl Broker {
    /// The rate and burst of `RATE_LIMIT`/`RATE_BURST`, when there is a limit.
    fn rate(&self) -> Option<(u32, u32)> {
        let rate = self.config.rate_limit;
        let burst = match self.config.rate_burst {
            0 => rate,
            burst => burst,
        };
        (rate > 0).then_some((rate, burst))
    }

    /// A REST publish from `ip`: within its address's bucket? The map is bounded: past
    /// 10,000 addresses, the full buckets (idle addresses) are forgotten.
    fn rest_publish_allowed(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some((rate, burst)) = self.rate() else {
            return Ok(());
        };
        if self.rest_buckets.len() > 10_000 {
            self.rest_buckets
                .retain(|_, bucket| !bucket.is_full(rate, burst));
        }
        let mut bucket = self
            .rest_buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(burst));
        bucket.take(rate, burst)
    }

    /// Whether `request` presents the API key (header `X-API-Key` or `?api_key=`), compared
    /// in constant time. The health probe and the console page are open: the page holds no
    /// data, and it is what asks a person for the key.
    fn authorized(&self, request: &Request) -> bool {
        let Some(key) = &self.config.api_key else {
            return true;
        };
        let open = request.method == "GET" && matches!(request.path.as_str(), "/health" | "/");
        let given = match request.header("x-api-key") {
            Some(given) => Some(given.to_string()),
            None => query_param(request.query.as_deref(), "api_key").map(percent_decode),
        };
        open || given.is_some_and(|given| same_key(given.as_bytes(), key.as_bytes()))
    }
}

/// Equal, in time that depends only on the lengths.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    let differ = given
        .iter()
        .zip(key)
        .fold(given.len() ^ key.len(), |acc, (a, b)| {
            acc | usize::from(a ^ b)
        });
    differ == 0
}

fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// `%XX` escapes and `+` of a query value.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---- the HTTP/1.1 subset ----

/// A parsed request head. Header names keep their spelling; lookups ignore case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) minor_version: u8,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) content_length: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpError {
    /// 400, with what was wrong.
    BadRequest(&'static str),
    /// 431: head over `MAX_HEAD_BYTES` or more than `MAX_HEADERS` lines.
    HeadTooLarge,
    /// 501: `Transfer-Encoding` (bodies must carry `Content-Length`).
    NotImplemented,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn wants_upgrade(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
    }

    fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        self.minor_version == 1 || self.header_has_token("connection", "keep-alive")
    }
}

/// Finds the end of the head (just past the blank line) and parses it. `Ok(None)` means the
/// head is not complete yet; past `MAX_HEAD_BYTES` without one it is an error, so a caller
/// never needs to buffer more than that.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let end = (1..buf.len()).find_map(|i| {
        let blank_line = buf[i] == b'\n'
            && (buf[i - 1] == b'\n' || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n'));
        blank_line.then_some(i + 1)
    });
    let end = match end {
        Some(end) if end <= MAX_HEAD_BYTES => end,
        Some(_) => return Err(HttpError::HeadTooLarge),
        None if buf.len() > MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
        None => return Ok(None),
    };
    parse_complete_head(&buf[..end]).map(|request| Some((request, end)))
}

fn parse_complete_head(head: &[u8]) -> Result<Request, HttpError> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest("malformed request line"));
    };
    if method.is_empty() || !method.iter().all(|b| is_token_byte(*b)) {
        return Err(HttpError::BadRequest("malformed method"));
    }
    let minor_version = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        _ => return Err(HttpError::BadRequest("unsupported HTTP version")),
    };
    if target.first() != Some(&b'/') || target.iter().any(|b| b.is_ascii_control()) {
        return Err(HttpError::BadRequest("malformed request target"));
    }
    let target =
        std::str::from_utf8(target).map_err(|_| HttpError::BadRequest("path is not UTF-8"))?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (target, None),
    };
    let mut headers = Vec::new();
    let mut content_length: Option<u64> = None;
    for line in lines {
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(HttpError::BadRequest("header without a colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|b| is_token_byte(*b)) {
            return Err(HttpError::BadRequest("malformed header name"));
        }
        if value.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
            return Err(HttpError::BadRequest("control character in a header value"));
        }
        let value = std::str::from_utf8(value)
            .map_err(|_| HttpError::BadRequest("header value is not UTF-8"))?
            .trim_matches([' ', '\t']);
        let name = std::str::from_utf8(name).unwrap_or_default();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::NotImplemented);
        }
        if name.eq_ignore_ascii_case("content-length") {
            for item in value.split(',') {
                let item = item.trim_matches([' ', '\t']);
                if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::BadRequest("malformed Content-Length"));
                }
                // Too many digits for u64 is still a valid (absurdly large) length: 413.
                let n = item.parse::<u64>().unwrap_or(u64::MAX);
                if content_length.is_some_and(|seen| seen != n) {
                    return Err(HttpError::BadRequest("conflicting Content-Length values"));
                }
                content_length = Some(n);
            }
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(Request {
        method: String::from_utf8_lossy(method).into_owned(),
        path: path.to_string(),
        query,
        minor_version,
        headers,
        content_length,
    })
}

/// `tchar` of RFC 9110: what methods and header names are made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

enum HeadRead {
    Request(Request, usize),
    Rejected(HttpError),
    Closed,
}

/// Reads until `buf` holds a whole head, never more than `MAX_HEAD_BYTES + 1` bytes of it,
/// and gives up at `deadline` or when shutdown begins on an idle connection.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    stop: &mut watch::Receiver<Option<Instant>>,
) -> HeadRead {
    loop {
        match parse_head(buf) {
            Ok(Some((request, len))) => return HeadRead::Request(request, len),
            Ok(None) => {}
            Err(e) => return HeadRead::Rejected(e),
        }
        // Read straight into `buf`'s tail (a stack buffer here would live in every
        // connection's task for its whole life), never past the head limit.
        let have = buf.len();
        let room = (MAX_HEAD_BYTES + 1).saturating_sub(have).clamp(1, 2048);
        buf.resize(have + room, 0);
        let mut until = match *stop.borrow() {
            Some(stop_at) => deadline.min(stop_at),
            None => deadline,
        };
        let read = loop {
            tokio::select! {
                read = timeout_at(until, stream.read(&mut buf[have..])) => break read,
                // Shutdown: an idle connection (no request begun) closes at once; one with a
                // request under way may finish sending it, to be answered 503, until the
                // drain deadline.
                Ok(()) = stop.changed() => {
                    if let Some(stop_at) = *stop.borrow() {
                        // Idle means nothing read and nothing waiting in the socket either.
                        if have == 0 {
                            match stream.try_read(&mut buf[have..]) {
                                Ok(n) if n > 0 => break Ok(Ok(n)),
                                _ => return HeadRead::Closed,
                            }
                        }
                        until = until.min(stop_at);
                    }
                }
            }
        };
        match read {
            Ok(Ok(n)) if n > 0 => buf.truncate(have + n),
            _ => return HeadRead::Closed,
        }
    }
}

/// A response about to be written: status, body, extra headers.
pub(crate) struct Response {
    status: u16,
    content_type: &'static str,
    body: Cow<'static, [u8]>,
    headers: Vec<(&'static str, Cow<'static, str>)>,
    close: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: Cow<'static, [u8]>) -> Response {
        Response {
            status,
            content_type,
            body,
            headers: Vec::new(),
            close: false,
        }
    }

    /// A JSON body built with `Json::object`.
    fn json(status: u16, build: impl FnOnce(Json)) -> Response {
        let mut body = Vec::with_capacity(128);
        build(Json::object(&mut body));
        Response::new(status, "application/json", Cow::Owned(body))
    }

    fn html(page: &'static str) -> Response {
        let body = Cow::Borrowed(page.as_bytes());
        Response::new(200, "text/html; charset=utf-8", body)
    }

    /// `{"error":{"code":…,"message":…}}`.
    fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(status, |json| json.error(code, message).end())
    }

    /// A refused request, with the status its code has in REST.
    fn reject(e: Reject) -> Response {
        Response::error(e.status, e.code, &e.message)
    }

    fn header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    fn closing(mut self) -> Response {
        self.close = true;
        self
    }

    fn from_http_error(e: HttpError) -> Response {
        let response = match e {
            HttpError::BadRequest(why) => Response::error(400, "BAD_REQUEST", why),
            HttpError::HeadTooLarge => Response::error(
                431,
                "HEADERS_TOO_LARGE",
                "request head over 8 KiB or 100 header lines",
            ),
            HttpError::NotImplemented => Response::error(
                501,
                "BAD_REQUEST",
                "Transfer-Encoding is not supported; send Content-Length",
            ),
        };
        response.closing()
    }

    async fn write(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str(if self.close {
            "Connection: close\r\n\r\n"
        } else {
            "\r\n"
        });
        if self.body.len() <= 4096 {
            head.push_str(&String::from_utf8_lossy(&self.body));
            stream.write_all(head.as_bytes()).await?;
        } else {
            // A big body is written from where it is, not copied behind the head.
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&self.body).await?;
        }
        stream.flush().await
    }

    /// Writes within `secs` seconds; a peer that does not read its response is dropped.
    /// A closing response is followed by a lingering close.
    async fn write_within(&self, stream: &mut TcpStream, secs: u64) -> std::io::Result<()> {
        match timeout(Duration::from_secs(secs), self.write(stream)).await {
            Ok(Ok(())) if self.close => {
                linger(stream).await;
                Ok(())
            }
            Ok(result) => result,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

/// Every close the server starts ends here, HTTP and WebSocket alike. Closing a socket that
/// still has unread input makes the kernel send a reset, which can destroy the last response
/// or Close frame before the client reads it (a 413 or a 1009 is sent with the client's bytes
/// still arriving). So: send FIN, then read and discard what the peer is still sending (its
/// Close reply included), for a short bounded time, before the socket is dropped.
async fn linger(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    const LINGER_BYTES: usize = 1024 * 1024;
    const LINGER_TIME: Duration = Duration::from_millis(500);
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut discarded = 0;
    let mut sink = vec![0u8; 4096];
    while discarded < LINGER_BYTES {
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

// ---- REST handlers ----

/// The console page, served at `/`.
const CONSOLE: &str = include_str!("console.html");

/// Every path the server answers, read from the whole path: a topic name is one segment (it
/// cannot contain `/`), so `/topics/a/b/c` is no route at all (404), not a topic (405).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    Console,
    Ws,
    Topics,
    Topic(&'a str),
    Messages(&'a str),
    Events(&'a str),
    Health,
    Stats,
    Metrics,
}

impl Route<'_> {
    pub(crate) fn parse(path: &str) -> Option<Route<'_>> {
        Some(match path {
            "/" => Route::Console,
            "/ws" => Route::Ws,
            "/topics" => Route::Topics,
            "/health" => Route::Health,
            "/stats" => Route::Stats,
            "/metrics" => Route::Metrics,
            _ => {
                let rest = path.strip_prefix("/topics/")?;
                match rest.split_once('/') {
                    None => Route::Topic(rest),
                    Some((name, "messages")) => Route::Messages(name),
                    Some((name, "events")) => Route::Events(name),
                    Some(_) => return None,
                }
            }
        })
    }

    /// The methods the route answers, for 405's `Allow`.
    fn allow(self) -> &'static str {
        match self {
            Route::Topics => "GET, POST",
            Route::Topic(_) => "DELETE",
            Route::Messages(_) => "POST",
            _ => "GET",
        }
    }
}

/// What a REST request turns into: a response, or (`GET /topics/{name}/events`) a stream.
enum Answer {
    Respond(Response),
    Stream(String, Replay),
}

impl From<Response> for Answer {
    fn from(response: Response) -> Answer {
        Answer::Respond(response)
    }
}

fn rest(broker: &Broker, request: &Request, body: &[u8], ip: IpAddr) -> Answer {
    let method = request.method.as_str();
    let path = request.path.as_str();
    let Some(route) = Route::parse(path) else {
        return Response::error(404, "NOT_FOUND", &format!("no route {path}")).into();
    };
    let response = match (route, method) {
        (Route::Console, "GET") => Response::html(CONSOLE),
        (Route::Ws, "GET") => {
            Response::error(400, "BAD_REQUEST", "/ws expects a WebSocket upgrade")
        }
        (Route::Topics, "GET") => list_topics(broker),
        (Route::Topics, "POST") => create_topic(broker, body),
        (Route::Topic(name), "DELETE") => delete_topic(broker, name),
        (Route::Messages(name), "POST") => match broker.rest_publish_allowed(ip) {
            Ok(()) => publish_message(broker, name, body),
            Err(wait) => too_many_requests(wait),
        },
        (Route::Events(name), "GET") => match events_request(request, name) {
            Ok(replay) => return Answer::Stream(name.to_string(), replay),
            Err(response) => response,
        },
        (Route::Health, "GET") => health(broker),
        (Route::Stats, "GET") => stats(broker),
        (Route::Metrics, "GET") => metrics(broker),
        (route, _) => {
            let message = format!("{method} is not allowed on {path}");
            Response::error(405, "METHOD_NOT_ALLOWED", &message).header("Allow", route.allow())
        }
    };
    response.into()
}

fn create_topic(broker: &Broker, body: &[u8]) -> Response {
    let name = match new_topic_name(body) {
        Ok(name) => name,
        Err(response) => return response,
    };
    match broker.create_topic(&name) {
        Ok(_) => topic_created(&name),
        Err(Created::Exists(_)) => topic_exists(&name),
        Err(Created::Full) => Response::reject(too_many_topics(broker.config.max_topics)),
    }
}

/// The `name` of a `POST /topics` body, checked.
fn new_topic_name(body: &[u8]) -> Result<String, Response> {
    #[derive(Deserialize)]
    struct Create {
        name: serde_json::Value,
    }
    let name = match serde_json::from_slice::<Create>(body) {
        Ok(Create {
            name: serde_json::Value::String(name),
        }) => name,
        Ok(_) => return Err(bad_request("\"name\" must be a string")),
        Err(e) => {
            return Err(bad_request(&format!(
                "body must be {{\"name\":\"...\"}}: {e}"
            )));
        }
    };
    check_topic_name(&name).map_err(|why| bad_request(&why))?;
    Ok(name)
}

fn topic_created(name: &str) -> Response {
    Response::json(201, |json| {
        json.plain("status", "created").plain("topic", name).end()
    })
}

fn topic_exists(name: &str) -> Response {
    let message = format!("topic '{name}' already exists");
    Response::error(409, "TOPIC_EXISTS", &message)
}

fn delete_topic(broker: &Broker, name: &str) -> Response {
    if let Err(why) = check_topic_name(name) {
        return bad_request(&why);
    }
    if broker.delete_topic(name) {
        Response::json(200, |json| {
            json.plain("status", "deleted").plain("topic", name).end()
        })
    } else {
        Response::reject(topic_not_found(name))
    }
}

/// `POST /topics/{name}/messages`: the body is the `message` object of a WebSocket publish,
/// and the event is the same, byte for byte.
fn publish_message(broker: &Broker, name: &str, body: &[u8]) -> Response {
    let (id, payload) = match publish_body(name, body) {
        Ok(message) => message,
        Err(response) => return response,
    };
    let connection = broker.next_id.fetch_add(1, Ordering::Relaxed);
    match Publisher::new(connection).publish(broker, name, id, payload) {
        Ok(published) => message_published(name, &published),
        Err(e) => Response::reject(e),
    }
}

/// The topic name and body of a REST publish, checked: the message's raw `id` and `payload`.
fn publish_body<'b>(name: &str, body: &'b [u8]) -> Result<(Option<&'b str>, &'b str), Response> {
    check_topic_name(name).map_err(|why| bad_request(&why))?;
    std::str::from_utf8(body)
        .map_err(|_| reject("BAD_REQUEST", "the body is not UTF-8"))
        .and_then(decode_message)
        .map_err(Response::reject)
}

fn message_published(name: &str, published: &Published) -> Response {
    Response::json(201, |json| {
        json.plain("status", "ok")
            .plain("topic", name)
            .id("id", published.id)
            .num("seq", published.seq)
            .ts(published.ts)
            .end()
    })
}

/// The replay an SSE subscriber asks for: `?last_n=N`, `?since_seq=N`, or `Last-Event-ID: N`.
/// The header wins over the query: an `EventSource` reconnects to the same URL (with its
/// `last_n`) and adds the header, and it is the header that says where the stream broke off.
fn events_request(request: &Request, name: &str) -> Result<Replay, Response> {
    check_topic_name(name).map_err(|why| bad_request(&why))?;
    let number_in = |what: &str, value: &str| {
        number(value.trim(), 0, u64::MAX)
            .map_err(|why| bad_request(&format!("{what}: {why}")))
            .map(Some)
    };
    if let Some(id) = request.header("last-event-id").filter(|id| !id.is_empty()) {
        return Ok(Replay::Since(number_in("Last-Event-ID", id)?.unwrap_or(0)));
    }
    let query = request.query.as_deref();
    let param = |key: &str| query_param(query, key);
    let last_n = param("last_n").map_or(Ok(None), |v| number_in("last_n", v))?;
    let since_seq = param("since_seq").map_or(Ok(None), |v| number_in("since_seq", v))?;
    replay_from(last_n, since_seq).map_err(Response::reject)
}

/// 429 `RATE_LIMITED`, with `retry_after_ms` in the body and `Retry-After` (whole seconds).
fn too_many_requests(wait: Duration) -> Response {
    let e = rate_limited(wait);
    let ms = retry_ms(wait);
    let response = Response::json(429, |json| {
        json.error(e.code, &e.message)
            .num("retry_after_ms", ms)
            .end()
    });
    response.header("Retry-After", ms.div_ceil(1000).to_string())
}

fn bad_request(message: &str) -> Response {
    Response::error(400, "BAD_REQUEST", message)
}

fn sorted_topics(broker: &Broker) -> Vec<Arc<Topic>> {
    let mut topics: Vec<Arc<Topic>> = broker
        .topics
        .iter()
        .map(|e| Arc::clone(e.value()))
        .collect();
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    topics
}

fn list_topics(broker: &Broker) -> Response {
    let topics = sorted_topics(broker);
    topic_list(
        topics
            .iter()
            .map(|t| (t.name.as_str(), t.subscriber_count())),
    )
}

/// The body of `GET /topics`, from (name, subscribers) in order.
fn topic_list<'t>(topics: impl Iterator<Item = (&'t str, usize)>) -> Response {
    Response::json(200, |json| {
        let mut list = json.open_list("topics");
        for (name, subscribers) in topics {
            list = list
                .item()
                .plain("name", name)
                .num("subscribers", subscribers as u64)
                .close();
        }
        list.close_list().end()
    })
}

fn health(broker: &Broker) -> Response {
    let subscribers: usize = broker
        .topics
        .iter()
        .map(|e| e.value().subscriber_count())
        .sum();
    Response::json(200, |json| {
        json.plain("status", "ok")
            .num("uptime_sec", broker.started.elapsed().as_secs())
            .num("topics", broker.topic_count.load(Ordering::Acquire) as u64)
            .num("subscribers", subscribers as u64)
            .num(
                "connections",
                broker.sessions.load(Ordering::Acquire) as u64,
            )
            .num("memory_bytes", broker.budget.used() as u64)
            .num("memory_limit", broker.budget.limit as u64)
            .end()
    })
}

fn stats(broker: &Broker) -> Response {
    let topics = sorted_topics(broker);
    topic_stats(topics.iter().map(|t| {
        let counts = [
            t.published(),
            t.subscriber_count() as u64,
            t.shared.dropped.load(Ordering::Acquire),
        ];
        (t.name.as_str(), counts)
    }))
}

/// The body of `GET /stats`, from (name, [messages, subscribers, dropped]) in order.
fn topic_stats<'t>(topics: impl Iterator<Item = (&'t str, [u64; 3])>) -> Response {
    Response::json(200, |json| {
        let mut out = json.open("topics");
        for (name, [messages, subscribers, dropped]) in topics {
            out = out
                .open(name)
                .num("messages", messages)
                .num("subscribers", subscribers)
                .num("dropped", dropped)
                .close();
        }
        out.close().end()
    })
}

/// A per-topic metric: name, help, and how to read it.
type PerTopic = (&'static str, &'static str, fn(&Topic) -> u64);

/// `GET /metrics`: the Prometheus text format 0.0.4. Every value is read from counters kept
/// beside the data (never a topic's ordering lock), so a scrape does not slow publishers.
fn metrics(broker: &Broker) -> Response {
    let topics = sorted_topics(broker);
    let mut out = String::with_capacity(512 + topics.len() * 256);
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
    };
    let subscriptions: usize = topics.iter().map(|t| t.subscriber_count()).sum();
    gauge(
        "pubsub_connections",
        "Open WebSocket and SSE connections.",
        broker.sessions.load(Ordering::Acquire) as u64,
    );
    gauge("pubsub_topics", "Topics.", topics.len() as u64);
    gauge(
        "pubsub_subscriptions",
        "Subscriptions, over all topics.",
        subscriptions as u64,
    );
    gauge(
        "pubsub_uptime_seconds",
        "Seconds since the broker started.",
        broker.started.elapsed().as_secs(),
    );
    gauge(
        "pubsub_memory_bytes",
        "Bytes the memory budget counts now.",
        broker.budget.used() as u64,
    );
    gauge(
        "pubsub_memory_limit_bytes",
        "MEMORY_LIMIT.",
        broker.budget.limit as u64,
    );
    let per_topic: [PerTopic; 3] = [
        (
            "pubsub_messages_published_total",
            "Messages published to the topic.",
            |t| t.published(),
        ),
        (
            "pubsub_messages_delivered_total",
            "Events written to the topic's subscribers (replays included).",
            |t| t.shared.delivered.load(Ordering::Relaxed),
        ),
        (
            "pubsub_messages_dropped_total",
            "Events dropped for the topic's slow subscribers.",
            |t| t.shared.dropped.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in per_topic {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
        for topic in &topics {
            let _ = writeln!(
                out,
                "{name}{{topic=\"{}\"}} {}",
                escape_label(&topic.name),
                value(topic)
            );
        }
    }
    let notices = broker.slow_notices.load(Ordering::Relaxed);
    let name = "pubsub_slow_consumer_notices_total";
    let _ = write!(
        out,
        "# HELP {name} SLOW_CONSUMER notices sent.\n# TYPE {name} counter\n{name} {notices}\n"
    );
    Response::new(
        200,
        "text/plain; version=0.0.4",
        Cow::Owned(out.into_bytes()),
    )
}

/// A label value escaped as the exposition format requires: backslash, double quote and
/// line feed. Topic names cannot hold any of them today; the format is kept anyway.
pub(crate) fn escape_label(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

pub(crate) fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "topic name must be 1 to {MAX_TOPIC_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err("topic name may contain only A-Z a-z 0-9 . _ -".into());
    }
    Ok(())
}

// ---- client messages ----

/// A client message, decoded field by field so that a wrong field still gets an error that
/// echoes the `request_id`. Each field is its raw JSON text, as the client wrote it; `null`
/// counts as absent except for `request_id`, which is echoed whatever it is.
#[derive(Deserialize, Default, Debug, PartialEq)]
pub(crate) struct Envelope<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "raw")]
    kind: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "present")]
    request_id: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "raw")]
    topic: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "raw")]
    last_n: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "raw")]
    since_seq: Option<&'a str>,
    #[serde(borrow, default)]
    message: Option<MessageField<'a>>,
}

/// `message` of a publish, decoded in the same pass as the envelope. Anything but an object
/// is `Invalid` rather than a parse error, so the reply can still echo the `request_id`.
#[derive(Debug, PartialEq)]
enum MessageField<'a> {
    Object(PublishedMessage<'a>),
    Invalid,
}

impl<'de: 'a, 'a> Deserialize<'de> for MessageField<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = MessageField<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                PublishedMessage::deserialize(MapAccessDeserializer::new(map))
                    .map(MessageField::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MessageField::Invalid)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MessageField::Invalid)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MessageField::Invalid)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MessageField::Invalid)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MessageField::Invalid)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MessageField::Invalid)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MessageField::Invalid)
            }
        }
        d.deserialize_any(FieldVisitor)
    }
}

#[derive(Deserialize, Default, Debug, PartialEq)]
pub(crate) struct PublishedMessage<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    id: Option<&'a str>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a str>,
}

/// A field's raw JSON text; `null` is absent.
fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    Option::<&RawValue>::deserialize(d).map(|raw| raw.map(RawValue::get))
}

/// A field's raw JSON text, kept even when it is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    <&RawValue>::deserialize(d).map(|raw| Some(raw.get()))
}

/// The common case of a client message, decoded without serde: an object whose keys and
/// string values have no escapes, and values that are valid JSON. Anything else —
/// an escape in a key, a duplicate field, invalid JSON, deep nesting — returns `None` and
/// goes to serde, which decodes it or words the error, so this never accepts what serde
/// would refuse and never reads a field differently (a property test compares the two).
/// It exists for speed: serde's visitors cost about a third of a fan-in publish.
pub(crate) struct Scan<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scan<'a> {
    fn new(text: &'a str) -> Scan<'a> {
        Scan { text, at: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Skips whitespace, then takes `byte`.
    fn eat(&mut self, byte: u8) -> Option<()> {
        self.space();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Nothing but whitespace is left.
    fn end(&mut self) -> Option<()> {
        self.space();
        (self.at == self.text.len()).then_some(())
    }

    /// An object, each member's value read by `member` given its key.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.space();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.space();
            let key = self.plain_string()?;
            self.eat(b':')?;
            self.space();
            member(self, key)?;
            self.space();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string with no escapes: its contents.
    fn plain_string(&mut self) -> Option<&'a str> {
        let start = self.at + 1;
        let escaped = self.string()?;
        (!escaped).then(|| &self.text[start..self.at - 1])
    }

    /// A string literal (the opening quote is next), its escapes checked; whether it had any.
    fn string(&mut self) -> Option<bool> {
        let bytes = self.text.as_bytes();
        (self.peek()? == b'"').then_some(())?;
        let mut at = self.at + 1;
        let mut escaped = false;
        loop {
            at = plain_run(bytes, at);
            match *bytes.get(at)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    at += 1;
                    match *bytes.get(at)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 1,
                        b'u' => {
                            let hex = bytes.get(at + 1..at + 5)?;
                            hex.iter().all(u8::is_ascii_hexdigit).then_some(())?;
                            at += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        self.at = at + 1;
        Some(escaped)
    }

    /// Any one JSON value, checked: its raw text. Nested values are walked with a bit stack
    /// (1 = array) rather than recursion; past 64 levels serde decides.
    fn value(&mut self) -> Option<&'a str> {
        self.space();
        let start = self.at;
        let mut arrays = 0u64;
        let mut depth = 0u32;
        loop {
            // A value, or the opening of a container (its first key read too).
            match self.peek()? {
                open @ (b'{' | b'[') => {
                    let array = open == b'[';
                    self.at += 1;
                    self.space();
                    if self.peek()? == open + 2 {
                        // `[]` or `{}`: `]` and `}` follow `[` and `{` by two in ASCII.
                        self.at += 1;
                    } else {
                        depth += 1;
                        if depth >= 64 {
                            return None;
                        }
                        arrays = arrays << 1 | array as u64;
                        if !array {
                            self.key()?;
                        }
                        self.space();
                        continue;
                    }
                }
                _ => self.scalar()?,
            }
            // After a value: a comma and the next member, or the ends of containers.
            loop {
                if depth == 0 {
                    return Some(&self.text[start..self.at]);
                }
                self.space();
                let in_array = arrays & 1 == 1;
                match (self.peek()?, in_array) {
                    (b',', _) => {
                        self.at += 1;
                        self.space();
                        if !in_array {
                            self.key()?;
                            self.space();
                        }
                        break;
                    }
                    (b']', true) | (b'}', false) => {
                        self.at += 1;
                        arrays >>= 1;
                        depth -= 1;
                    }
                    _ => return None,
                }
            }
        }
    }

    /// An object member's key and its colon.
    fn key(&mut self) -> Option<()> {
        self.string()?;
        self.eat(b':')
    }

    /// A string, a number, `true`, `false` or `null`.
    fn scalar(&mut self) -> Option<()> {
        let rest = &self.text.as_bytes()[self.at..];
        let word = match rest.first()? {
            b'"' => return self.string().map(drop),
            b'-' | b'0'..=b'9' => return self.number(),
            b't' => "true",
            b'f' => "false",
            b'n' => "null",
            _ => return None,
        };
        rest.starts_with(word.as_bytes()).then_some(())?;
        self.at += word.len();
        Some(())
    }

    /// A number in JSON's grammar.
    fn number(&mut self) -> Option<()> {
        let bytes = self.text.as_bytes();
        let digits = |at: &mut usize| {
            let from = *at;
            while bytes.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            *at > from
        };
        let mut at = self.at;
        if bytes.get(at) == Some(&b'-') {
            at += 1;
        }
        match bytes.get(at)? {
            b'0' => at += 1,
            b'1'..=b'9' => {
                digits(&mut at);
            }
            _ => return None,
        }
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            digits(&mut at).then_some(())?;
        }
        if let Some(b'e' | b'E') = bytes.get(at) {
            at += 1;
            if let Some(b'+' | b'-') = bytes.get(at) {
                at += 1;
            }
            digits(&mut at).then_some(())?;
        }
        self.at = at;
        Some(())
    }

    /// A field's value into `slot` (`null` is absent unless `keep_null`); a second
    /// occurrence is serde's "duplicate field", so it is left to serde.
    fn field(
        &mut self,
        slot: &mut Option<&'a str>,
        seen: &mut bool,
        keep_null: bool,
    ) -> Option<()> {
        if std::mem::replace(seen, true) {
            return None;
        }
        let value = self.value()?;
        *slot = (keep_null || value != "null").then_some(value);
        Some(())
    }

    /// A publish's `message` object.
    fn message(&mut self) -> Option<PublishedMessage<'a>> {
        let mut message = PublishedMessage::default();
        let mut seen = [false; 2];
        self.object(|scan, key| match key {
            "id" => scan.field(&mut message.id, &mut seen[0], false),
            "payload" => scan.field(&mut message.payload, &mut seen[1], true),
            _ => scan.value().map(drop),
        })?;
        Some(message)
    }

    pub(crate) fn envelope(text: &'a str) -> Option<Envelope<'a>> {
        let mut envelope = Envelope::default();
        let mut seen = [false; 6];
        let mut scan = Scan::new(text);
        scan.object(|scan, key| match key {
            "type" => scan.field(&mut envelope.kind, &mut seen[0], false),
            "request_id" => scan.field(&mut envelope.request_id, &mut seen[1], true),
            "topic" => scan.field(&mut envelope.topic, &mut seen[2], false),
            "last_n" => scan.field(&mut envelope.last_n, &mut seen[3], false),
            "since_seq" => scan.field(&mut envelope.since_seq, &mut seen[4], false),
            "message" => {
                if std::mem::replace(&mut seen[5], true) {
                    return None;
                }
                // An object, or `null` (absent); any other value is left to serde, which
                // reads it as a number or a string and may refuse it for reasons of its own.
                scan.space();
                envelope.message = match scan.peek()? {
                    b'{' => Some(MessageField::Object(scan.message()?)),
                    _ => (scan.value()? == "null").then_some(None)?,
                };
                Some(())
            }
            _ => scan.value().map(drop),
        })?;
        scan.end()?;
        Some(envelope)
    }

    /// The body of a REST publish.
    pub(crate) fn published_message(text: &'a str) -> Option<PublishedMessage<'a>> {
        let mut scan = Scan::new(text);
        let message = scan.message()?;
        scan.end()?;
        Some(message)
    }
}

/// The first byte from `at` on that ends a string's plain run: a quote, a backslash or a
/// control character (or the end). Eight bytes at a time: byte by byte, this loop was most
/// of a publish's decoding.
fn plain_run(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte that is zero (in `x ^ pattern`) or below 0x20. Borrows can
    // flag a byte above a true hit, never one below it, so the lowest flag is exact.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let Ok(word) = <[u8; 8]>::try_from(chunk).map(u64::from_le_bytes) else {
            break;
        };
        let quote = zero(word ^ (ONES * u64::from(b'"')));
        let backslash = zero(word ^ (ONES * u64::from(b'\\')));
        let control = word.wrapping_sub(ONES * 0x20) & !word;
        let special = (quote | backslash | control) & HIGH;
        if special != 0 {
            return at + special.trailing_zeros() as usize / 8;
        }
        at += 8;
    }
    while bytes
        .get(at)
        .is_some_and(|&b| !matches!(b, b'"' | b'\\' | 0..=0x1f))
    {
        at += 1;
    }
    at
}

/// What a client asked for, validated.
#[derive(Debug, PartialEq)]
pub(crate) enum ClientRequest<'a> {
    Subscribe {
        topic: Cow<'a, str>,
        replay: Replay,
    },
    Unsubscribe {
        topic: Cow<'a, str>,
    },
    /// `id` is raw JSON (a string literal) when the client gave one.
    Publish {
        topic: Cow<'a, str>,
        id: Option<&'a str>,
        payload: &'a str,
    },
    Ping,
}

/// An error reply: a contract code, a human message, and the status it has over REST.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reject {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) status: u16,
}

fn reject(code: &'static str, message: impl Into<String>) -> Reject {
    let status = match code {
        "TOPIC_NOT_FOUND" => 404,
        "LIMIT_EXCEEDED" | "RATE_LIMITED" => 429,
        _ => 400,
    };
    Reject {
        code,
        message: message.into(),
        status,
    }
}

/// Valid JSON nested deeper than the limit needs an opening and a closing bracket per
/// level, so shorter texts (most of them) skip the scan; invalid ones fail in serde.
fn check_depth(text: &str) -> Result<(), Reject> {
    if text.len() >= 2 * (MAX_JSON_DEPTH + 1) && json_depth_exceeds(text, MAX_JSON_DEPTH) {
        let message = format!("JSON nested deeper than {MAX_JSON_DEPTH} levels");
        return Err(reject("BAD_REQUEST", message));
    }
    Ok(())
}

/// Decodes one text frame. Returns the `request_id` (raw JSON, echoed verbatim) whenever the
/// frame was a JSON object, whatever else was wrong with it.
pub(crate) fn decode(text: &str) -> (Option<&str>, Result<ClientRequest<'_>, Reject>) {
    if let Err(e) = check_depth(text) {
        return (None, Err(e));
    }
    let envelope = match Scan::envelope(text).map_or_else(|| serde_envelope(text), Ok) {
        Ok(envelope) => envelope,
        Err(e) => return (None, Err(e)),
    };
    let request_id = envelope.request_id;
    (request_id, decode_request(envelope))
}

/// What serde makes of a client message: the reference that `Scan` must agree with.
pub(crate) fn serde_envelope(text: &str) -> Result<Envelope<'_>, Reject> {
    serde_json::from_str(text).map_err(|e| {
        let message = format!("expected a JSON object message: {e}");
        reject("BAD_REQUEST", message)
    })
}

fn decode_request(envelope: Envelope<'_>) -> Result<ClientRequest<'_>, Reject> {
    let kind = envelope
        .kind
        .and_then(as_str)
        .ok_or_else(|| reject("BAD_REQUEST", "\"type\" must be a string"))?;
    let topic = envelope.topic;
    let topic = || {
        let topic = topic
            .and_then(as_str)
            .ok_or_else(|| reject("BAD_REQUEST", "\"topic\" is required and must be a string"))?;
        check_topic_name(&topic).map_err(|why| reject("BAD_REQUEST", why))?;
        Ok(topic)
    };
    match &*kind {
        "subscribe" => {
            let count = |raw: Option<&str>, name: &str| match raw {
                None => Ok(None),
                Some(raw) => serde_json::from_str::<u64>(raw).map(Some).map_err(|_| {
                    reject("BAD_REQUEST", format!("\"{name}\" must be an integer >= 0"))
                }),
            };
            let last_n = count(envelope.last_n, "last_n")?;
            let since_seq = count(envelope.since_seq, "since_seq")?;
            Ok(ClientRequest::Subscribe {
                topic: topic()?,
                replay: replay_from(last_n, since_seq)?,
            })
        }
        "unsubscribe" => Ok(ClientRequest::Unsubscribe { topic: topic()? }),
        "publish" => {
            let topic = topic()?;
            let Some(MessageField::Object(message)) = envelope.message else {
                let why = "\"message\" must be an object {\"id\"?: string, \"payload\": any}";
                return Err(reject("BAD_REQUEST", why));
            };
            let (id, payload) = message.validate()?;
            Ok(ClientRequest::Publish { topic, id, payload })
        }
        "ping" => Ok(ClientRequest::Ping),
        other => {
            let message =
                format!("unknown type '{other}'; expected subscribe, unsubscribe, publish or ping");
            Err(reject("BAD_REQUEST", message))
        }
    }
}

/// `last_n` and `since_seq` of a subscribe (WebSocket or SSE): at most one of them.
fn replay_from(last_n: Option<u64>, since_seq: Option<u64>) -> Result<Replay, Reject> {
    match (last_n, since_seq) {
        (Some(_), Some(_)) => Err(reject(
            "BAD_REQUEST",
            "give \"last_n\" or \"since_seq\", not both",
        )),
        (Some(n), None) => Ok(Replay::Last(usize::try_from(n).unwrap_or(usize::MAX))),
        (None, Some(seq)) => Ok(Replay::Since(seq)),
        (None, None) => Ok(Replay::Last(0)),
    }
}

impl<'a> PublishedMessage<'a> {
    /// The raw `id` (a JSON string literal, if given) and `payload`, checked.
    fn validate(self) -> Result<(Option<&'a str>, &'a str), Reject> {
        let payload = self
            .payload
            .ok_or_else(|| reject("BAD_REQUEST", "\"message.payload\" is required"))?;
        let id = match self.id {
            None => None,
            Some(raw) => match as_str(raw) {
                Some(id) if id.len() <= MAX_ID_LEN => Some(raw),
                Some(_) => {
                    let why = format!("\"message.id\" is longer than {MAX_ID_LEN} bytes");
                    return Err(reject("BAD_REQUEST", why));
                }
                None => return Err(reject("BAD_REQUEST", "\"message.id\" must be a string")),
            },
        };
        Ok((id, payload))
    }
}

/// The body of a REST publish: the `message` object of a WebSocket publish, on its own.
fn decode_message(text: &str) -> Result<(Option<&str>, &str), Reject> {
    check_depth(text)?;
    let message = match Scan::published_message(text) {
        Some(message) => message,
        None => serde_json::from_str(text).map_err(|e| {
            let why = format!("body must be {{\"id\"?: string, \"payload\": any}}: {e}");
            reject("BAD_REQUEST", why)
        })?,
    };
    message.validate()
}

/// The string a raw JSON value holds, borrowed when it has no escapes.
fn as_str(json: &str) -> Option<Cow<'_, str>> {
    match json.strip_prefix('"').and_then(|j| j.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
        Some(_) => serde_json::from_str::<String>(json).ok().map(Cow::Owned),
        None => None,
    }
}

/// True if `text` nests arrays and objects deeper than `limit` (brackets inside strings do
/// not count). Runs before serde so that depth is bounded everywhere, payload included.
pub(crate) fn json_depth_exceeds(text: &str, limit: usize) -> bool {
    // Cheap and vectorizable: without more than `limit` opening brackets the depth cannot
    // exceed it.
    let opening = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    if opening <= limit {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

// ---- server messages ----

/// Builds one JSON object into a byte buffer, member by member: the one way this server
/// writes JSON — events, replies, notices and REST bodies alike. Keys are literals (or topic
/// names, which need no escaping) and raw values are JSON the client sent, written byte for
/// byte; strings are escaped. A comma goes before every member but the first of its object.
pub(crate) struct Json<'a> {
    buf: &'a mut Vec<u8>,
    /// No member written yet in the innermost open object or array: no comma before the
    /// next. A flag rather than a look at the last byte, so that in a chain of calls, which
    /// are all inlined, it is known at compile time and costs nothing.
    first: bool,
}

impl<'a> Json<'a> {
    /// `{` — a plain object (REST bodies).
    #[inline(always)]
    fn object(buf: &'a mut Vec<u8>) -> Json<'a> {
        buf.push(b'{');
        Json { buf, first: true }
    }

    /// `{"type":"<kind>"` — a server message.
    #[inline(always)]
    fn message(buf: &'a mut Vec<u8>, kind: &str) -> Json<'a> {
        Json::object(buf).plain("type", kind)
    }

    /// Goes on with an object left open in `buf`.
    #[inline(always)]
    fn resume(buf: &'a mut Vec<u8>) -> Json<'a> {
        Json { buf, first: false }
    }

    #[inline(always)]
    fn comma(&mut self) {
        if !std::mem::replace(&mut self.first, false) {
            self.buf.push(b',');
        }
    }

    #[inline(always)]
    fn key(&mut self, key: &str) {
        self.comma();
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    #[inline(always)]
    fn raw(mut self, key: &str, json: &[u8]) -> Self {
        self.key(key);
        self.buf.extend_from_slice(json);
        self
    }

    #[inline(always)]
    fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        let plain = value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        if plain {
            self.buf.push(b'"');
            self.buf.extend_from_slice(value.as_bytes());
            self.buf.push(b'"');
        } else {
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *self.buf, value);
        }
        self
    }

    /// A string that needs no escaping: a topic name (checked to be plain ASCII), a code, a
    /// literal. Skips `str`'s scan, which showed in the fan-in profile.
    #[inline(always)]
    fn plain(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        self.buf.push(b'"');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(b'"');
        self
    }

    #[inline(always)]
    fn num(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        push_u64(self.buf, value);
        self
    }

    #[inline(always)]
    fn ts(mut self, ts: Timestamp) -> Self {
        self.key("ts");
        self.buf.push(b'"');
        self.buf.extend_from_slice(&ts.text);
        self.buf.push(b'"');
        self
    }

    /// The `request_id` of a reply, echoed verbatim, when the request had one.
    #[inline(always)]
    fn request_id(self, id: Option<&str>) -> Self {
        match id {
            Some(id) => self.raw("request_id", id.as_bytes()),
            None => self,
        }
    }

    /// A message id: the client's string as it sent it, or a server-assigned
    /// `"<connection>-<n>"`.
    #[inline(always)]
    fn id(mut self, key: &str, id: MessageId) -> Self {
        self.key(key);
        match id {
            MessageId::Given(raw) => self.buf.extend_from_slice(raw.as_bytes()),
            MessageId::Assigned(connection, n) => {
                self.buf.push(b'"');
                push_u64(self.buf, connection);
                self.buf.push(b'-');
                push_u64(self.buf, n);
                self.buf.push(b'"');
            }
        }
        self
    }

    /// `"error":{"code":…,"message":…}`, in WebSocket replies and REST bodies alike.
    #[inline(always)]
    fn error(self, code: &str, message: &str) -> Self {
        self.open("error")
            .plain("code", code)
            .str("message", message)
            .close()
    }

    /// Opens a nested object under `key`; `close` ends it.
    #[inline(always)]
    fn open(mut self, key: &str) -> Self {
        self.key(key);
        self.buf.push(b'{');
        self.first = true;
        self
    }

    /// Opens an array under `key`; `item` opens each element object, `close_list` ends it.
    #[inline(always)]
    fn open_list(mut self, key: &str) -> Self {
        self.key(key);
        self.buf.push(b'[');
        self.first = true;
        self
    }

    #[inline(always)]
    fn item(mut self) -> Self {
        self.comma();
        self.buf.push(b'{');
        self.first = true;
        self
    }

    #[inline(always)]
    fn close(mut self) -> Self {
        self.buf.push(b'}');
        self.first = false;
        self
    }

    #[inline(always)]
    fn close_list(mut self) -> Self {
        self.buf.push(b']');
        self.first = false;
        self
    }

    /// Closes the outermost object.
    #[inline(always)]
    fn end(self) {
        self.buf.push(b'}');
    }
}

/// Room left before an event's JSON for its WebSocket header, the longest of which is
/// 10 bytes (a 64-bit length).
const HEADER_ROOM: usize = 10;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_PING: u8 = 0x9;

/// The header of an unmasked, unfragmented server frame (RFC 6455 §5.2) and its length.
fn frame_header(opcode: u8, len: usize) -> ([u8; HEADER_ROOM], usize) {
    let mut header = [0u8; HEADER_ROOM];
    header[0] = 0x80 | opcode;
    if len < 126 {
        header[1] = len as u8;
        (header, 2)
    } else if len <= 0xffff {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (header, 4)
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (header, 10)
    }
}

pub(crate) fn now_rfc3339() -> String {
    Timestamp::now().as_str().to_string()
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T10:00:00.123Z`: 24 ASCII bytes, kept on
/// the stack. Each thread remembers the last one it formatted, so a busy publish path formats
/// once per millisecond rather than once per message.
#[derive(Clone, Copy)]
pub(crate) struct Timestamp {
    millis: u64,
    text: [u8; 24],
}

impl Timestamp {
    pub(crate) fn now() -> Timestamp {
        thread_local! {
            static LAST: std::cell::Cell<Timestamp> =
                const { std::cell::Cell::new(Timestamp { millis: u64::MAX, text: [0; 24] }) };
        }
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let millis = since_epoch.as_millis() as u64;
        LAST.with(|last| {
            let cached = last.get();
            if cached.millis == millis {
                return cached;
            }
            let stamp = Timestamp::format(millis);
            last.set(stamp);
            stamp
        })
    }

    fn format(millis: u64) -> Timestamp {
        let secs = millis / 1000;
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        let text = format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            millis % 1000
        );
        let mut bytes = [b'0'; 24];
        let n = text.len().min(24);
        bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
        Timestamp {
            millis,
            text: bytes,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text).unwrap_or("1970-01-01T00:00:00.000Z")
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---- one connection's subscriptions ----

/// Output is written in chunks of about this size, so a long drain or replay never holds
/// more than this (plus one frame) in the connection's buffer.
const OUT_CHUNK: usize = 64 * 1024;

/// How long one write may wait for the socket before the peer is given up on: two heartbeat
/// intervals, or `WRITE_STALL_LIMIT` with heartbeats off.
/// A write that must finish within the connection's write deadline.
fn within(
    stall: Duration,
    write: impl Future<Output = std::io::Result<()>>,
) -> impl Future<Output = std::io::Result<()>> {
    // A plain function, not an `async fn`, which would keep `write` twice in its future.
    timeout(stall, write)
        .map(|done| done.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())))
}

/// An output buffer once written: emptied, cut back if a burst grew it, and its share of the
/// budget updated.
fn written(out: &mut Vec<u8>, charged: &mut Charged) {
    out.clear();
    if out.capacity() > 2 * OUT_CHUNK {
        out.shrink_to(OUT_CHUNK);
    }
    charged.track(out.capacity());
}

/// An output buffer between bursts: freed if it holds nothing, so an idle connection costs
/// the same after a burst as before it. Called once a connection has caught up, and at each
/// heartbeat.
fn idle(out: &mut Vec<u8>, charged: &mut Charged) {
    if out.is_empty() {
        *out = Vec::new();
    }
    charged.track(out.capacity());
}

fn write_deadline(config: &Config) -> Duration {
    match config.heartbeat {
        beat if beat.is_zero() => WRITE_STALL_LIMIT,
        beat => beat * 2,
    }
}

/// How a connection frames what its subscriptions deliver — WebSocket frames or SSE records,
/// around the same event JSON — and writes it. Framing only appends to the writer's buffer;
/// `write_out` sends the buffer, within the connection's write deadline.
trait Writer {
    fn event(&mut self, event: &Event);
    fn replayed(&mut self, event: &Event);
    /// The `SLOW_CONSUMER` notice: `count` events were dropped since the last one.
    fn dropped(&mut self, count: u64);
    fn topic_deleted(&mut self, topic: &str);
    fn buffered(&self) -> usize;
    async fn write_out(&mut self) -> std::io::Result<()>;

    /// Writes the buffer once it holds a chunk's worth. Boxed: it is reached from deep inside
    /// the request handlers, whose futures would otherwise each carry a copy of its state in
    /// every connection's task, for a write that happens only once per 64 KiB.
    async fn write_if_full(&mut self) -> std::io::Result<()> {
        if self.buffered() >= OUT_CHUNK {
            Box::pin(self.write_out()).await?;
        }
        Ok(())
    }
}

/// The subscriptions one connection holds, and the draining of its outbox into its writer.
/// Transport-neutral: a WebSocket session and an SSE stream each own one, so both have the
/// same queue, drop-oldest policy, limits, counts and order. Dropping it ends every
/// subscription, on every exit path (close, error, abort, shutdown).
struct Subscriptions {
    broker: Arc<Broker>,
    /// The connection's id, for logs and server-assigned message ids.
    id: u64,
    outbox: Arc<Outbox>,
    /// Topic name → the topic subscribed to (the `Arc` identifies the incarnation: a topic
    /// deleted and re-created is another one).
    topics: HashMap<String, Arc<Topic>>,
    /// Events written of one topic in a row, added to its `delivered` when the run ends.
    run: Option<(Arc<TopicShared>, u64)>,
}

/// A subscription made: the topic, and its replay (empty if it was already subscribed).
struct Joined {
    topic: Arc<Topic>,
    backlog: Backlog,
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for topic in self.topics.values() {
            topic.unsubscribe(&self.outbox);
        }
        // No publish reaches this outbox any more, though a large topic's snapshot may hold
        // it until its next rebuild: let go of the queued events now, so they neither stay
        // charged nor wait for a shedder that can no longer see them.
        while self.outbox.pop().is_some() {}
        self.broker.outboxes.remove(&self.id);
        self.broker.sessions.fetch_sub(1, Ordering::AcqRel);
        log!(self.broker, Level::Debug, "connection {} closed", self.id);
    }
}

impl Subscriptions {
    fn new(broker: Arc<Broker>) -> Subscriptions {
        broker.sessions.fetch_add(1, Ordering::AcqRel);
        let id = broker.next_id.fetch_add(1, Ordering::Relaxed);
        log!(broker, Level::Debug, "connection {id} opened");
        let outbox = Arc::new(Outbox::new(broker.config.queue_size));
        broker.outboxes.insert(id, Arc::clone(&outbox));
        Subscriptions {
            outbox,
            broker,
            id,
            topics: HashMap::new(),
            run: None,
        }
    }

    /// Counts a delivery of `event`'s topic: a pointer comparison, and an atomic add only
    /// when the topic changes (and at the end of each drain).
    fn count(&mut self, event: &Event) {
        match &mut self.run {
            Some((topic, n)) if Arc::ptr_eq(topic, &event.topic) => *n += 1,
            run => {
                if let Some((topic, n)) = run.replace((Arc::clone(&event.topic), 1)) {
                    topic.delivered.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    fn end_run(&mut self) {
        if let Some((topic, n)) = self.run.take() {
            topic.delivered.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Moves up to `DRAIN_BATCH` queued events to the writer, then any drop notice and
    /// topic-deleted notices. The connection writes the buffer when nothing else is ready.
    async fn drain(&mut self, w: &mut impl Writer) -> std::io::Result<()> {
        for _ in 0..DRAIN_BATCH {
            let Some(event) = self.outbox.pop() else {
                break;
            };
            w.event(&event);
            self.count(&event);
            w.write_if_full().await?;
        }
        self.end_run();
        let dropped = self.outbox.dropped.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            w.dropped(dropped);
            self.broker.slow_notices.fetch_add(1, Ordering::Relaxed);
        }
        let deleted = self.outbox.take_deleted();
        if !deleted.is_empty() {
            // Events of the deleted topics queued before the deletion go out first.
            self.move_queue(w, None).await?;
            for shared in deleted {
                let name = self
                    .topics
                    .iter()
                    .find(|(_, t)| Arc::ptr_eq(&t.shared, &shared))
                    .map(|(name, _)| name.clone());
                if let Some(name) = name {
                    self.topics.remove(&name);
                    w.topic_deleted(&name);
                }
            }
        }
        Ok(())
    }

    /// Moves the queued events to the writer, leaving out those of `skip` (a topic just
    /// unsubscribed or deleted). Bounded by the queue's capacity: no event of a topic that was
    /// just left or deleted can arrive any more, so all of its events are within one
    /// queue-length of pops, and a flood on other topics cannot keep this loop going.
    async fn move_queue(
        &mut self,
        w: &mut impl Writer,
        skip: Option<&Arc<TopicShared>>,
    ) -> std::io::Result<()> {
        for _ in 0..self.outbox.capacity {
            let Some(event) = self.outbox.pop() else {
                break;
            };
            if !skip.is_some_and(|topic| Arc::ptr_eq(&event.topic, topic)) {
                w.event(&event);
                self.count(&event);
                w.write_if_full().await?;
            }
        }
        self.end_run();
        Ok(())
    }

    /// Subscribes at the topic's ordering point. The caller writes the acknowledgement, then
    /// `replay`s the backlog; live events follow through the outbox.
    async fn subscribe(
        &mut self,
        w: &mut impl Writer,
        name: &str,
        replay: Replay,
    ) -> std::io::Result<Result<Joined, Reject>> {
        // A pending deletion notice must go out before this subscription can be judged.
        self.drain(w).await?;
        if let Some(current) = self.topics.get(name) {
            if !current.is_deleted() {
                let topic = Arc::clone(current);
                let backlog = Backlog {
                    events: Vec::new(),
                    missed: 0,
                };
                return Ok(Ok(Joined { topic, backlog }));
            }
            // Deleted, but its notice has not reached this outbox yet (the deleter is between
            // marking the topic and telling its subscribers): end it here, notice included,
            // so the client never sees the new topic's events continue the old one's.
            self.topics.remove(name);
            self.move_queue(w, None).await?;
            w.topic_deleted(name);
        }
        let max = self.broker.config.max_subscriptions;
        if self.topics.len() >= max {
            let message = format!("at most {max} subscriptions per connection");
            return Ok(Err(reject("LIMIT_EXCEEDED", message)));
        }
        let found = match &self.broker.engine {
            Engine::Local => self.broker.find_topic(name),
            #[cfg(feature = "cluster")]
            Engine::Cluster(c) => Box::pin(c.follow(&self.broker, name)).await,
        };
        let topic = match found {
            Ok(topic) => topic,
            Err(e) => return Ok(Err(e)),
        };
        let Some(backlog) = topic.subscribe(&self.outbox, replay) else {
            return Ok(Err(topic_not_found(name)));
        };
        self.topics.insert(name.to_string(), Arc::clone(&topic));
        Ok(Ok(Joined { topic, backlog }))
    }

    async fn replay(&mut self, w: &mut impl Writer, events: &[Arc<Event>]) -> std::io::Result<()> {
        for event in events {
            w.replayed(event);
            self.count(event);
            w.write_if_full().await?;
        }
        self.end_run();
        Ok(())
    }

    /// Ends a subscription; nothing of the topic reaches the writer after this returns.
    async fn unsubscribe(
        &mut self,
        w: &mut impl Writer,
        name: &str,
    ) -> std::io::Result<Result<(), Reject>> {
        if let Some(topic) = self.topics.remove(name) {
            topic.unsubscribe(&self.outbox);
            self.move_queue(w, Some(&topic.shared)).await?;
        } else if self.broker.topic(name).is_none() {
            return Ok(Err(topic_not_found(name)));
        }
        Ok(Ok(()))
    }
}

// ---- the heartbeat ----

/// A connection's heartbeat. It ticks at half the interval: a ping goes out on every other
/// tick, and a peer that must answer (a WebSocket client, which answers Pings with Pongs)
/// and was silent for four ticks in a row (two intervals) is dead — found between 2 and 2.5
/// intervals after the last thing it sent. With a zero interval it still ticks every
/// `IDLE_TICK`, so that buffers shrink after a burst, but never pings nor declares a peer dead.
struct Heartbeat {
    ticker: tokio::time::Interval,
    /// Heartbeats are on (`HEARTBEAT_SECS` is not 0).
    beating: bool,
    /// Whether silence means death: an SSE client sends nothing after its request.
    listens: bool,
    ping_due: bool,
    heard: bool,
    silent_ticks: u32,
}

enum Beat {
    Ping,
    Quiet,
    Dead,
}

impl Heartbeat {
    fn new(interval: Duration, listens: bool) -> Heartbeat {
        const IDLE_TICK: Duration = Duration::from_secs(15);
        let beating = !interval.is_zero();
        let half = match beating {
            true => (interval / 2).max(Duration::from_millis(1)),
            false => IDLE_TICK,
        };
        let mut ticker = tokio::time::interval_at(Instant::now() + half, half);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Heartbeat {
            ticker,
            beating,
            listens,
            ping_due: false,
            heard: false,
            silent_ticks: 0,
        }
    }

    /// The peer sent something.
    fn heard(&mut self) {
        self.heard = true;
    }

    /// Cancel-safe: the state changes only after the tick has come.
    async fn tick(&mut self) -> Beat {
        self.ticker.tick().await;
        if !self.beating {
            return Beat::Quiet;
        }
        self.silent_ticks = if std::mem::take(&mut self.heard) {
            0
        } else {
            self.silent_ticks + 1
        };
        if self.listens && self.silent_ticks >= 4 {
            return Beat::Dead;
        }
        self.ping_due = !self.ping_due;
        if self.ping_due {
            Beat::Ping
        } else {
            Beat::Quiet
        }
    }
}

// ---- the WebSocket session ----

/// tungstenite's own `WebSocket` over the non-blocking socket: its `read` returns
/// `WouldBlock` when nothing is waiting, and the session awaits readiness itself
/// (`next_message`). tokio-tungstenite's `Stream` adapter does the same, but registers two
/// wakers on every poll — 4% of the server's CPU in fan-in.
type Ws = WebSocket<ReadAhead>;

/// How much one `read` may take from the socket for a busy connection.
const READ_AHEAD: usize = 16 * 1024;

/// The socket as tungstenite sees it: a non-blocking `Read` and `Write`. tungstenite reads in
/// small steps (its buffer is allocated up front, so it is small). Once a read fills such a
/// step, the connection is busy and this reads up to 16 KiB per system call into a buffer
/// that exists only while it holds unread bytes: a busy publisher pays one `read` per ~80
/// messages, while quiet connections read straight into tungstenite's buffer and never
/// allocate one. Writes go straight to the socket.
pub(crate) struct ReadAhead {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// The last read filled what it was given: more is probably waiting.
    busy: bool,
    /// The last write did not take all it was given: tungstenite holds the rest.
    blocked: bool,
    /// Bytes handed to tungstenite since the last whole message: a frame or a fragmented
    /// message still arriving, which tungstenite holds. Unread input, for the budget.
    unread: usize,
    /// The budget's share of `unread` and of `buf`, kept in 4 KiB steps.
    charged: Charged,
}

impl ReadAhead {
    fn new(stream: TcpStream, budget: &Arc<Budget>) -> ReadAhead {
        ReadAhead {
            stream,
            buf: Vec::new(),
            pos: 0,
            busy: false,
            blocked: false,
            unread: 0,
            charged: Charged::new(budget, 0),
        }
    }

    fn account(&mut self) {
        let held = self.unread + self.buf.capacity();
        if held.abs_diff(self.charged.bytes) >= 4096 || held == 0 {
            self.charged.track(held);
        }
    }

    /// tungstenite has made a whole message of what it was handed.
    fn message_done(&mut self) {
        if self.unread > 0 {
            self.unread = 0;
            self.account();
        }
    }
}

impl std::io::Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() && self.busy {
            let mut buf = Vec::with_capacity(READ_AHEAD);
            // `WouldBlock` before allocating would be better still; the allocation is
            // cheap next to the system call, and freed at once when nothing came.
            let n = self.stream.try_read_buf(&mut buf)?;
            // Traffic has slowed: go back to reading directly.
            self.busy = n == READ_AHEAD;
            if n == 0 {
                return Ok(0);
            }
            self.buf = buf;
            self.pos = 0;
        }
        let n = if self.pos < self.buf.len() {
            let n = (self.buf.len() - self.pos).min(out.len());
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.buf.len() {
                self.buf = Vec::new();
                self.pos = 0;
            }
            n
        } else {
            let n = self.stream.try_read(out)?;
            self.busy = n == out.len() && n > 0;
            n
        };
        self.unread += n;
        self.account();
        Ok(n)
    }
}

impl std::io::Write for ReadAhead {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let written = self.stream.try_write(data);
        // tungstenite keeps what did not go (a Pong, a Close reply) and writes it at its next
        // flush: the session must come back for it even if the peer sends nothing more.
        self.blocked = !matches!(written, Ok(n) if n == data.len());
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The next message, once one has arrived; `None` once the connection is closed.
/// Cancel-safe: a frame that has arrived in part stays in tungstenite's buffer.
async fn next_message(ws: &mut Ws) -> Option<Result<Message, WsError>> {
    loop {
        match ws.read() {
            Ok(message) => return Some(Ok(message)),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return None,
            Err(e) if !would_block(&e) => return Some(Err(e)),
            Err(_) => {}
        }
        if let Err(e) = ws.get_ref().stream.readable().await {
            return Some(Err(WsError::Io(e)));
        }
    }
}

/// Writes what tungstenite holds (its Pong and Close replies), waiting for the socket as
/// needed.
async fn flush(ws: &mut Ws) -> Result<(), WsError> {
    loop {
        match ws.flush() {
            Err(e) if would_block(&e) => ws.get_ref().stream.writable().await?,
            done => return done,
        }
    }
}

/// Sends `message` through tungstenite (only Close frames are).
async fn send(ws: &mut Ws, message: Message) -> Result<(), WsError> {
    match ws.write(message) {
        // Buffered; `flush` writes it.
        Err(e) if would_block(&e) => {}
        done => done?,
    }
    flush(ws).await
}

/// Why a session ended, for the log and the Close frame.
enum End {
    Closed,
    Error(WsError),
}

impl From<WsError> for End {
    fn from(e: WsError) -> End {
        match e {
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::Closed,
            e => End::Error(e),
        }
    }
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        End::Error(WsError::Io(e))
    }
}

/// The WebSocket side of a connection's output. It owns the socket (the session reads
/// through it too) and frames what the server sends into `out`, which leaves in one write
/// per batch. Events are framed once, at publish, and copied as they are. tungstenite parses
/// what the client sends and writes only its own Pong and Close replies; those are flushed
/// before `out`, so the two never interleave inside a frame.
struct WsWriter {
    ws: Ws,
    /// Encoded frames not yet written to the socket.
    out: Vec<u8>,
    /// How long one write may wait for the socket before the peer is given up on.
    stall: Duration,
    /// The budget's share of `out`.
    charged: Charged,
}

impl WsWriter {
    /// Appends one frame whose payload is `parts`, in order.
    fn frame(&mut self, opcode: u8, parts: &[&[u8]]) {
        let len = parts.iter().map(|part| part.len()).sum();
        let (header, header_len) = frame_header(opcode, len);
        self.out.extend_from_slice(&header[..header_len]);
        for part in parts {
            self.out.extend_from_slice(part);
        }
    }

    /// Appends a server message: `{"type":"<kind>"`, what `build` adds, then `ts`. Written
    /// in place behind room for a short frame header; the rare message of 126 bytes or more
    /// moves over for a longer one.
    fn message(&mut self, kind: &str, ts: Timestamp, build: impl FnOnce(Json<'_>) -> Json<'_>) {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 2]);
        build(Json::message(&mut self.out, kind)).ts(ts).end();
        let (header, header_len) = frame_header(OPCODE_TEXT, self.out.len() - start - 2);
        if header_len > 2 {
            let room = std::iter::repeat_n(0, header_len - 2);
            self.out.splice(start + 2..start + 2, room);
        }
        self.out[start..start + header_len].copy_from_slice(&header[..header_len]);
    }

    fn error(&mut self, request_id: Option<&str>, e: Reject) {
        self.message("error", Timestamp::now(), |json| {
            json.request_id(request_id).error(e.code, &e.message)
        });
    }

    /// The reply to a publish: its ack, or why it was refused.
    fn answer(
        &mut self,
        request_id: Option<&str>,
        topic: &str,
        r: Result<(u64, Timestamp), Reject>,
    ) {
        match r {
            Ok((seq, ts)) => self.message("ack", ts, |json| {
                json.request_id(request_id)
                    .plain("topic", topic)
                    .plain("status", "ok")
                    .num("seq", seq)
            }),
            Err(e) => self.error(request_id, e),
        }
    }

    /// The refusal of a request over `RATE_LIMIT`, with when to try again.
    fn retry_later(&mut self, request_id: Option<&str>, wait: Duration) {
        let e = rate_limited(wait);
        let ms = retry_ms(wait);
        self.message("error", Timestamp::now(), |json| {
            json.request_id(request_id)
                .error(e.code, &e.message)
                .num("retry_after_ms", ms)
        });
    }
}

impl Writer for WsWriter {
    fn event(&mut self, event: &Event) {
        self.out.extend_from_slice(event.frame());
    }

    fn replayed(&mut self, event: &Event) {
        let (live, marker) = event.replay_parts();
        self.frame(OPCODE_TEXT, &[live, marker]);
    }

    fn dropped(&mut self, count: u64) {
        let message = format!("{count} event(s) dropped: this connection reads too slowly");
        self.message("error", Timestamp::now(), |json| {
            json.error("SLOW_CONSUMER", &message).num("dropped", count)
        });
    }

    fn topic_deleted(&mut self, topic: &str) {
        self.message("info", Timestamp::now(), |json| {
            json.plain("topic", topic).plain("msg", "topic_deleted")
        });
    }

    /// Counts a reply tungstenite could not write whole as a byte, so that the session
    /// comes back to flush it.
    fn buffered(&self) -> usize {
        self.out.len() + usize::from(self.ws.get_ref().blocked)
    }

    /// Writes `out` to the socket (after whatever tungstenite itself has pending).
    async fn write_out(&mut self) -> std::io::Result<()> {
        let write = async {
            flush(&mut self.ws).await.map_err(|e| match e {
                WsError::Io(e) => e,
                e => std::io::Error::other(e),
            })?;
            // Flushed: tungstenite holds nothing more.
            self.ws.get_mut().blocked = false;
            if !self.out.is_empty() {
                self.ws.get_mut().stream.write_all(&self.out).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        self.charged.track(self.out.capacity());
        within(self.stall, write).await?;
        written(&mut self.out, &mut self.charged);
        Ok(())
    }
}

/// A connection's publishes to one topic in a row, within one burst: drafted as they come,
/// so that each message's buffer is let go of at once, published together when the burst
/// ends or anything else comes, then answered in order.
#[derive(Default)]
struct Batch {
    topic: Option<Arc<Topic>>,
    events: Vec<Arc<Event>>,
    /// The requests' `request_id`s (raw JSON) end to end, and where each one is.
    ids: String,
    request_ids: Vec<Option<(usize, usize)>>,
}

impl Batch {
    fn push(&mut self, event: Arc<Event>, request_id: Option<&str>) {
        self.events.push(event);
        self.request_ids.push(request_id.map(|id| {
            self.ids.push_str(id);
            (self.ids.len() - id.len(), self.ids.len())
        }));
    }

    fn request_id(&self, k: usize) -> Option<&str> {
        self.request_ids[k].map(|(from, to)| &self.ids[from..to])
    }
}

/// One WebSocket connection. Its task is the only writer to the socket and owns the
/// connection's subscriptions, which gives one order per connection for free: replies leave
/// in request order, a subscribe ack precedes its replay and live events, and after an
/// unsubscribe ack nothing of that topic follows.
struct Session {
    subscriptions: Subscriptions,
    writer: WsWriter,
    heartbeat: Heartbeat,
    publisher: Publisher,
    /// `RATE_LIMIT` for this connection: publishes and replaying subscribes.
    bucket: Option<TokenBucket>,
    /// Held for the session's life: the connection's place under `MAX_CONNECTIONS`, and the
    /// token the shutdown waits for.
    _held: (SocketGuard, watch::Receiver<()>),
}

/// What woke a WebSocket session's task.
enum Woke {
    Beat(Beat),
    Read(Option<Result<Message, WsError>>),
    Write,
}

impl Session {
    /// The session's task, from the connection that upgraded.
    fn start(
        connection: Connection,
        guard: SocketGuard,
        ws: Ws,
    ) -> impl Future<Output = ()> + Send + 'static {
        Box::new(Session::new(connection, guard, ws)).run()
    }

    fn new(connection: Connection, guard: SocketGuard, ws: Ws) -> Session {
        let Connection { broker, _alive, .. } = connection;
        let writer = WsWriter {
            ws,
            out: Vec::new(),
            stall: write_deadline(&broker.config),
            charged: Charged::new(&broker.budget, 0),
        };
        let heartbeat = Heartbeat::new(broker.config.heartbeat, true);
        let subscriptions = Subscriptions::new(broker);
        Session {
            bucket: subscriptions
                .broker
                .rate()
                .map(|(_, burst)| TokenBucket::new(burst)),
            publisher: Publisher::new(subscriptions.id),
            subscriptions,
            writer,
            heartbeat,
            _held: (guard, _alive),
        }
    }

    /// Boxed: an `async fn` keeps a by-value argument twice in its future (the argument, and
    /// the local it is moved into), which for a 600-byte session is 600 bytes more per
    /// connection than the box.
    async fn run(mut self: Box<Self>) {
        let end = self.serve().await;
        if let End::Error(e) = end {
            // Boxed: the closing states stay out of every connection's task.
            Box::pin(self.fail(e)).await;
        }
    }

    /// A session that ended on an error: Close with the contract's code where tungstenite
    /// sends none (1009, 1007, 1002), within a second, then a lingering close.
    async fn fail(&mut self, e: WsError) {
        log!(
            self.subscriptions.broker,
            Level::Debug,
            "connection {}: {e}",
            self.subscriptions.id
        );
        let code = match e {
            WsError::Capacity(_) => CloseCode::Size,
            WsError::Utf8(_) => CloseCode::Invalid,
            WsError::Protocol(_) => CloseCode::Protocol,
            _ => return,
        };
        // A Close reason may hold at most 123 bytes.
        let mut reason = e.to_string();
        while reason.len() > 120 {
            reason.pop();
        }
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        };
        let close = async {
            self.writer.write_out().await?;
            send(&mut self.writer.ws, Message::Close(Some(frame)))
                .await
                .map_err(End::from)
        };
        if let Ok(Ok(())) = timeout(Duration::from_secs(1), close).await {
            linger(&mut self.writer.ws.get_mut().stream).await;
        }
    }

    async fn serve(&mut self) -> End {
        let outbox = Arc::clone(&self.subscriptions.outbox);
        loop {
            if self.subscriptions.broker.stopping().is_some() {
                return Box::pin(self.goodbye()).await;
            }
            outbox.about_to_look();
            if outbox.has_work()
                && let Err(e) = self.subscriptions.drain(&mut self.writer).await
            {
                return e.into();
            }
            let pending = self.writer.buffered() > 0;
            // The select only says what woke the task; the work happens after it, so the
            // futures of its branches and those of the work never take room side by side.
            let woke = tokio::select! {
                biased;
                beat = self.heartbeat.tick() => Woke::Beat(beat),
                incoming = next_message(&mut self.writer.ws) => Woke::Read(incoming),
                _ = outbox.notify.notified() => continue,
                // Nothing else is ready: write what the loop has gathered, in one go.
                _ = std::future::ready(()), if pending => Woke::Write,
            };
            let step = match woke {
                Woke::Beat(Beat::Ping) => {
                    idle(&mut self.writer.out, &mut self.writer.charged);
                    self.writer.frame(OPCODE_PING, &[]);
                    self.writer
                        .message("info", Timestamp::now(), |json| json.plain("msg", "ping"));
                    continue;
                }
                Woke::Beat(Beat::Quiet) => {
                    idle(&mut self.writer.out, &mut self.writer.charged);
                    continue;
                }
                Woke::Beat(Beat::Dead) => {
                    let id = self.subscriptions.id;
                    log!(
                        self.subscriptions.broker,
                        Level::Debug,
                        "connection {id} timed out"
                    );
                    return End::Closed;
                }
                Woke::Read(incoming) => {
                    self.heartbeat.heard();
                    match incoming {
                        None => return End::Closed,
                        Some(Err(e)) => return e.into(),
                        Some(Ok(message)) => self.on_burst(&message).await,
                    }
                }
                Woke::Write => {
                    let written = self.writer.write_out().await.map_err(End::from);
                    // Caught up: the buffer a burst grew goes now, not at the next heartbeat.
                    if !outbox.has_work() {
                        idle(&mut self.writer.out, &mut self.writer.charged);
                    }
                    written
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Handles `first` and then the messages already buffered behind it (up to a bound), so a
    /// client that pipelines requests costs one trip through the loop per burst, not per
    /// message, and its publishes to one topic in a row go in together (`Batch`).
    async fn on_burst(&mut self, first: &Message) -> Result<(), End> {
        const BURST: usize = 64;
        let mut batch = Batch::default();
        self.writer.ws.get_mut().message_done();
        self.on_message(first, &mut batch).await?;
        let mut bytes = first.len();
        let mut ended = None;
        // Up to a read's worth: replies wait for the burst's end, and may echo what it sent.
        for _ in 1..BURST {
            if bytes >= READ_AHEAD {
                break;
            }
            // Each message spends from the task's cooperative budget, so a client that floods
            // publishes yields its worker to the subscribers it is feeding.
            tokio::task::consume_budget().await;
            let message = match self.writer.ws.read() {
                Ok(message) => message,
                Err(e) if would_block(&e) => break,
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                    ended = Some(End::Closed);
                    break;
                }
                Err(e) => {
                    ended = Some(e.into());
                    break;
                }
            };
            self.writer.ws.get_mut().message_done();
            bytes += message.len();
            self.on_message(&message, &mut batch).await?;
        }
        self.publish_batch(&mut batch);
        self.writer.write_if_full().await?;
        ended.map_or(Ok(()), Err)
    }

    async fn on_message(&mut self, message: &Message, batch: &mut Batch) -> Result<(), End> {
        if let Message::Text(text) = message {
            return self.on_text(text, batch).await;
        }
        self.publish_batch(batch);
        match message {
            Message::Binary(_) => {
                let why = "binary frames are not supported; send JSON text";
                self.writer.error(None, reject("BAD_REQUEST", why));
                Ok(())
            }
            // tungstenite has queued the Close reply; send it (within the write deadline: a
            // peer that sends Close but reads nothing must not hold the connection) and end,
            // writing nothing after.
            Message::Close(_) => {
                self.writer.out.clear();
                let reply = timeout(self.writer.stall, flush(&mut self.writer.ws));
                let _ = Box::pin(reply).await;
                Err(End::Closed)
            }
            _ => Ok(()),
        }
    }

    /// Takes a token under `RATE_LIMIT` for a request that costs one (a publish, or a
    /// subscribe that asks for a replay); without one, how long until there is one.
    fn spend(&mut self) -> Result<(), Duration> {
        match (&mut self.bucket, self.subscriptions.broker.rate()) {
            (Some(bucket), Some((rate, burst))) => bucket.take(rate, burst),
            _ => Ok(()),
        }
    }

    async fn on_text(&mut self, text: &str, batch: &mut Batch) -> Result<(), End> {
        let (request_id, request) = decode(text);
        let costly = match &request {
            Ok(ClientRequest::Publish { .. }) => true,
            Ok(ClientRequest::Subscribe { replay, .. }) => *replay != Replay::Last(0),
            _ => false,
        };
        let spent = if costly { self.spend() } else { Ok(()) };
        let local = matches!(self.subscriptions.broker.engine, Engine::Local);
        let request = match (spent, request) {
            (Ok(()), Ok(ClientRequest::Publish { topic, id, payload })) if local => {
                if batch.topic.as_ref().is_some_and(|t| t.name != topic) {
                    self.publish_batch(batch);
                }
                let broker = &self.subscriptions.broker;
                let topic = match &batch.topic {
                    Some(topic) => topic,
                    None => match self.publisher.topic(broker, &topic) {
                        Ok(found) => batch.topic.insert(found),
                        Err(e) => {
                            self.writer.error(request_id, e);
                            return Ok(());
                        }
                    },
                };
                let event = self.publisher.draft(topic, id, payload);
                batch.push(event, request_id);
                return Ok(());
            }
            (Ok(()), request) => request,
            (Err(wait), _) => {
                self.publish_batch(batch);
                self.writer.retry_later(request_id, wait);
                return Ok(());
            }
        };
        // Anything else is answered after the publishes before it. Replies are written when
        // the burst ends (`on_burst`), except a replay's, which `subscribe` writes as it goes.
        self.publish_batch(batch);
        match request {
            Err(e) => self.writer.error(request_id, e),
            Ok(ClientRequest::Ping) => {
                let ts = Timestamp::now();
                self.writer
                    .message("pong", ts, |json| json.request_id(request_id));
            }
            // Boxed, like the other rare paths, so their state does not sit in every
            // connection's task for its whole life.
            Ok(request) => Box::pin(self.on_request(request_id, request)).await?,
        }
        Ok(())
    }

    /// The requests that wait on something: a subscribe's replay, an unsubscribe's drain, a
    /// publish in cluster mode.
    async fn on_request(
        &mut self,
        request_id: Option<&str>,
        request: ClientRequest<'_>,
    ) -> Result<(), End> {
        match request {
            ClientRequest::Publish { topic, id, payload } => {
                let broker = &self.subscriptions.broker;
                let published = match &broker.engine {
                    Engine::Local => self.publisher.publish(broker, &topic, id, payload),
                    #[cfg(feature = "cluster")]
                    Engine::Cluster(c) => c.publish(broker, &topic, id, payload).await,
                };
                self.writer
                    .answer(request_id, &topic, published.map(|p| (p.seq, p.ts)));
            }
            ClientRequest::Subscribe { topic, replay } => {
                self.subscribe(request_id, &topic, replay).await?;
            }
            ClientRequest::Unsubscribe { topic } => {
                self.unsubscribe(request_id, &topic).await?;
            }
            // Answered in `on_text`, which never sends it here.
            ClientRequest::Ping => {}
        }
        Ok(())
    }

    /// Publishes the batch, all at once, and answers each of its requests in order. If the
    /// memory budget refuses it whole, each message is tried alone, so that each gets its own
    /// answer.
    fn publish_batch(&mut self, batch: &mut Batch) {
        let Some(topic) = batch.topic.take() else {
            return;
        };
        let broker = &self.subscriptions.broker;
        let count = batch.events.len();
        match self
            .publisher
            .publish_all(broker, &topic, &mut batch.events)
        {
            Ok((first, ts)) => {
                for (k, seq) in (0..count).zip(first..) {
                    self.writer
                        .answer(batch.request_id(k), &topic.name, Ok((seq, ts)));
                }
            }
            Err(e) if batch.events.is_empty() => {
                for k in 0..count {
                    self.writer
                        .answer(batch.request_id(k), &topic.name, Err(e.clone()));
                }
            }
            Err(_) => {
                let events = std::mem::take(&mut batch.events);
                for (k, event) in events.into_iter().enumerate() {
                    let published = self.publisher.publish_all(broker, &topic, &mut vec![event]);
                    self.writer
                        .answer(batch.request_id(k), &topic.name, published);
                }
            }
        }
        batch.events.clear();
        batch.ids.clear();
        batch.request_ids.clear();
    }

    async fn subscribe(
        &mut self,
        request_id: Option<&str>,
        name: &str,
        replay: Replay,
    ) -> Result<(), End> {
        let joined = match self
            .subscriptions
            .subscribe(&mut self.writer, name, replay)
            .await?
        {
            Ok(joined) => joined,
            Err(e) => {
                self.writer.error(request_id, e);
                return Ok(());
            }
        };
        let Joined { topic, backlog } = joined;
        self.writer.message("ack", Timestamp::now(), |json| {
            let json = json
                .request_id(request_id)
                .plain("topic", name)
                .plain("status", "ok")
                .plain("epoch", &topic.epoch)
                .num("replayed", backlog.events.len() as u64);
            if backlog.missed > 0 {
                json.num("missed", backlog.missed)
            } else {
                json
            }
        });
        self.subscriptions
            .replay(&mut self.writer, &backlog.events)
            .await?;
        Ok(())
    }

    async fn unsubscribe(&mut self, request_id: Option<&str>, name: &str) -> Result<(), End> {
        match self
            .subscriptions
            .unsubscribe(&mut self.writer, name)
            .await?
        {
            Ok(()) => self.writer.message("ack", Timestamp::now(), |json| {
                json.request_id(request_id)
                    .plain("topic", name)
                    .plain("status", "ok")
            }),
            Err(e) => self.writer.error(request_id, e),
        }
        Ok(())
    }

    /// Shutdown: `info`/`shutdown`, the queued events, Close 1001, then a lingering close
    /// that reads the peer's Close — all by the drain deadline.
    async fn goodbye(&mut self) -> End {
        let deadline = self
            .subscriptions
            .broker
            .stopping()
            .unwrap_or_else(Instant::now);
        let farewell = async {
            let ts = Timestamp::now();
            self.writer
                .message("info", ts, |json| json.plain("msg", "shutdown"));
            while self.subscriptions.outbox.len() > 0 {
                self.subscriptions.drain(&mut self.writer).await?;
            }
            self.writer.write_out().await?;
            let frame = CloseFrame {
                code: CloseCode::Away,
                reason: Utf8Bytes::from_static("server shutting down"),
            };
            send(&mut self.writer.ws, Message::Close(Some(frame))).await?;
            linger(&mut self.writer.ws.get_mut().stream).await;
            Ok::<(), End>(())
        };
        let _ = timeout_at(deadline, farewell).await;
        End::Closed
    }
}

fn topic_not_found(name: &str) -> Reject {
    reject("TOPIC_NOT_FOUND", format!("topic '{name}' does not exist"))
}

fn too_many_topics(max: usize) -> Reject {
    reject("LIMIT_EXCEEDED", format!("at most {max} topics"))
}

// ---- the SSE stream ----

/// The Server-Sent Events side of a subscriber: frames what its subscription delivers as SSE
/// records around the same event JSON a WebSocket subscriber gets (`id: <seq>`,
/// `event: message`, `data: <JSON>`), and writes them to the socket.
struct SseWriter {
    stream: TcpStream,
    /// Records not yet written to the socket.
    out: Vec<u8>,
    /// How long one write may wait for the socket before the peer is given up on.
    stall: Duration,
    /// The topic was deleted: its notice is the stream's last record.
    ended: bool,
    /// The budget's share of `out`.
    charged: Charged,
}

impl SseWriter {
    /// Appends `event: <kind>` and `data:` lines holding `parts`, in order. A line break in
    /// the JSON (whitespace a publisher put in its payload; `breaks` says whether there may
    /// be one) starts another `data:` line, which the client joins back with `\n`.
    fn record(&mut self, kind: &str, parts: &[&[u8]], breaks: bool) {
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(kind.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        for part in parts {
            if !breaks {
                self.out.extend_from_slice(part);
                continue;
            }
            for (i, line) in part.split(|b| *b == b'\n' || *b == b'\r').enumerate() {
                if i > 0 {
                    self.out.extend_from_slice(b"\ndata: ");
                }
                self.out.extend_from_slice(line);
            }
        }
        self.out.extend_from_slice(b"\n\n");
    }

    /// A record whose data is a small JSON object built by `build`.
    fn notice(&mut self, kind: &str, build: impl FnOnce(Json<'_>) -> Json<'_>) {
        let mut data = Vec::with_capacity(64);
        build(Json::object(&mut data)).end();
        self.record(kind, &[&data], false);
    }

    fn message(&mut self, event: &Event, parts: &[&[u8]]) {
        self.out.extend_from_slice(b"id: ");
        push_u64(&mut self.out, event.seq);
        self.out.push(b'\n');
        self.record("message", parts, event.has_line_breaks());
    }
}

impl Writer for SseWriter {
    fn event(&mut self, event: &Event) {
        self.message(event, &[event.text()]);
    }

    fn replayed(&mut self, event: &Event) {
        let (live, marker) = event.replay_parts();
        self.message(event, &[live, marker]);
    }

    fn dropped(&mut self, count: u64) {
        self.notice("slow_consumer", |json| json.num("dropped", count));
    }

    fn topic_deleted(&mut self, topic: &str) {
        self.notice("topic_deleted", |json| json.plain("topic", topic));
        self.ended = true;
    }

    fn buffered(&self) -> usize {
        self.out.len()
    }

    async fn write_out(&mut self) -> std::io::Result<()> {
        self.charged.track(self.out.capacity());
        if !self.out.is_empty() {
            within(self.stall, self.stream.write_all(&self.out)).await?;
        }
        written(&mut self.out, &mut self.charged);
        Ok(())
    }
}

/// One SSE subscriber (`GET /topics/{name}/events`): a subscription like a WebSocket one,
/// through the same outbox, written by an `SseWriter`. The client sends nothing after its
/// request, so the stream ends when the socket does (or its writes stall), when the topic is
/// deleted, or at shutdown.
struct SseStream {
    subscriptions: Subscriptions,
    writer: SseWriter,
    heartbeat: Heartbeat,
}

impl SseStream {
    async fn serve(connection: Connection, stream: TcpStream, name: String, replay: Replay) {
        let Connection { broker, _alive, .. } = connection;
        let mut sse = SseStream {
            writer: SseWriter {
                stream,
                out: Vec::new(),
                stall: write_deadline(&broker.config),
                ended: false,
                charged: Charged::new(&broker.budget, 0),
            },
            heartbeat: Heartbeat::new(broker.config.heartbeat, false),
            subscriptions: Subscriptions::new(broker),
        };
        let subscribed = sse.subscriptions.subscribe(&mut sse.writer, &name, replay);
        let Joined { topic, backlog } = match subscribed.await {
            Ok(Ok(joined)) => joined,
            Ok(Err(e)) => {
                let response = Response::reject(e).closing();
                let _ = response.write_within(&mut sse.writer.stream, 1).await;
                return;
            }
            Err(_) => return,
        };
        sse.writer.out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              X-Accel-Buffering: no\r\nConnection: close\r\n\r\n",
        );
        sse.writer.notice("subscribed", |json| {
            let json = json
                .plain("topic", &name)
                .plain("epoch", &topic.epoch)
                .num("replayed", backlog.events.len() as u64);
            if backlog.missed > 0 {
                json.num("missed", backlog.missed)
            } else {
                json
            }
        });
        if sse
            .subscriptions
            .replay(&mut sse.writer, &backlog.events)
            .await
            .is_ok()
        {
            drop(backlog);
            sse.stream().await;
        }
        linger(&mut sse.writer.stream).await;
    }

    async fn stream(&mut self) {
        let outbox = Arc::clone(&self.subscriptions.outbox);
        // What a client sends after its request is read only to notice that it has gone.
        let mut discard = [0u8; 64];
        loop {
            if self.subscriptions.broker.stopping().is_some() {
                return self.goodbye().await;
            }
            outbox.about_to_look();
            if outbox.has_work() && self.subscriptions.drain(&mut self.writer).await.is_err() {
                return;
            }
            if self.writer.ended {
                let _ = self.writer.write_out().await;
                return;
            }
            let pending = self.writer.buffered() > 0;
            tokio::select! {
                biased;
                beat = self.heartbeat.tick() => {
                    idle(&mut self.writer.out, &mut self.writer.charged);
                    if let Beat::Ping = beat {
                        self.writer.out.extend_from_slice(b": ping\n\n");
                    }
                }
                read = self.writer.stream.read(&mut discard) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return;
                    }
                }
                _ = outbox.notify.notified() => {}
                _ = std::future::ready(()), if pending => {
                    if self.writer.write_out().await.is_err() {
                        return;
                    }
                    // Caught up: the buffer a burst grew goes now, not at the next heartbeat.
                    if !outbox.has_work() {
                        idle(&mut self.writer.out, &mut self.writer.charged);
                    }
                }
            }
        }
    }

    /// Shutdown: the queued events, then `event: shutdown`, by the drain deadline.
    async fn goodbye(&mut self) {
        let deadline = self
            .subscriptions
            .broker
            .stopping()
            .unwrap_or_else(Instant::now);
        let farewell = async {
            while self.subscriptions.outbox.len() > 0 {
                self.subscriptions.drain(&mut self.writer).await?;
            }
            self.writer.notice("shutdown", |json| json);
            self.writer.write_out().await
        };
        let _ = timeout_at(deadline, farewell).await;
    }
}
