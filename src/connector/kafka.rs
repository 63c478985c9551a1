//! Kafka sources: topics read with rdkafka, positions committed with the
//! views.
//!
//! A Kafka partition is an append-only log addressed by offset — the same
//! shape as a generator (see [`crate::connector`]), with one offset per
//! partition instead of one per source. A source's position is therefore a
//! [`Positions`] map, `(topic, partition) → next offset`, stored in the
//! epoch's `WriteBatch` next to the view state it produced. After a crash
//! the reader is assigned exactly those offsets and the records after them
//! are read again: exactly once into every view.
//!
//! Partitions are **assigned**, not subscribed: Sluice owns the positions,
//! so a consumer-group rebalance can never move them. The group id is used
//! only to commit the committed positions back to Kafka after each epoch,
//! for external lag tools.
//!
//! [`KafkaReader`] runs one thread per source that polls, decodes
//! ([`RecordDecoder`], on that thread, so decoding runs beside the epoch
//! driver rather than inside it) and hands [`Chunk`]s through a bounded
//! channel — a slow pipeline backs up into Kafka, never into memory. Every
//! few seconds it refreshes metadata: new partitions (and new topics
//! matching a `TOPIC PATTERN`) are assigned from their start, a missing
//! topic or an unreachable broker shows as the source's error state, and
//! librdkafka reconnects by itself when the broker returns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::format::{
    BadRecord, Decoded, Envelope, Format, HeaderRef, KeyedOp, Meta, RecordDecoder, RecordRef,
};
use super::kafka_batch::BatchQueue;
use crate::error::{Error, Result};

/// `(topic, partition) → next offset to read`.
pub type Positions = BTreeMap<(String, i32), i64>;

/// How long CREATE SOURCE waits for the brokers.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most records per decoded chunk.
const CHUNK_RECORDS: usize = 8192;
/// Chunks buffered between the reader and the epoch driver (at most
/// `CHANNEL_CHUNKS × CHUNK_RECORDS` records).
const CHANNEL_CHUNKS: usize = 16;
/// How long the reader waits to fill a chunk once it has records: big
/// chunks at high rates, a few milliseconds of latency at low ones.
const CHUNK_WAIT: Duration = Duration::from_millis(5);
/// How often the reader refreshes partitions and watermarks.
const REFRESH: Duration = Duration::from_secs(2);
/// Least time between two commits to the consumer group. They are for
/// external lag tools only (Sluice's own positions are in its epochs), and
/// an offset commit per epoch — dozens a second — slows the fetches that
/// share the broker connection.
const GROUP_COMMIT_EVERY: Duration = Duration::from_secs(1);

/// Which topics a source reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topics {
    /// One topic.
    Name(String),
    /// Every topic whose whole name matches this regular expression.
    Pattern(String),
}

/// Where a source starts reading partitions that exist when it is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartOffset {
    /// The oldest retained record.
    Earliest,
    /// After the newest record at creation.
    Latest,
    /// Per partition, by partition number (one topic).
    Offsets(Vec<i64>),
    /// The first record at or after this time (milliseconds since epoch).
    Timestamp(i64),
}

/// What a source does with a record it cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Record it in `sluice_source_errors` and go on.
    Skip,
    /// Stop the source, with the error visible in `SHOW SOURCES`.
    Fail,
}

/// A Kafka source's definition, as the catalog stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KafkaSpec {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic(s).
    pub topics: Topics,
    /// librdkafka properties passed through (a connection's, then the
    /// source's own).
    pub properties: Vec<(String, String)>,
    /// The connection it was created with, if any (for display).
    pub connection: Option<String>,
    /// Consumer group for committing positions back to Kafka.
    pub group_id: Option<String>,
    /// Start of the partitions that existed at creation.
    pub start: StartOffset,
    /// Value format.
    pub format: Format,
    /// Metadata columns after the value columns.
    pub include: Vec<Meta>,
    /// Bad-record policy.
    pub on_error: OnError,
    /// `ON ERROR DEAD LETTER TOPIC`: bad records are also written, whole,
    /// to this topic (at least once), with error headers.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// How records map to changes.
    #[serde(default)]
    pub envelope: Envelope,
    /// Records with larger values go to the error table (default 16 MiB).
    #[serde(default)]
    pub max_record_bytes: Option<usize>,
    /// Start offsets resolved at creation; partitions found later start at
    /// their beginning.
    pub starts: Vec<(String, i32, i64)>,
}

