//! Load generator for the broker — and, for comparison, for nats-server over WebSocket.
//!
//! `cargo run --release --example bench -- --scenario fanout [--target ours|nats] [--url URL]
//!  [--duration S] [--warmup S] [--server-pid PID] [--runs N]`
//!
//! It opens publisher and subscriber connections from this one process, embeds a send
//! timestamp and a per-publisher sequence number in every payload, and reports published/s,
//! delivered/s, the delivery ratio against the deliveries expected, order violations,
//! duplicates, latency percentiles (after the warm-up), and with `--server-pid` the server's
//! resident memory and CPU time per delivered message — as a table and as one JSON line.
//!
//! The WebSocket client is a minimal one written here (unmasked server frames parsed in place,
//! one read buffer per connection), so that the generator spends as little of the two shared
//! cores as it can.
//!
//! `sse-fanout` is `fanout` with Server-Sent-Events subscribers (`GET /topics/{name}/events`,
//! records parsed line by line in place, one read buffer per connection, as cheap as the
//! WebSocket subscriber's parsing) and the same WebSocket publisher; it is for `--target ours`
//! only, since nats-server has no SSE.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

// ---- scenarios and options ----

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    topics: usize,
    publishers: usize,
    /// Messages per second per publisher; `None` = as fast as the window allows.
    rate: Option<f64>,
    subscribers: usize,
    /// Topics each subscriber is on (consecutive topics from its index).
    topics_per_subscriber: usize,
    duration: f64,
    /// Idle-connection scenario: one publish per topic, timed until it reached everyone.
    idle: bool,
    /// Subscribers read Server-Sent Events (`GET /topics/{name}/events`, one topic each)
    /// instead of a WebSocket; publishers still use the WebSocket.
    sse: bool,
}

fn scenario(name: &str) -> Option<Scenario> {
    let base = Scenario {
        name: "",
        topics: 1,
        publishers: 1,
        rate: None,
        subscribers: 100,
        topics_per_subscriber: 1,
        duration: 15.0,
        idle: false,
        sse: false,
    };
    Some(match name {
        "medium" => Scenario {
            name: "medium",
            topics: 10,
            publishers: 20,
            rate: Some(100.0),
            subscribers: 50,
            topics_per_subscriber: 2,
            duration: 20.0,
            ..base
        },
        "fanout" => Scenario {
            name: "fanout",
            ..base
        },
        "sse-fanout" => Scenario {
            name: "sse-fanout",
            sse: true,
            ..base
        },
        "fanout-1k" => Scenario {
            name: "fanout-1k",
            subscribers: 1000,
            ..base
        },
        "fanin" => Scenario {
            name: "fanin",
            publishers: 20,
            subscribers: 1,
            ..base
        },
        "topics" => Scenario {
            name: "topics",
            topics: 1000,
            publishers: 50,
            subscribers: 1000,
            ..base
        },
        "connections" => Scenario {
            name: "connections",
            topics: 100,
            publishers: 1,
            subscribers: 10_000,
            duration: 0.0,
            idle: true,
            ..base
        },
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Ours,
    Nats,
}

#[derive(Clone, Debug)]
struct Options {
    scenario: Scenario,
    target: Target,
    host: String,
    port: u16,
    warmup: f64,
    window: usize,
    payload: usize,
    server_pid: Option<u32>,
    runs: usize,
}

const USAGE: &str = "usage: bench --scenario medium|fanout|sse-fanout|fanout-1k|fanin|topics|connections \
[--target ours|nats] [--url ws://127.0.0.1:8000/ws] [--duration S] [--warmup S] [--window N] \
[--payload BYTES] [--server-pid PID] [--runs N]";

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut scenario = None;
    let mut target = Target::Ours;
    let mut url = None;
    let mut duration = None;
    let mut warmup = 2.0;
    let mut window = 256;
    let mut payload = 100;
    let mut server_pid = None;
    let mut runs = 1;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|_| format!("bad number {v}"));
        match flag.as_str() {
            "--scenario" => {
                let v = value()?;
                scenario = Some(scenario_or_err(&v)?);
            }
            "--target" => {
                target = match value()?.as_str() {
                    "ours" => Target::Ours,
                    "nats" => Target::Nats,
                    other => return Err(format!("unknown target {other}")),
                }
            }
            "--url" => url = Some(value()?),
            "--duration" => duration = Some(number(value()?)?),
            "--warmup" => warmup = number(value()?)?,
            "--window" => window = number(value()?)? as usize,
            "--payload" => payload = number(value()?)? as usize,
            "--server-pid" => server_pid = Some(number(value()?)? as u32),
            "--runs" => runs = number(value()?)? as usize,
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let mut scenario = scenario.ok_or_else(|| USAGE.to_string())?;
    if scenario.sse && target != Target::Ours {
        return Err(format!(
            "the {} scenario needs --target ours: nats-server has no Server-Sent Events",
            scenario.name
        ));
    }
    if let Some(d) = duration {
        scenario.duration = d;
    }
    let default_url = match target {
        Target::Ours => "ws://127.0.0.1:8000/ws",
        Target::Nats => "ws://127.0.0.1:9222/",
    };
    let url = url.unwrap_or_else(|| default_url.to_string());
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or("the url must be ws://host:port/...")?;
    let (host, port) = authority.rsplit_once(':').ok_or("the url needs a port")?;
    let port = port.parse().map_err(|_| "bad port in url")?;
    Ok(Options {
        warmup: warmup.min(scenario.duration / 2.0),
        scenario,
        target,
        host: host.to_string(),
        port,
        window: window.max(1),
        payload: payload.max(64),
        server_pid,
        runs: runs.max(1),
    })
}

fn scenario_or_err(name: &str) -> Result<Scenario, String> {
    scenario(name).ok_or_else(|| format!("unknown scenario {name}\n{USAGE}"))
}

// ---- a minimal WebSocket client ----

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
}

