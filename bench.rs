//! Load generator for the broker — and, for comparison, for nats-server over WebSocket.
//!
//! ```text
//! cargo run --release --example bench -- --scenario NAME [--target ours|nats] [--url URL]
//!     [--sub-url URL] [--duration S] [--warmup S] [--rate MSGS_PER_S] [--subscribers N] [--window N]
//!     [--payload BYTES] [--server-pid PID] [--runs N] [--check]
//! cargo run --release --example bench -- --list
//! ```
//!
//! ## Scenarios
//! - `light`, `medium`, `heavy`, `extreme`: the load levels of the Python service this broker
//!   replaces — 5/10/20/50 topics, 10/20/50/100 publishers at 100 msg/s each, 20/50/100/200
//!   subscribers each on 2 topics; 20 s.
//! - `latency-10x`, `latency-50x`, `latency-100x`: `medium`'s shape at 10, 50 and 100 times its
//!   rate (1,000, 5,000 and 10,000 msg/s per publisher; 20,000 to 200,000 publishes/s and ten
//!   deliveries each), to show where each broker's latency bends; 20 s.
//! - `fanout` (1 publisher as fast as the window allows, 100 subscribers of its topic),
//!   `fanout-1k` (1,000 subscribers), `sse-fanout` (`fanout` with Server-Sent-Events subscribers;
//!   ours only: nats-server has no SSE), `fanin` (20 publishers, 1 subscriber), `topics` (1,000
//!   topics, 50 publishers round-robin over all of them, 1,000 subscribers); 15 s.
//! - `connections`: 10,000 idle subscribers on 100 topics: RSS per connection, how long one
//!   publish per topic takes to reach them all, and RSS per connection again 3 s after a burst
//!   (50 events on every topic, confirmed round by round).
//! - `mass-disconnect`: 10,000 subscribers of one topic leave at once (each sends a Close frame,
//!   then closes its socket) while a publisher at 1,000 msg/s on another topic, with one
//!   subscriber of its own, goes on. With `--server-pid`: the server's CPU time from the first
//!   close until it has closed the last of them (its open descriptors, from /proc, are back to
//!   what they were before the 10,000 came), and the latency of the other topic's messages sent
//!   in that window, against before it. `--warmup` is the steady time before the disconnect.
//! - `cluster`: 10 publishers as fast as the window allows, 100 subscribers, one topic; meant
//!   for cluster mode, with the publishers on one node (`--url`) and the subscribers on another
//!   (`--sub-url`). Against a single node or nats-server it is the same shape in one place.
//!
//! `--subscribers` overrides the scenario's subscriber count (a quick smoke of `connections`),
//! `--rate` its per-publisher rate. `--check` exits 1 unless every run had no order violation,
//! no duplicate, no disconnected subscriber, something delivered, and every expected delivery
//! either delivered or reported dropped by the server (`unaccounted` 0).
//!
//! ## What is measured
//! Every payload carries its publisher, a per-publisher sequence number and its send time
//! (stamped just before it is queued for the socket). Subscribers count deliveries, order
//! violations and duplicates per publisher, and the latency of messages sent after the warm-up:
//! from that stamp to the kernel's receive timestamp of the read that brought the event
//! (SO_TIMESTAMPNS on the subscriber's socket), so the generator's own wake-ups and parsing are
//! not counted as the broker's; `receive_clock` says "user" if some read had no timestamp and
//! was timed when the generator read it. A publish counts as expected once the server confirmed it
//! (ours: its ack; NATS: the PONG of a later PING); expected deliveries are confirmed publishes ×
//! the topic's subscribers. With `--server-pid` the server's RSS and CPU time (/proc/PID/stat,
//! 10 ms ticks) over the window; the generator's own CPU is reported beside it, so a run where
//! the generator itself ran out of CPU can be told apart.
//!
//! ## Driving both targets alike
//! The WebSocket client is a minimal one written here (server frames parsed in place, one read
//! buffer per connection), so the generator spends as little of the shared cores as it can; the
//! SSE and NATS parsers work the same way, in place. Both targets get the same connections, the
//! same payload bytes, the same pacing, the same flushes and the same timestamps. Each is driven
//! the way its own clients drive it:
//! - Ours: one text frame per request (the protocol's rule), every publish acked; a paced
//!   publisher never waits on its acks, an unpaced one keeps at most `--window` unacked.
//! - NATS: `CONNECT` with the Go client's defaults (`verbose` and `pedantic` off, `echo`,
//!   `headers`, `no_responders` on); the protocol bytes of one flush go in one binary frame, as
//!   nats.go and nats.ws write them; no PING per message: a PING after every `--window`/2 PUBs
//!   and one at the end, whose PONGs confirm the PUBs before them (what `nats bench`'s final
//!   `Flush` does). A paced publisher never waits on them; an unpaced one keeps at most
//!   `--window` PUBs unconfirmed, the same window as ours.
//!
//! What still differs is the protocols': our publish is acked and NATS's is not (the generator
//! reads an ack of about 100 bytes per publish from us, a PONG per 128 from NATS); our event is
//! a JSON frame of its own (about 230 bytes for a 100-byte payload) where nats-server packs
//! several `MSG`s (about 122 bytes each) into one frame; our publish is JSON (160 bytes) against
//! a `PUB` (120).
//!
//! ## Pacing
//! A paced publisher wakes on a timer every 1/rate, but no more often than every millisecond
//! (tokio's timer resolution), sends every message that is due by the clock since its start in
//! one write, and stamps each when it is sent. So a late wake-up of the generator shows as a
//! later send, not as broker latency; at 10,000 msg/s the load arrives in bursts of 10 per
//! publisher per millisecond. How far each message left behind its ideal time (start + k/rate)
//! is reported as the send lag: about a millisecond at the top rates by construction, and much
//! more only if the generator (or the server's TCP backpressure) held the publisher back —
//! then that run's latency is not to be trusted. Publishers start staggered across one period.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

// ---- scenarios ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Publishers and subscribers for `duration`: rates, delivery, latency.
    Stream,
    /// `connections`: idle subscribers, one publish per topic timed until it reached them all.
    Idle,
    /// `mass-disconnect`: topic 0's subscribers leave at once, topic 1's traffic is timed.
    MassDisconnect,
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    kind: Kind,
    topics: usize,
    publishers: usize,
    /// Messages per second per publisher; `None` = as fast as the window allows.
    rate: Option<f64>,
    subscribers: usize,
    /// Topics each subscriber is on (consecutive topics from its index).
    topics_per_subscriber: usize,
    /// Each publisher cycles through every topic (from its own starting point) instead of
    /// publishing to its own one.
    round_robin: bool,
    duration: f64,
    /// Subscribers read Server-Sent Events (`GET /topics/{name}/events`, one topic each)
    /// instead of a WebSocket; publishers still use the WebSocket.
    sse: bool,
}

const SCENARIOS: [&str; 15] = [
    "light",
    "medium",
    "heavy",
    "extreme",
    "latency-10x",
    "latency-50x",
    "latency-100x",
    "fanout",
    "sse-fanout",
    "fanout-1k",
    "fanin",
    "topics",
    "connections",
    "mass-disconnect",
    "cluster",
];

/// The Python service's load levels: every publisher at 100 msg/s, every subscriber on 2 topics.
fn load_level(
    name: &'static str,
    topics: usize,
    publishers: usize,
    subscribers: usize,
) -> Scenario {
    Scenario {
        name,
        kind: Kind::Stream,
        topics,
        publishers,
        rate: Some(100.0),
        subscribers,
        topics_per_subscriber: 2,
        round_robin: false,
        duration: 20.0,
        sse: false,
    }
}

fn scenario(name: &str) -> Option<Scenario> {
    let name = *SCENARIOS.iter().find(|n| **n == name)?;
    let unpaced = Scenario {
        name,
        rate: None,
        topics: 1,
        publishers: 1,
        subscribers: 100,
        topics_per_subscriber: 1,
        duration: 15.0,
        ..load_level(name, 1, 1, 1)
    };
    let medium_times = |k: f64| Scenario {
        rate: Some(100.0 * k),
        ..load_level(name, 10, 20, 50)
    };
    Some(match name {
        "light" => load_level(name, 5, 10, 20),
        "medium" => load_level(name, 10, 20, 50),
        "heavy" => load_level(name, 20, 50, 100),
        "extreme" => load_level(name, 50, 100, 200),
        "latency-10x" => medium_times(10.0),
        "latency-50x" => medium_times(50.0),
        "latency-100x" => medium_times(100.0),
        "fanout" => unpaced,
        "sse-fanout" => Scenario {
            sse: true,
            ..unpaced
        },
        "fanout-1k" => Scenario {
            subscribers: 1000,
            ..unpaced
        },
        "fanin" => Scenario {
            publishers: 20,
            subscribers: 1,
            ..unpaced
        },
        "topics" => Scenario {
            topics: 1000,
            publishers: 50,
            subscribers: 1000,
            round_robin: true,
            ..unpaced
        },
        "connections" => Scenario {
            kind: Kind::Idle,
            topics: 100,
            subscribers: 10_000,
            duration: 0.0,
            ..unpaced
        },
        "mass-disconnect" => Scenario {
            kind: Kind::MassDisconnect,
            topics: 2,
            rate: Some(1000.0),
            subscribers: 10_000,
            duration: 0.0,
            ..unpaced
        },
        // Cluster mode: publishers on one node (`--url`), subscribers on another
        // (`--sub-url`). Ten publishers, because a cluster node carries out one connection's
        // publishes one JetStream round trip at a time.
        "cluster" => Scenario {
            publishers: 10,
            ..unpaced
        },
        _ => unreachable!("every name in SCENARIOS has its shape"),
    })
}