impl KafkaSpec {
    /// Client configuration for a consumer of source `source`.
    pub fn client_config(&self, source: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set(
                "group.id",
                self.group_id
                    .clone()
                    .unwrap_or_else(|| format!("sluice-{source}")),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "20")
            // librdkafka's default (1 s) pauses a partition's fetches for a
            // whole second whenever its local queue is full — with a reader
            // slower than the broker (decoding takes time) the queue then
            // runs dry and the reader waits: the Kafka benchmark showed
            // ~100 ms stalls several times a second (187 K → 546 K
            // records/s with 5 ms; docs/benchmarks.md).
            .set("fetch.queue.backoff.ms", "5")
            .set("socket.connection.setup.timeout.ms", "10000");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    fn consumer(&self, source: &str) -> Result<BaseConsumer> {
        self.client_config(source)
            .create()
            .map_err(|e| Error::Connector(format!("Kafka client configuration: {e}")))
    }

    /// Checks that `topic` is one this source reads.
    fn matches(&self, re: Option<&regex::Regex>, topic: &str) -> bool {
        match (&self.topics, re) {
            (Topics::Name(n), _) => n == topic,
            (Topics::Pattern(_), Some(re)) => re.is_match(topic),
            (Topics::Pattern(_), None) => false,
        }
    }

    fn pattern(&self) -> Result<Option<regex::Regex>> {
        match &self.topics {
            Topics::Name(_) => Ok(None),
            Topics::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
                .map(Some)
                .map_err(|e| Error::Syntax(format!("invalid TOPIC PATTERN: {e}"))),
        }
    }

    /// The partitions of the topics it reads, from `md`.
    fn partitions(&self, md: &Metadata, re: Option<&regex::Regex>) -> Result<Vec<(String, i32)>> {
        let mut out = Vec::new();
        for t in md.topics() {
            if !self.matches(re, t.name()) {
                continue;
            }
            if let Some(e) = t.error() {
                if let Topics::Name(n) = &self.topics {
                    return Err(Error::UndefinedObject(format!(
                        "Kafka topic \"{n}\" is not available: {}",
                        rdkafka::error::RDKafkaErrorCode::from(e)
                    )));
                }
                continue;
            }
            for p in t.partitions() {
                out.push((t.name().to_string(), p.id()));
            }
        }
        if out.is_empty() {
            if let Topics::Name(n) = &self.topics {
                return Err(Error::UndefinedObject(format!(
                    "Kafka topic \"{n}\" does not exist"
                )));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Contacts the brokers and resolves [`KafkaSpec::starts`]: the
    /// statement fails here, with nothing created, when the brokers are
    /// unreachable or the topic is missing.
    pub fn resolve(&mut self, source: &str) -> Result<()> {
        let re = self.pattern()?;
        let consumer = self.consumer(source)?;
        let topic = match &self.topics {
            Topics::Name(n) => Some(n.as_str()),
            Topics::Pattern(_) => None,
        };
        let md = consumer
            .fetch_metadata(topic, CONNECT_TIMEOUT)
            .map_err(|e| {
                Error::Connector(format!(
                    "could not reach the Kafka brokers at {}: {e}",
                    self.brokers
                ))
            })?;
        let parts = self.partitions(&md, re.as_ref())?;
        let mut starts = Vec::with_capacity(parts.len());
        match &self.start {
            StartOffset::Earliest | StartOffset::Latest => {
                for (t, p) in &parts {
                    let (low, high) = consumer
                        .fetch_watermarks(t, *p, CONNECT_TIMEOUT)
                        .map_err(|e| Error::Connector(format!("watermarks of {t}/{p}: {e}")))?;
                    let at = if self.start == StartOffset::Earliest {
                        low
                    } else {
                        high
                    };
                    starts.push((t.clone(), *p, at));
                }
            }
            StartOffset::Offsets(offsets) => {
                if offsets.len() != parts.len() {
                    return Err(Error::data(
                        crate::error::DataErrorKind::InvalidParameterValue,
                        format!(
                            "START OFFSET lists {} offsets but the topic has {} partitions",
                            offsets.len(),
                            parts.len()
                        ),
                    ));
                }
                for ((t, p), o) in parts.iter().zip(offsets) {
                    starts.push((t.clone(), *p, *o));
                }
            }
            StartOffset::Timestamp(ms) => {
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &parts {
                    tpl.add_partition_offset(t, *p, Offset::Offset(*ms))
                        .map_err(|e| Error::Connector(e.to_string()))?;
                }
                let found = consumer
                    .offsets_for_times(tpl, CONNECT_TIMEOUT)
                    .map_err(|e| Error::Connector(format!("offsets for START TIMESTAMP: {e}")))?;
                for e in found.elements() {
                    let at = match e.offset() {
                        Offset::Offset(o) => o,
                        // No record at or after the time: start at the end.
                        _ => {
                            consumer
                                .fetch_watermarks(e.topic(), e.partition(), CONNECT_TIMEOUT)
                                .map_err(|e| Error::Connector(e.to_string()))?
                                .1
                        }
                    };
                    starts.push((e.topic().to_string(), e.partition(), at));
                }
                starts.sort();
            }
        }
        self.starts = starts;
        Ok(())
    }

    /// Where a partition starts.
    pub fn start_of(&self, topic: &str, partition: i32) -> i64 {
        self.starts
            .iter()
            .find(|(t, p, _)| t == topic && *p == partition)
            .map(|s| s.2)
            .unwrap_or(0)
    }

    /// The positions of a source that has read nothing.
    pub fn initial_positions(&self) -> Positions {
        self.starts
            .iter()
            .map(|(t, p, o)| ((t.clone(), *p), *o))
            .collect()
    }

    /// Current high watermarks of every partition the source reads.
    pub fn high_watermarks(&self, source: &str) -> Result<Positions> {
        let consumer = self.consumer(source)?;
        high_watermarks(self, &consumer)
    }

    /// Reads and decodes every record in `from..to` (per partition; a
    /// partition missing from `from` starts at its start), for a bounded
    /// SELECT or the backfill of a new view. Bad records are skipped.
    /// Stops early once `limit` rows are read.
    pub fn read_range(
        &self,
        source: &str,
        decoder: &RecordDecoder,
        from: &Positions,
        to: &Positions,
        limit: Option<usize>,
    ) -> Result<Vec<RecordBatch>> {
        let consumer = self.consumer(source)?;
        let mut tpl = TopicPartitionList::new();
        let mut remaining: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for ((t, p), end) in to {
            let start = from
                .get(&(t.clone(), *p))
                .copied()
                .unwrap_or_else(|| self.start_of(t, *p));
            if start < *end {
                tpl.add_partition_offset(t, *p, Offset::Offset(start))
                    .map_err(|e| Error::Connector(e.to_string()))?;
                remaining.insert((t.clone(), *p), *end);
            }
        }
        let mut out = Vec::new();
        if remaining.is_empty() {
            return Ok(out);
        }
        consumer
            .assign(&tpl)
            .map_err(|e| Error::Connector(e.to_string()))?;
        let mut last_progress = Instant::now();
        let mut rows = 0;
        while !remaining.is_empty() && limit.is_none_or(|l| rows < l) {
            let mut msgs = Vec::new();
            let mut timeout = Duration::from_millis(100);
            while msgs.len() < CHUNK_RECORDS {
                match consumer.poll(timeout) {
                    None => break,
                    Some(Ok(m)) => {
                        let key = (m.topic().to_string(), m.partition());
                        if let Some(end) = remaining.get(&key) {
                            if m.offset() < *end {
                                msgs.push(m);
                            }
                        }
                    }
                    Some(Err(e)) => tracing::debug!("bounded read: {e}"),
                }
                timeout = Duration::ZERO;
            }
            if !msgs.is_empty() {
                last_progress = Instant::now();
                let batch = with_refs(&msgs, decoder, |refs| decoder.decode(refs))?.batch;
                rows += batch.num_rows();
                out.push(batch);
                for m in &msgs {
                    let key = (m.topic().to_string(), m.partition());
                    if remaining
                        .get(&key)
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        remaining.remove(&key);
                    }
                }
            }
            // A partition may end in records we never see (transaction
            // markers, compacted records): its position tells.
            if let Ok(pos) = consumer.position() {
                for e in pos.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        let key = (e.topic().to_string(), e.partition());
                        if remaining.get(&key).is_some_and(|end| o >= *end) {
                            remaining.remove(&key);
                        }
                    }
                }
            }
            if last_progress.elapsed() > CONNECT_TIMEOUT * 3 {
                return Err(Error::Connector(format!(
                    "reading source \"{source}\" from Kafka made no progress for {} s (still missing {:?})",
                    (CONNECT_TIMEOUT * 3).as_secs(),
                    remaining
                )));
            }
        }
        Ok(out)
    }
}

fn high_watermarks(spec: &KafkaSpec, consumer: &BaseConsumer) -> Result<Positions> {
    let re = spec.pattern()?;
    let topic = match &spec.topics {
        Topics::Name(n) => Some(n.as_str()),
        Topics::Pattern(_) => None,
    };
    let md = consumer
        .fetch_metadata(topic, CONNECT_TIMEOUT)
        .map_err(|e| Error::Connector(format!("Kafka metadata: {e}")))?;
    let mut out = Positions::new();
    for (t, p) in spec.partitions(&md, re.as_ref())? {
        let (_, high) = consumer
            .fetch_watermarks(&t, p, CONNECT_TIMEOUT)
            .map_err(|e| Error::Connector(format!("watermarks of {t}/{p}: {e}")))?;
        out.insert((t, p), high);
    }
    Ok(out)
}

fn headers_of<M: Message>(m: &M) -> Vec<HeaderRef<'_>> {
    match m.headers() {
        None => Vec::new(),
        Some(h) => h.iter().map(|h| (h.key, h.value)).collect(),
    }
}

