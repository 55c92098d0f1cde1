//! Cluster mode (feature `cluster`, setting `NATS_URL`): several brokers behind one NATS
//! server with JetStream keep the same contract on every node — one order per topic, the same
//! `seq` and `epoch` everywhere, `last_n` and `since_seq` answered from any node.
//!
//! JetStream does the work no broker should reinvent. A topic is a stream of its own
//! (`t_<base32hex(name)>`, subject `t.<hex(name)>`) that keeps `REPLAY_SIZE` messages, drops
//! the oldest and denies deletes, so its stream sequence is dense and **is** the topic's `seq`.
//! The stream's creation time is the `epoch`. A publish is a JetStream publish with a
//! `Nats-Msg-Id` (retried once with the same id, so a retry never takes a second `seq`), and
//! the ack's sequence is the `seq` the client is told.
//!
//! Every stored message is republished by the stream, with its sequence in a header, on the
//! topic's live subject (`live.<hex(name)>`). A node follows each topic one of its clients
//! subscribed to: one core subscription to the live subject, whose messages enter the same
//! local `Topic` as in single-node mode (`Topic::admit`: its replay ring, which then mirrors
//! the stream's window, and its subscribers' drop-oldest queues). Duplicates are dropped by
//! `seq`; a gap is filled from the stream by sequence (direct get); what the stream no longer
//! holds is told to the subscribers as dropped, like any drop. Topics are created, deleted and
//! listed in JetStream; every node learns of them from the stream advisories.
//!
//! Nothing here runs on the single-node path: main.rs reaches this module through
//! `Engine::Cluster` alone.

use std::sync::OnceLock;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use futures_util::StreamExt;

use super::*;

/// How long one JetStream request (create, delete, info, direct get) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a publish waits for its ack, per attempt (there are two).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a subscribe waits for this node to catch up with the stream before it replays
/// what it has; anything later then arrives live, still in order.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// Direct gets in flight at once while a node fills a gap or warms its replay ring.
const FETCH_AHEAD: usize = 16;

/// Messages a live subscription buffers before the client drops them (counted as a gap and
/// filled from the stream, so a burst costs time, not events).
const LIVE_BUFFER: usize = 4096;

/// Accepts `nats://host:port` or `host:port`. Neither TLS (no crypto backend) nor NATS over
/// WebSocket is built in, so `tls://`, `ws://` and `wss://` are refused at start rather than
/// retried forever.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Ok(());
    }
    if let Some((scheme, _)) = url.split_once("://")
        && scheme != "nats"
    {
        return Err(format!(
            "only nats:// is built in (no TLS, no WebSocket), not {scheme}://"
        ));
    }
    url.parse::<async_nats::ServerAddr>()
        .map(|_| ())
        .map_err(|e| format!("not a NATS server address: {e}"))
}

pub(super) fn engine(config: &Config) -> Engine {
    match &config.nats_url {
        Some(url) => Engine::Cluster(Box::new(Cluster::new(url))),
        None => Engine::Local,
    }
}

/// The cluster side of a broker: its link to NATS and the topics this node follows.
pub(super) struct Cluster {
    url: String,
    /// `host:port` of the URL, for logs: a password in the URL is never printed.
    server: String,
    /// Set once by `start`; the client reconnects by itself from then on.
    link: OnceLock<Link>,
    /// This process among the nodes: the first half of every `Nats-Msg-Id` it sends and of
    /// the ids it assigns, so that two nodes never send the same one.
    node: u64,
    /// Publishes sent, the second half of those ids.
    sent: AtomicU64,
    /// Topic name → its feed on this node, for the topics that local clients subscribed to.
    feeds: DashMap<String, Feed>,
    /// Counts (re)connections to NATS: feeds and the registry compare themselves with
    /// JetStream again each time it moves.
    connected: watch::Sender<u64>,
    /// Whether the link is up, as the client's events tell it: a request in flight when it
    /// goes down is given up at once (`within`) rather than at its deadline.
    up: watch::Sender<bool>,
}

struct Link {
    client: Client,
    js: jetstream::Context,
}

/// One followed topic: the task that feeds it, and how far it got.
struct Feed {
    /// The incarnation followed (a re-created topic is another one).
    topic: Arc<Topic>,
    /// The next `seq` the local topic expects: everything before it has been admitted.
    progress: watch::Receiver<u64>,
    /// Asks the task to compare the topic with its stream now (a subscriber is waiting).
    poke: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

/// A topic's names in NATS. Subjects carry the name in hex, which keeps every topic name
/// (`.` included) one token long. Stream names are at most 255 characters (they name a
/// directory of the store), too few for the hex of a 128-character topic, so the stream is
/// named in base32hex instead: 205 characters at most, and lower case only, so that two
/// topics never share a directory on a case-insensitive file system.
struct Names {
    stream: String,
    subject: String,
    live: String,
}

/// The base32hex digits (RFC 4648), in lower case.
const BASE32: &[u8; 32] = b"0123456789abcdefghijklmnopqrstuv";

impl Names {
    fn of(topic: &str) -> Names {
        let mut hex = String::with_capacity(topic.len() * 2);
        for b in topic.bytes() {
            let _ = write!(hex, "{b:02x}");
        }
        let mut stream = String::with_capacity(2 + topic.len() * 8 / 5 + 1);
        stream.push_str("t_");
        let (mut acc, mut bits) = (0u32, 0u32);
        for b in topic.bytes() {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                stream.push(BASE32[(acc >> bits) as usize & 31] as char);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            stream.push(BASE32[(acc << (5 - bits)) as usize & 31] as char);
        }
        Names {
            stream,
            subject: format!("t.{hex}"),
            live: format!("live.{hex}"),
        }
    }