/// The topics subscriber `index` is on.
fn subscriber_topics(s: &Scenario, index: usize) -> Vec<usize> {
    (0..s.topics_per_subscriber)
        .map(|k| (index + k) % s.topics)
        .collect()
}

/// The topics publisher `index` publishes to, in turn.
fn publisher_topics(s: &Scenario, index: usize) -> Vec<usize> {
    if s.round_robin {
        (0..s.topics).map(|k| (index + k) % s.topics).collect()
    } else {
        vec![index % s.topics]
    }
}

fn topic_name(i: usize) -> String {
    format!("bench.t{i}")
}

// ---- options ----

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
    /// Where subscribers connect: `--sub-url`, or the same as publishers.
    sub_host: String,
    sub_port: u16,
    warmup: f64,
    window: usize,
    payload: usize,
    server_pid: Option<u32>,
    runs: usize,
    check: bool,
}

const USAGE: &str =
    "usage: bench --scenario NAME [--target ours|nats] [--url ws://127.0.0.1:8000/ws] \
[--sub-url URL] [--duration S] [--warmup S] [--rate MSGS_PER_S] [--subscribers N] [--window N] [--payload BYTES] \
[--server-pid PID] [--runs N] [--check]
       bench --list
scenarios: light medium heavy extreme latency-10x latency-50x latency-100x fanout sse-fanout \
fanout-1k fanin topics connections mass-disconnect cluster";

/// The flags as given; `None` where the scenario's or the target's default applies.
#[derive(Default)]
struct Flags {
    scenario: Option<Scenario>,
    target: Option<Target>,
    url: Option<String>,
    sub_url: Option<String>,
    duration: Option<f64>,
    warmup: Option<f64>,
    rate: Option<f64>,
    subscribers: Option<usize>,
    window: Option<usize>,
    payload: Option<usize>,
    server_pid: Option<u32>,
    runs: Option<usize>,
    check: bool,
}

/// `Ok(None)` for `--list` (the names were printed).
fn parse_flags() -> Result<Option<Flags>, String> {
    let mut args = std::env::args().skip(1);
    let mut f = Flags::default();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|_| format!("bad number {v}"));
        match flag.as_str() {
            "--scenario" => {
                let v = value()?;
                f.scenario = Some(scenario(&v).ok_or(format!("unknown scenario {v}\n{USAGE}"))?);
            }
            "--target" => {
                f.target = Some(match value()?.as_str() {
                    "ours" => Target::Ours,
                    "nats" => Target::Nats,
                    other => return Err(format!("unknown target {other}")),
                })
            }
            "--url" => f.url = Some(value()?),
            "--sub-url" => f.sub_url = Some(value()?),
            "--duration" => f.duration = Some(number(value()?)?),
            "--warmup" => f.warmup = Some(number(value()?)?),
            "--rate" => f.rate = Some(number(value()?)?).filter(|r| *r > 0.0),
            "--subscribers" => f.subscribers = Some(number(value()?)? as usize),
            "--window" => f.window = Some(number(value()?)? as usize),
            "--payload" => f.payload = Some(number(value()?)? as usize),
            "--server-pid" => f.server_pid = Some(number(value()?)? as u32),
            "--runs" => f.runs = Some(number(value()?)? as usize),
            "--check" => f.check = true,
            "--list" => {
                SCENARIOS.iter().for_each(|name| println!("{name}"));
                return Ok(None);
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Some(f))
}

fn parse_options() -> Result<Option<Options>, String> {
    let Some(f) = parse_flags()? else {
        return Ok(None);
    };
    let mut scenario = f.scenario.ok_or_else(|| USAGE.to_string())?;
    let target = f.target.unwrap_or(Target::Ours);
    if scenario.sse && target != Target::Ours {
        return Err(format!(
            "the {} scenario needs --target ours: nats-server has no Server-Sent Events",
            scenario.name
        ));
    }
    scenario.duration = f.duration.unwrap_or(scenario.duration);
    scenario.rate = f.rate.or(scenario.rate);
    scenario.subscribers = f.subscribers.unwrap_or(scenario.subscribers).max(1);
    let mut warmup = f.warmup.unwrap_or(2.0);
    if scenario.kind == Kind::Stream {
        warmup = warmup.min(scenario.duration / 2.0);
    }
    let default_url = match target {
        Target::Ours => "ws://127.0.0.1:8000/ws",
        Target::Nats => "ws://127.0.0.1:9222/",
    };
    let url = f.url.unwrap_or_else(|| default_url.to_string());
    let (host, port) = host_port(&url)?;
    let (sub_host, sub_port) = match &f.sub_url {
        Some(sub_url) => host_port(sub_url)?,
        None => (host.clone(), port),
    };
    Ok(Some(Options {
        scenario,
        target,
        host,
        port,
        sub_host,
        sub_port,
        warmup,
        window: f.window.unwrap_or(256).max(2),
        payload: f.payload.unwrap_or(100).max(64),
        server_pid: f.server_pid,
        runs: f.runs.unwrap_or(1).max(1),
        check: f.check,
    }))
}

fn host_port(url: &str) -> Result<(String, u16), String> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or("the url must be ws://host:port/...")?;
    let (host, port) = authority.rsplit_once(':').ok_or("the url needs a port")?;
    let port = port.parse().map_err(|_| "bad port in url")?;
    Ok((host.to_string(), port))
}

// ---- a minimal WebSocket client ----

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    /// The kernel's receive time (CLOCK_REALTIME ns) of the last read, if stamped.
    rx_ns: Option<u64>,
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
            if let Some(end) = find(&buf, b"\r\n\r\n") {
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
                    rx_ns: None,
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
        let start = self.out.len();
        self.out.extend_from_slice(payload);
        for (i, b) in self.out[start..].iter_mut().enumerate() {
            *b ^= MASK[i % 4];
        }
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
        self.rx_ns = read_more(&mut self.stream, &mut self.buf, &mut self.pos).await?;
        Ok(())
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
                self.queue(OP_PONG, &payload);
                continue;
            }
            return Some((opcode, range));
        }
    }
}