/// The headers of each message, parsed only if the source includes them:
/// librdkafka parses a message's headers on first access, a cost paid per
/// record for nothing otherwise.
fn headers_if<'a, M: Message>(msgs: &'a [M], decoder: &RecordDecoder) -> Vec<Vec<HeaderRef<'a>>> {
    if decoder.includes(Meta::Headers) {
        msgs.iter().map(headers_of).collect()
    } else {
        vec![Vec::new(); msgs.len()]
    }
}

/// Calls `f` with the records of `msgs`.
fn with_refs<M: Message, T>(
    msgs: &[M],
    decoder: &RecordDecoder,
    f: impl FnOnce(&[RecordRef<'_>]) -> T,
) -> T {
    let headers = headers_if(msgs, decoder);
    f(&record_refs(msgs, &headers))
}

fn record_refs<'a, M: Message>(
    msgs: &'a [M],
    headers: &'a [Vec<HeaderRef<'a>>],
) -> Vec<RecordRef<'a>> {
    msgs.iter()
        .zip(headers)
        .map(|(m, h)| record_ref(m, h))
        .collect()
}

fn record_ref<'a, M: Message>(
    m: &'a M,
    headers: &'a [(&'a str, Option<&'a [u8]>)],
) -> RecordRef<'a> {
    RecordRef {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key(),
        payload: m.payload(),
        headers,
    }
}