impl Ws {
    async fn connect(host: &str, port: u16, path: &str) -> io::Result<Ws> {
        let mut stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    return Err(io::Error::other(format!("upgrade refused: {head}")));
                }
                buf.drain(..end + 4);
                return Ok(Ws {
                    stream,
                    buf,
                    pos: 0,
                    out: Vec::with_capacity(4096),
                });
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Appends one masked frame to the output buffer (sent by `flush`).
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        self.out.push(0x80 | opcode);
        let len = payload.len();
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if len < 65536 {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&MASK);
        self.out
            .extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more bytes; cancel-safe (a read either happened or did not).
    async fn fill(&mut self) -> io::Result<()> {
        read_more(&mut self.stream, &mut self.buf, &mut self.pos).await
    }

    /// The next complete frame in the buffer: opcode and payload range. Answers Pings.
    fn frame(&mut self) -> Option<(u8, Range<usize>)> {
        loop {
            let b = &self.buf[self.pos..];
            if b.len() < 2 {
                return None;
            }
            let opcode = b[0] & 0x0f;
            let (len, header) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                126 | 127 => return None,
                n => (n as usize, 2),
            };
            if b.len() < header + len {
                return None;
            }
            let range = self.pos + header..self.pos + header + len;
            self.pos += header + len;
            if opcode == OP_PING {
                let payload = self.buf[range].to_vec();
                self.queue(0xA, &payload);
                continue;
            }
            return Some((opcode, range));
        }
    }
}

/// Reads more bytes into `buf`, first dropping the consumed `..pos` when that is at least half
/// of it; cancel-safe (a read either happened or did not). End of stream is an error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, pos: &mut usize) -> io::Result<()> {
    if *pos > 0 && *pos * 2 >= buf.len() {
        buf.drain(..*pos);
        *pos = 0;
    }
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    match stream.read_buf(buf).await? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

// ---- a minimal Server-Sent-Events client ----