    /// The topic a stream holds, for the streams this broker made (`None` for any other).
    fn topic_of(stream: &str) -> Option<String> {
        let digits = stream.strip_prefix("t_")?;
        let (mut acc, mut bits) = (0u32, 0u32);
        let mut bytes = Vec::with_capacity(digits.len() * 5 / 8);
        for c in digits.bytes() {
            let value = BASE32.iter().position(|&d| d == c)? as u32;
            acc = (acc << 5) | value;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                bytes.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        let name = String::from_utf8(bytes).ok()?;
        check_topic_name(&name).ok()?;
        // Only the canonical spelling: no two stream names map to one topic.
        (Names::of(&name).stream == stream).then_some(name)
    }
}

/// A stream's creation time as an `epoch`: nanoseconds since 1970, in decimal.
fn epoch_of(info: &stream::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}

/// Whether epoch `a` is a later incarnation than `b`.
fn later(a: &str, b: &str) -> bool {
    a.parse::<i128>().unwrap_or(0) > b.parse::<i128>().unwrap_or(0)
}

/// What a stored message holds: `<ts millis>\n<id, a JSON string>\n<payload JSON>`. A JSON
/// string cannot hold a raw line break, so the first two split it unambiguously.
fn encode(millis: u64, id: &str, payload: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(24 + id.len() + payload.len());
    push_u64(&mut body, millis);
    body.push(b'\n');
    body.extend_from_slice(id.as_bytes());
    body.push(b'\n');
    body.extend_from_slice(payload.as_bytes());
    body
}

fn decode_body(body: &[u8]) -> Option<(u64, &str, &str)> {
    let text = std::str::from_utf8(body).ok()?;
    let (millis, rest) = text.split_once('\n')?;
    let (id, payload) = rest.split_once('\n')?;
    Some((millis.parse().ok()?, id, payload))
}

/// The broker's cluster, when it runs in cluster mode.
fn cluster_of(broker: &Broker) -> Option<&Cluster> {
    match &broker.engine {
        Engine::Cluster(cluster) => Some(cluster),
        Engine::Local => None,
    }
}

/// `INTERNAL`, 503 over REST: the cluster could not be reached, so nothing was done (or, for
/// a publish that timed out twice, it is not known to have been).
fn unavailable(why: impl std::fmt::Display) -> Reject {
    Reject {
        code: "INTERNAL",
        message: format!("cluster unavailable: {why}"),
        status: 503,
    }
}

/// Why a JetStream lookup of a topic gave no stream.
enum Lookup {
    Missing,
    Failed(String),
}

/// Connects in the background (a node starts whether or not NATS is up yet) and starts the
/// registry, which mirrors JetStream's topics into the local one.
pub(super) fn start(broker: &Arc<Broker>) {
    let Some(cluster) = cluster_of(broker) else {
        return;
    };
    let connected = cluster.connected.clone();
    let up = cluster.up.clone();
    let options = ConnectOptions::new()
        .name(format!("pubsub-{:x}", cluster.node))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .subscription_capacity(LIVE_BUFFER)
        // The first attempt at once, then 0.1 s more per attempt, up to a second apart.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts.saturating_sub(1) as u64 * 100).min(1000))
        })
        .event_callback(move |event| {
            let (connected, up) = (connected.clone(), up.clone());
            async move {
                match event {
                    async_nats::Event::Connected => {
                        up.send_replace(true);
                        connected.send_modify(|n| *n += 1);
                    }
                    async_nats::Event::Disconnected => {
                        up.send_replace(false);
                    }
                    _ => {}
                }
            }
        });
    let broker = Arc::clone(broker);
    tokio::spawn(async move {
        let Some(cluster) = cluster_of(&broker) else {
            return;
        };
        let client = match options.connect(cluster.url.as_str()).await {
            Ok(client) => client,
            Err(e) => {
                log!(
                    broker,
                    Level::Error,
                    "cluster: cannot use {}: {e}",
                    cluster.server
                );
                return;
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        if cluster.link.set(Link { client, js }).is_err() {
            return;
        }
        log!(broker, Level::Info, "cluster: NATS at {}", cluster.server);
        registry(broker).await;
    });
}

/// Keeps the local registry equal to JetStream's set of topics: all of it at every
/// (re)connection, then each creation and deletion as its advisory arrives.
async fn registry(broker: Arc<Broker>) {
    let Some(cluster) = cluster_of(&broker) else {
        return;
    };
    let Some(link) = cluster.link.get() else {
        return;
    };
    let mut connected = cluster.connected.subscribe();
    let subscribed = timeout(
        REQUEST_TIMEOUT,
        link.client.subscribe("$JS.EVENT.ADVISORY.STREAM.*.*"),
    )
    .await;
    let subscribed = subscribed
        .map_err(|_| "timed out".to_string())
        .and_then(|result| result.map_err(|e| e.to_string()));
    let mut advisories = match subscribed {
        Ok(subscriber) => subscriber,
        Err(e) => {
            log!(
                broker,
                Level::Error,
                "cluster: cannot follow advisories: {e}"
            );
            return;
        }
    };
    // The first connection may have come before `connected` was watched.
    cluster.reconcile(&broker).await;
    loop {
        tokio::select! {
            changed = connected.changed() => {
                if changed.is_err() {
                    return;
                }
                log!(broker, Level::Info, "cluster: connected to {}", cluster.server);
                cluster.reconcile(&broker).await;
            }
            advisory = advisories.next() => {
                let Some(advisory) = advisory else { return };
                let mut tokens = advisory.subject.as_str().rsplit('.');
                let (Some(stream), Some(action)) = (tokens.next(), tokens.next()) else {
                    continue;
                };
                let Some(name) = Names::topic_of(stream) else { continue };
                // Either way JetStream is asked what holds now: an advisory may arrive after
                // this node already acted on a later change (its own delete and re-create).
                if matches!(action, "CREATED" | "DELETED") {
                    let _ = cluster.lookup(&broker, &name).await;
                }
            }
        }
    }
}

impl Cluster {
    fn new(url: &str) -> Cluster {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let server = url.parse::<async_nats::ServerAddr>().map_or_else(
            |_| "the NATS server".to_string(),
            |addr| format!("{}:{}", addr.host(), addr.port()),
        );
        Cluster {
            url: url.to_string(),
            server,
            link: OnceLock::new(),
            node: mix(nanos ^ (u64::from(std::process::id()) << 32)),
            sent: AtomicU64::new(0),
            feeds: DashMap::new(),
            connected: watch::Sender::new(0),
            up: watch::Sender::new(false),
        }
    }

    /// The link, if connected now.
    fn link(&self) -> Result<&Link, Reject> {
        let link = self
            .link
            .get()
            .ok_or_else(|| unavailable("not connected to NATS yet"))?;
        match link.client.connection_state() {
            async_nats::connection::State::Connected => Ok(link),
            _ => Err(unavailable("not connected to NATS")),
        }
    }

    /// Runs one request to NATS within `limit`, and gives it up at once if the connection goes
    /// down meanwhile: its answer can no longer come, and the client should not wait for the
    /// deadline to learn that.
    async fn within<T>(
        &self,
        limit: Duration,
        request: impl Future<Output = T>,
    ) -> Result<T, String> {
        let mut up = self.up.subscribe();
        let lost = async {
            while up.changed().await.is_ok() {
                if !*up.borrow() {
                    break;
                }
            }
        };
        tokio::select! {
            answer = timeout(limit, request) => {
                answer.map_err(|_| format!("no answer within {} ms", limit.as_millis()))
            }
            () = lost => Err("the connection to NATS was lost".into()),
        }
    }

    /// Every stream JetStream holds, page by page, stopping at the first error.
    async fn streams(&self, link: &Link) -> Result<Vec<stream::Info>, String> {
        let listing = async {
            let mut streams = link.js.streams();
            let mut infos = Vec::new();
            while let Some(info) = streams.next().await {
                infos.push(info.map_err(|e| e.to_string())?);
            }
            Ok(infos)
        };
        self.within(REQUEST_TIMEOUT * 4, listing).await?
    }

    /// Makes `name` of `epoch` the local topic of that name: creates it, or replaces an
    /// older incarnation (whose subscribers are told it was deleted). An older `epoch` than
    /// the one held is stale news and changes nothing.
    fn adopt(&self, broker: &Broker, name: &str, epoch: String) -> Arc<Topic> {
        let replaced;
        let topic = match broker.topics.entry(name.to_string()) {
            Entry::Occupied(slot) if !later(&epoch, &slot.get().epoch) => {
                return Arc::clone(slot.get());
            }
            Entry::Occupied(mut slot) => {
                let topic = incarnate(broker, name, epoch);
                replaced = Some(slot.insert(Arc::clone(&topic)));
                topic
            }
            Entry::Vacant(slot) => {
                broker.topic_count.fetch_add(1, Ordering::AcqRel);
                let topic = incarnate(broker, name, epoch);
                slot.insert(Arc::clone(&topic));
                replaced = None;
                topic
            }
        };
        if let Some(old) = replaced {
            self.unfollow(&old);
            for outbox in old.close() {
                outbox.topic_deleted(&old.shared);
            }
        }
        topic
    }

    /// Removes this incarnation of a topic (deleted in JetStream) and tells its subscribers.
    fn retire(&self, broker: &Broker, topic: &Arc<Topic>) {
        self.unfollow(topic);
        if broker
            .topics
            .remove_if(&topic.name, |_, held| Arc::ptr_eq(held, topic))
            .is_none()
        {
            return;
        }
        broker.topic_count.fetch_sub(1, Ordering::AcqRel);
        for outbox in topic.close() {
            outbox.topic_deleted(&topic.shared);
        }
    }

    /// Asks JetStream about a topic: adopts the incarnation it holds, or retires the one
    /// held here if it holds none. Only what was held before asking is retired, so a topic
    /// created on this node meanwhile is left alone.
    async fn lookup(&self, broker: &Broker, name: &str) -> Result<Arc<Topic>, Lookup> {
        let link = self.link().map_err(|e| Lookup::Failed(e.message))?;
        let names = Names::of(name);
        let held = broker.topic(name);
        let found = self.within(REQUEST_TIMEOUT, link.js.get_stream(&names.stream));
        match found.await.map_err(Lookup::Failed)? {
            Ok(stream) => Ok(self.adopt(broker, name, epoch_of(stream.cached_info()))),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    if let Some(topic) = held {
                        self.retire(broker, &topic);
                    }
                    Err(Lookup::Missing)
                }
                _ => Err(Lookup::Failed(e.to_string())),
            },
        }
    }