/// What the reader hands the epoch driver: decoded rows and where they end.
#[derive(Debug)]
pub struct Chunk {
    /// Decoded rows.
    pub batch: RecordBatch,
    /// Records that failed to decode.
    pub bad: Vec<BadRecord>,
    /// Keyed envelopes: the changes, in record order.
    pub ops: Option<Vec<KeyedOp>>,
    /// New position of every partition the chunk read from.
    pub positions: Vec<((String, i32), i64)>,
    /// Records read (good and bad).
    pub records: u64,
    /// Value bytes read.
    pub bytes: u64,
}

/// Per-partition counters for `sluice_source_partitions`.
#[derive(Debug, Clone, Default)]
pub struct PartitionStats {
    /// Latest high watermark seen.
    pub high_watermark: Option<i64>,
    /// Records read.
    pub records: u64,
    /// Value bytes read.
    pub bytes: u64,
    /// Records that failed to decode.
    pub errors: u64,
    /// Records per second over the last refresh period.
    pub rate: f64,
    window_records: u64,
}

/// What the reader reports.
#[derive(Debug, Default)]
pub struct ReaderStatus {
    /// The last broker or metadata error, while it persists.
    pub error: Option<String>,
    /// Per partition.
    pub partitions: BTreeMap<(String, i32), PartitionStats>,
}

struct Shared {
    stop: AtomicBool,
    status: Mutex<ReaderStatus>,
    /// Positions to commit to the consumer group (for lag tools).
    commit: Mutex<Option<Positions>>,
}

/// The background reader of one Kafka source.
pub struct KafkaReader {
    rx: Receiver<Chunk>,
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer>,
    spec: KafkaSpec,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader").finish()
    }
}

