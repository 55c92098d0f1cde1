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
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

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

/// tungstenite's per-connection buffers. The read buffer is allocated up front, so it is small:
/// 10,000 idle connections should cost little, and 2 KiB reads cost nothing measurable in the
/// fan-in benchmark. tungstenite writes only Pong and Close replies (events and replies are
/// framed by `Session`), so its write buffer stays small too.
const WS_READ_BUFFER: usize = 2 * 1024;
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

/// Everything the server can be told at start. `Default` is the documented configuration;
/// tests build one and shrink what they need (a queue of 2, a heartbeat of 50 ms).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) log_level: Level,
    /// Events queued per connection before the oldest is dropped.
    pub(crate) queue_size: usize,
    /// Events kept per topic for `last_n` replays.
    pub(crate) replay_size: usize,
    /// Largest WebSocket message and REST body.
    pub(crate) max_message_bytes: usize,
    /// Open TCP connections of any kind; beyond it new ones get 503.
    pub(crate) max_connections: usize,
    pub(crate) max_topics: usize,
    /// Topics one connection may be subscribed to at once.
    pub(crate) max_subscriptions: usize,
    /// Ping interval; zero turns heartbeats (and dead-peer detection) off.
    pub(crate) heartbeat: Duration,
    /// How long shutdown may spend flushing queues before the process exits anyway.
    pub(crate) shutdown_grace: Duration,
    /// Deadline for a whole request head, from the connection's start or the previous
    /// response. Not an environment variable: it exists so tests can shrink it.
    pub(crate) head_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 8000,
            log_level: Level::Info,
            queue_size: 1000,
            replay_size: 100,
            max_message_bytes: 65536,
            max_connections: 10_000,
            max_topics: 10_000,
            max_subscriptions: 1000,
            heartbeat: Duration::from_secs(30),
            shutdown_grace: Duration::from_millis(2000),
            head_timeout: Duration::from_secs(10),
        }
    }
}

/// The settings, in the order `--help` lists them: variable name, default, meaning.
const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "HOST",
        "127.0.0.1",
        "address to bind (0.0.0.0 to serve other machines)",
    ),
    (
        "PORT",
        "8000",
        "port (0 = any free port; the chosen address is logged)",
    ),
    ("LOG_LEVEL", "info", "error, warn, info or debug"),
    (
        "QUEUE_SIZE",
        "1000",
        "events queued per connection before drop-oldest",
    ),
    ("REPLAY_SIZE", "100", "events kept per topic for last_n"),
    (
        "MAX_MESSAGE_BYTES",
        "65536",
        "largest WebSocket message and REST body",
    ),
    (
        "MAX_CONNECTIONS",
        "10000",
        "open connections; beyond it new ones get 503",
    ),
    (
        "MAX_TOPICS",
        "10000",
        "topics; beyond it POST /topics gets 429",
    ),
    (
        "MAX_SUBSCRIPTIONS",
        "1000",
        "topics one connection may subscribe to",
    ),
    ("HEARTBEAT_SECS", "30", "heartbeat interval; 0 turns it off"),
    (
        "SHUTDOWN_GRACE_MS",
        "2000",
        "how long shutdown may spend flushing queues",
    ),
];

impl Config {
    /// Reads the environment, then the command line (`--queue-size 64` or `--queue-size=64`),
    /// which wins. The error names the setting, for the exit-status-2 message.
    pub(crate) fn from_sources(
        env: impl Fn(&str) -> Option<String>,
        args: &[String],
    ) -> Result<Config, String> {
        let mut values: Vec<(&str, String)> = Vec::new();
        for (name, _, _) in SETTINGS {
            if let Some(value) = env(name) {
                values.push((name, value));
            }
        }
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_string())),
                None => (arg.as_str(), None),
            };
            let name = flag
                .strip_prefix("--")
                .map(|f| f.to_ascii_uppercase().replace('-', "_"))
                .and_then(|n| {
                    SETTINGS
                        .iter()
                        .find(|(s, _, _)| *s == n)
                        .map(|(s, _, _)| *s)
                })
                .ok_or_else(|| format!("unknown argument '{arg}' (see --help)"))?;
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))?,
            };
            values.push((name, value));
        }
        let mut config = Config::default();
        for (name, value) in values {
            config.set(name, value.trim())?;
        }
        Ok(config)
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let invalid = |why: &str| format!("invalid {name}='{value}': {why}");
        let number = |min: u64, max: u64| -> Result<u64, String> {
            let n: u64 = value
                .parse()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| invalid("not a whole number"))?;
            if n < min || n > max {
                return Err(invalid(&format!("must be between {min} and {max}")));
            }
            Ok(n)
        };
        match name {
            "HOST" if value.is_empty() => return Err(invalid("empty")),
            "HOST" => self.host = value.to_string(),
            "PORT" => self.port = number(0, 65535)? as u16,
            "LOG_LEVEL" => {
                self.log_level = match value.to_ascii_lowercase().as_str() {
                    "error" => Level::Error,
                    "warn" => Level::Warn,
                    "info" => Level::Info,
                    "debug" => Level::Debug,
                    _ => return Err(invalid("expected error, warn, info or debug")),
                }
            }
            "QUEUE_SIZE" => self.queue_size = number(1, MAX_QUEUE_SIZE as u64)? as usize,
            "REPLAY_SIZE" => self.replay_size = number(0, MAX_QUEUE_SIZE as u64)? as usize,
            "MAX_MESSAGE_BYTES" => {
                self.max_message_bytes = number(1, MAX_MESSAGE_LIMIT as u64)? as usize
            }
            "MAX_CONNECTIONS" => self.max_connections = number(1, u32::MAX as u64)? as usize,
            "MAX_TOPICS" => self.max_topics = number(1, u32::MAX as u64)? as usize,
            "MAX_SUBSCRIPTIONS" => self.max_subscriptions = number(1, u32::MAX as u64)? as usize,
            "HEARTBEAT_SECS" => self.heartbeat = Duration::from_secs(number(0, 86_400)?),
            "SHUTDOWN_GRACE_MS" => {
                self.shutdown_grace = Duration::from_millis(number(0, 3_600_000)?)
            }
            _ => return Err(format!("unknown setting {name}")),
        }
        Ok(())
    }
}