    /// The topic a subscribe or publish names: held here, or found in (or, with
    /// `AUTO_CREATE`, created in) JetStream.
    async fn topic(&self, broker: &Broker, name: &str) -> Result<Arc<Topic>, Reject> {
        if let Some(topic) = broker.topic(name) {
            return Ok(topic);
        }
        match self.lookup(broker, name).await {
            Ok(topic) => Ok(topic),
            Err(Lookup::Failed(why)) => Err(unavailable(why)),
            Err(Lookup::Missing) if !broker.config.auto_create => Err(topic_not_found(name)),
            Err(Lookup::Missing) => match self.create(broker, name).await {
                Ok(topic) => Ok(topic),
                Err(Creation::Exists) => self
                    .lookup(broker, name)
                    .await
                    .map_err(|_| topic_not_found(name)),
                Err(Creation::Full) => Err(too_many_topics(broker.config.max_topics)),
                Err(Creation::Failed(e)) => Err(e),
            },
        }
    }

    /// Creates the topic's stream. The description names this node and a counter, so that
    /// two nodes creating the same topic at once do not both succeed (JetStream treats an
    /// identical configuration as the same create): the second gets `TOPIC_EXISTS`.
    async fn create(&self, broker: &Broker, name: &str) -> Result<Arc<Topic>, Creation> {
        if broker.topic_count.load(Ordering::Acquire) >= broker.config.max_topics {
            return Err(Creation::Full);
        }
        let link = self.link().map_err(Creation::Failed)?;
        let names = Names::of(name);
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let config = stream::Config {
            name: names.stream.clone(),
            description: Some(format!("pubsub topic {name} ({:x}-{n})", self.node)),
            subjects: vec![names.subject.clone()],
            // A stream with 0 keeps everything; the ring may be 0, the stream keeps one.
            max_messages: broker.config.replay_size.max(1) as i64,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            allow_direct: true,
            deny_delete: true,
            republish: Some(stream::Republish {
                source: names.subject.clone(),
                destination: names.live.clone(),
                headers_only: false,
            }),
            ..Default::default()
        };
        let created = self.within(REQUEST_TIMEOUT, link.js.create_stream(config));
        match created
            .await
            .map_err(|why| Creation::Failed(unavailable(why)))?
        {
            Ok(stream) => Ok(self.adopt(broker, name, epoch_of(stream.cached_info()))),
            Err(e) => match e.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
                {
                    Err(Creation::Exists)
                }
                _ => Err(Creation::Failed(unavailable(e))),
            },
        }
    }

    async fn delete(&self, broker: &Broker, name: &str) -> Result<(), Reject> {
        let link = self.link()?;
        let names = Names::of(name);
        let held = broker.topic(name);
        let result = self
            .within(REQUEST_TIMEOUT, link.js.delete_stream(&names.stream))
            .await
            .map_err(unavailable)?;
        let gone = match &result {
            Ok(_) => true,
            Err(e) => matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(err)
                    if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ),
        };
        if gone && let Some(topic) = held {
            self.retire(broker, &topic);
        }
        match result {
            Ok(_) => Ok(()),
            Err(_) if gone => Err(topic_not_found(name)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A publish, from a WebSocket or REST client: JetStream assigns the `seq`. The event
    /// reaches this node's subscribers through the topic's feed, like everyone else's.
    pub(super) async fn publish<'a>(
        &self,
        broker: &Broker,
        name: &str,
        id: Option<&'a str>,
        payload: &str,
    ) -> Result<Published<'a>, Reject> {
        let topic = self.topic(broker, name).await?;
        let link = self.link()?;
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let message_id = format!("{}-{n}", self.node);
        let (id, id_text) = match id {
            Some(raw) => (MessageId::Given(raw), Cow::Borrowed(raw)),
            None => (
                MessageId::Assigned(self.node, n),
                Cow::Owned(format!("\"{message_id}\"")),
            ),
        };
        let ts = Timestamp::now();
        let body = encode(ts.millis, &id_text, payload);
        let subject = Names::of(name).subject;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id.as_str());
        let mut last_error = String::new();
        for _attempt in 0..2 {
            let sent = self
                .within(PUBLISH_TIMEOUT, async {
                    link.js
                        .publish_with_headers(subject.clone(), headers.clone(), body.clone().into())
                        .await?
                        .await
                })
                .await;
            match sent {
                Ok(Ok(ack)) => {
                    return Ok(Published {
                        id,
                        seq: ack.sequence,
                        ts,
                    });
                }
                Ok(Err(e)) if e.kind() == PublishErrorKind::StreamNotFound => {
                    self.retire(broker, &topic);
                    return Err(topic_not_found(name));
                }
                // The same `Nats-Msg-Id` again: if the first one was stored after all, the
                // stream answers with its `seq` instead of storing it twice.
                Ok(Err(e)) if e.kind() == PublishErrorKind::TimedOut => {
                    last_error = e.to_string();
                }
                Err(why) => last_error = why,
                // nats-server's `max_payload` (1 MiB unless configured) is below this
                // broker's MAX_MESSAGE_BYTES.
                Ok(Err(e)) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(reject("LIMIT_EXCEEDED", format!("refused by NATS: {e}")));
                }
                Ok(Err(e)) => return Err(unavailable(e)),
            }
            if link.client.connection_state() != async_nats::connection::State::Connected {
                break;
            }
        }
        Err(unavailable(format!(
            "the publish was not acknowledged ({last_error}); it may or may not have been stored"
        )))
    }

    /// The topic a subscriber joins, followed by this node and caught up with its stream, so
    /// that its replay is what the stream holds now, whichever node the events came from.
    pub(super) async fn follow(
        &self,
        broker: &Arc<Broker>,
        name: &str,
    ) -> Result<Arc<Topic>, Reject> {
        let mut topic = self.topic(broker, name).await?;
        let followed = self
            .feeds
            .get(name)
            .is_some_and(|feed| Arc::ptr_eq(&feed.topic, &topic) && !feed.task.is_finished());
        let (mut progress, mut poke) = self.feed(broker, &topic);
        let link = match self.link() {
            Ok(link) => link,
            // Followed already: serve what this node has; the feed catches up on reconnect.
            Err(_) if followed => return Ok(topic),
            Err(e) => return Err(e),
        };
        let names = Names::of(name);
        let stream = self
            .within(REQUEST_TIMEOUT, link.js.get_stream(&names.stream))
            .await;
        let info = match stream {
            Ok(Ok(stream)) => stream.cached_info().clone(),
            Ok(Err(_)) | Err(_) => {
                // Gone, or unreachable: the lookup says which.
                return match self.lookup(broker, name).await {
                    Err(Lookup::Missing) => Err(topic_not_found(name)),
                    _ => Err(unavailable("cannot read the topic's stream")),
                };
            }
        };
        if epoch_of(&info) != topic.epoch {
            // Deleted and re-created while this node held the old one: join the new one.
            topic = self.adopt(broker, name, epoch_of(&info));
            (progress, poke) = self.feed(broker, &topic);
        }
        let last = info.state.last_sequence;
        if *progress.borrow() <= last {
            poke.notify_one();
            let caught_up = progress.wait_for(|next| *next > last);
            if timeout(SYNC_TIMEOUT, caught_up).await.is_err() {
                log!(
                    broker,
                    Level::Warn,
                    "cluster: '{name}' not caught up with seq {last}"
                );
            }
        }
        Ok(topic)
    }

    /// The feed of `topic` on this node, started if it has none.
    fn feed(
        &self,
        broker: &Arc<Broker>,
        topic: &Arc<Topic>,
    ) -> (watch::Receiver<u64>, Arc<Notify>) {
        let mut slot = self
            .feeds
            .entry(topic.name.clone())
            .or_insert_with(|| Feed::start(broker, topic));
        if !Arc::ptr_eq(&slot.topic, topic) || slot.task.is_finished() {
            slot.task.abort();
            *slot = Feed::start(broker, topic);
        }
        (slot.progress.clone(), Arc::clone(&slot.poke))
    }

    fn unfollow(&self, topic: &Arc<Topic>) {
        if let Some((_, feed)) = self
            .feeds
            .remove_if(&topic.name, |_, feed| Arc::ptr_eq(&feed.topic, topic))
        {
            feed.task.abort();
        }
    }

    /// Compares every local topic with JetStream's: adopts the missing and the re-created,
    /// retires the deleted. Feeds compare their own `(epoch, last seq)` on the same signal.
    async fn reconcile(&self, broker: &Broker) {
        let Ok(link) = self.link() else { return };
        // Only topics held before the listing can be stale: one created since is not in it.
        let held: Vec<Arc<Topic>> = broker
            .topics
            .iter()
            .map(|entry| Arc::clone(entry.value()))
            .collect();
        let listed = match self.streams(link).await {
            Ok(listed) => listed,
            Err(why) => {
                log!(
                    broker,
                    Level::Warn,
                    "cluster: listing the topics failed: {why}"
                );
                return;
            }
        };
        let mut seen = HashSet::new();
        for info in listed {
            if let Some(name) = Names::topic_of(&info.config.name) {
                self.adopt(broker, &name, epoch_of(&info));
                seen.insert(name);
            }
        }
        for topic in held.iter().filter(|topic| !seen.contains(&topic.name)) {
            self.retire(broker, topic);
        }
        log!(
            broker,
            Level::Info,
            "cluster: {} topic(s) in JetStream",
            seen.len()
        );
    }

    /// The topics JetStream holds, with this node's counts: `GET /topics` and `GET /stats`.
    async fn listing(&self, broker: &Broker) -> Result<Vec<(String, stream::State)>, Reject> {
        let link = self.link()?;
        let listed = self.streams(link).await.map_err(unavailable)?;
        let mut topics = Vec::new();
        for info in listed {
            if let Some(name) = Names::topic_of(&info.config.name) {
                if broker
                    .topic(&name)
                    .is_none_or(|t| t.epoch != epoch_of(&info))
                {
                    self.adopt(broker, &name, epoch_of(&info));
                }
                topics.push((name, info.state));
            }
        }
        topics.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(topics)
    }

    /// The REST routes that go to JetStream in cluster mode; the rest are the single-node ones.
    pub(super) async fn rest(
        &self,
        broker: &Broker,
        request: &Request,
        body: &[u8],
        ip: IpAddr,
    ) -> Answer {
        let route = Route::parse(&request.path);
        let response = match (route, request.method.as_str()) {
            (Some(Route::Topics), "GET") => self.list_topics(broker).await,
            (Some(Route::Topics), "POST") => self.create_topic(broker, body).await,
            (Some(Route::Topic(name)), "DELETE") => match check_topic_name(name) {
                Err(why) => bad_request(&why),
                Ok(()) => match self.delete(broker, name).await {
                    Ok(()) => Response::json(200, |json| {
                        json.plain("status", "deleted").plain("topic", name).end()
                    }),
                    Err(e) => Response::reject(e),
                },
            },
            (Some(Route::Messages(name)), "POST") => match broker.rest_publish_allowed(ip) {
                Ok(()) => self.publish_message(broker, name, body).await,
                Err(wait) => too_many_requests(wait),
            },
            (Some(Route::Stats), "GET") => self.stats(broker).await,
            _ => return super::rest(broker, request, body, ip),
        };
        Answer::Respond(response)
    }

    async fn create_topic(&self, broker: &Broker, body: &[u8]) -> Response {
        let name = match new_topic_name(body) {
            Ok(name) => name,
            Err(response) => return response,
        };
        match self.create(broker, &name).await {
            Ok(_) => topic_created(&name),
            Err(Creation::Exists) => topic_exists(&name),
            Err(Creation::Full) => Response::reject(too_many_topics(broker.config.max_topics)),
            Err(Creation::Failed(e)) => Response::reject(e),
        }
    }

    async fn publish_message(&self, broker: &Broker, name: &str, body: &[u8]) -> Response {
        let (id, payload) = match publish_body(name, body) {
            Ok(message) => message,
            Err(response) => return response,
        };
        match self.publish(broker, name, id, payload).await {
            Ok(published) => message_published(name, &published),
            Err(e) => Response::reject(e),
        }
    }

    async fn list_topics(&self, broker: &Broker) -> Response {
        let topics = match self.listing(broker).await {
            Ok(topics) => topics,
            Err(e) => return Response::reject(e),
        };
        topic_list(topics.iter().map(|(name, _)| {
            let subscribers = broker.topic(name).map_or(0, |t| t.subscriber_count());
            (name.as_str(), subscribers)
        }))
    }

    /// `messages` is the stream's last `seq` (every message ever published to this
    /// incarnation, from any node); `subscribers` and `dropped` are this node's.
    async fn stats(&self, broker: &Broker) -> Response {
        let topics = match self.listing(broker).await {
            Ok(topics) => topics,
            Err(e) => return Response::reject(e),
        };
        topic_stats(topics.iter().map(|(name, state)| {
            let local = broker.topic(name);
            let counts = [
                state.last_sequence,
                local.as_ref().map_or(0, |t| t.subscriber_count() as u64),
                local.map_or(0, |t| t.shared.dropped.load(Ordering::Acquire)),
            ];
            (name.as_str(), counts)
        }))
    }
}