/// Reads more bytes into `buf`, first dropping the consumed `..pos` when that is at least half
/// of it; cancel-safe (a read either happened or did not). End of stream is an error. Returns
/// the kernel's receive time of what was read, if the socket has receive timestamps on.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    pos: &mut usize,
) -> io::Result<Option<u64>> {
    if *pos > 0 && *pos * 2 >= buf.len() {
        buf.drain(..*pos);
        *pos = 0;
    }
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    let fd = stream.as_raw_fd();
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || recv_stamped(fd, buf)) {
            Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok((_, stamp)) => return Ok(stamp),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

// ---- kernel receive timestamps ----

/// Asks the kernel to stamp what `stream` receives (SO_TIMESTAMPNS), so that a subscriber's
/// latency ends when its event reached the socket, not when the generator got round to reading
/// it: the generator's own wake-ups and parsing are not the broker's latency.
fn enable_rx_timestamps(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a c_int option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One `recvmsg` into the spare capacity of `buf`: the bytes read, and the receive time
/// (CLOCK_REALTIME ns) of the last segment among them when the kernel stamped it.
fn recv_stamped(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<(usize, Option<u64>)> {
    let spare = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: iov points into buf's spare capacity, control is ours; both outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n as usize) };
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

// ---- a minimal Server-Sent-Events client ----

/// One `GET /topics/{name}/events` response body (no Content-Length: it runs until the
/// connection closes), read into one buffer and parsed in place.
struct Sse {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// The kernel's receive time of the last read, as `Ws::rx_ns`.
    rx_ns: Option<u64>,
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
                    rx_ns: None,
                });
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads more bytes; cancel-safe.
    async fn fill(&mut self) -> io::Result<()> {
        self.rx_ns = read_more(&mut self.stream, &mut self.buf, &mut self.pos).await?;
        Ok(())
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

// ---- the NATS client protocol ----

/// The Go client's default CONNECT options (nats.go `Options`: not verbose, not pedantic,
/// echo on, headers and no-responders on).
const NATS_CONNECT: &str = concat!(
    r#"CONNECT {"verbose":false,"pedantic":false,"tls_required":false,"name":"bench","#,
    r#""lang":"rust","version":"0.1.0","protocol":1,"echo":true,"headers":true,"no_responders":true}"#,
    "\r\n"
);

/// Opens a NATS-over-WebSocket connection: CONNECT, then a PING whose PONG says it was accepted.
async fn nats_connect(opts: &Options) -> io::Result<Ws> {
    let mut ws = Ws::connect(&opts.host, opts.port, "/").await?;
    ws.queue(OP_BINARY, format!("{NATS_CONNECT}PING\r\n").as_bytes());
    ws.flush().await?;
    nats_wait_pong(&mut ws).await?;
    Ok(ws)
}

/// Waits for the PONG of a PING already sent (answering the server's PINGs meanwhile).
async fn nats_wait_pong(ws: &mut Ws) -> io::Result<()> {
    let mut nats = NatsStream::default();
    loop {
        ws.fill().await?;
        let (mut pong, mut ping, mut error) = (false, false, None);
        while let Some((op, range)) = ws.frame() {
            if matches!(op, OP_TEXT | OP_BINARY | OP_CONT) {
                nats.feed(&ws.buf[range], |item| match item {
                    NatsItem::Pong => pong = true,
                    NatsItem::Ping => ping = true,
                    NatsItem::Err(e) => error = Some(e),
                    NatsItem::Msg(_) | NatsItem::Other => {}
                });
            }
        }
        if let Some(e) = error {
            return Err(io::Error::other(e));
        }
        if ping {
            ws.queue(OP_BINARY, b"PONG\r\n");
            ws.flush().await?;
        }
        if pong {
            return Ok(());
        }
    }
}

/// The NATS byte stream carried by the WebSocket frames. A frame may hold several protocol
/// items, or part of one: whole items are parsed in place in the frame (as ours are in theirs);
/// only an incomplete tail is copied, and completed by the next frame.
#[derive(Default)]
struct NatsStream {
    tail: Vec<u8>,
}

enum NatsItem<'a> {
    /// A `MSG`'s payload.
    Msg(&'a [u8]),
    Ping,
    Pong,
    Err(String),
    Other,
}

impl NatsStream {
    /// Hands every whole item of the stream so far to `on`.
    fn feed(&mut self, bytes: &[u8], mut on: impl FnMut(NatsItem<'_>)) {
        if self.tail.is_empty() {
            let used = nats_items(bytes, &mut on);
            self.tail.extend_from_slice(&bytes[used..]);
        } else {
            let mut tail = std::mem::take(&mut self.tail);
            tail.extend_from_slice(bytes);
            let used = nats_items(&tail, &mut on);
            tail.drain(..used);
            self.tail = tail;
        }
    }
}

/// Hands each whole item in `bytes` to `on`; returns the bytes used.
fn nats_items(bytes: &[u8], on: &mut impl FnMut(NatsItem<'_>)) -> usize {
    let mut at = 0;
    while let Some((item, len)) = nats_item(&bytes[at..]) {
        on(item);
        at += len;
    }
    at
}

/// The item at the start of `bytes` and its length, if it is all there.
fn nats_item(bytes: &[u8]) -> Option<(NatsItem<'_>, usize)> {
    let eol = find(bytes, b"\r\n")?;
    let line = &bytes[..eol];
    if line.starts_with(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <size>
        let digits = line.iter().rev().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            let line = String::from_utf8_lossy(line).into_owned();
            return Some((NatsItem::Err(format!("bad MSG line: {line}")), eol + 2));
        }
        let size = line[eol - digits..]
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
        let start = eol + 2;
        if bytes.len() < start + size + 2 {
            return None;
        }
        return Some((NatsItem::Msg(&bytes[start..start + size]), start + size + 2));
    }
    let item = match line {
        b"PING" => NatsItem::Ping,
        b"PONG" => NatsItem::Pong,
        _ if line.starts_with(b"-ERR") => NatsItem::Err(String::from_utf8_lossy(line).into()),
        _ => NatsItem::Other,
    };
    Some((item, eol + 2))
}

// ---- payloads ----

/// Appends a payload: `{"p":<publisher>,"s":<seq>,"t":<send ns>,"x":"xxx…"}` padded to `size`
/// bytes.
fn write_payload(out: &mut Vec<u8>, size: usize, publisher: usize, seq: u64, t: u64) {
    let start = out.len();
    write!(out, r#"{{"p":{publisher},"s":{seq},"t":{t},"x":""#).expect("a Vec takes writes");
    let pad = size.saturating_sub(out.len() - start + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

/// Finds `{"p":` in `bytes` and reads publisher, seq and send time.
fn parse_payload(bytes: &[u8]) -> Option<(usize, u64, u64)> {
    let at = find(bytes, br#"{"p":"#)?;
    let mut rest = &bytes[at + 5..];
    let mut number = |skip: usize| -> Option<u64> {
        rest = rest.get(skip..)?;
        let n = leading_number(rest)?;
        rest = &rest[rest.iter().take_while(|b| b.is_ascii_digit()).count()..];
        Some(n)
    };
    let p = number(0)?;
    let s = number(5)?; // ,"s":
    let t = number(5)?; // ,"t":
    Some((p as usize, s, t))
}

/// The decimal number at the start of `bytes`.
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = bytes[..digits]
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    (digits > 0).then_some(n)
}

/// The `"dropped":n` of a slow-consumer notice (a WebSocket error frame or an SSE record).
fn dropped_count(notice: &[u8]) -> u64 {
    find(notice, br#""dropped":"#)
        .and_then(|at| leading_number(&notice[at + 10..]))
        .unwrap_or(0)
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

const BUCKETS: usize = 1024 + 64 * 40;

/// Log-linear latency histogram in microseconds: exact below 1 ms, 64 steps per power of two
/// above (1.6%). Its 28 KiB are allocated on the first sample, so 10,000 idle subscribers do
/// not hold one each.
#[derive(Clone, Default)]
struct Histogram {
    buckets: Vec<u64>,
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < 1024 {
            return us as usize;
        }
        let log = 63 - us.leading_zeros() as usize;
        let sub = ((us >> (log - 6)) & 63) as usize;
        (1024 + (log - 10) * 64 + sub).min(BUCKETS - 1)
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
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS];
        }
        self.buckets[Self::index(us)] += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            self.buckets.clone_from(&other.buckets);
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The value at quantile `q` (1.0 = the maximum); 0 when empty.
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
        Self::value(BUCKETS - 1)
    }
}

/// State shared by every task of one run. Times are nanoseconds since `epoch`.
struct Shared {
    epoch: Instant,
    /// `epoch` on CLOCK_REALTIME, the kernel's receive timestamps' clock.
    epoch_real_ns: u64,
    /// A subscriber read had no kernel timestamp, and was timed when the generator read it.
    user_clock_used: AtomicBool,
    /// Latency and rates count the messages sent in `window_start..window_end`.
    window_start_ns: AtomicU64,
    window_end_ns: AtomicU64,
    /// `mass-disconnect`: messages sent from here to `window_start` make the baseline latency.
    baseline_start_ns: AtomicU64,
    /// Publishers send until then.
    send_end_ns: AtomicU64,
    delivered: AtomicU64,
    /// Events the server reported dropped (slow-consumer notices).
    dropped: AtomicU64,
    stop: AtomicBool,
    stop_notify: tokio::sync::Notify,
}

impl Shared {
    /// Shared state for a run whose window is `from..to` seconds (publishers stop at `to`).
    fn new(from: f64, to: f64) -> Arc<Shared> {
        let ns = |s: f64| {
            if s.is_finite() {
                (s * 1e9) as u64
            } else {
                u64::MAX
            }
        };
        let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        Arc::new(Shared {
            epoch: Instant::now(),
            epoch_real_ns: real.map_or(0, |d| d.as_nanos() as u64),
            user_clock_used: AtomicBool::new(false),
            window_start_ns: AtomicU64::new(ns(from)),
            window_end_ns: AtomicU64::new(ns(to)),
            baseline_start_ns: AtomicU64::new(u64::MAX),
            send_end_ns: AtomicU64::new(ns(to)),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stop_notify: tokio::sync::Notify::new(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// When a read's bytes arrived, in the run's clock: the kernel's receive timestamp, or
    /// (without one) now.
    fn received_at(&self, rx_ns: Option<u64>) -> u64 {
        match rx_ns {
            Some(real) => real.saturating_sub(self.epoch_real_ns),
            None => {
                self.user_clock_used.store(true, Ordering::Relaxed);
                self.now_ns()
            }
        }
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window_start_ns.load(Ordering::Relaxed)
            && t < self.window_end_ns.load(Ordering::Relaxed)
    }

    fn in_baseline(&self, t: u64) -> bool {
        t >= self.baseline_start_ns.load(Ordering::Relaxed)
            && t < self.window_start_ns.load(Ordering::Relaxed)
    }

    fn sending(&self) -> bool {
        self.now_ns() < self.send_end_ns.load(Ordering::Relaxed)
    }

    /// Tells every subscriber task to end.
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.stop_notify.notify_waiters();
    }
}

/// What one subscriber saw.
#[derive(Default)]
struct Tally {
    delivered: u64,
    in_window: u64,
    dropped: u64,
    order_violations: u64,
    duplicates: u64,
    slow_consumer_notices: u64,
    disconnected: bool,
    latency: Histogram,
    /// `mass-disconnect`: the latency before the disconnect.
    baseline: Histogram,
    /// The highest sequence number seen from each publisher.
    last: Vec<u64>,
}

impl Tally {
    fn new(publishers: usize) -> Tally {
        Tally {
            last: vec![0; publishers.max(1)],
            ..Tally::default()
        }
    }

    /// Counts one delivered payload: order, duplicates and (in the window) latency.
    fn record(&mut self, payload: &[u8], shared: &Shared, now: u64) {
        let Some((p, s, t)) = parse_payload(payload) else {
            return;
        };
        self.delivered += 1;
        if let Some(prev) = self.last.get_mut(p) {
            if s == *prev {
                self.duplicates += 1;
            } else if s < *prev {
                self.order_violations += 1;
            }
            *prev = (*prev).max(s);
        }
        let us = now.saturating_sub(t) / 1000;
        if shared.in_window(t) {
            self.in_window += 1;
            self.latency.record(us);
        } else if shared.in_baseline(t) {
            self.baseline.record(us);
        }
    }

    /// Counts a slow-consumer notice and the drops it reports.
    fn notice(&mut self, notice: &[u8]) {
        self.slow_consumer_notices += 1;
        self.dropped += dropped_count(notice);
    }

    /// Adds what this read brought to the run's totals.
    fn publish_progress(&self, shared: &Shared, before: (u64, u64)) {
        shared
            .delivered
            .fetch_add(self.delivered - before.0, Ordering::Relaxed);
        shared
            .dropped
            .fetch_add(self.dropped - before.1, Ordering::Relaxed);
    }
}

// ---- subscribers ----

/// A subscriber's connection: a WebSocket, or (`sse-fanout`) an SSE stream.
enum Subscriber {
    Ws(Ws),
    Sse(Sse),
}

/// Opens `count` subscribers, `topics_of(i)` for the i-th, 200 connects at a time (so that
/// 10,000 do not overflow the listen backlog); each is subscribed when this returns.
async fn open_subscribers(
    opts: &Options,
    count: usize,
    topics_of: impl Fn(usize) -> Vec<usize>,
) -> io::Result<Vec<Subscriber>> {
    let gate = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::new();
    for i in 0..count {
        let opts = opts.clone();
        let gate = Arc::clone(&gate);
        let topics = topics_of(i);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            open_subscriber(&opts, &topics).await
        }));
    }
    let mut subscribers = Vec::new();
    for task in tasks {
        subscribers.push(task.await.map_err(io::Error::other)??);
    }
    Ok(subscribers)
}

async fn open_subscriber(opts: &Options, topics: &[usize]) -> io::Result<Subscriber> {
    if opts.scenario.sse {
        let sse = open_sse_subscriber(opts, topics[0]).await?;
        enable_rx_timestamps(&sse.stream);
        return Ok(Subscriber::Sse(sse));
    }
    let ws = match opts.target {
        Target::Ours => subscribe_ours(opts, topics).await?,
        Target::Nats => subscribe_nats(opts, topics).await?,
    };
    enable_rx_timestamps(&ws.stream);
    Ok(Subscriber::Ws(ws))
}

/// Opens `GET /topics/{name}/events` and waits for its `subscribed` record, as the WebSocket
/// subscribers wait for their acks.
async fn open_sse_subscriber(opts: &Options, topic: usize) -> io::Result<Sse> {
    let path = format!("/topics/{}/events", topic_name(topic));
    let mut sse = Sse::connect(&opts.sub_host, opts.sub_port, &path).await?;
    loop {
        while let Some(record) = sse.record() {
            if record.kind == SseKind::Subscribed {
                return Ok(sse);
            }
        }
        sse.fill().await?;
    }
}

/// Subscribes to `topics` and waits for every ack.
async fn subscribe_ours(opts: &Options, topics: &[usize]) -> io::Result<Ws> {
    let mut ws = Ws::connect(&opts.sub_host, opts.sub_port, "/ws").await?;
    for t in topics {
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
                return Err(io::Error::other(String::from_utf8_lossy(text).into_owned()));
            }
        }
        ws.flush().await?;
    }
    Ok(ws)
}

/// SUBs to `topics`, then a PING: its PONG says the server has them all.
async fn subscribe_nats(opts: &Options, topics: &[usize]) -> io::Result<Ws> {
    let mut ws = nats_connect(opts).await?;
    let mut lines = String::new();
    for (sid, t) in topics.iter().enumerate() {
        lines.push_str(&format!("SUB {} {}\r\n", topic_name(*t), sid + 1));
    }
    lines.push_str("PING\r\n");
    ws.queue(OP_BINARY, lines.as_bytes());
    ws.flush().await?;
    nats_wait_pong(&mut ws).await?;
    Ok(ws)
}

/// Starts a reader task for each subscriber.
fn spawn_readers(
    subscribers: Vec<Subscriber>,
    opts: &Options,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let publishers = opts.scenario.publishers;
    subscribers
        .into_iter()
        .map(|subscriber| {
            let shared = Arc::clone(shared);
            match subscriber {
                Subscriber::Ws(ws) => {
                    tokio::spawn(run_subscriber(ws, opts.target, shared, publishers))
                }
                Subscriber::Sse(sse) => tokio::spawn(run_sse_subscriber(sse, shared, publishers)),
            }
        })
        .collect()
}

/// Stops the reader tasks and collects what they saw.
async fn stop_readers(
    readers: Vec<tokio::task::JoinHandle<Tally>>,
    shared: &Shared,
) -> io::Result<Vec<Tally>> {
    shared.stop();
    let mut tallies = Vec::new();
    for mut reader in readers {
        // A reader may be between reads when notified: wake it again until it ends.
        let tally = loop {
            tokio::select! {
                tally = &mut reader => break tally.map_err(io::Error::other)?,
                _ = tokio::time::sleep(Duration::from_millis(50)) => shared.stop_notify.notify_waiters(),
            }
        };
        tallies.push(tally);
    }
    Ok(tallies)
}

/// A WebSocket subscriber (either target): reads until stopped, counting what arrives.
async fn run_subscriber(
    mut ws: Ws,
    target: Target,
    shared: Arc<Shared>,
    publishers: usize,
) -> Tally {
    let mut tally = Tally::new(publishers);
    let mut nats = NatsStream::default();
    loop {
        let before = (tally.delivered, tally.dropped);
        let read = tokio::select! {
            read = ws.fill() => read,
            _ = shared.stop_notify.notified() => break,
        };
        if read.is_err() {
            tally.disconnected = !shared.stop.load(Ordering::Acquire);
            break;
        }
        let now = shared.received_at(ws.rx_ns);
        let mut pong_due = false;
        while let Some((op, range)) = ws.frame() {
            let bytes = &ws.buf[range];
            match target {
                Target::Ours => ours_frame(op, bytes, &mut tally, &shared, now),
                Target::Nats => {
                    pong_due |= nats_frame(op, bytes, &mut nats, &mut tally, &shared, now)
                }
            }
        }
        if pong_due {
            ws.queue(OP_BINARY, b"PONG\r\n");
        }
        tally.publish_progress(&shared, before);
        if ws.flush().await.is_err() {
            tally.disconnected = true;
        }
        if tally.disconnected {
            break;
        }
    }
    tally
}

/// Counts one frame from our server: an event, a slow-consumer notice, or a Close.
fn ours_frame(op: u8, text: &[u8], tally: &mut Tally, shared: &Shared, now: u64) {
    if op == OP_CLOSE {
        tally.disconnected = true;
    } else if op == OP_TEXT {
        if text.starts_with(br#"{"type":"event""#) {
            tally.record(text, shared, now);
        } else if find(text, b"SLOW_CONSUMER").is_some() {
            tally.notice(text);
        }
    }
}

/// Counts the `MSG`s of one frame of a NATS stream; true if the server sent a PING.
fn nats_frame(
    op: u8,
    bytes: &[u8],
    nats: &mut NatsStream,
    tally: &mut Tally,
    shared: &Shared,
    now: u64,
) -> bool {
    if op == OP_CLOSE {
        tally.disconnected = true;
    }
    if !matches!(op, OP_TEXT | OP_BINARY | OP_CONT) {
        return false;
    }
    let mut ping = false;
    nats.feed(bytes, |item| match item {
        NatsItem::Msg(payload) => tally.record(payload, shared, now),
        NatsItem::Ping => ping = true,
        NatsItem::Err(e) => {
            eprintln!("nats subscriber: {e}");
            tally.disconnected = true;
        }
        NatsItem::Pong | NatsItem::Other => {}
    });
    ping
}

/// An SSE subscriber: the same counting as `run_subscriber`'s, on the `data:` line of each
/// `message` record (exactly the event JSON a WebSocket subscriber gets).
async fn run_sse_subscriber(mut sse: Sse, shared: Arc<Shared>, publishers: usize) -> Tally {
    let mut tally = Tally::new(publishers);
    loop {
        let before = (tally.delivered, tally.dropped);
        let read = tokio::select! {
            read = sse.fill() => read,
            _ = shared.stop_notify.notified() => break,
        };
        if read.is_err() {
            tally.disconnected = !shared.stop.load(Ordering::Acquire);
            break;
        }
        let now = shared.received_at(sse.rx_ns);
        while let Some(record) = sse.record() {
            let data = &sse.buf[record.data];
            match record.kind {
                SseKind::Message if data.starts_with(br#"{"type":"event""#) => {
                    tally.record(data, &shared, now)
                }
                SseKind::SlowConsumer => tally.notice(data),
                // The bench deletes no topics; were the stream to end after one, that end
                // would count as a disconnection.
                _ => {}
            }
        }
        tally.publish_progress(&shared, before);
    }
    tally
}

// ---- publishers ----

/// How long an unpaced publisher waits for a confirmation, and any publisher at the end.
const NO_REPLY: Duration = Duration::from_secs(10);

/// A publisher's connection, speaking its target's protocol.
struct PubLink {
    ws: Ws,
    target: Target,
    /// The frame being built: our publish JSON, or (NATS) the PUBs and PINGs of the next flush.
    scratch: Vec<u8>,
    payload_size: usize,
    nats: NatsStream,
    /// NATS: PUBs since the last PING, a PING every `ping_every` PUBs, and the PUBs each PING
    /// still unanswered will confirm, oldest first.
    since_ping: usize,
    ping_every: usize,
    pings: VecDeque<usize>,
}

impl PubLink {
    async fn connect(opts: &Options) -> io::Result<PubLink> {
        let ws = match opts.target {
            Target::Ours => Ws::connect(&opts.host, opts.port, "/ws").await?,
            Target::Nats => nats_connect(opts).await?,
        };
        Ok(PubLink {
            ws,
            target: opts.target,
            scratch: Vec::with_capacity(64 * 1024),
            payload_size: opts.payload,
            nats: NatsStream::default(),
            since_ping: 0,
            ping_every: opts.window / 2,
            pings: VecDeque::new(),
        })
    }

    /// Queues one publish (ours: a frame of its own; NATS: a PUB in the next flush's frame).
    fn publish(&mut self, topic: &str, publisher: usize, seq: u64, t: u64) {
        let size = self.payload_size;
        match self.target {
            Target::Ours => {
                self.scratch.clear();
                write!(
                    self.scratch,
                    r#"{{"type":"publish","topic":"{topic}","message":{{"payload":"#
                )
                .expect("a Vec takes writes");
                write_payload(&mut self.scratch, size, publisher, seq, t);
                self.scratch.extend_from_slice(b"}}");
                self.ws.queue(OP_TEXT, &self.scratch);
            }
            Target::Nats => {
                let len = size.max(payload_floor(publisher, seq, t));
                write!(self.scratch, "PUB {topic} {len}\r\n").expect("a Vec takes writes");
                let at = self.scratch.len();
                write_payload(&mut self.scratch, size, publisher, seq, t);
                debug_assert_eq!(self.scratch.len() - at, len, "the PUB's size");
                self.scratch.extend_from_slice(b"\r\n");
                self.since_ping += 1;
                if self.since_ping == self.ping_every {
                    self.ping();
                }
            }
        }
    }

    /// NATS: a PING confirming the PUBs since the last one.
    fn ping(&mut self) {
        if self.target == Target::Nats && self.since_ping > 0 {
            self.scratch.extend_from_slice(b"PING\r\n");
            self.pings.push_back(self.since_ping);
            self.since_ping = 0;
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.target == Target::Nats && !self.scratch.is_empty() {
            self.ws.queue(OP_BINARY, &self.scratch);
            self.scratch.clear();
        }
        self.ws.flush().await
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.ws.fill().await
    }

    /// Reads the confirmations that arrived (our acks and errors, NATS's PONGs) into `pending`.
    fn replies(&mut self, pending: &mut Pending, shared: &Shared) -> io::Result<()> {
        let mut pong_due = false;
        while let Some((op, range)) = self.ws.frame() {
            let bytes = &self.ws.buf[range];
            if op == OP_CLOSE {
                return Err(io::Error::other("the server closed the publisher"));
            }
            match self.target {
                Target::Ours if bytes.starts_with(br#"{"type":"ack""#) => {
                    pending.confirm(1, shared)
                }
                // A refused publish is not a delivery anyone should expect.
                Target::Ours if bytes.starts_with(br#"{"type":"error""#) => pending.refuse(),
                Target::Ours => {}
                Target::Nats => {
                    let mut error = None;
                    self.nats.feed(bytes, |item| match item {
                        NatsItem::Pong => {
                            pending.confirm(self.pings.pop_front().unwrap_or(0), shared)
                        }
                        NatsItem::Ping => pong_due = true,
                        NatsItem::Err(e) => error = Some(e),
                        NatsItem::Msg(_) | NatsItem::Other => {}
                    });
                    if let Some(e) = error {
                        return Err(io::Error::other(e));
                    }
                }
            }
        }
        if pong_due {
            self.scratch.extend_from_slice(b"PONG\r\n");
        }
        Ok(())
    }
}

/// The smallest payload `write_payload` writes (its fields with no padding).
fn payload_floor(publisher: usize, seq: u64, t: u64) -> usize {
    let digits = |n: u64| n.checked_ilog10().unwrap_or(0) as usize + 1;
    r#"{"p":,"s":,"t":,"x":""}"#.len() + digits(publisher as u64) + digits(seq) + digits(t)
}

/// Publishes sent and not yet confirmed, oldest first, and the count of confirmed ones.
struct Pending {
    sent: VecDeque<(usize, u64)>,
    per_topic: Vec<u64>,
    in_window: u64,
}

impl Pending {
    fn new(topics: usize) -> Pending {
        Pending {
            sent: VecDeque::new(),
            per_topic: vec![0; topics],
            in_window: 0,
        }
    }

    fn confirm(&mut self, count: usize, shared: &Shared) {
        for _ in 0..count {
            if let Some((topic, t)) = self.sent.pop_front() {
                self.per_topic[topic] += 1;
                self.in_window += u64::from(shared.in_window(t));
            }
        }
    }

    fn refuse(&mut self) {
        self.sent.pop_front();
    }
}

/// Paces a publisher at `rate` messages per second: a timer wakes it every 1/rate, but no
/// more often than every millisecond (tokio's timer resolution); each wake-up sends every
/// message due by the clock since `start` (message k at start + k/rate), so the rate holds
/// however late a wake-up is, and records how far each left behind its due time.
struct Pacer {
    /// When message 0 is due, in the run's clock (`Shared::now_ns`).
    start_ns: u64,
    rate: f64,
    sent: u64,
    ticker: tokio::time::Interval,
    /// The lag of the messages due in the window, in microseconds.
    lag: Histogram,
}

impl Pacer {
    /// `slot` of `slots` staggers the publishers' wake-ups across one period.
    fn new(rate: f64, slot: usize, slots: usize, shared: &Shared) -> Pacer {
        let period = Duration::from_secs_f64((1.0 / rate).max(0.001));
        let offset = period.mul_f64(slot as f64 / slots.max(1) as f64);
        let start_ns = shared.now_ns() + offset.as_nanos() as u64;
        let start = shared.epoch + Duration::from_nanos(start_ns);
        let mut ticker = tokio::time::interval_at(start.into(), period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pacer {
            start_ns,
            rate,
            sent: 0,
            ticker,
            lag: Histogram::default(),
        }
    }

    /// How many messages are due now (and not yet sent).
    fn due(&mut self, shared: &Shared) -> u64 {
        let now = shared.now_ns();
        if now < self.start_ns {
            return 0;
        }
        let due = ((now - self.start_ns) as f64 * 1e-9 * self.rate) as u64 + 1;
        for k in self.sent..due {
            let due_at = self.start_ns + (k as f64 / self.rate * 1e9) as u64;
            if shared.in_window(due_at) {
                self.lag.record(now.saturating_sub(due_at) / 1000);
            }
        }
        let n = due.saturating_sub(self.sent);
        self.sent = self.sent.max(due);
        n
    }
}

/// What one publisher did.
struct Published {
    /// Messages confirmed, per topic.
    per_topic: Vec<u64>,
    /// Confirmed messages sent in the window.
    in_window: u64,
    /// Paced: how far behind their due time the messages left.
    lag: Histogram,
}

/// Connects a publisher and runs it on its share of the scenario's topics.
async fn spawn_publisher(
    opts: Options,
    index: usize,
    shared: Arc<Shared>,
) -> io::Result<Published> {
    let link = PubLink::connect(&opts).await?;
    let topics = publisher_topics(&opts.scenario, index);
    run_publisher(link, topics, index, opts, shared).await
}

/// Publishes to `topics` in turn until `shared.send_end_ns`, then waits for the confirmation
/// of everything sent.
async fn run_publisher(
    mut link: PubLink,
    topics: Vec<usize>,
    index: usize,
    opts: Options,
    shared: Arc<Shared>,
) -> io::Result<Published> {
    let s = &opts.scenario;
    let names: Vec<String> = topics.iter().map(|t| topic_name(*t)).collect();
    let mut pending = Pending::new(s.topics);
    let mut pacer = s
        .rate
        .map(|rate| Pacer::new(rate, index, s.publishers, &shared));
    let (mut seq, mut next) = (0u64, 0usize);
    while shared.sending() {
        let due = match pacer.as_mut() {
            Some(pacer) => pacer.due(&shared),
            None => opts.window.saturating_sub(pending.sent.len()) as u64,
        };
        for _ in 0..due {
            seq += 1;
            let t = shared.now_ns();
            link.publish(&names[next], index, seq, t);
            pending.sent.push_back((topics[next], t));
            next = (next + 1) % topics.len();
        }
        link.flush().await?;
        wait_for_work(&mut link, pacer.as_mut(), &mut pending, &shared).await?;
    }
    link.ping();
    link.flush().await?;
    while !pending.sent.is_empty() {
        let read = tokio::time::timeout(NO_REPLY, link.fill()).await;
        read.map_err(|_| io::Error::other("publisher: no confirmation for 10 s"))??;
        link.replies(&mut pending, &shared)?;
        link.flush().await?;
    }
    Ok(Published {
        per_topic: pending.per_topic,
        in_window: pending.in_window,
        lag: pacer.map(|p| p.lag).unwrap_or_default(),
    })
}

/// Waits for the next tick (paced) or for replies, and reads those.
async fn wait_for_work(
    link: &mut PubLink,
    pacer: Option<&mut Pacer>,
    pending: &mut Pending,
    shared: &Shared,
) -> io::Result<()> {
    let read = match pacer {
        Some(pacer) => tokio::select! {
            _ = pacer.ticker.tick() => None,
            read = link.fill() => Some(read),
        },
        None => Some(
            tokio::time::timeout(NO_REPLY, link.fill())
                .await
                .map_err(|_| io::Error::other("publisher: no confirmation for 10 s"))?,
        ),
    };
    match read {
        Some(read) => {
            read?;
            link.replies(pending, shared)
        }
        None => Ok(()),
    }
}

// ---- the runs ----

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latency {
    fn of(h: &Histogram) -> Latency {
        Latency {
            p50: h.quantile(0.50),
            p90: h.quantile(0.90),
            p99: h.quantile(0.99),
            p999: h.quantile(0.999),
            max: h.quantile(1.0),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Report {
    published_per_s: f64,
    delivered_per_s: f64,
    delivered: u64,
    delivery_ratio: f64,
    /// Deliveries the server reported dropped (slow-consumer notices).
    dropped: u64,
    /// Expected deliveries neither delivered nor reported dropped.
    unaccounted: i64,
    order_violations: u64,
    duplicates: u64,
    slow_consumer_notices: u64,
    disconnected_subscribers: u64,
    latency: Latency,
    /// Where latency ends: "kernel" (the subscriber socket's receive timestamps) or "user"
    /// (when the generator read it; some read had no kernel timestamp).
    receive_clock: &'static str,
    /// Paced publishers: how far behind their due time messages left (µs).
    send_lag_p99_us: Option<f64>,
    send_lag_max_us: Option<f64>,
    server_rss_mib: Option<f64>,
    server_cpu_us_per_delivery: Option<f64>,
    server_cpu_cores: Option<f64>,
    generator_cpu_cores: Option<f64>,
    /// `connections` only.
    rss_per_connection_kib: Option<f64>,
    /// The same, idle again after a burst.
    rss_after_burst_per_connection_kib: Option<f64>,
    reach_all_ms: Option<f64>,
    /// `mass-disconnect` only: the generator's time to close them all, the time until the
    /// server had, its CPU time meanwhile, and the other topic's latency before it.
    close_ms: Option<f64>,
    disconnect_ms: Option<f64>,
    disconnect_server_cpu_ms: Option<f64>,
    baseline_latency: Option<Latency>,
}

impl Report {
    /// Adds the subscribers' tallies against `expected` deliveries; returns the deliveries
    /// of messages sent in the window.
    fn add_tallies(&mut self, tallies: &[Tally], expected: u64, shared: &Shared) -> u64 {
        self.receive_clock = match shared.user_clock_used.load(Ordering::Relaxed) {
            false => "kernel",
            true => "user",
        };
        let (mut latency, mut baseline) = (Histogram::default(), Histogram::default());
        let mut in_window = 0;
        for t in tallies {
            self.delivered += t.delivered;
            self.dropped += t.dropped;
            self.order_violations += t.order_violations;
            self.duplicates += t.duplicates;
            self.slow_consumer_notices += t.slow_consumer_notices;
            self.disconnected_subscribers += u64::from(t.disconnected);
            in_window += t.in_window;
            latency.merge(&t.latency);
            baseline.merge(&t.baseline);
        }
        self.delivery_ratio = self.delivered as f64 / expected.max(1) as f64;
        self.unaccounted = expected as i64 - self.delivered as i64 - self.dropped as i64;
        self.latency = Latency::of(&latency);
        self.baseline_latency = (baseline.count() > 0).then(|| Latency::of(&baseline));
        in_window
    }

    /// The paced publishers' send lag (none when unpaced).
    fn add_lag(&mut self, lag: &Histogram) {
        if lag.count() > 0 {
            self.send_lag_p99_us = Some(lag.quantile(0.99) as f64);
            self.send_lag_max_us = Some(lag.quantile(1.0) as f64);
        }
    }

    /// The server's and the generator's CPU between two samples.
    fn add_usage(&mut self, from: &Sample, to: &Sample) {
        let secs = to.at.duration_since(from.at).as_secs_f64().max(1e-9);
        let cpu_us = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| {
            Some((b?.1 - a?.1) as f64 / CLOCK_TICKS * 1e6)
        };
        let delivered = (to.delivered - from.delivered).max(1) as f64;
        if let Some(us) = cpu_us(from.server, to.server) {
            self.server_cpu_us_per_delivery = Some(us / delivered);
            self.server_cpu_cores = Some(us / 1e6 / secs);
        }
        self.generator_cpu_cores = cpu_us(from.generator, to.generator).map(|us| us / 1e6 / secs);
    }
}

/// Creates the topics `bench.t0`… (ours; NATS subjects need no creating).
async fn prepare_topics(opts: &Options, count: usize) -> io::Result<()> {
    if opts.target != Target::Ours {
        return Ok(());
    }
    for t in 0..count {
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

/// Waits (at most 5 s) until every expected delivery arrived or was reported dropped.
async fn drain(shared: &Shared, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let settled = || {
        shared.delivered.load(Ordering::Relaxed) + shared.dropped.load(Ordering::Relaxed)
            >= expected
    };
    while !settled() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run_once(opts: &Options) -> io::Result<Report> {
    let mut report = match opts.scenario.kind {
        Kind::Stream => run_stream(opts).await?,
        Kind::Idle => run_idle(opts).await?,
        Kind::MassDisconnect => run_mass_disconnect(opts).await?,
    };
    if let Some(pid) = opts.server_pid {
        report.server_rss_mib = proc_usage(&pid.to_string()).map(|(rss, _)| rss as f64 / 1024.0);
    }
    Ok(report)
}

/// Publishers and subscribers for the scenario's duration.
async fn run_stream(opts: &Options) -> io::Result<Report> {
    let s = &opts.scenario;
    prepare_topics(opts, s.topics).await?;
    let subscribers = open_subscribers(opts, s.subscribers, |i| subscriber_topics(s, i)).await?;
    let shared = Shared::new(opts.warmup, s.duration);
    let readers = spawn_readers(subscribers, opts, &shared);
    let publishers: Vec<_> = (0..s.publishers)
        .map(|i| tokio::spawn(spawn_publisher(opts.clone(), i, Arc::clone(&shared))))
        .collect();
    let sampler = tokio::spawn(sample_window(opts.server_pid, Arc::clone(&shared)));
    let mut per_topic = vec![0u64; s.topics];
    let (mut published_in_window, mut lag) = (0, Histogram::default());
    for publisher in publishers {
        let published = publisher.await.map_err(io::Error::other)??;
        per_topic
            .iter_mut()
            .zip(&published.per_topic)
            .for_each(|(a, b)| *a += b);
        published_in_window += published.in_window;
        lag.merge(&published.lag);
    }
    let mut subscribers_of = vec![0u64; s.topics];
    (0..s.subscribers)
        .flat_map(|i| subscriber_topics(s, i))
        .for_each(|t| subscribers_of[t] += 1);
    let expected = per_topic
        .iter()
        .zip(&subscribers_of)
        .map(|(p, n)| p * n)
        .sum();
    drain(&shared, expected).await;
    let (from, to) = sampler.await.map_err(io::Error::other)?;
    let tallies = stop_readers(readers, &shared).await?;
    let mut report = Report::default();
    let window = s.duration - opts.warmup;
    report.delivered_per_s = report.add_tallies(&tallies, expected, &shared) as f64 / window;
    report.published_per_s = published_in_window as f64 / window;
    report.add_usage(&from, &to);
    report.add_lag(&lag);
    Ok(report)
}

/// `connections`: idle subscribers, then one publish per topic, timed until it reached all.
async fn run_idle(opts: &Options) -> io::Result<Report> {
    let s = &opts.scenario;
    prepare_topics(opts, s.topics).await?;
    let pid = opts.server_pid.map(|pid| pid.to_string());
    let before = pid.as_deref().and_then(proc_usage);
    let subscribers = open_subscribers(opts, s.subscribers, |i| subscriber_topics(s, i)).await?;
    let connected = pid.as_deref().and_then(proc_usage);
    let shared = Shared::new(0.0, f64::INFINITY);
    let readers = spawn_readers(subscribers, opts, &shared);
    let mut report = Report::default();
    if let (Some((rss0, _)), Some((rss1, _))) = (before, connected) {
        report.rss_per_connection_kib =
            Some(rss1.saturating_sub(rss0) as f64 / s.subscribers as f64);
    }
    let t0 = Instant::now();
    let mut link = PubLink::connect(opts).await?;
    for t in 0..s.topics {
        link.publish(&topic_name(t), 0, t as u64 + 1, shared.now_ns());
    }
    link.ping();
    link.flush().await?;
    let expected = s.subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    report.reach_all_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
    // Then a burst, and idle again: what each connection holds once the burst is over. The
    // broker hands freed pages back within a second or two of one.
    publish_rounds(
        &mut link,
        s.topics,
        BURST_ROUNDS,
        s.topics as u64 + 1,
        &shared,
    )
    .await?;
    let expected = expected * (1 + BURST_ROUNDS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pid.as_deref().and_then(proc_usage);
    if let (Some((rss0, _)), Some((rss2, _))) = (before, after) {
        report.rss_after_burst_per_connection_kib =
            Some(rss2.saturating_sub(rss0) as f64 / s.subscribers as f64);
    }
    let tallies = stop_readers(readers, &shared).await?;
    report.add_tallies(&tallies, expected, &shared);
    Ok(report)
}

/// `connections`' burst: events on every topic, round after round.
const BURST_ROUNDS: u64 = 50;

/// One event on every topic per round, each round confirmed (our acks, NATS's PONG) before
/// the next, so that the link never holds more than a round.
async fn publish_rounds(
    link: &mut PubLink,
    topics: usize,
    rounds: u64,
    first_seq: u64,
    shared: &Shared,
) -> io::Result<()> {
    let mut pending = Pending::new(topics);
    let mut seq = first_seq;
    for _ in 0..rounds {
        for t in 0..topics {
            let now = shared.now_ns();
            link.publish(&topic_name(t), 0, seq, now);
            pending.sent.push_back((t, now));
            seq += 1;
        }
        link.ping();
        link.flush().await?;
        while !pending.sent.is_empty() {
            link.fill().await?;
            link.replies(&mut pending, shared)?;
        }
    }
    Ok(())
}

// ---- mass-disconnect ----

/// Topic 0's subscribers (the crowd) leave at once while topic 1's publisher and subscriber
/// (the probe) go on; timed from the first close until the server has closed them all.
async fn run_mass_disconnect(opts: &Options) -> io::Result<Report> {
    prepare_topics(opts, 2).await?;
    let shared = Shared::new(f64::INFINITY, f64::INFINITY);
    let probe = open_subscriber(opts, &[1]).await?;
    let link = PubLink::connect(opts).await?;
    let fds_before = opts.server_pid.and_then(open_fds);
    let crowd = open_subscribers(opts, opts.scenario.subscribers, |_| vec![0]).await?;
    let crowd = detach(crowd)?;
    let readers = spawn_readers(vec![probe], opts, &shared);
    let (opts2, shared2) = (opts.clone(), Arc::clone(&shared));
    let publisher = tokio::spawn(run_publisher(link, vec![1], 0, opts2, shared2));
    // The steady state before the disconnect: its second half is the baseline.
    let warmup = Duration::from_secs_f64(opts.warmup.max(0.2));
    let baseline_from = shared.now_ns() + warmup.as_nanos() as u64 / 2;
    (shared.baseline_start_ns).store(baseline_from, Ordering::Relaxed);
    tokio::time::sleep(warmup).await;

    let d = disconnect(crowd, opts.server_pid, fds_before, &shared).await?;
    let published = publisher.await.map_err(io::Error::other)??;
    let expected = published.per_topic[1];
    drain(&shared, expected).await;
    let tallies = stop_readers(readers, &shared).await?;
    let mut report = Report::default();
    let window = d.to.at.duration_since(d.from.at).as_secs_f64().max(1e-9);
    report.delivered_per_s = report.add_tallies(&tallies, expected, &shared) as f64 / window;
    report.published_per_s = published.in_window as f64 / window;
    report.add_lag(&published.lag);
    report.add_usage(&d.from, &d.to);
    report.server_cpu_us_per_delivery = None;
    report.close_ms = Some(d.closed.as_secs_f64() * 1000.0);
    report.disconnect_ms = d.gone.map(|d| d.as_secs_f64() * 1000.0);
    if let (Some((_, c0)), Some((_, c1))) = (d.from.server, d.to.server) {
        report.disconnect_server_cpu_ms = Some((c1 - c0) as f64 / CLOCK_TICKS * 1000.0);
    }
    Ok(report)
}

/// The disconnect, as measured.
struct Disconnect {
    from: Sample,
    to: Sample,
    /// How long the generator took to close them all.
    closed: Duration,
    /// How long until the server had (`None`: no `--server-pid`, or not within 10 s).
    gone: Option<Duration>,
}

/// Closes the crowd and waits until the server has closed its side too (without
/// `--server-pid`: one second); the window is that time. Publishers stop 200 ms later.
async fn disconnect(
    crowd: Vec<std::net::TcpStream>,
    pid: Option<u32>,
    fds_before: Option<usize>,
    shared: &Shared,
) -> io::Result<Disconnect> {
    let from = sample(pid, shared);
    let start = shared.now_ns();
    shared.window_start_ns.store(start, Ordering::Relaxed);
    let t0 = Instant::now();
    let closer = std::thread::spawn(move || close_all(crowd));
    let gone = match (pid, fds_before) {
        (Some(pid), Some(before)) => wait_for_fds(pid, before, t0).await,
        _ => None,
    };
    while !closer.is_finished() || (gone.is_none() && t0.elapsed() < Duration::from_secs(1)) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let closed = closer
        .join()
        .map_err(|_| io::Error::other("the closing thread panicked"))?;
    let to = sample(pid, shared);
    let end = shared.now_ns();
    shared.window_end_ns.store(end, Ordering::Relaxed);
    shared
        .send_end_ns
        .store(end + 200_000_000, Ordering::Relaxed);
    Ok(Disconnect {
        from,
        to,
        closed,
        gone,
    })
}

/// The crowd's sockets, taken out of the runtime: they are closed from a thread of their own,
/// so that closing 10,000 of them does not hold up the probe's tasks.
fn detach(crowd: Vec<Subscriber>) -> io::Result<Vec<std::net::TcpStream>> {
    let mut sockets = Vec::with_capacity(crowd.len());
    for subscriber in crowd {
        if let Subscriber::Ws(ws) = subscriber {
            let socket = ws.stream.into_std()?;
            socket.set_nonblocking(false)?;
            sockets.push(socket);
        }
    }
    Ok(sockets)
}

/// Every socket sends a Close frame (1000, masked as a client must), then every one is closed;
/// the time that took.
fn close_all(sockets: Vec<std::net::TcpStream>) -> Duration {
    let t0 = Instant::now();
    let code = 1000u16.to_be_bytes();
    let frame = [
        0x80 | OP_CLOSE,
        0x80 | 2,
        MASK[0],
        MASK[1],
        MASK[2],
        MASK[3],
        code[0] ^ MASK[0],
        code[1] ^ MASK[1],
    ];
    for mut socket in &sockets {
        let _ = io::Write::write_all(&mut socket, &frame);
    }
    drop(sockets);
    t0.elapsed()
}

/// Waits (at most 10 s) until the server has no more open descriptors than `before`; the time
/// since `t0` when it had.
async fn wait_for_fds(pid: u32, before: usize, t0: Instant) -> Option<Duration> {
    while t0.elapsed() < Duration::from_secs(10) {
        if open_fds(pid)? <= before {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

// ---- the server's side, and the generator's: /proc ----

/// Clock ticks per second for /proc times (100 on Linux everywhere this runs).
const CLOCK_TICKS: f64 = 100.0;

/// Resident memory (KiB) and CPU time (user + system, in clock ticks) of a process (a pid, or
/// `self`).
fn proc_usage(pid: &str) -> Option<(u64, u64)> {
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

/// How many descriptors a process has open.
fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The server's and the generator's usage at one moment, with the deliveries so far.
struct Sample {
    at: Instant,
    server: Option<(u64, u64)>,
    generator: Option<(u64, u64)>,
    delivered: u64,
}

fn sample(pid: Option<u32>, shared: &Shared) -> Sample {
    Sample {
        at: Instant::now(),
        server: pid.and_then(|pid| proc_usage(&pid.to_string())),
        generator: proc_usage("self"),
        delivered: shared.delivered.load(Ordering::Relaxed),
    }
}

/// Samples at the window's edges.
async fn sample_window(pid: Option<u32>, shared: Arc<Shared>) -> (Sample, Sample) {
    let edge = |ns: &AtomicU64| shared.epoch + Duration::from_nanos(ns.load(Ordering::Relaxed));
    tokio::time::sleep_until(edge(&shared.window_start_ns).into()).await;
    let from = sample(pid, &shared);
    tokio::time::sleep_until(edge(&shared.window_end_ns).into()).await;
    (from, sample(pid, &shared))
}

// ---- output ----

fn target_name(target: Target) -> &'static str {
    match target {
        Target::Ours => "ours",
        Target::Nats => "nats",
    }
}

fn latency_json(l: &Latency) -> String {
    format!(
        r#"{{"p50":{},"p90":{},"p99":{},"p999":{},"max":{}}}"#,
        l.p50, l.p90, l.p99, l.p999, l.max
    )
}

fn json_line(opts: &Options, r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
    let mut out = format!(
        r#"{{"scenario":"{}","target":"{}","published_per_s":{:.0},"delivered_per_s":{:.0},"#,
        opts.scenario.name,
        target_name(opts.target),
        r.published_per_s,
        r.delivered_per_s
    );
    let _ = write!(
        out,
        r#""delivered":{},"delivery_ratio":{:.4},"dropped":{},"unaccounted":{},"#,
        r.delivered, r.delivery_ratio, r.dropped, r.unaccounted
    );
    let _ = write!(
        out,
        r#""order_violations":{},"duplicates":{},"slow_consumer_notices":{},"disconnected_subscribers":{},"#,
        r.order_violations, r.duplicates, r.slow_consumer_notices, r.disconnected_subscribers
    );
    let _ = write!(out, r#""latency_us":{},"#, latency_json(&r.latency));
    let _ = write!(out, r#""receive_clock":"{}","#, r.receive_clock);
    let figures = [
        ("send_lag_p99_us", r.send_lag_p99_us),
        ("send_lag_max_us", r.send_lag_max_us),
        ("server_rss_mib", r.server_rss_mib),
        ("server_cpu_us_per_delivery", r.server_cpu_us_per_delivery),
        ("server_cpu_cores", r.server_cpu_cores),
        ("generator_cpu_cores", r.generator_cpu_cores),
        ("rss_per_connection_kib", r.rss_per_connection_kib),
        (
            "rss_after_burst_per_connection_kib",
            r.rss_after_burst_per_connection_kib,
        ),
        ("reach_all_ms", r.reach_all_ms),
        ("close_ms", r.close_ms),
        ("disconnect_ms", r.disconnect_ms),
        ("disconnect_server_cpu_ms", r.disconnect_server_cpu_ms),
    ];
    for (key, value) in figures {
        let _ = write!(out, r#""{key}":{},"#, opt(value));
    }
    let baseline = r
        .baseline_latency
        .as_ref()
        .map_or("null".into(), latency_json);
    let _ = write!(out, r#""baseline_latency_us":{baseline}}}"#);
    out
}

fn table(r: &Report) -> String {
    let mut rows = count_rows(r);
    rows.extend(figure_rows(r));
    rows.iter()
        .map(|(k, v)| format!("  {k:<34} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What every scenario reports: rates, delivery and latency.
fn count_rows(r: &Report) -> Vec<(&'static str, String)> {
    let latency = |l: &Latency| format!("{}/{}/{}/{}/{} µs", l.p50, l.p90, l.p99, l.p999, l.max);
    let mut rows = vec![
        ("published/s", format!("{:.0}", r.published_per_s)),
        ("delivered/s", format!("{:.0}", r.delivered_per_s)),
        ("delivery ratio", format!("{:.4}", r.delivery_ratio)),
        (
            "dropped (reported) / unaccounted",
            format!("{} / {}", r.dropped, r.unaccounted),
        ),
        ("order violations", r.order_violations.to_string()),
        ("duplicates", r.duplicates.to_string()),
        ("slow-consumer notices", r.slow_consumer_notices.to_string()),
        (
            "disconnected subscribers",
            r.disconnected_subscribers.to_string(),
        ),
        ("latency p50/p90/p99/p99.9/max", latency(&r.latency)),
        ("  measured to", receipt(r.receive_clock).to_string()),
    ];
    if let Some(b) = &r.baseline_latency {
        rows.push(("  before the disconnect", latency(b)));
    }
    rows
}

fn receipt(clock: &str) -> &'static str {
    match clock {
        "kernel" => "the kernel's receive timestamp",
        _ => "the generator's read",
    }
}

/// The figures measured in this scenario (the others are left out).
fn figure_rows(r: &Report) -> Vec<(&'static str, String)> {
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.1} ms"));
    let lag =
        (r.send_lag_p99_us.zip(r.send_lag_max_us)).map(|(a, b)| format!("{a:.0} / {b:.0} µs"));
    let cpu = (r.server_cpu_cores.zip(r.generator_cpu_cores))
        .map(|(a, b)| format!("{a:.2} / {b:.2} cores"));
    [
        ("send lag p99 / max", lag),
        (
            "server RSS",
            r.server_rss_mib.map(|v| format!("{v:.1} MiB")),
        ),
        (
            "server CPU per delivery",
            r.server_cpu_us_per_delivery.map(|v| format!("{v:.3} µs")),
        ),
        ("server / generator CPU", cpu),
        (
            "server RSS per connection",
            r.rss_per_connection_kib.map(|v| format!("{v:.1} KiB")),
        ),
        (
            "the same after a burst",
            r.rss_after_burst_per_connection_kib
                .map(|v| format!("{v:.1} KiB")),
        ),
        ("time to reach all", ms(r.reach_all_ms)),
        ("generator closing them all", ms(r.close_ms)),
        ("until the server closed all", ms(r.disconnect_ms)),
        ("server CPU meanwhile", ms(r.disconnect_server_cpu_ms)),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v?)))
    .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The median of each figure over the runs (counts summed).
fn median_report(reports: &[Report]) -> Report {
    let pick = |f: &dyn Fn(&Report) -> f64| median(reports.iter().map(f).collect());
    let pick_opt = |f: &dyn Fn(&Report) -> Option<f64>| {
        let values: Vec<f64> = reports.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| median(values))
    };
    let sum = |f: &dyn Fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let latency = |f: &dyn Fn(&Report) -> Option<Latency>| {
        let l =
            |g: fn(&Latency) -> u64| pick_opt(&|r| f(r).map(|l| g(&l) as f64)).map(|v| v as u64);
        Some(Latency {
            p50: l(|l| l.p50)?,
            p90: l(|l| l.p90)?,
            p99: l(|l| l.p99)?,
            p999: l(|l| l.p999)?,
            max: l(|l| l.max)?,
        })
    };
    Report {
        published_per_s: pick(&|r| r.published_per_s),
        delivered_per_s: pick(&|r| r.delivered_per_s),
        delivered: sum(&|r| r.delivered),
        delivery_ratio: pick(&|r| r.delivery_ratio),
        dropped: sum(&|r| r.dropped),
        unaccounted: reports.iter().map(|r| r.unaccounted).sum(),
        order_violations: sum(&|r| r.order_violations),
        duplicates: sum(&|r| r.duplicates),
        slow_consumer_notices: sum(&|r| r.slow_consumer_notices),
        disconnected_subscribers: sum(&|r| r.disconnected_subscribers),
        latency: latency(&|r| Some(r.latency)).unwrap_or_default(),
        receive_clock: reports[0].receive_clock,
        send_lag_p99_us: pick_opt(&|r| r.send_lag_p99_us),
        send_lag_max_us: pick_opt(&|r| r.send_lag_max_us),
        server_rss_mib: pick_opt(&|r| r.server_rss_mib),
        server_cpu_us_per_delivery: pick_opt(&|r| r.server_cpu_us_per_delivery),
        server_cpu_cores: pick_opt(&|r| r.server_cpu_cores),
        generator_cpu_cores: pick_opt(&|r| r.generator_cpu_cores),
        rss_per_connection_kib: pick_opt(&|r| r.rss_per_connection_kib),
        rss_after_burst_per_connection_kib: pick_opt(&|r| r.rss_after_burst_per_connection_kib),
        reach_all_ms: pick_opt(&|r| r.reach_all_ms),
        close_ms: pick_opt(&|r| r.close_ms),
        disconnect_ms: pick_opt(&|r| r.disconnect_ms),
        disconnect_server_cpu_ms: pick_opt(&|r| r.disconnect_server_cpu_ms),
        baseline_latency: latency(&|r| r.baseline_latency),
    }
}

/// `--check`: what is wrong with a run, if anything.
fn check(opts: &Options, r: &Report) -> Result<(), String> {
    let mut wrong = Vec::new();
    if r.order_violations > 0 || r.duplicates > 0 {
        wrong.push("order violations or duplicates");
    }
    if r.disconnected_subscribers > 0 {
        wrong.push("subscribers were disconnected");
    }
    if r.delivered == 0 {
        wrong.push("nothing was delivered");
    }
    if r.unaccounted != 0 {
        wrong.push("expected deliveries neither delivered nor reported dropped");
    }
    if opts.scenario.kind == Kind::MassDisconnect
        && opts.server_pid.is_some()
        && r.disconnect_ms.is_none()
    {
        wrong.push("the server did not close the connections within 10 s");
    }
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(wrong.join("; ")),
    }
}

// ---- main ----

/// Raises the soft descriptor limit to the hard one (10,000 connections need more than the
/// usual 1,024), and the hard one too where allowed (root).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            let wanted = limit.rlim_max.max(65536);
            let raised = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: wanted,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

fn main() {
    let opts = match parse_options() {
        Ok(Some(opts)) => opts,
        Ok(None) => return,
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
    let (name, target) = (opts.scenario.name, opts.target);
    let mut reports = Vec::new();
    let mut failed = false;
    for run in 1..=opts.runs {
        let report = runtime.block_on(run_once(&opts)).unwrap_or_else(|e| {
            eprintln!("bench: run {run} failed: {e}");
            std::process::exit(1);
        });
        println!(
            "{name} against {target:?}, run {run} of {}:\n{}",
            opts.runs,
            table(&report)
        );
        println!("{}", json_line(&opts, &report));
        if let (true, Err(wrong)) = (opts.check, check(&opts, &report)) {
            eprintln!("bench --check: {name}, run {run}: {wrong}");
            failed = true;
        }
        reports.push(report);
    }
    if reports.len() > 1 {
        let m = median_report(&reports);
        let runs = reports.len();
        println!(
            "{name} against {target:?}, median of {runs} runs (counts summed):\n{}",
            table(&m)
        );
        println!(
            "{}",
            json_line(&opts, &m).replace(r#""scenario""#, r#""median":true,"scenario""#)
        );
    }
    if failed {
        std::process::exit(1);
    }
}