/// One `GET /topics/{name}/events` response body (no Content-Length: it runs until the
/// connection closes), read into one buffer and parsed in place.
struct Sse {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SseKind {
    Message,
    Subscribed,
    SlowConsumer,
    TopicDeleted,
    Other,
}

/// One dispatched SSE record: its `event:` type and its first `data:` line's value.
struct SseRecord {
    kind: SseKind,
    data: Range<usize>,
}

impl Sse {
    async fn connect(host: &str, port: u16, path: &str) -> io::Result<Sse> {
        let mut stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200")
                    || !head.contains("text/event-stream")
                    || head.contains("transfer-encoding")
                {
                    // Chunked bodies are not decoded here: the protocol promises none.
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    return Err(io::Error::other(format!("SSE request refused: {head}")));
                }
                buf.drain(..end + 4);
                return Ok(Sse {
                    stream,
                    buf,
                    pos: 0,
                });
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads more bytes; cancel-safe.
    async fn fill(&mut self) -> io::Result<()> {
        read_more(&mut self.stream, &mut self.buf, &mut self.pos).await
    }

    /// The next complete record in the buffer (one that ended with a blank line). Comment
    /// lines (`: ping` heartbeats), `id:` and `retry:` are skipped, records with neither
    /// `event:` nor `data:` are not dispatched, and of a multi-line `data:` only the first
    /// line is kept (the bench's payloads have no newlines). One pass over the bytes; an
    /// incomplete record stays in the buffer and is parsed again after the next read.
    fn record(&mut self) -> Option<SseRecord> {
        let mut at = self.pos;
        let mut kind = None;
        let mut data: Option<Range<usize>> = None;
        loop {
            let eol = find_byte(&self.buf[at..], b'\n')?;
            let start = at;
            let mut end = at + eol;
            at = end + 1;
            if end > start && self.buf[end - 1] == b'\r' {
                end -= 1;
            }
            let line = &self.buf[start..end];
            if line.is_empty() {
                self.pos = at;
                if kind.is_none() && data.is_none() {
                    continue;
                }
                return Some(SseRecord {
                    kind: kind.unwrap_or(SseKind::Message),
                    data: data.unwrap_or(0..0),
                });
            }
            let value = |name: usize| {
                let from = start + name + usize::from(line.get(name) == Some(&b' '));
                from..end
            };
            if line.starts_with(b"data:") {
                if data.is_none() {
                    data = Some(value(5));
                }
            } else if line.starts_with(b"event:") {
                kind = Some(match &self.buf[value(6)] {
                    b"message" => SseKind::Message,
                    b"subscribed" => SseKind::Subscribed,
                    b"slow_consumer" => SseKind::SlowConsumer,
                    b"topic_deleted" => SseKind::TopicDeleted,
                    _ => SseKind::Other,
                });
            }
        }
    }
}

/// The index of the first `byte` in `haystack`, eight bytes at a time (a quarter of the cost
/// of `iter().position` on SSE records, whose lines are found this way).
fn find_byte(haystack: &[u8], byte: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(byte);
    let mut chunks = haystack.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word) ^ pattern;
        // A set high bit for each zero byte (and maybe above one): the lowest is the first.
        let zero = word.wrapping_sub(LO) & !word & HI;
        if zero != 0 {
            return Some(offset + (zero.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    let rest = chunks.remainder().iter().position(|b| *b == byte)?;
    Some(offset + rest)
}

// ---- payloads ----

/// A payload: `{"p":<publisher>,"s":<seq>,"t":<send ns>,"x":"xxx…"}` padded to `size` bytes.
fn payload(size: usize, publisher: usize, seq: u64, t: u64) -> String {
    let mut text = format!(r#"{{"p":{publisher},"s":{seq},"t":{t},"x":""#);
    let pad = size.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

/// Finds `{"p":` in `bytes` and reads publisher, seq and send time.
fn parse_payload(bytes: &[u8]) -> Option<(usize, u64, u64)> {
    let at = find(bytes, br#"{"p":"#)?;
    let mut rest = &bytes[at + 5..];
    let mut number = |skip: usize| -> Option<u64> {
        rest = rest.get(skip..)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let mut n = 0u64;
        for d in &rest[..digits] {
            n = n * 10 + u64::from(d - b'0');
        }
        rest = &rest[digits..];
        (digits > 0).then_some(n)
    };
    let p = number(0)?;
    let s = number(5)?; // ,"s":
    let t = number(5)?; // ,"t":
    Some((p as usize, s, t))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        let rel = haystack[i..].iter().position(|b| *b == first)?;
        i += rel;
        if haystack[i..].starts_with(needle) {
            return Some(i);
        }
        i += 1;
    }
    None
}

// ---- measurement ----

/// Log-linear latency histogram in microseconds: exact below 1 ms, 64 steps per power of two
/// above.
#[derive(Clone)]
struct Histogram {
    buckets: Vec<u64>,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: vec![0; 1024 + 64 * 40],
        }
    }

    fn index(us: u64) -> usize {
        if us < 1024 {
            return us as usize;
        }
        let log = 63 - us.leading_zeros() as usize;
        let sub = ((us >> (log - 6)) & 63) as usize;
        (1024 + (log - 10) * 64 + sub).min(1024 + 64 * 40 - 1)
    }

    fn value(index: usize) -> u64 {
        if index < 1024 {
            return index as u64;
        }
        let log = (index - 1024) / 64 + 10;
        let sub = ((index - 1024) % 64) as u64;
        (64 + sub) << (log - 6)
    }

    fn record(&mut self, us: u64) {
        self.buckets[Self::index(us)] += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(self.buckets.len() - 1)
    }
}

/// What one subscriber saw.
struct Tally {
    delivered: u64,
    in_window: u64,
    order_violations: u64,
    duplicates: u64,
    slow_consumer_notices: u64,
    disconnected: bool,
    latency: Histogram,
    /// The highest sequence number seen from each publisher.
    last: Vec<u64>,
}

impl Tally {
    fn new(publishers: usize) -> Tally {
        Tally {
            delivered: 0,
            in_window: 0,
            order_violations: 0,
            duplicates: 0,
            slow_consumer_notices: 0,
            disconnected: false,
            latency: Histogram::new(),
            last: vec![0; publishers.max(1)],
        }
    }

    /// Counts one delivered payload: order, duplicates and (in the window) latency.
    fn record(&mut self, payload: &[u8], shared: &Shared, now: u64) {
        if let Some((p, s, t)) = parse_payload(payload) {
            self.delivered += 1;
            if let Some(prev) = self.last.get_mut(p) {
                if s == *prev {
                    self.duplicates += 1;
                } else if s < *prev {
                    self.order_violations += 1;
                }
                *prev = (*prev).max(s);
            }
            if shared.in_window(t) {
                self.in_window += 1;
                self.latency.record(now.saturating_sub(t) / 1000);
            }
        }
    }
}

/// State shared by every task of one run.
struct Shared {
    epoch: Instant,
    warmup_ns: u64,
    end_ns: AtomicU64,
    delivered: AtomicU64,
    stop: AtomicBool,
    stop_notify: tokio::sync::Notify,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.warmup_ns && t < self.end_ns.load(Ordering::Relaxed)
    }
}

fn topic_name(i: usize) -> String {
    format!("bench.t{i}")
}

// ---- subscribers ----

/// A subscriber's connection: a WebSocket, or (`sse-fanout`) an SSE stream.
enum Subscriber {
    Ws(Ws),
    Sse(Sse),
}

async fn open_subscriber(opts: &Options, index: usize) -> io::Result<Subscriber> {
    let s = &opts.scenario;
    if s.sse {
        return open_sse_subscriber(opts, index).await.map(Subscriber::Sse);
    }
    open_ws_subscriber(opts, index).await.map(Subscriber::Ws)
}

/// Opens `GET /topics/{name}/events` on the subscriber's (one) topic and waits for its
/// `subscribed` record, as the WebSocket subscribers wait for their acks.
async fn open_sse_subscriber(opts: &Options, index: usize) -> io::Result<Sse> {
    let path = format!(
        "/topics/{}/events",
        topic_name(index % opts.scenario.topics)
    );
    let mut sse = Sse::connect(&opts.host, opts.port, &path).await?;
    loop {
        while let Some(record) = sse.record() {
            if record.kind == SseKind::Subscribed {
                return Ok(sse);
            }
        }
        sse.fill().await?;
    }
}

async fn open_ws_subscriber(opts: &Options, index: usize) -> io::Result<Ws> {
    let s = &opts.scenario;
    let topics: Vec<usize> = (0..s.topics_per_subscriber)
        .map(|k| (index + k) % s.topics)
        .collect();
    match opts.target {
        Target::Ours => {
            let mut ws = Ws::connect(&opts.host, opts.port, "/ws").await?;
            for t in &topics {
                let msg = format!(r#"{{"type":"subscribe","topic":"{}"}}"#, topic_name(*t));
                ws.queue(OP_TEXT, msg.as_bytes());
            }
            ws.flush().await?;
            let mut acked = 0;
            while acked < topics.len() {
                ws.fill().await?;
                while let Some((op, range)) = ws.frame() {
                    let text = &ws.buf[range];
                    if op == OP_TEXT && text.starts_with(br#"{"type":"ack""#) {
                        acked += 1;
                    } else if text.starts_with(br#"{"type":"error""#) {
                        let error = String::from_utf8_lossy(text).into_owned();
                        return Err(io::Error::other(error));
                    }
                }
                ws.flush().await?;
            }
            Ok(ws)
        }
        Target::Nats => {
            let mut ws = nats_connect(opts).await?;
            let mut lines = String::new();
            for (sid, t) in topics.iter().enumerate() {
                lines.push_str(&format!("SUB {} {}\r\n", topic_name(*t), sid + 1));
            }
            lines.push_str("PING\r\n");
            ws.queue(OP_BINARY, lines.as_bytes());
            ws.flush().await?;
            let mut nats = NatsStream::default();
            nats_wait_pong(&mut ws, &mut nats).await?;
            Ok(ws)
        }
    }
}

async fn run_subscriber(
    mut ws: Ws,
    target: Target,
    shared: Arc<Shared>,
    publishers: usize,
) -> Tally {
    let mut tally = Tally::new(publishers);
    let mut nats = NatsStream::default();
    loop {
        let before = tally.delivered;
        let read = tokio::select! {
            read = ws.fill() => read,
            _ = shared.stop_notify.notified() => break,
        };
        if read.is_err() {
            tally.disconnected = !shared.stop.load(Ordering::Acquire);
            break;
        }
        let now = shared.now_ns();
        while let Some((op, range)) = ws.frame() {
            match (target, op) {
                (_, OP_CLOSE) => {
                    tally.disconnected = true;
                }
                (Target::Ours, OP_TEXT) => {
                    let text = &ws.buf[range];
                    if text.starts_with(br#"{"type":"event""#) {
                        tally.record(text, &shared, now);
                    } else if find(text, b"SLOW_CONSUMER").is_some() {
                        tally.slow_consumer_notices += 1;
                    }
                }
                (Target::Nats, OP_BINARY | OP_CONT | OP_TEXT) => {
                    nats.extend(&ws.buf[range]);
                    while let Some(item) = nats.next() {
                        match item {
                            NatsItem::Msg(r) => {
                                let payload = nats.buf[r].to_vec();
                                tally.record(&payload, &shared, now);
                            }
                            NatsItem::Ping => ws.queue(OP_BINARY, b"PONG\r\n"),
                            NatsItem::Err(e) => {
                                eprintln!("nats subscriber: -ERR {e}");
                                tally.disconnected = true;
                            }
                            NatsItem::Pong | NatsItem::Other => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if ws.flush().await.is_err() {
            tally.disconnected = true;
            break;
        }
        shared
            .delivered
            .fetch_add(tally.delivered - before, Ordering::Relaxed);
        if tally.disconnected {
            break;
        }
    }
    tally
}

/// An SSE subscriber: the same counting as `run_subscriber`'s, on the `data:` line of each
/// `message` record (exactly the event JSON a WebSocket subscriber gets).
async fn run_sse_subscriber(mut sse: Sse, shared: Arc<Shared>, publishers: usize) -> Tally {
    let mut tally = Tally::new(publishers);
    loop {
        let before = tally.delivered;
        let read = tokio::select! {
            read = sse.fill() => read,
            _ = shared.stop_notify.notified() => break,
        };
        if read.is_err() {
            tally.disconnected = !shared.stop.load(Ordering::Acquire);
            break;
        }
        let now = shared.now_ns();
        while let Some(record) = sse.record() {
            match record.kind {
                SseKind::Message => {
                    let data = &sse.buf[record.data];
                    if data.starts_with(br#"{"type":"event""#) {
                        tally.record(data, &shared, now);
                    }
                }
                SseKind::SlowConsumer => tally.slow_consumer_notices += 1,
                // The bench deletes no topics; were the stream to end after one, that end
                // would count as a disconnection.
                SseKind::TopicDeleted | SseKind::Subscribed | SseKind::Other => {}
            }
        }
        shared
            .delivered
            .fetch_add(tally.delivered - before, Ordering::Relaxed);
    }
    tally
}

// ---- publishers ----

struct Published {
    /// Messages acknowledged (ours) or confirmed by a PONG (nats), per topic.
    per_topic: Vec<u64>,
    in_window: u64,
}

async fn run_publisher(
    opts: Options,
    index: usize,
    shared: Arc<Shared>,
    duration: Duration,
) -> io::Result<Published> {
    let s = &opts.scenario;
    let mut ws = match opts.target {
        Target::Ours => Ws::connect(&opts.host, opts.port, "/ws").await?,
        Target::Nats => nats_connect(&opts).await?,
    };
    let mut nats = NatsStream::default();
    // Topics this publisher cycles through: its own in `medium` and `fanin`, all of them
    // round-robin (from a different starting point per publisher) in `topics`.
    let topics: Vec<usize> = if s.topics >= s.publishers && s.name == "topics" {
        (0..s.topics).map(|k| (index + k) % s.topics).collect()
    } else {
        vec![index % s.topics]
    };
    let names: Vec<String> = topics.iter().map(|t| topic_name(*t)).collect();
    let mut result = Published {
        per_topic: vec![0; s.topics],
        in_window: 0,
    };
    // Publishes sent and not yet confirmed, oldest first: (topic, send time).
    let mut pending: std::collections::VecDeque<(usize, u64)> = Default::default();
    let window = opts.window;
    let started = Instant::now();
    let interval = s.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut ticker = interval.map(|i| {
        let mut t = tokio::time::interval(i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut seq = 0u64;
    let mut next_topic = 0;
    // NATS has no publish acks: a PING after every `batch` publishes, its PONG confirms them
    // (after every publish when paced, so each one is confirmed on its own).
    let batch = if ticker.is_some() {
        1
    } else {
        (window / 2).max(1)
    };
    // Paced publishes that are due (a tick arrived) and not yet sent.
    let mut due = 0usize;
    let mut unconfirmed_batches: std::collections::VecDeque<usize> = Default::default();
    let mut since_ping = 0;
    let publish = |ws: &mut Ws, seq: u64, topic_slot: usize, now: u64| {
        let body = payload(opts.payload, index, seq, now);
        queue_publish(ws, opts.target, &names[topic_slot], &body);
    };
    let mut sending = true;
    loop {
        if sending && started.elapsed() >= duration {
            sending = false;
            if opts.target == Target::Nats && since_ping > 0 {
                ws.queue(OP_BINARY, b"PING\r\n");
                unconfirmed_batches.push_back(since_ping);
                since_ping = 0;
            }
        }
        if !sending && pending.is_empty() {
            break;
        }
        // Send what is due: the window's free room when unpaced, the ticks' count when paced.
        if sending {
            while (ticker.is_none() && pending.len() < window) || due > 0 {
                due = due.saturating_sub(1);
                seq += 1;
                let now = shared.now_ns();
                publish(&mut ws, seq, next_topic, now);
                pending.push_back((topics[next_topic], now));
                next_topic = (next_topic + 1) % topics.len();
                if opts.target == Target::Nats {
                    since_ping += 1;
                    if since_ping == batch {
                        ws.queue(OP_BINARY, b"PING\r\n");
                        unconfirmed_batches.push_back(batch);
                        since_ping = 0;
                    }
                }
            }
        }
        ws.flush().await?;
        let tick = async {
            match ticker.as_mut() {
                Some(t) if sending => {
                    t.tick().await;
                }
                _ => std::future::pending::<()>().await,
            }
        };
        let read = tokio::select! {
            _ = tick => None,
            read = ws.fill() => Some(read),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                return Err(io::Error::other("publisher: no confirmation for 10 s"));
            }
        };
        match read {
            None => {
                due += 1;
                continue;
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(())) => {}
        }
        let confirm =
            |count: usize,
             result: &mut Published,
             pending: &mut std::collections::VecDeque<(usize, u64)>| {
                for _ in 0..count {
                    if let Some((topic, t)) = pending.pop_front() {
                        result.per_topic[topic] += 1;
                        if shared.in_window(t) {
                            result.in_window += 1;
                        }
                    }
                }
            };
        while let Some((op, range)) = ws.frame() {
            match opts.target {
                Target::Ours => {
                    let text = &ws.buf[range];
                    if text.starts_with(br#"{"type":"ack""#) {
                        confirm(1, &mut result, &mut pending);
                    } else if text.starts_with(br#"{"type":"error""#) {
                        // A refused publish is not a delivery anyone should expect.
                        pending.pop_front();
                    }
                }
                Target::Nats => {
                    if op == OP_CLOSE {
                        return Err(io::Error::other("nats closed the publisher"));
                    }
                    nats.extend(&ws.buf[range]);
                    while let Some(item) = nats.next() {
                        match item {
                            NatsItem::Pong => {
                                let n = unconfirmed_batches.pop_front().unwrap_or(0);
                                confirm(n, &mut result, &mut pending);
                            }
                            NatsItem::Ping => ws.queue(OP_BINARY, b"PONG\r\n"),
                            NatsItem::Err(e) => return Err(io::Error::other(e)),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    Ok(result)
}

/// Queues one publish of `body` to `topic` in the target's protocol.
fn queue_publish(ws: &mut Ws, target: Target, topic: &str, body: &str) {
    match target {
        Target::Ours => {
            let msg =
                format!(r#"{{"type":"publish","topic":"{topic}","message":{{"payload":{body}}}}}"#);
            ws.queue(OP_TEXT, msg.as_bytes());
        }
        Target::Nats => {
            let msg = format!("PUB {topic} {}\r\n{body}\r\n", body.len());
            ws.queue(OP_BINARY, msg.as_bytes());
        }
    }
}

// ---- the NATS client protocol ----

async fn nats_connect(opts: &Options) -> io::Result<Ws> {
    let mut ws = Ws::connect(&opts.host, opts.port, "/").await?;
    let connect = r#"CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false}"#;
    ws.queue(OP_BINARY, format!("{connect}\r\nPING\r\n").as_bytes());
    ws.flush().await?;
    let mut nats = NatsStream::default();
    nats_wait_pong(&mut ws, &mut nats).await?;
    Ok(ws)
}

async fn nats_wait_pong(ws: &mut Ws, nats: &mut NatsStream) -> io::Result<()> {
    loop {
        ws.fill().await?;
        while let Some((_, range)) = ws.frame() {
            nats.extend(&ws.buf[range]);
        }
        while let Some(item) = nats.next() {
            match item {
                NatsItem::Pong => return Ok(()),
                NatsItem::Err(e) => return Err(io::Error::other(e)),
                NatsItem::Ping => ws.queue(OP_BINARY, b"PONG\r\n"),
                _ => {}
            }
        }
        ws.flush().await?;
    }
}

/// The NATS byte stream carried by the WebSocket frames (a frame may hold several protocol
/// lines, or part of one).
#[derive(Default)]
struct NatsStream {
    buf: Vec<u8>,
    pos: usize,
}

enum NatsItem {
    Msg(Range<usize>),
    Ping,
    Pong,
    Err(String),
    Other,
}

impl NatsStream {
    fn extend(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn next(&mut self) -> Option<NatsItem> {
        let rest = &self.buf[self.pos..];
        let eol = find(rest, b"\r\n")?;
        let line = &rest[..eol];
        if line.starts_with(b"MSG ") {
            let size: usize = std::str::from_utf8(line)
                .ok()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()?;
            if rest.len() < eol + 2 + size + 2 {
                return None;
            }
            let start = self.pos + eol + 2;
            self.pos = start + size + 2;
            return Some(NatsItem::Msg(start..start + size));
        }
        let item = if line == b"PING" {
            NatsItem::Ping
        } else if line == b"PONG" {
            NatsItem::Pong
        } else if line.starts_with(b"-ERR") {
            NatsItem::Err(String::from_utf8_lossy(line).into_owned())
        } else {
            NatsItem::Other
        };
        self.pos += eol + 2;
        Some(item)
    }
}

// ---- the server's side: /proc ----

/// Resident memory (KiB) and CPU time (user + system, in clock ticks) of a process.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) — utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((rss, utime + stime))
}

/// Clock ticks per second for /proc times (100 on Linux everywhere this runs).
const CLOCK_TICKS: f64 = 100.0;

// ---- one run ----

#[derive(Clone, Debug, Default)]
struct Report {
    published_per_s: f64,
    delivered_per_s: f64,
    delivery_ratio: f64,
    order_violations: u64,
    duplicates: u64,
    slow_consumer_notices: u64,
    disconnected_subscribers: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    server_rss_mib: Option<f64>,
    server_cpu_us_per_delivery: Option<f64>,
    /// `connections` only.
    rss_per_connection_kib: Option<f64>,
    reach_all_ms: Option<f64>,
}

async fn prepare_topics(opts: &Options) -> io::Result<()> {
    if opts.target != Target::Ours {
        return Ok(());
    }
    for t in 0..opts.scenario.topics {
        let body = format!(r#"{{"name":"{}"}}"#, topic_name(t));
        let request = format!(
            "POST /topics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = TcpStream::connect((opts.host.as_str(), opts.port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        if !(response.starts_with(b"HTTP/1.1 201") || response.starts_with(b"HTTP/1.1 409")) {
            let text = String::from_utf8_lossy(&response).into_owned();
            return Err(io::Error::other(format!("creating topics: {text}")));
        }
    }
    Ok(())
}

async fn open_subscribers(opts: &Options) -> io::Result<Vec<Subscriber>> {
    // Bounded concurrency, so 10,000 connects do not overflow the listen backlog.
    let gate = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::new();
    for i in 0..opts.scenario.subscribers {
        let opts = opts.clone();
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            open_subscriber(&opts, i).await
        }));
    }
    let mut subscribers = Vec::new();
    for task in tasks {
        subscribers.push(task.await.map_err(io::Error::other)??);
    }
    Ok(subscribers)
}

async fn run_once(opts: &Options) -> io::Result<Report> {
    prepare_topics(opts).await?;
    let s = &opts.scenario;
    let before = opts.server_pid.and_then(proc_usage);
    let subscribers = open_subscribers(opts).await?;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        warmup_ns: (opts.warmup * 1e9) as u64,
        end_ns: AtomicU64::new(u64::MAX),
        delivered: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        stop_notify: tokio::sync::Notify::new(),
    });
    let mut subscriber_count = vec![0u64; s.topics];
    for i in 0..s.subscribers {
        for k in 0..s.topics_per_subscriber {
            subscriber_count[(i + k) % s.topics] += 1;
        }
    }
    let connected = opts.server_pid.and_then(proc_usage);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|subscriber| match subscriber {
            Subscriber::Ws(ws) => tokio::spawn(run_subscriber(
                ws,
                opts.target,
                Arc::clone(&shared),
                s.publishers,
            )),
            Subscriber::Sse(sse) => {
                tokio::spawn(run_sse_subscriber(sse, Arc::clone(&shared), s.publishers))
            }
        })
        .collect();

    let mut report = Report::default();
    if s.idle {
        // One publish per topic, timed until every subscriber has it.
        if let (Some((rss0, _)), Some((rss1, _))) = (before, connected) {
            report.rss_per_connection_kib =
                Some(rss1.saturating_sub(rss0) as f64 / s.subscribers as f64);
        }
        let t0 = Instant::now();
        publish_one_per_topic(opts, &shared).await?;
        let expected: u64 = s.subscribers as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        report.reach_all_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        report.delivery_ratio = delivered as f64 / expected as f64;
    } else {
        let duration = Duration::from_secs_f64(s.duration);
        shared
            .end_ns
            .store((s.duration * 1e9) as u64, Ordering::Relaxed);
        let publishers: Vec<_> = (0..s.publishers)
            .map(|i| {
                tokio::spawn(run_publisher(
                    opts.clone(),
                    i,
                    Arc::clone(&shared),
                    duration,
                ))
            })
            .collect();
        // Sample the server's CPU at the window's edges.
        let sampler = {
            let shared = Arc::clone(&shared);
            let pid = opts.server_pid;
            let warmup = opts.warmup;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
                let start = pid.and_then(proc_usage);
                let start_delivered = shared.delivered.load(Ordering::Relaxed);
                tokio::time::sleep(duration.saturating_sub(Duration::from_secs_f64(warmup))).await;
                let end = pid.and_then(proc_usage);
                let end_delivered = shared.delivered.load(Ordering::Relaxed);
                (start, end, end_delivered - start_delivered)
            })
        };
        let mut per_topic = vec![0u64; s.topics];
        let mut published_in_window = 0;
        for publisher in publishers {
            let published = publisher.await.map_err(io::Error::other)??;
            for (t, n) in published.per_topic.iter().enumerate() {
                per_topic[t] += n;
            }
            published_in_window += published.in_window;
        }
        let expected: u64 = per_topic
            .iter()
            .zip(&subscriber_count)
            .map(|(p, n)| p * n)
            .sum();
        let drain_deadline = Instant::now() + Duration::from_secs(5);
        while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (cpu_start, cpu_end, window_delivered) = sampler.await.map_err(io::Error::other)?;
        let window = s.duration - opts.warmup;
        report.published_per_s = published_in_window as f64 / window;
        let delivered = shared.delivered.load(Ordering::Relaxed);
        report.delivery_ratio = if expected == 0 {
            0.0
        } else {
            delivered as f64 / expected as f64
        };
        if let (Some((_, c0)), Some((_, c1))) = (cpu_start, cpu_end) {
            let cpu_us = (c1 - c0) as f64 / CLOCK_TICKS * 1e6;
            report.server_cpu_us_per_delivery = Some(cpu_us / window_delivered.max(1) as f64);
        }
    }
    if let Some(pid) = opts.server_pid {
        report.server_rss_mib = proc_usage(pid).map(|(rss, _)| rss as f64 / 1024.0);
    }
    shared.stop.store(true, Ordering::Release);
    shared.stop_notify.notify_waiters();
    let mut latency = Histogram::new();
    let mut in_window = 0;
    for reader in readers {
        // A reader may be between reads when notified: wake it again until it ends.
        let mut reader = reader;
        let tally = loop {
            tokio::select! {
                tally = &mut reader => break tally.map_err(io::Error::other)?,
                _ = tokio::time::sleep(Duration::from_millis(50)) => shared.stop_notify.notify_waiters(),
            }
        };
        report.order_violations += tally.order_violations;
        report.duplicates += tally.duplicates;
        report.slow_consumer_notices += tally.slow_consumer_notices;
        report.disconnected_subscribers += u64::from(tally.disconnected);
        in_window += tally.in_window;
        latency.merge(&tally.latency);
    }
    if !s.idle {
        report.delivered_per_s = in_window as f64 / (s.duration - opts.warmup);
    }
    report.p50_us = latency.quantile(0.50);
    report.p90_us = latency.quantile(0.90);
    report.p99_us = latency.quantile(0.99);
    report.p999_us = latency.quantile(0.999);
    report.max_us = latency.quantile(1.0);
    Ok(report)
}

/// The `connections` scenario's publisher: one message to each topic.
async fn publish_one_per_topic(opts: &Options, shared: &Shared) -> io::Result<()> {
    let mut ws = match opts.target {
        Target::Ours => Ws::connect(&opts.host, opts.port, "/ws").await?,
        Target::Nats => nats_connect(opts).await?,
    };
    for t in 0..opts.scenario.topics {
        let body = payload(opts.payload, 0, t as u64 + 1, shared.now_ns());
        queue_publish(&mut ws, opts.target, &topic_name(t), &body);
    }
    ws.flush().await
}

// ---- output ----

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn json_line(opts: &Options, r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
    format!(
        concat!(
            r#"{{"scenario":"{}","target":"{}","published_per_s":{:.0},"delivered_per_s":{:.0},"#,
            r#""delivery_ratio":{:.4},"order_violations":{},"duplicates":{},"slow_consumer_notices":{},"#,
            r#""disconnected_subscribers":{},"latency_us":{{"p50":{},"p90":{},"p99":{},"p999":{},"max":{}}},"#,
            r#""server_rss_mib":{},"server_cpu_us_per_delivery":{},"rss_per_connection_kib":{},"reach_all_ms":{}}}"#
        ),
        opts.scenario.name,
        match opts.target {
            Target::Ours => "ours",
            Target::Nats => "nats",
        },
        r.published_per_s,
        r.delivered_per_s,
        r.delivery_ratio,
        r.order_violations,
        r.duplicates,
        r.slow_consumer_notices,
        r.disconnected_subscribers,
        r.p50_us,
        r.p90_us,
        r.p99_us,
        r.p999_us,
        r.max_us,
        opt(r.server_rss_mib),
        opt(r.server_cpu_us_per_delivery),
        opt(r.rss_per_connection_kib),
        opt(r.reach_all_ms),
    )
}

fn table(r: &Report) -> String {
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.3} {unit}"));
    [
        ("published/s", format!("{:.0}", r.published_per_s)),
        ("delivered/s", format!("{:.0}", r.delivered_per_s)),
        ("delivery ratio", format!("{:.4}", r.delivery_ratio)),
        ("order violations", r.order_violations.to_string()),
        ("duplicates", r.duplicates.to_string()),
        ("slow-consumer notices", r.slow_consumer_notices.to_string()),
        (
            "disconnected subscribers",
            r.disconnected_subscribers.to_string(),
        ),
        (
            "latency p50/p90/p99/p99.9/max",
            format!(
                "{}/{}/{}/{}/{} µs",
                r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us
            ),
        ),
        ("server RSS", opt(r.server_rss_mib, "MiB")),
        (
            "server CPU per delivery",
            opt(r.server_cpu_us_per_delivery, "µs"),
        ),
        (
            "server RSS per connection",
            opt(r.rss_per_connection_kib, "KiB"),
        ),
        ("time to reach all", opt(r.reach_all_ms, "ms")),
    ]
    .iter()
    .map(|(k, v)| format!("  {k:<30} {v}"))
    .collect::<Vec<_>>()
    .join("\n")
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() {
    let opts = match parse_options() {
        Ok(opts) => opts,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut reports = Vec::new();
    for run in 0..opts.runs {
        let report = match runtime.block_on(run_once(&opts)) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("bench: run {} failed: {e}", run + 1);
                std::process::exit(1);
            }
        };
        println!(
            "{} against {:?}, run {} of {}:\n{}",
            opts.scenario.name,
            opts.target,
            run + 1,
            opts.runs,
            table(&report)
        );
        println!("{}", json_line(&opts, &report));
        reports.push(report);
    }
    if reports.len() > 1 {
        let pick = |f: fn(&Report) -> f64| median(reports.iter().map(f).collect());
        let pick_opt = |f: fn(&Report) -> Option<f64>| {
            let values: Vec<f64> = reports.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| median(values))
        };
        let m = Report {
            published_per_s: pick(|r| r.published_per_s),
            delivered_per_s: pick(|r| r.delivered_per_s),
            delivery_ratio: pick(|r| r.delivery_ratio),
            order_violations: reports.iter().map(|r| r.order_violations).sum(),
            duplicates: reports.iter().map(|r| r.duplicates).sum(),
            slow_consumer_notices: reports.iter().map(|r| r.slow_consumer_notices).sum(),
            disconnected_subscribers: reports.iter().map(|r| r.disconnected_subscribers).sum(),
            p50_us: pick(|r| r.p50_us as f64) as u64,
            p90_us: pick(|r| r.p90_us as f64) as u64,
            p99_us: pick(|r| r.p99_us as f64) as u64,
            p999_us: pick(|r| r.p999_us as f64) as u64,
            max_us: pick(|r| r.max_us as f64) as u64,
            server_rss_mib: pick_opt(|r| r.server_rss_mib),
            server_cpu_us_per_delivery: pick_opt(|r| r.server_cpu_us_per_delivery),
            rss_per_connection_kib: pick_opt(|r| r.rss_per_connection_kib),
            reach_all_ms: pick_opt(|r| r.reach_all_ms),
        };
        println!(
            "{} against {:?}, median of {} runs (counts summed):\n{}",
            opts.scenario.name,
            opts.target,
            reports.len(),
            table(&m)
        );
        println!(
            "{}",
            json_line(&opts, &m).replace(r#""scenario""#, r#""median":true,"scenario""#)
        );
    }
}