/// Why a topic's stream was not created.
enum Creation {
    Exists,
    Full,
    Failed(Reject),
}

/// A local topic for a stream of the cluster: its `epoch` is the stream's, and its clock
/// starts at zero, so the first events it admits keep the `ts` their publisher gave them.
fn incarnate(broker: &Broker, name: &str, epoch: String) -> Arc<Topic> {
    let mut topic = Topic::new(
        name,
        0,
        broker.config.replay_size,
        Arc::clone(&broker.budget),
    );
    topic.epoch = epoch;
    topic.lock().last_ts = Timestamp::format(0);
    Arc::new(topic)
}

/// splitmix64's finalizer: spreads a clock reading and a PID over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Feed {
    fn start(broker: &Arc<Broker>, topic: &Arc<Topic>) -> Feed {
        let (tx, progress) = watch::channel(topic.lock().next_seq);
        let poke = Arc::new(Notify::new());
        let follower = Follower {
            topic: Arc::clone(topic),
            progress: tx,
            replay_size: broker.config.replay_size.max(1) as u64,
            stream: None,
        };
        let task = tokio::spawn(follower.run(Arc::clone(broker), Arc::clone(&poke)));
        Feed {
            topic: Arc::clone(topic),
            progress,
            poke,
            task: task.abort_handle(),
        }
    }
}