fn help() -> String {
    let mut text = String::from(
        "pubsub — an in-memory WebSocket publish/subscribe broker\n\n\
         usage: pubsub [--setting value]...\n\n\
         Each setting is an environment variable or a flag (QUEUE_SIZE=64 is --queue-size 64);\n\
         a flag wins over the variable.\n\n",
    );
    for (name, default, meaning) in SETTINGS {
        let flag = format!("--{}", name.to_ascii_lowercase().replace('_', "-"));
        let _ = writeln!(
            text,
            "  {flag:<22} {name:<18} default {default:<10} {meaning}"
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
    // `stop` carries the drain deadline to every connection; `alive` receivers are held by
    // connections so that `alive_tx.closed()` says when the last one is gone.
    let (stop_tx, stop_rx) = watch::channel(None::<Instant>);
    let (alive_tx, alive_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let conn = Connection {
                        broker: Arc::clone(&broker),
                        stop: stop_rx.clone(),
                        _alive: alive_rx.clone(),
                    };
                    tokio::spawn(conn.serve(stream));
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
    let deadline = Instant::now() + grace;
    broker.stopping.store(true, Ordering::Release);
    let open = broker.open_sockets.load(Ordering::Relaxed);
    log!(
        broker,
        Level::Info,
        "shutting down: draining {open} connection(s)"
    );
    let _ = stop_tx.send(Some(deadline));
    drop(alive_rx);
    // A little past the deadline, so that connections which used all of it can still send
    // their Close frames.
    let _ = timeout_at(deadline + Duration::from_millis(250), alive_tx.closed()).await;
    log!(broker, Level::Info, "shutdown complete");
}

// ---- accepting a connection and routing it ----

/// One accepted TCP connection before it knows what it is: REST requests on a kept-alive
/// connection, or a WebSocket after the upgrade.
struct Connection {
    broker: Arc<Broker>,
    stop: watch::Receiver<Option<Instant>>,
    /// Dropped with the connection; `run` waits for all of these at shutdown.
    _alive: watch::Receiver<()>,
}

/// Counts an open TCP connection for `MAX_CONNECTIONS` and uncounts it on every exit path.
struct SocketGuard(Arc<Broker>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connection {
    async fn serve(mut self, mut stream: TcpStream) {
        let broker = Arc::clone(&self.broker);
        let open = broker.open_sockets.fetch_add(1, Ordering::AcqRel) + 1;
        let _guard = SocketGuard(Arc::clone(&broker));
        let _ = stream.set_nodelay(true);
        if open > broker.config.max_connections {
            let body = error_body("LIMIT_EXCEEDED", "too many open connections");
            let response = Response::new(503, body).closing();
            let _ = timeout(Duration::from_secs(1), response.write(&mut stream)).await;
            return;
        }
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        let mut deadline = Instant::now() + broker.config.head_timeout;
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
                    return;
                }
                HeadRead::Closed => return,
            };
            if broker.stopping.load(Ordering::Acquire) {
                let body = error_body("SHUTTING_DOWN", "the server is shutting down");
                let _ = Response::new(503, body)
                    .closing()
                    .write_within(&mut stream, 1)
                    .await;
                return;
            }
            if request.path == "/ws" && request.method == "GET" && request.wants_upgrade() {
                return self.upgrade(stream, request, buf).await;
            }
            let keep_alive = request.keep_alive();
            let response = match self
                .read_body(&mut stream, &mut buf, &request, deadline)
                .await
            {
                Ok(body) => {
                    let response = rest(&broker, &request, &body);
                    if keep_alive {
                        response
                    } else {
                        response.closing()
                    }
                }
                Err(BodyError::TooLarge) => {
                    let message =
                        format!("body larger than {} bytes", broker.config.max_message_bytes);
                    Response::new(413, error_body("PAYLOAD_TOO_LARGE", &message)).closing()
                }
                Err(BodyError::Closed) => return,
            };
            let close = response.close;
            if response.write_within(&mut stream, 10).await.is_err() || close {
                return;
            }
            deadline = Instant::now() + broker.config.head_timeout;
        }
    }

    /// Reads exactly `Content-Length` bytes of body, some of which may already be in `buf`.
    /// The limit is checked before anything is allocated or read.
    async fn read_body(
        &self,
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
        request: &Request,
        deadline: Instant,
    ) -> Result<Vec<u8>, BodyError> {
        let len = request.content_length.unwrap_or(0);
        if len > self.broker.config.max_message_bytes as u64 {
            return Err(BodyError::TooLarge);
        }
        let len = len as usize;
        while buf.len() < len {
            let have = buf.len();
            buf.resize(len, 0);
            match timeout_at(deadline, stream.read(&mut buf[have..])).await {
                Ok(Ok(n)) if n > 0 => buf.truncate(have + n),
                _ => return Err(BodyError::Closed),
            }
        }
        Ok(buf.drain(..len).collect())
    }

    /// Completes the WebSocket handshake ourselves (the head is already parsed), then hands
    /// the stream, with any bytes read past the head, to a session.
    async fn upgrade(self, mut stream: TcpStream, request: Request, leftover: Vec<u8>) {
        let key = request.header("sec-websocket-key").map(str::trim);
        let version = request.header("sec-websocket-version").map(str::trim);
        if version != Some("13") {
            let body = error_body("BAD_REQUEST", "unsupported WebSocket version; use 13");
            let response = Response::new(426, body)
                .header("Sec-WebSocket-Version", "13")
                .closing();
            let _ = response.write_within(&mut stream, 1).await;
            return;
        }
        let key = match key.filter(|k| is_websocket_key(k)) {
            Some(key) => key,
            None => {
                let body = error_body("BAD_REQUEST", "missing or malformed Sec-WebSocket-Key");
                let _ = Response::new(400, body)
                    .closing()
                    .write_within(&mut stream, 1)
                    .await;
                return;
            }
        };
        let accept = derive_accept_key(key.as_bytes());
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        match timeout(Duration::from_secs(10), stream.write_all(head.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        let limit = self.broker.config.max_message_bytes;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(WS_WRITE_BUFFER)
            .max_write_buffer_size(WS_WRITE_BUFFER + 2 * limit + 4096)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let ws = WebSocketStream::from_partially_read(
            ReadAhead::new(stream),
            leftover,
            Role::Server,
            Some(ws_config),
        )
        .await;
        Session::new(self.broker, self.stop).run(ws).await;
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

// ---- shared state: the broker, topics, outboxes ----

/// State shared by every connection.
pub(crate) struct Broker {
    pub(crate) config: Config,
    /// Topic name → topic. Looked up on every publish; entries are cloned out (`Arc`) and the
    /// map guard dropped at once, never held across an `.await`.
    topics: DashMap<String, Arc<Topic>>,
    /// Number of topics, kept beside the map so `MAX_TOPICS` is checked without a scan.
    topic_count: AtomicUsize,
    /// Every open TCP connection, for `MAX_CONNECTIONS`.
    open_sockets: AtomicUsize,
    /// Open WebSocket sessions, for `/health`.
    sessions: AtomicUsize,
    /// Source of connection ids (for logs and server-assigned message ids).
    next_id: AtomicU64,
    started: Instant,
    /// Set when shutdown begins: REST answers 503 from then on.
    stopping: AtomicBool,
}

impl Broker {
    fn new(config: Config) -> Broker {
        Broker {
            config,
            topics: DashMap::new(),
            topic_count: AtomicUsize::new(0),
            open_sockets: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            stopping: AtomicBool::new(false),
        }
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.get(name).map(|entry| Arc::clone(entry.value()))
    }

    fn create_topic(&self, name: &str) -> Result<(), &'static str> {
        match self.topics.entry(name.to_string()) {
            Entry::Occupied(_) => Err("TOPIC_EXISTS"),
            Entry::Vacant(slot) => {
                if self.topic_count.fetch_add(1, Ordering::AcqRel) >= self.config.max_topics {
                    self.topic_count.fetch_sub(1, Ordering::AcqRel);
                    return Err("LIMIT_EXCEEDED");
                }
                slot.insert(Arc::new(Topic::new(name, self.config.replay_size)));
                Ok(())
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

/// The part of a topic that its events point back to: identity (compared by pointer) and the
/// drop counter, which an evicted event must find after the topic itself may be gone.
pub(crate) struct TopicShared {
    dropped: AtomicU64,
}

pub(crate) struct Topic {
    name: String,
    shared: Arc<TopicShared>,
    /// Outboxes of the current subscribers. Swapped whole (`rcu`) under the ordering lock;
    /// readers such as `/stats` load a snapshot without taking the lock.
    subscribers: ArcSwap<Vec<Arc<Outbox>>>,
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
    ring: VecDeque<Arc<Event>>,
    replay_size: usize,
}

/// A message's `id`: the client's (raw JSON, a string literal), or one the server assigns
/// from the publishing connection and its count of unnamed messages.
enum MessageId<'a> {
    Given(&'a str),
    Assigned(u64, u64),
}

/// Appends the decimal digits of `n`, two at a time: every publish writes three or four
/// integers (ids, `seq`), and the profile showed the digit-at-a-time loop at 5% of fan-in CPU.
pub(crate) fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    buf.extend_from_slice(&digits[at..]);
}

/// One published event, serialized once; every subscriber queue holds the same `Arc`.
pub(crate) struct Event {
    topic: Arc<TopicShared>,
    /// The whole WebSocket frame from `start` on: header, then the `event` JSON from
    /// `HEADER_ROOM` on. Server frames are unmasked, so these bytes are the same for every
    /// subscriber and a connection writes them as they are.
    wire: Vec<u8>,
    start: usize,
}

impl Event {
    fn frame(&self) -> &[u8] {
        &self.wire[self.start..]
    }

    fn text(&self) -> &[u8] {
        &self.wire[HEADER_ROOM..]
    }
}

impl Topic {
    fn new(name: &str, replay_size: usize) -> Topic {
        Topic {
            name: name.to_string(),
            shared: Arc::new(TopicShared {
                dropped: AtomicU64::new(0),
            }),
            subscribers: ArcSwap::from_pointee(Vec::new()),
            state: Mutex::new(TopicState {
                next_seq: 1,
                ring: VecDeque::with_capacity(replay_size.min(1024)),
                replay_size,
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
        self.subscribers.load().len()
    }

    fn published(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Assigns the next `seq` and delivers the event; `None` if the topic was deleted.
    /// `id` and `payload` are raw JSON, copied into the frame byte for byte.
    fn publish(&self, id: MessageId, payload: &str) -> Option<(u64, Timestamp)> {
        let ts = Timestamp::now();
        let mut wire = Vec::with_capacity(160 + self.name.len() + payload.len());
        wire.extend_from_slice(&[0; HEADER_ROOM]);
        wire.extend_from_slice(br#"{"type":"event","topic":""#);
        wire.extend_from_slice(self.name.as_bytes());
        wire.extend_from_slice(br#"","message":{"id":"#);
        match id {
            MessageId::Given(raw) => wire.extend_from_slice(raw.as_bytes()),
            MessageId::Assigned(connection, n) => {
                wire.push(b'"');
                push_u64(&mut wire, connection);
                wire.push(b'-');
                push_u64(&mut wire, n);
                wire.push(b'"');
            }
        }
        wire.extend_from_slice(br#","payload":"#);
        wire.extend_from_slice(payload.as_bytes());
        wire.extend_from_slice(br#"},"seq":"#);
        // Allocated before the lock and finished under it; what the ring evicts is freed
        // after it (declared first, dropped last): the critical section does no allocation.
        let mut event = Arc::new(Event {
            topic: Arc::clone(&self.shared),
            wire,
            start: 0,
        });
        let mut evicted = None;
        let mut state = self.lock();
        if self.is_deleted() {
            return None;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        // Nothing else holds `event` until it is pushed below, so this always succeeds.
        let fresh = Arc::get_mut(&mut event)?;
        push_u64(&mut fresh.wire, seq);
        fresh.wire.extend_from_slice(br#","ts":""#);
        fresh.wire.extend_from_slice(ts.as_str().as_bytes());
        fresh.wire.extend_from_slice(br#""}"#);
        let (header, len) = frame_header(OPCODE_TEXT, fresh.wire.len() - HEADER_ROOM);
        fresh.start = HEADER_ROOM - len;
        fresh.wire[HEADER_ROOM - len..HEADER_ROOM].copy_from_slice(&header[..len]);
        if state.replay_size > 0 {
            if state.ring.len() == state.replay_size {
                evicted = state.ring.pop_front();
            }
            state.ring.push_back(Arc::clone(&event));
        }
        for outbox in self.subscribers.load().iter() {
            outbox.push(&event);
        }
        drop(state);
        drop(evicted);
        Some((seq, ts))
    }

    /// Registers `outbox` and returns the last `last_n` events, at the ordering point.
    fn subscribe(&self, outbox: &Arc<Outbox>, last_n: usize) -> Option<Vec<Arc<Event>>> {
        let state = self.lock();
        if self.is_deleted() {
            return None;
        }
        self.subscribers.rcu(|current| {
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend(current.iter().cloned());
            next.push(Arc::clone(outbox));
            next
        });
        let skip = state.ring.len().saturating_sub(last_n);
        Some(state.ring.iter().skip(skip).cloned().collect())
    }

    fn unsubscribe(&self, outbox: &Arc<Outbox>) {
        let _state = self.lock();
        self.subscribers.rcu(|current| {
            current
                .iter()
                .filter(|o| !Arc::ptr_eq(o, outbox))
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
        let subscribers = self.subscribers.swap(Arc::new(Vec::new()));
        drop(state);
        subscribers.iter().cloned().collect()
    }
}

/// What publishers hand to one connection: a bounded queue of events with drop-oldest, and
/// the out-of-band notices that must not be dropped with them.
pub(crate) struct Outbox {
    queue: ArrayQueue<Arc<Event>>,
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
            queue: ArrayQueue::new(capacity),
            dropped: AtomicU64::new(0),
            notify: Notify::new(),
            woken: AtomicBool::new(false),
            deleted: Mutex::new(Vec::new()),
            has_deleted: AtomicBool::new(false),
        }
    }

    fn push(&self, event: &Arc<Event>) {
        if let Some(evicted) = self.queue.force_push(Arc::clone(event)) {
            self.dropped.fetch_add(1, Ordering::AcqRel);
            evicted.topic.dropped.fetch_add(1, Ordering::Relaxed);
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
        !self.queue.is_empty()
            || self.dropped.load(Ordering::Acquire) > 0
            || self.has_deleted.load(Ordering::Acquire)
    }
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
        let mut until = deadline;
        let read = loop {
            tokio::select! {
                read = timeout_at(until, stream.read(&mut buf[have..])) => break read,
                // Shutdown: keep reading until the drain deadline, so that a request on this
                // connection is answered 503, but no longer.
                Ok(()) = stop.changed() => {
                    if let Some(stop_at) = *stop.borrow() {
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

/// A response about to be written: status, JSON body, extra headers.
pub(crate) struct Response {
    status: u16,
    body: String,
    headers: Vec<(&'static str, &'static str)>,
    close: bool,
}

impl Response {
    fn new(status: u16, body: String) -> Response {
        Response {
            status,
            body,
            headers: Vec::new(),
            close: false,
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Response {
        self.headers.push((name, value));
        self
    }

    fn closing(mut self) -> Response {
        self.close = true;
        self
    }

    fn from_http_error(e: HttpError) -> Response {
        let response = match e {
            HttpError::BadRequest(why) => Response::new(400, error_body("BAD_REQUEST", why)),
            HttpError::HeadTooLarge => Response::new(
                431,
                error_body(
                    "HEADERS_TOO_LARGE",
                    "request head over 8 KiB or 100 header lines",
                ),
            ),
            HttpError::NotImplemented => Response::new(
                501,
                error_body(
                    "BAD_REQUEST",
                    "Transfer-Encoding is not supported; send Content-Length",
                ),
            ),
        };
        response.closing()
    }

    async fn write(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
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
        head.push_str(&self.body);
        stream.write_all(head.as_bytes()).await?;
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

/// Closing a socket that still has unread input makes the kernel send a reset, which can
/// destroy the response before the client reads it (a 413 or 431 is answered with the
/// client's bytes still arriving). So: send FIN, then read and discard what the peer is still
/// sending, for a short bounded time, before the socket is dropped.
async fn linger(stream: &mut TcpStream) {
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

fn error_body(code: &str, message: &str) -> String {
    format!(
        r#"{{"error":{{"code":"{code}","message":{}}}}}"#,
        json_string(message)
    )
}

// ---- REST handlers ----

fn rest(broker: &Broker, request: &Request, body: &[u8]) -> Response {
    let method = request.method.as_str();
    let path = request.path.as_str();
    let allow = |allowed: &'static str| {
        let message = format!("{method} is not allowed on {path}");
        Response::new(405, error_body("METHOD_NOT_ALLOWED", &message)).header("Allow", allowed)
    };
    match path {
        "/topics" => match method {
            "GET" => list_topics(broker),
            "POST" => create_topic(broker, body),
            _ => allow("GET, POST"),
        },
        "/health" if method == "GET" => health(broker),
        "/health" => allow("GET"),
        "/stats" if method == "GET" => stats(broker),
        "/stats" => allow("GET"),
        "/ws" if method == "GET" => Response::new(
            400,
            error_body("BAD_REQUEST", "/ws expects a WebSocket upgrade"),
        ),
        "/ws" => allow("GET"),
        _ => match path.strip_prefix("/topics/") {
            Some(name) if method == "DELETE" => delete_topic(broker, name),
            Some(_) => allow("DELETE"),
            None => Response::new(404, error_body("NOT_FOUND", &format!("no route {path}"))),
        },
    }
}

fn create_topic(broker: &Broker, body: &[u8]) -> Response {
    #[derive(Deserialize)]
    struct Create {
        name: serde_json::Value,
    }
    let name = match serde_json::from_slice::<Create>(body) {
        Ok(Create {
            name: serde_json::Value::String(name),
        }) => name,
        Ok(_) => return bad_request("\"name\" must be a string"),
        Err(e) => return bad_request(&format!("body must be {{\"name\":\"...\"}}: {e}")),
    };
    if let Err(why) = check_topic_name(&name) {
        return bad_request(&why);
    }
    match broker.create_topic(&name) {
        Ok(()) => Response::new(201, format!(r#"{{"status":"created","topic":"{name}"}}"#)),
        Err("TOPIC_EXISTS") => Response::new(
            409,
            error_body("TOPIC_EXISTS", &format!("topic '{name}' already exists")),
        ),
        Err(_) => Response::new(
            429,
            error_body(
                "LIMIT_EXCEEDED",
                &format!("at most {} topics", broker.config.max_topics),
            ),
        ),
    }
}

fn delete_topic(broker: &Broker, name: &str) -> Response {
    if let Err(why) = check_topic_name(name) {
        return bad_request(&why);
    }
    if broker.delete_topic(name) {
        Response::new(200, format!(r#"{{"status":"deleted","topic":"{name}"}}"#))
    } else {
        topic_not_found_response(name)
    }
}

fn topic_not_found_response(name: &str) -> Response {
    let message = format!("topic '{name}' does not exist");
    Response::new(404, error_body("TOPIC_NOT_FOUND", &message))
}

fn bad_request(message: &str) -> Response {
    Response::new(400, error_body("BAD_REQUEST", message))
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
    let items: Vec<String> = sorted_topics(broker)
        .iter()
        .map(|t| {
            format!(
                r#"{{"name":"{}","subscribers":{}}}"#,
                t.name,
                t.subscriber_count()
            )
        })
        .collect();
    Response::new(200, format!(r#"{{"topics":[{}]}}"#, items.join(",")))
}

fn health(broker: &Broker) -> Response {
    let subscribers: usize = broker
        .topics
        .iter()
        .map(|e| e.value().subscriber_count())
        .sum();
    Response::new(
        200,
        format!(
            r#"{{"status":"ok","uptime_sec":{},"topics":{},"subscribers":{},"connections":{}}}"#,
            broker.started.elapsed().as_secs(),
            broker.topic_count.load(Ordering::Acquire),
            subscribers,
            broker.sessions.load(Ordering::Acquire),
        ),
    )
}

fn stats(broker: &Broker) -> Response {
    let items: Vec<String> = sorted_topics(broker)
        .iter()
        .map(|t| {
            format!(
                r#""{}":{{"messages":{},"subscribers":{},"dropped":{}}}"#,
                t.name,
                t.published(),
                t.subscriber_count(),
                t.shared.dropped.load(Ordering::Acquire)
            )
        })
        .collect();
    Response::new(200, format!(r#"{{"topics":{{{}}}}}"#, items.join(",")))
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
/// echoes the `request_id`.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    request_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    last_n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<MessageField<'a>>,
}

/// `message` of a publish, decoded in the same pass as the envelope. Anything but an object
/// is `Invalid` rather than a parse error, so the reply can still echo the `request_id`.
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

#[derive(Deserialize)]
struct PublishedMessage<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
}

/// Keeps a field that is present, even as `null` (plain `Option` would turn `null` into `None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// What a client asked for, validated.
#[derive(Debug, PartialEq)]
pub(crate) enum ClientRequest<'a> {
    Subscribe {
        topic: Cow<'a, str>,
        last_n: usize,
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

/// An error reply: a contract code and a human message.
#[derive(Debug, PartialEq)]
pub(crate) struct Reject {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

fn reject(code: &'static str, message: impl Into<String>) -> Reject {
    Reject {
        code,
        message: message.into(),
    }
}

/// Decodes one text frame. Returns the `request_id` (raw JSON, echoed verbatim) whenever the
/// frame was a JSON object, whatever else was wrong with it.
pub(crate) fn decode(text: &str) -> (Option<&RawValue>, Result<ClientRequest<'_>, Reject>) {
    // Valid JSON nested deeper than the limit needs an opening and a closing bracket per
    // level, so shorter messages (most of them) skip the scan; invalid ones fail in serde.
    if text.len() >= 2 * (MAX_JSON_DEPTH + 1) && json_depth_exceeds(text, MAX_JSON_DEPTH) {
        let message = format!("JSON nested deeper than {MAX_JSON_DEPTH} levels");
        return (None, Err(reject("BAD_REQUEST", message)));
    }
    let envelope: Envelope = match serde_json::from_str(text) {
        Ok(envelope) => envelope,
        Err(e) => {
            let message = format!("expected a JSON object message: {e}");
            return (None, Err(reject("BAD_REQUEST", message)));
        }
    };
    let request_id = envelope.request_id;
    (request_id, decode_request(envelope))
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
            let last_n = match envelope.last_n {
                None => 0,
                Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
                    Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
                    Err(_) => {
                        let message = "\"last_n\" must be an integer >= 0";
                        return Err(reject("BAD_REQUEST", message));
                    }
                },
            };
            Ok(ClientRequest::Subscribe {
                topic: topic()?,
                last_n,
            })
        }
        "unsubscribe" => Ok(ClientRequest::Unsubscribe { topic: topic()? }),
        "publish" => {
            let topic = topic()?;
            let bad_message = || {
                let message = "\"message\" must be an object {\"id\"?: string, \"payload\": any}";
                reject("BAD_REQUEST", message)
            };
            let Some(MessageField::Object(message)) = envelope.message else {
                return Err(bad_message());
            };
            let payload = message
                .payload
                .ok_or_else(|| reject("BAD_REQUEST", "\"message.payload\" is required"))?;
            let id = match message.id {
                None => None,
                Some(raw) => match as_str(raw) {
                    Some(id) if id.len() <= MAX_ID_LEN => Some(raw.get()),
                    Some(_) => {
                        let why = format!("\"message.id\" is longer than {MAX_ID_LEN} bytes");
                        return Err(reject("BAD_REQUEST", why));
                    }
                    None => return Err(reject("BAD_REQUEST", "\"message.id\" must be a string")),
                },
            };
            Ok(ClientRequest::Publish {
                topic,
                id,
                payload: payload.get(),
            })
        }
        "ping" => Ok(ClientRequest::Ping),
        other => {
            let message =
                format!("unknown type '{other}'; expected subscribe, unsubscribe, publish or ping");
            Err(reject("BAD_REQUEST", message))
        }
    }
}

/// The string a raw JSON value holds, borrowed when it has no escapes.
fn as_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
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

/// Builds one server message: `{"type":…, fields…, "ts":…}`. Keys and raw values are written
/// as given; strings are escaped.
struct Frame(String);

impl Frame {
    fn new(kind: &str) -> Frame {
        let mut text = String::with_capacity(128);
        text.push_str(r#"{"type":""#);
        text.push_str(kind);
        text.push('"');
        Frame(text)
    }

    fn raw(mut self, key: &str, json: &str) -> Frame {
        let _ = write!(self.0, r#","{key}":{json}"#);
        self
    }

    fn request_id(self, id: Option<&RawValue>) -> Frame {
        match id {
            Some(id) => self.raw("request_id", id.get()),
            None => self,
        }
    }

    fn string(self, key: &str, value: &str) -> Frame {
        self.raw(key, &json_string(value))
    }

    fn number(self, key: &str, value: u64) -> Frame {
        self.raw(key, &value.to_string())
    }

    fn error(self, code: &str, message: &str) -> Frame {
        let json = format!(r#"{{"code":"{code}","message":{}}}"#, json_string(message));
        self.raw("error", &json)
    }

    fn finish(self) -> String {
        self.finish_at(Timestamp::now().as_str())
    }

    fn finish_at(mut self, ts: &str) -> String {
        let _ = write!(self.0, r#","ts":"{ts}"}}"#);
        self.0
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

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The replayed copy of an event: the same JSON with `"replay":true` before its closing brace.
fn replay_text(event: &Event) -> Vec<u8> {
    let live = event.text();
    let body = live.strip_suffix(b"}").unwrap_or(live);
    let mut text = Vec::with_capacity(body.len() + 16);
    text.extend_from_slice(body);
    text.extend_from_slice(br#","replay":true}"#);
    text
}

pub(crate) fn now_rfc3339() -> String {
    Timestamp::now().as_str().to_string()
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T10:00:00.123Z`: 24 ASCII bytes, kept on
/// the stack. Each thread remembers the last one it formatted, so a busy publish path formats
/// once per millisecond rather than once per message.
#[derive(Clone, Copy)]
pub(crate) struct Timestamp([u8; 24]);

impl Timestamp {
    pub(crate) fn now() -> Timestamp {
        thread_local! {
            static LAST: std::cell::Cell<(u64, [u8; 24])> =
                const { std::cell::Cell::new((u64::MAX, [0; 24])) };
        }
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let millis = since_epoch.as_millis() as u64;
        LAST.with(|last| {
            let (cached_millis, bytes) = last.get();
            if cached_millis == millis {
                return Timestamp(bytes);
            }
            let stamp = Timestamp::format(millis);
            last.set((millis, stamp.0));
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
        Timestamp(bytes)
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01T00:00:00.000Z")
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

// ---- the WebSocket session ----

type Ws = WebSocketStream<ReadAhead>;

/// How much one `read` may take from the socket for a busy connection.
const READ_AHEAD: usize = 16 * 1024;

/// The socket as tungstenite sees it. tungstenite reads in 2 KiB steps (its buffer is
/// allocated up front, so it is small). Once a read fills such a step, the connection is busy
/// and this reads up to 16 KiB per system call into a buffer that exists only while it holds
/// unread bytes: a busy publisher pays one `read` per ~80 messages, while quiet connections
/// read straight into tungstenite's buffer and never allocate one. Writes go straight through.
pub(crate) struct ReadAhead {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// The last read filled what it was given: more is probably waiting.
    busy: bool,
}

impl ReadAhead {
    fn new(stream: TcpStream) -> ReadAhead {
        ReadAhead {
            stream,
            buf: Vec::new(),
            pos: 0,
            busy: false,
        }
    }
}

impl tokio::io::AsyncRead for ReadAhead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.pos < this.buf.len() {
                let n = (this.buf.len() - this.pos).min(out.remaining());
                out.put_slice(&this.buf[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.buf.len() {
                    this.buf = Vec::new();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if !this.busy {
                let before = out.filled().len();
                let read = std::pin::Pin::new(&mut this.stream).poll_read(cx, out);
                if let Poll::Ready(Ok(())) = read {
                    this.busy = out.remaining() == 0 && out.filled().len() > before;
                }
                return read;
            }
            // Wait for readiness before allocating, so a waiting connection holds no buffer.
            match this.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let mut buf = Vec::with_capacity(READ_AHEAD);
            match this.stream.try_read_buf(&mut buf) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(n) => {
                    // Traffic has slowed: go back to reading directly.
                    this.busy = n == READ_AHEAD;
                    this.buf = buf;
                    this.pos = 0;
                }
                // Readiness was stale; `try_read_buf` cleared it, so poll it again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for ReadAhead {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Output is written in chunks of about this size, so a long drain or replay never holds
/// more than this (plus one frame) in the connection's buffer.
const OUT_CHUNK: usize = 64 * 1024;

/// Why a session ended, for the log.
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

/// One WebSocket connection. Its task is the only writer to the socket and owns the
/// connection's subscriptions, which gives one order per connection for free: replies leave
/// in request order, a subscribe ack precedes its replay and live events, and after an
/// unsubscribe ack nothing of that topic follows.
///
/// tungstenite parses what the client sends; what the server sends is framed here, into
/// `out`, because an event's frame is encoded once at publish time and copied as is. Before
/// each write of `out`, tungstenite's own buffer (Pong and Close replies) is flushed, so the
/// two never interleave inside a frame.
struct Session {
    broker: Arc<Broker>,
    outbox: Arc<Outbox>,
    stop: watch::Receiver<Option<Instant>>,
    /// Topic name → the topic this connection is subscribed to (the `Arc` identifies the
    /// incarnation: a topic deleted and re-created is another one).
    subscriptions: HashMap<String, Arc<Topic>>,
    /// The topic of the last publish, so a publisher streaming to one topic skips the map.
    last_published: Option<Arc<Topic>>,
    /// Encoded frames not yet written to the socket.
    out: Vec<u8>,
    /// Reused to build acks.
    scratch: Vec<u8>,
    /// How long one write may wait for the socket before the peer is given up on.
    stall: Duration,
    id: u64,
    /// Messages published without an `id`, for server-assigned ids.
    unnamed: u64,
}

impl Drop for Session {
    /// Every exit path — close, error, abort, shutdown — removes the subscriptions.
    fn drop(&mut self) {
        for topic in self.subscriptions.values() {
            topic.unsubscribe(&self.outbox);
        }
        self.broker.sessions.fetch_sub(1, Ordering::AcqRel);
        log!(self.broker, Level::Debug, "connection {} closed", self.id);
    }
}

impl Session {
    fn new(broker: Arc<Broker>, stop: watch::Receiver<Option<Instant>>) -> Session {
        broker.sessions.fetch_add(1, Ordering::AcqRel);
        let id = broker.next_id.fetch_add(1, Ordering::Relaxed);
        log!(broker, Level::Debug, "connection {id} opened");
        let stall = match broker.config.heartbeat {
            beat if beat.is_zero() => WRITE_STALL_LIMIT,
            beat => beat * 2,
        };
        Session {
            outbox: Arc::new(Outbox::new(broker.config.queue_size)),
            broker,
            stop,
            subscriptions: HashMap::new(),
            last_published: None,
            out: Vec::new(),
            scratch: Vec::new(),
            stall,
            id,
            unnamed: 0,
        }
    }

    async fn run(mut self, mut ws: Ws) {
        let end = self.serve(&mut ws).await;
        match end {
            End::Closed => {}
            End::Error(e) => {
                log!(self.broker, Level::Debug, "connection {}: {e}", self.id);
                // tungstenite sends no Close frame for these; the contract wants one.
                let code = match e {
                    WsError::Capacity(_) => Some(CloseCode::Size),
                    WsError::Utf8(_) => Some(CloseCode::Invalid),
                    WsError::Protocol(_) => Some(CloseCode::Protocol),
                    _ => None,
                };
                if let Some(code) = code {
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
                        self.write_out(&mut ws).await?;
                        ws.close(Some(frame)).await
                    };
                    let _ = timeout(Duration::from_secs(1), close).await;
                }
            }
        }
    }

    async fn serve(&mut self, ws: &mut Ws) -> End {
        let heartbeat = self.broker.config.heartbeat;
        let beating = !heartbeat.is_zero();
        // Ticks at half the interval: pings go out on every other tick, and a peer silent for
        // four ticks in a row (two intervals) is closed, between 2 and 2.5 intervals after
        // the last thing it sent.
        let half = if beating {
            heartbeat / 2
        } else {
            Duration::from_secs(3600)
        };
        let mut ticker = tokio::time::interval_at(Instant::now() + half, half);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_due = false;
        let mut heard = false;
        let mut silent_ticks = 0;
        let outbox = Arc::clone(&self.outbox);
        if self.stop.borrow_and_update().is_some() {
            return Box::pin(self.goodbye(ws)).await;
        }
        loop {
            outbox.about_to_look();
            if outbox.has_work()
                && let Err(e) = self.drain(ws).await
            {
                return e.into();
            }
            let pending = !self.out.is_empty();
            let step = tokio::select! {
                biased;
                _ = self.stop.changed() => return Box::pin(self.goodbye(ws)).await,
                _ = ticker.tick(), if beating => {
                    silent_ticks = if std::mem::take(&mut heard) { 0 } else { silent_ticks + 1 };
                    if silent_ticks >= 4 {
                        log!(self.broker, Level::Debug, "connection {} timed out", self.id);
                        return End::Closed;
                    }
                    ping_due = !ping_due;
                    if ping_due {
                        self.put_frame(OPCODE_PING, b"");
                        self.put(Frame::new("info").string("msg", "ping").finish().as_bytes());
                    }
                    continue;
                }
                incoming = ws.next() => {
                    heard = true;
                    match incoming {
                        None => return End::Closed,
                        Some(Err(e)) => return e.into(),
                        Some(Ok(message)) => self.on_burst(ws, message).await,
                    }
                }
                _ = outbox.notify.notified() => continue,
                // Nothing else is ready: write what the loop has gathered, in one go.
                _ = std::future::ready(()), if pending => self.write_out(ws).await,
            };
            if let Err(e) = step {
                return e.into();
            }
        }
    }

    /// Handles `first` and then the messages already buffered behind it (up to a bound), so a
    /// client that pipelines requests costs one trip through the loop per burst, not per
    /// message.
    async fn on_burst(&mut self, ws: &mut Ws, first: Message) -> Result<(), WsError> {
        const BURST: usize = 64;
        self.on_message(ws, first).await?;
        for _ in 1..BURST {
            // Each message spends from the task's cooperative budget, so a client that floods
            // publishes yields its worker to the subscribers it is feeding.
            tokio::task::consume_budget().await;
            match ws.next().now_or_never() {
                Some(Some(Ok(message))) => self.on_message(ws, message).await?,
                Some(Some(Err(e))) => return Err(e),
                Some(None) => return Err(WsError::ConnectionClosed),
                None => break,
            }
        }
        Ok(())
    }

    /// Appends a text frame.
    fn put(&mut self, text: &[u8]) {
        self.put_frame(OPCODE_TEXT, text);
    }

    fn put_frame(&mut self, opcode: u8, payload: &[u8]) {
        let (header, len) = frame_header(opcode, payload.len());
        self.out.extend_from_slice(&header[..len]);
        self.out.extend_from_slice(payload);
    }

    /// An ack, written without intermediate strings: it answers every publish.
    fn put_ack(
        &mut self,
        request_id: Option<&RawValue>,
        topic: &str,
        seq: Option<u64>,
        ts: Timestamp,
    ) {
        let mut text = std::mem::take(&mut self.scratch);
        text.clear();
        text.extend_from_slice(br#"{"type":"ack""#);
        if let Some(id) = request_id {
            text.extend_from_slice(br#","request_id":"#);
            text.extend_from_slice(id.get().as_bytes());
        }
        text.extend_from_slice(br#","topic":""#);
        text.extend_from_slice(topic.as_bytes());
        text.extend_from_slice(br#"","status":"ok""#);
        if let Some(seq) = seq {
            text.extend_from_slice(br#","seq":"#);
            push_u64(&mut text, seq);
        }
        text.extend_from_slice(br#","ts":""#);
        text.extend_from_slice(ts.as_str().as_bytes());
        text.extend_from_slice(br#""}"#);
        self.put(&text);
        self.scratch = text;
    }

    fn put_error(&mut self, request_id: Option<&RawValue>, e: Reject) {
        let frame = Frame::new("error")
            .request_id(request_id)
            .error(e.code, &e.message)
            .finish();
        self.put(frame.as_bytes());
    }

    /// Writes `out` to the socket (after whatever tungstenite itself has pending). A peer
    /// that takes no bytes for `stall` is given up on.
    async fn write_out(&mut self, ws: &mut Ws) -> Result<(), WsError> {
        let write = async {
            ws.flush().await?;
            if !self.out.is_empty() {
                ws.get_mut().write_all(&self.out).await?;
            }
            Ok::<(), WsError>(())
        };
        match timeout(self.stall, write).await {
            Ok(result) => result?,
            Err(_) => return Err(WsError::Io(std::io::ErrorKind::TimedOut.into())),
        }
        self.out.clear();
        if self.out.capacity() > 2 * OUT_CHUNK {
            self.out.shrink_to(OUT_CHUNK);
        }
        Ok(())
    }

    /// Writes `out` once it holds a chunk's worth. Boxed: it is reached from deep inside the
    /// request handlers, whose futures would otherwise each carry a copy of its state in
    /// every connection's task, for a write that happens only once per 64 KiB.
    async fn write_if_full(&mut self, ws: &mut Ws) -> Result<(), WsError> {
        if self.out.len() >= OUT_CHUNK {
            Box::pin(self.write_out(ws)).await?;
        }
        Ok(())
    }

    /// Moves up to `DRAIN_BATCH` queued events into `out`, then any drop notice and
    /// topic-deleted notices. The loop writes `out` when nothing else is ready.
    async fn drain(&mut self, ws: &mut Ws) -> Result<(), WsError> {
        for _ in 0..DRAIN_BATCH {
            let Some(event) = self.outbox.queue.pop() else {
                break;
            };
            self.out.extend_from_slice(event.frame());
            self.write_if_full(ws).await?;
        }
        let dropped = self.outbox.dropped.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            let message = format!("{dropped} event(s) dropped: this connection reads too slowly");
            let notice = Frame::new("error")
                .error("SLOW_CONSUMER", &message)
                .number("dropped", dropped);
            self.put(notice.finish().as_bytes());
        }
        let deleted = self.outbox.take_deleted();
        if !deleted.is_empty() {
            // Events of the deleted topics queued before the deletion go out first.
            self.move_queue(ws, None).await?;
            for shared in deleted {
                let name = self
                    .subscriptions
                    .iter()
                    .find(|(_, t)| Arc::ptr_eq(&t.shared, &shared))
                    .map(|(name, _)| name.clone());
                if let Some(name) = name {
                    self.subscriptions.remove(&name);
                    self.put_topic_deleted(&name);
                }
            }
        }
        Ok(())
    }

    fn put_topic_deleted(&mut self, topic: &str) {
        let notice = Frame::new("info")
            .string("topic", topic)
            .string("msg", "topic_deleted");
        self.put(notice.finish().as_bytes());
    }

    async fn on_message(&mut self, ws: &mut Ws, message: Message) -> Result<(), WsError> {
        match message {
            Message::Text(text) => self.on_text(ws, &text).await,
            Message::Binary(_) => {
                let why = "binary frames are not supported; send JSON text";
                self.put_error(None, reject("BAD_REQUEST", why));
                Ok(())
            }
            // tungstenite has queued the Close reply; send it and end, writing nothing after.
            Message::Close(_) => {
                self.out.clear();
                ws.flush().await?;
                Err(WsError::ConnectionClosed)
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        }
    }

    async fn on_text(&mut self, ws: &mut Ws, text: &str) -> Result<(), WsError> {
        let (request_id, request) = decode(text);
        match request {
            Err(e) => self.put_error(request_id, e),
            Ok(ClientRequest::Ping) => {
                let pong = Frame::new("pong").request_id(request_id).finish();
                self.put(pong.as_bytes());
            }
            Ok(ClientRequest::Publish { topic, id, payload }) => {
                match self.publish(&topic, id, payload) {
                    Ok((seq, ts)) => self.put_ack(request_id, &topic, Some(seq), ts),
                    Err(e) => self.put_error(request_id, e),
                }
            }
            Ok(ClientRequest::Subscribe { topic, last_n }) => {
                // Boxed, like the other rare paths, so their state does not sit in every
                // connection's task for its whole life.
                Box::pin(self.subscribe(ws, request_id, topic.into_owned(), last_n)).await?;
            }
            Ok(ClientRequest::Unsubscribe { topic }) => {
                Box::pin(self.unsubscribe(ws, request_id, topic.into_owned())).await?;
            }
        }
        self.write_if_full(ws).await
    }

    fn publish(
        &mut self,
        name: &str,
        id: Option<&str>,
        payload: &str,
    ) -> Result<(u64, Timestamp), Reject> {
        let cached = self
            .last_published
            .take()
            .filter(|t| t.name == name && !t.is_deleted());
        let topic = cached
            .or_else(|| self.broker.topic(name))
            .ok_or_else(|| topic_not_found(name))?;
        let id = match id {
            Some(raw) => MessageId::Given(raw),
            None => {
                self.unnamed += 1;
                MessageId::Assigned(self.id, self.unnamed)
            }
        };
        let published = topic
            .publish(id, payload)
            .ok_or_else(|| topic_not_found(name))?;
        self.last_published = Some(topic);
        Ok(published)
    }

    async fn subscribe(
        &mut self,
        ws: &mut Ws,
        request_id: Option<&RawValue>,
        name: String,
        last_n: usize,
    ) -> Result<(), WsError> {
        // A pending deletion notice must go out before this subscription can be judged.
        self.drain(ws).await?;
        if let Some(current) = self.subscriptions.get(&name) {
            if !current.is_deleted() {
                self.put_ack(request_id, &name, None, Timestamp::now());
                return Ok(());
            }
            // Deleted, but its notice has not reached this outbox yet (the deleter is between
            // marking the topic and telling its subscribers): end it here, notice included,
            // so the client never sees the new topic's events continue the old one's.
            let shared = Arc::clone(&current.shared);
            self.subscriptions.remove(&name);
            self.move_queue(ws, Some(&shared)).await?;
            self.put_topic_deleted(&name);
        }
        let max = self.broker.config.max_subscriptions;
        if self.subscriptions.len() >= max {
            let message = format!("at most {max} subscriptions per connection");
            self.put_error(request_id, reject("LIMIT_EXCEEDED", message));
            return Ok(());
        }
        let registered = self.broker.topic(&name).and_then(|topic| {
            let replay = topic.subscribe(&self.outbox, last_n)?;
            Some((topic, replay))
        });
        let Some((topic, replay)) = registered else {
            self.put_error(request_id, topic_not_found(&name));
            return Ok(());
        };
        self.put_ack(request_id, &name, None, Timestamp::now());
        self.subscriptions.insert(name, topic);
        for event in &replay {
            self.put(&replay_text(event));
            self.write_if_full(ws).await?;
        }
        Ok(())
    }

    async fn unsubscribe(
        &mut self,
        ws: &mut Ws,
        request_id: Option<&RawValue>,
        name: String,
    ) -> Result<(), WsError> {
        if let Some(topic) = self.subscriptions.remove(&name) {
            topic.unsubscribe(&self.outbox);
            self.move_queue(ws, Some(&topic.shared)).await?;
        } else if self.broker.topic(&name).is_none() {
            self.put_error(request_id, topic_not_found(&name));
            return Ok(());
        }
        self.put_ack(request_id, &name, None, Timestamp::now());
        Ok(())
    }

    /// Moves the queued events into `out`, leaving out those of `skip` (a topic just
    /// unsubscribed or deleted). Bounded by the queue's capacity: no event of a topic that was
    /// just left or deleted can arrive any more, so all of its events are within one
    /// queue-length of pops, and a flood on other topics cannot keep this loop going.
    async fn move_queue(
        &mut self,
        ws: &mut Ws,
        skip: Option<&Arc<TopicShared>>,
    ) -> Result<(), WsError> {
        for _ in 0..self.outbox.queue.capacity() {
            let Some(event) = self.outbox.queue.pop() else {
                break;
            };
            if !skip.is_some_and(|topic| Arc::ptr_eq(&event.topic, topic)) {
                self.out.extend_from_slice(event.frame());
                self.write_if_full(ws).await?;
            }
        }
        Ok(())
    }

    /// Shutdown: `info`/`shutdown`, the queued events, Close 1001, then wait for the peer's
    /// Close — all by the drain deadline.
    async fn goodbye(&mut self, ws: &mut Ws) -> End {
        let deadline = (*self.stop.borrow()).unwrap_or_else(Instant::now);
        let farewell = async {
            self.put(
                Frame::new("info")
                    .string("msg", "shutdown")
                    .finish()
                    .as_bytes(),
            );
            while !self.outbox.queue.is_empty() {
                self.drain(ws).await?;
            }
            self.write_out(ws).await?;
            let frame = CloseFrame {
                code: CloseCode::Away,
                reason: Utf8Bytes::from_static("server shutting down"),
            };
            ws.send(Message::Close(Some(frame))).await?;
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() {
                    break;
                }
            }
            Ok::<(), WsError>(())
        };
        let _ = timeout_at(deadline, farewell).await;
        End::Closed
    }
}

fn topic_not_found(name: &str) -> Reject {
    reject("TOPIC_NOT_FOUND", format!("topic '{name}' does not exist"))
}