impl KafkaReader {
    /// Starts reading source `name` at `positions` (its committed ones),
    /// calling `on_data` whenever a chunk is ready. Does not wait for the
    /// brokers.
    pub fn start(
        name: &str,
        spec: &KafkaSpec,
        decoder: RecordDecoder,
        positions: &Positions,
        on_data: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<KafkaReader> {
        let consumer = Arc::new(spec.consumer(name)?);
        let dead_letter = match &spec.dead_letter {
            Some(topic) => {
                let mut c = ClientConfig::new();
                c.set("bootstrap.servers", &spec.brokers);
                for (k, v) in &spec.properties {
                    c.set(k, v);
                }
                let producer: BaseProducer = c
                    .create()
                    .map_err(|e| Error::Connector(format!("dead letter producer: {e}")))?;
                Some(DeadLetter {
                    producer,
                    topic: topic.clone(),
                    source: name.to_string(),
                })
            }
            None => None,
        };
        // Partitions go to the reader's batch queue, attached before they
        // are assigned (see `kafka_batch`).
        let mut batch = BatchQueue::new(consumer.clone())?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in positions {
            batch.attach(t, *p)?;
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                .map_err(|e| Error::Connector(e.to_string()))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| Error::Connector(e.to_string()))?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            status: Mutex::new(ReaderStatus {
                error: None,
                partitions: positions
                    .keys()
                    .map(|k| (k.clone(), PartitionStats::default()))
                    .collect(),
            }),
            commit: Mutex::new(None),
        });
        let (tx, rx) = sync_channel(CHANNEL_CHUNKS);
        let thread = {
            let consumer = consumer.clone();
            let shared = shared.clone();
            let spec = spec.clone();
            let assigned: Vec<(String, i32)> = positions.keys().cloned().collect();
            std::thread::Builder::new()
                .name(format!("kafka-{name}"))
                .spawn(move || {
                    let io = ReaderIo {
                        tx,
                        on_data,
                        dead_letter,
                    };
                    read_loop(&consumer, batch, &shared, &spec, &decoder, io, assigned)
                })?
        };
        Ok(KafkaReader {
            rx,
            shared,
            consumer,
            spec: spec.clone(),
            thread: Some(thread),
        })
    }

    /// The chunks read so far, at most about `max_rows` rows, and whether
    /// more are waiting.
    pub fn take(&self, max_rows: usize) -> (Vec<Chunk>, bool) {
        let mut out = Vec::new();
        let mut rows = 0;
        while rows < max_rows {
            match self.rx.try_recv() {
                Ok(c) => {
                    rows += c.batch.num_rows().max(1);
                    out.push(c);
                }
                Err(_) => return (out, false),
            }
        }
        (out, true)
    }

    /// Asks the reader to commit `positions` to the consumer group.
    pub fn commit_to_group(&self, positions: &Positions) {
        *self.shared.commit.lock() = Some(positions.clone());
    }

    /// A way to ask the brokers for the current high watermarks through
    /// this reader's (already connected) consumer — to run off any lock, on
    /// a blocking thread.
    pub fn watermarks(&self) -> impl FnOnce() -> Result<Positions> + Send + 'static {
        let (spec, consumer) = (self.spec.clone(), self.consumer.clone());
        move || high_watermarks(&spec, &consumer)
    }

    /// The broker or metadata error the reader is retrying through, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.status.lock().error.clone()
    }

    /// Per-partition counters.
    pub fn partition_stats(&self) -> BTreeMap<(String, i32), PartitionStats> {
        self.shared.status.lock().partitions.clone()
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a bad record goes besides the error table.
struct DeadLetter {
    producer: BaseProducer,
    topic: String,
    source: String,
}

impl DeadLetter {
    /// Writes the whole record with headers saying why.
    fn send<M: Message>(&self, m: &M, error: &str) {
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "sluice.error",
                value: Some(error),
            })
            .insert(Header {
                key: "sluice.source",
                value: Some(&self.source),
            })
            .insert(Header {
                key: "sluice.topic",
                value: Some(m.topic()),
            })
            .insert(Header {
                key: "sluice.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "sluice.offset",
                value: Some(&offset),
            });
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).headers(headers);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(p) = m.payload() {
            rec = rec.payload(p);
        }
        // librdkafka queues and retries; a full queue is the only
        // immediate failure: wait for room.
        loop {
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    tracing::debug!("dead letter queue full: {e}");
                    rec = r;
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }
}