/// The task behind a feed: moves one topic's messages, in `seq` order, from NATS into the
/// local topic.
struct Follower {
    topic: Arc<Topic>,
    progress: watch::Sender<u64>,
    /// What the stream keeps: a gap wider than this cannot be filled anyway.
    replay_size: u64,
    /// The stream, once read: direct gets go through it.
    stream: Option<jetstream::stream::Stream>,
}

/// Why a follower stops.
enum Stop {
    /// The topic was deleted (or re-created): this incarnation is over.
    Gone,
    /// NATS did not answer; the next (re)connection or subscriber tries again.
    Unreachable(String),
}

impl Follower {
    fn next(&self) -> u64 {
        *self.progress.borrow()
    }

    async fn run(mut self, broker: Arc<Broker>, poke: Arc<Notify>) {
        let Some(cluster) = cluster_of(&broker) else {
            return;
        };
        let Some(link) = cluster.link.get() else {
            return;
        };
        let names = Names::of(&self.topic.name);
        let mut connected = cluster.connected.subscribe();
        // Subscribed before the stream is read, so nothing falls between the two.
        let subscribed = timeout(REQUEST_TIMEOUT, link.client.subscribe(names.live.clone())).await;
        let mut live = match subscribed {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => {
                log!(
                    broker,
                    Level::Warn,
                    "cluster: cannot follow '{}': {e}",
                    self.topic.name
                );
                return;
            }
            // The next subscriber starts it again.
            Err(_) => return,
        };
        let mut stale = true;
        loop {
            if stale {
                match self.catch_up(&broker, cluster, link, &names).await {
                    Ok(()) => {
                        stale = false;
                        log!(
                            broker,
                            Level::Debug,
                            "cluster: '{}' caught up to seq {}",
                            self.topic.name,
                            self.next() - 1
                        );
                    }
                    Err(Stop::Gone) => return,
                    Err(Stop::Unreachable(why)) => {
                        log!(broker, Level::Warn, "cluster: '{}': {why}", self.topic.name);
                    }
                }
            }
            tokio::select! {
                message = live.next() => {
                    let Some(message) = message else { return };
                    let seq = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Sequence"))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    let Some(seq) = seq else { continue };
                    if seq < self.next() {
                        continue;
                    }
                    if seq > self.next() {
                        match self.fill(&broker, cluster, seq - 1).await {
                            Ok(()) => {}
                            Err(Stop::Gone) => return,
                            // This message is fetched with the gap, next time.
                            Err(Stop::Unreachable(_)) => {
                                stale = true;
                                continue;
                            }
                        }
                    }
                    if self.admit(&broker, seq, &message.payload).is_err() {
                        return;
                    }
                }
                _ = poke.notified() => stale = true,
                changed = connected.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    stale = true;
                }
            }
        }
    }

    /// Compares the topic with its stream — the same incarnation (`epoch`)? how far is it
    /// (last `seq`)? — and fetches what this node has not seen.
    async fn catch_up(
        &mut self,
        broker: &Broker,
        cluster: &Cluster,
        link: &Link,
        names: &Names,
    ) -> Result<(), Stop> {
        let stream = match cluster
            .within(REQUEST_TIMEOUT, link.js.get_stream(&names.stream))
            .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                if let jetstream::context::GetStreamErrorKind::JetStream(err) = e.kind()
                    && err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                {
                    cluster.retire(broker, &self.topic);
                    return Err(Stop::Gone);
                }
                return Err(Stop::Unreachable(e.to_string()));
            }
            Err(why) => return Err(Stop::Unreachable(why)),
        };
        let info = stream.cached_info();
        if epoch_of(info) != self.topic.epoch {
            cluster.adopt(broker, &self.topic.name, epoch_of(info));
            return Err(Stop::Gone);
        }
        let last = info.state.last_sequence;
        self.stream = Some(stream);
        self.fill(broker, cluster, last).await
    }

    /// Fetches and admits every message up to `upto` that the local topic has not seen; what
    /// the stream no longer holds is skipped, and counted as dropped for the subscribers.
    async fn fill(&mut self, broker: &Broker, cluster: &Cluster, upto: u64) -> Result<(), Stop> {
        let Some(stream) = self.stream.clone() else {
            return Err(Stop::Unreachable("the stream was not read yet".into()));
        };
        let oldest_kept = upto.saturating_sub(self.replay_size - 1).max(1);
        if self.next() < oldest_kept {
            self.skip_to(oldest_kept);
        }
        let from = self.next();
        if from > upto {
            return Ok(());
        }
        let mut fetched = futures_util::stream::iter(from..=upto)
            .map(|seq| {
                let stream = &stream;
                async move {
                    (
                        seq,
                        cluster
                            .within(REQUEST_TIMEOUT, stream.direct_get(seq))
                            .await,
                    )
                }
            })
            .buffered(FETCH_AHEAD);
        while let Some((seq, got)) = fetched.next().await {
            match got {
                Ok(Ok(message)) => self.admit(broker, seq, &message.payload)?,
                Ok(Err(e)) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                    self.skip_to(seq + 1);
                }
                Ok(Err(e)) => return Err(Stop::Unreachable(e.to_string())),
                Err(why) => return Err(Stop::Unreachable(why)),
            }
        }
        Ok(())
    }

    fn admit(&mut self, broker: &Broker, seq: u64, body: &[u8]) -> Result<(), Stop> {
        let Some((millis, id, payload)) = decode_body(body) else {
            log!(
                broker,
                Level::Warn,
                "cluster: '{}' seq {seq} is not ours; skipped",
                self.topic.name
            );
            self.skip_to(seq + 1);
            return Ok(());
        };
        // What the event will cost, made room for before it is drafted.
        let _ = broker.make_room(
            std::mem::size_of::<Event>() + event_capacity(&self.topic.name, id.len(), payload),
        );
        if !self.topic.admit(seq, millis, id, payload) {
            return Err(Stop::Gone);
        }
        self.progress.send_replace(seq + 1);
        Ok(())
    }

    fn skip_to(&mut self, seq: u64) {
        self.topic.skip_to(seq);
        self.progress.send_replace(seq);
    }
}

impl Topic {
    /// Enters an event the cluster numbered into the local fan-out: the same ordering point,
    /// ring and queues as `publish`, with `seq` and `ts` given instead of assigned. Called by
    /// the topic's one follower, in `seq` order; false once the topic is deleted.
    fn admit(&self, seq: u64, millis: u64, id: &str, payload: &str) -> bool {
        let stamped = Timestamp::format(millis);
        let mut event = Event::draft(&self.shared, &self.name, MessageId::Given(id), payload);
        let mut state = self.lock();
        if self.is_deleted() {
            return false;
        }
        if seq != state.next_seq {
            return true;
        }
        state.next_seq = seq + 1;
        self.published.store(seq, Ordering::Release);
        let ts = state.stamp(stamped);
        self.shared.budget.charge(event.footprint());
        Event::seal(&mut event, seq, ts);
        let evicted = self.deliver(&mut state, vec![event]);
        drop(state);
        drop(evicted);
        true
    }

    /// Moves the topic on to `seq` past events it will never get (the stream no longer holds
    /// them): each subscriber is told they were dropped, as for any drop. The ring is emptied
    /// so that it keeps consecutive `seq`s; `since_seq` then counts the skipped as `missed`.
    fn skip_to(&self, seq: u64) {
        let mut state = self.lock();
        if seq <= state.next_seq {
            return;
        }
        let missed = seq - state.next_seq;
        state.next_seq = seq;
        self.published.store(seq - 1, Ordering::Release);
        let ring = std::mem::take(&mut state.ring);
        let subscribers = self.subscribers.load();
        for outbox in subscribers.iter().chain(&state.joined) {
            if !state.left.contains(&address(outbox)) {
                outbox.dropped.fetch_add(missed, Ordering::AcqRel);
                self.shared.dropped.fetch_add(missed, Ordering::Relaxed);
                outbox.wake();
            }
        }
        drop(state);
        drop(ring);
    }
}