impl Drop for DeadLetter {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

/// The reader thread's outputs.
struct ReaderIo {
    tx: SyncSender<Chunk>,
    on_data: Arc<dyn Fn() + Send + Sync>,
    dead_letter: Option<DeadLetter>,
}

fn read_loop(
    consumer: &BaseConsumer,
    mut batch: BatchQueue,
    shared: &Shared,
    spec: &KafkaSpec,
    decoder: &RecordDecoder,
    io: ReaderIo,
    mut assigned: Vec<(String, i32)>,
) {
    let re = spec.pattern().ok().flatten();
    let mut last_refresh: Option<Instant> = None;
    let mut last_commit: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if last_refresh.is_none_or(|t| t.elapsed() >= REFRESH) {
            let elapsed = last_refresh.map(|t| t.elapsed().as_secs_f64());
            refresh(
                consumer,
                &mut batch,
                shared,
                spec,
                re.as_ref(),
                &mut assigned,
                elapsed,
            );
            last_refresh = Some(Instant::now());
        }
        let commit_due = last_commit.is_none_or(|t| t.elapsed() >= GROUP_COMMIT_EVERY);
        if let Some(p) = commit_due.then(|| shared.commit.lock().take()).flatten() {
            last_commit = Some(Instant::now());
            let mut tpl = TopicPartitionList::new();
            for ((t, part), o) in &p {
                let _ = tpl.add_partition_offset(t, *part, Offset::Offset(*o));
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!("committing offsets to the consumer group: {e}");
            }
        }
        // Events (errors, commit results) come on the consumer queue;
        // records on the batch queue.
        if !serve_events(consumer, shared) {
            return;
        }
        // Wait up to 100 ms for a first record, then up to CHUNK_WAIT for
        // the chunk to fill, taking whatever the queue holds per call.
        let mut msgs = Vec::with_capacity(CHUNK_RECORDS);
        let mut first: Option<Instant> = None;
        while msgs.len() < CHUNK_RECORDS {
            let (timeout, want) = match first {
                None => (Duration::from_millis(100), 1),
                Some(t) => match CHUNK_WAIT.checked_sub(t.elapsed()) {
                    Some(left) => (left, CHUNK_RECORDS - msgs.len()),
                    None => break,
                },
            };
            let before = msgs.len();
            if let Some(e) = batch.consume(timeout, want, &mut msgs) {
                tracing::warn!("{e}");
                shared.status.lock().error = Some(e);
                break;
            }
            if msgs.len() == before {
                break;
            }
            first.get_or_insert_with(Instant::now);
        }
        if msgs.is_empty() {
            continue;
        }
        let headers = headers_if(&msgs, decoder);
        let refs = record_refs(&msgs, &headers);
        let Decoded { batch, bad, ops } = match decoder.decode(&refs) {
            Ok(d) => d,
            Err(e) => {
                // Not a record's fault (a bug, or out of memory): report it
                // and read the same records again later.
                tracing::error!("decoding failed: {e}");
                shared.status.lock().error = Some(format!("decoding failed: {e}"));
                return;
            }
        };
        // Per partition of the poll: (topic, partition, next offset,
        // records, bytes). A poll spans a handful of partitions, so a
        // linear search beats building a key per record.
        let mut per: Vec<(&str, i32, i64, u64, u64)> = Vec::new();
        for r in &refs {
            let len = r.payload.map_or(0, |p| p.len()) as u64;
            match per
                .iter_mut()
                .find(|p| p.1 == r.partition && p.0 == r.topic)
            {
                Some(p) => {
                    p.2 = r.offset + 1;
                    p.3 += 1;
                    p.4 += len;
                }
                None => per.push((r.topic, r.partition, r.offset + 1, 1, len)),
            }
        }
        let bytes = per.iter().map(|p| p.4).sum();
        {
            let mut status = shared.status.lock();
            status.error = None;
            for (topic, partition, _, records, bytes) in &per {
                let st = status
                    .partitions
                    .entry((topic.to_string(), *partition))
                    .or_default();
                st.records += records;
                st.window_records += records;
                st.bytes += bytes;
            }
            for b in &bad {
                if let Some(st) = status.partitions.get_mut(&(b.topic.clone(), b.partition)) {
                    st.errors += 1;
                }
            }
        }
        if let Some(dl) = &io.dead_letter {
            for b in &bad {
                if let Some(m) = msgs.iter().find(|m| {
                    m.partition() == b.partition && m.offset() == b.offset && m.topic() == b.topic
                }) {
                    dl.send(m, &b.error);
                }
            }
        }
        let mut chunk = Chunk {
            batch,
            bad,
            ops,
            positions: per
                .iter()
                .map(|(t, p, next, _, _)| ((t.to_string(), *p), *next))
                .collect(),
            records: refs.len() as u64,
            bytes,
        };
        drop(refs);
        drop(headers);
        drop(msgs);
        loop {
            match io.tx.try_send(chunk) {
                Ok(()) => {
                    (io.on_data)();
                    break;
                }
                Err(TrySendError::Full(c)) => {
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    chunk = c;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// Assigns new partitions, notices missing topics, samples watermarks.
/// Serves what is waiting on the consumer queue: errors (an unreachable
/// broker) become the source's visible state, other events are handled by
/// rdkafka. Records never arrive there (each partition is attached to the
/// batch queue before it is assigned); if one did, its partition's records
/// would be split between two queues, so the reader stops with an error
/// instead of reading past it. Returns whether to go on.
fn serve_events(consumer: &BaseConsumer, shared: &Shared) -> bool {
    // Bounded: a flood of events must not starve the records.
    for _ in 0..64 {
        match consumer.poll(Duration::ZERO) {
            None => break,
            Some(Ok(m)) => {
                let e = format!(
                    "internal error: record {}/{} offset {} bypassed the batch queue",
                    m.topic(),
                    m.partition(),
                    m.offset()
                );
                tracing::error!("{e}");
                shared.status.lock().error = Some(e);
                return false;
            }
            Some(Err(e)) => {
                tracing::warn!("Kafka: {e}");
                shared.status.lock().error = Some(e.to_string());
            }
        }
    }
    true
}

fn refresh(
    consumer: &BaseConsumer,
    batch: &mut BatchQueue,
    shared: &Shared,
    spec: &KafkaSpec,
    re: Option<&regex::Regex>,
    assigned: &mut Vec<(String, i32)>,
    elapsed: Option<f64>,
) {
    let topic = match &spec.topics {
        Topics::Name(n) => Some(n.as_str()),
        Topics::Pattern(_) => None,
    };
    let parts = match consumer
        .fetch_metadata(topic, Duration::from_secs(2))
        .map_err(|e| Error::Connector(format!("Kafka brokers unreachable: {e}")))
        .and_then(|md| spec.partitions(&md, re))
    {
        Ok(p) => p,
        Err(e) => {
            shared.status.lock().error = Some(e.to_string());
            return;
        }
    };
    let new: Vec<&(String, i32)> = parts.iter().filter(|p| !assigned.contains(p)).collect();
    if !new.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &new {
            if let Err(e) = batch.attach(t, *p) {
                shared.status.lock().error = Some(e.to_string());
                return;
            }
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(spec.start_of(t, *p)));
        }
        match consumer.incremental_assign(&tpl) {
            Ok(()) => {
                tracing::info!("Kafka: reading new partitions {new:?}");
                assigned.extend(new.into_iter().cloned());
            }
            Err(e) => shared.status.lock().error = Some(e.to_string()),
        }
    }
    let mut marks = Vec::new();
    for (t, p) in assigned.iter() {
        if let Ok((_, high)) = consumer.fetch_watermarks(t, *p, Duration::from_secs(1)) {
            marks.push(((t.clone(), *p), high));
        }
    }
    let mut status = shared.status.lock();
    status.error = None;
    for (key, high) in marks {
        let st = status.partitions.entry(key).or_default();
        st.high_watermark = Some(high);
    }
    for st in status.partitions.values_mut() {
        if let Some(secs) = elapsed.filter(|s| *s > 0.0) {
            st.rate = st.window_records as f64 / secs;
        }
        st.window_records = 0;
    }
}

#[cfg(test)]
mod tests {
    //! In-process tests against librdkafka's mock cluster (the end-to-end
    //! suite against a real broker is `tests/kafka.rs`).

    use std::sync::atomic::AtomicUsize;

    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use rdkafka::mocking::MockCluster;

    use super::*;

    fn spec(brokers: &str, start: StartOffset) -> KafkaSpec {
        KafkaSpec {
            brokers: brokers.into(),
            topics: Topics::Name("t".into()),
            properties: vec![],
            connection: None,
            group_id: None,
            start,
            format: Format::Text,
            include: vec![Meta::Partition, Meta::Offset],
            on_error: OnError::Skip,
            dead_letter: None,
            envelope: Envelope::None,
            max_record_bytes: None,
            starts: vec![],
        }
    }

    fn decoder() -> RecordDecoder {
        let schema = Arc::new(Schema::new(vec![
            Field::new("text", DataType::Utf8, false),
            Field::new("partition", DataType::Int32, true),
            Field::new("offset", DataType::Int64, true),
        ]));
        RecordDecoder::new(
            Format::Text,
            schema,
            1,
            vec![Meta::Partition, Meta::Offset],
            &[],
        )
        .unwrap()
    }

    /// A mock cluster with topic `t` (2 partitions) holding `values`.
    fn cluster_with(
        values: &[(i32, &[u8])],
    ) -> (
        MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        String,
    ) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        produce(&brokers, values);
        (cluster, brokers)
    }

    fn produce(brokers: &str, values: &[(i32, &[u8])]) {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        for (part, v) in values {
            p.send(BaseRecord::<(), [u8]>::to("t").partition(*part).payload(*v))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn resolves_start_offsets_and_reads_ranges() {
        let (_cluster, brokers) = cluster_with(&[
            (0, &b"a"[..]),
            (0, &b"b"[..]),
            (1, &b"c"[..]),
            (0, &b"\xffd"[..]),
        ]);

        let mut earliest = spec(&brokers, StartOffset::Earliest);
        earliest.resolve("s").unwrap();
        assert_eq!(
            earliest.starts,
            vec![("t".into(), 0, 0), ("t".into(), 1, 0)]
        );
        let mut latest = spec(&brokers, StartOffset::Latest);
        latest.resolve("s").unwrap();
        assert_eq!(latest.starts, vec![("t".into(), 0, 3), ("t".into(), 1, 1)]);
        let mut listed = spec(&brokers, StartOffset::Offsets(vec![1, 0]));
        listed.resolve("s").unwrap();
        assert_eq!(listed.initial_positions().get(&("t".into(), 0)), Some(&1));
        assert!(spec(&brokers, StartOffset::Offsets(vec![1]))
            .resolve("s")
            .is_err());
        // The mock answers timestamp lookups with the end (as Tansu answers
        // 0); what can be checked here is that the lookup resolves to
        // offsets within the partitions.
        let mut since = spec(&brokers, StartOffset::Timestamp(0));
        since.resolve("s").unwrap();
        for ((e, l), s) in earliest
            .starts
            .iter()
            .zip(&latest.starts)
            .zip(&since.starts)
        {
            assert!(e.2 <= s.2 && s.2 <= l.2, "{s:?}");
        }
        let mut missing = spec(&brokers, StartOffset::Earliest);
        missing.topics = Topics::Name("nope".into());
        assert!(matches!(
            missing.resolve("s"),
            Err(Error::UndefinedObject(_))
        ));

        let to = earliest.high_watermarks("s").unwrap();
        let batches = listed
            .read_range("s", &decoder(), &listed.initial_positions(), &to, None)
            .unwrap();
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        // Partition 0 from offset 1 ("b" and a non-UTF-8 record, skipped),
        // partition 1 from 0 ("c").
        assert_eq!(rows, 2);
    }

    #[test]
    fn librdkafka_properties_pass_through() {
        let mut s = spec("127.0.0.1:1", StartOffset::Earliest);
        s.properties = vec![
            ("security.protocol".into(), "ssl".into()),
            ("ssl.ca.location".into(), "/nonexistent/ca.pem".into()),
        ];
        // librdkafka itself checks them: SSL is built in, the CA is not there.
        let e = s.consumer("s").err().expect("an error").to_string();
        assert!(e.contains("ssl.ca.location") || e.contains("ca.pem"), "{e}");
        s.properties = vec![("no.such.property".into(), "1".into())];
        let e = s.consumer("s").err().expect("an error").to_string();
        assert!(e.contains("no.such.property"), "{e}");
        s.properties = vec![
            ("security.protocol".into(), "sasl_plaintext".into()),
            ("sasl.mechanism".into(), "PLAIN".into()),
            ("sasl.username".into(), "u".into()),
            ("sasl.password".into(), "p".into()),
        ];
        assert!(s.consumer("s").is_ok());
    }

    #[test]
    fn reader_hands_over_chunks_with_positions_and_bad_records() {
        let (cluster, brokers) = cluster_with(&[
            (0, &b"a"[..]),
            (1, &b"b"[..]),
            (0, &b"\xffx"[..]),
            (1, &b"c"[..]),
        ]);
        let mut s = spec(&brokers, StartOffset::Earliest);
        s.resolve("s").unwrap();
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let reader = KafkaReader::start(
            "s",
            &s,
            decoder(),
            &s.initial_positions(),
            Arc::new(move || {
                w.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut rows = 0;
        let mut bad = Vec::new();
        let mut positions = Positions::new();
        while (rows < 3 || bad.is_empty()) && Instant::now() < deadline {
            for c in reader.take(1000).0 {
                rows += c.batch.num_rows();
                bad.extend(c.bad);
                positions.extend(c.positions);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(rows, 3);
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].partition, bad[0].offset), (0, 1));
        // The bad record's offset is consumed too: nothing is read twice.
        assert_eq!(positions.get(&("t".into(), 0)), Some(&2));
        assert_eq!(positions.get(&("t".into(), 1)), Some(&2));
        assert!(woken.load(Ordering::Relaxed) > 0);
        assert_eq!(reader.error(), None);

        // The topic goes away (as a deleted topic looks in metadata): the
        // reader says so, and keeps trying.
        cluster
            .topic_error(
                "t",
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while reader.error().is_none() {
            assert!(Instant::now() < deadline, "no error state");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(reader.error().unwrap().contains("\"t\""));
        drop(reader);
    }
}
