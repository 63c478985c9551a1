//! Kafka sinks: changes encoded into an outbox in RocksDB, drained to a
//! topic by a writer thread.
//!
//! Exactly-once *into the outbox*: the commit that changes a relation also
//! stages, in the same `WriteBatch`, the Kafka messages those changes mean
//! for every sink reading it ([`encode`]), under the sink's next sequence
//! number. A new sink's first outbox entries are the relation's contents at
//! creation (the snapshot, in entries of at most 10 000 messages), written
//! with its catalog entry. So the outbox
//! always holds every change after the last acknowledged one, in commit
//! order, and never anything uncommitted.
//!
//! At-least-once *out of it*: the [`SinkWriter`] thread sends the pending
//! entries in order with an idempotent producer, waits until Kafka
//! acknowledged every message, and only then deletes the entries. A crash
//! between the acknowledgement and the delete sends those entries again on
//! restart — duplicates only of that tail, nothing lost. While the broker
//! is away the writer backs off and retries; the outbox (on disk, bounded
//! by how long the outage lasts) holds what is not yet sent, and
//! `SHOW SINKS` shows the state and the backlog.
//!
//! Exactly-once *out of it* (`EXACTLY ONCE`): the writer is a transactional
//! producer (`transactional.id` = `sluice-sink-<sink id>-<token>` unless given as a
//! property) and every round is one Kafka transaction holding whole outbox
//! entries (up to 64 and 20 000 messages; an entry is never split) **and** a
//! progress marker — a record `{"sink": <token>, "next_seq": n}` in the
//! sink's progress topic (`<transactional.id>-progress`, one partition,
//! compacted) saying "entries below `n` are in Kafka". The transaction
//! commits the messages and the marker atomically, so Kafka itself records
//! how far it got. Then:
//!
//! 1. After the commit the entries are deleted from the outbox, as above.
//! 2. On writer start (and after any error whose outcome is unknown), a new
//!    producer calls `init_transactions`, which fences older producers with
//!    the same transactional id and aborts their open transaction; then
//!    the writer reads the progress topic backwards with `read_committed`
//!    and deletes the outbox entries below the last committed marker's
//!    `next_seq`. A crash between the Kafka commit and the outbox delete
//!    therefore sends nothing twice; a crash before the commit leaves an
//!    aborted transaction (invisible to `read_committed` consumers) and the
//!    entries still pending, sent again in a new transaction.
//! 3. An abortable error (a failed delivery) aborts the transaction and
//!    retries the same entries after a backoff. A fatal error (fenced by
//!    another writer with the same transactional id) stops the writer:
//!    `SHOW SINKS` shows `failed: …` until the sink is recreated or Sluice
//!    restarts.
//!
//! The marker carries a token made at `CREATE SINK`, so that markers of
//! another sink that reused the transactional id (another Sluice, or a
//! data directory started anew) are ignored. Sequence numbers never
//! restart: a high-water mark ([`SYS_SINK_SEQ`]) is written with every
//! delete, else an empty outbox after a restart would number new entries
//! from 0 again, below the last marker.
//!
//! Why a marker record and not the consumer-group offset trick
//! (`send_offsets_to_transaction` committing "offset = next sequence" for
//! a group on the output topic): both are atomic with the transaction, but
//! the marker needs no group coordinator, keeps the token next to the
//! number, and can be tested — librdkafka's mock cluster acknowledges
//! `TxnOffsetCommit` without storing the offsets, so recovery from a group
//! offset could never be exercised there. Consumers see exactly once only
//! with `isolation.level=read_committed` (librdkafka's default).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch};
use parking_lot::{Condvar, Mutex};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::sink_format::{Encoder, SinkFormat};
use crate::error::{Error, Result};
use crate::state::store::{sys_key, Store};

/// Sub-keyspace of the system table holding sinks' outboxes:
/// `0u32 · 0x06 · sink id · seq (u64 BE)` → encoded messages.
pub const SYS_SINK_OUTBOX: u8 = 0x06;

/// How changes become messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkEnvelope {
    /// Every inserted row is a message; the input must be insert-only.
    Append,
    /// Key = the `KEY` columns, value = the row; a delete is a tombstone.
    Upsert,
    /// `{"before": …, "after": …, "op": "c|u|d"}`, keyed like UPSERT.
    Debezium,
}

/// A Kafka sink's definition, as the catalog stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkSpec {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Output topic.
    pub topic: String,
    /// librdkafka properties passed through.
    pub properties: Vec<(String, String)>,
    /// The connection it was created with, if any.
    pub connection: Option<String>,
    /// Envelope.
    pub envelope: SinkEnvelope,
    /// Key column indices (UPSERT, DEBEZIUM; optional for APPEND).
    pub key: Vec<usize>,
    /// Partitions of the topic if Sluice creates it.
    pub partitions: Option<i32>,
    /// How keys and values are written (sinks from before formats: JSON).
    #[serde(default)]
    pub format: SinkFormat,
    /// `EXACTLY ONCE`: Kafka transactions (see the module docs).
    #[serde(default)]
    pub exactly_once: Option<ExactlyOnce>,
    /// The compiled format, built on first use and shared by clones.
    #[serde(skip)]
    pub encoder: EncoderCache,
}

/// The compiled [`Encoder`] of a spec: parsing Avro schemas once, not on
/// every commit. Not part of the definition (always equal).
#[derive(Clone, Default)]
pub struct EncoderCache(Arc<Mutex<Option<Arc<Encoder>>>>);

impl PartialEq for EncoderCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for EncoderCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncoderCache")
    }
}

/// `EXACTLY ONCE`: how the writer's transactions are named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExactlyOnce {
    /// `transactional.id` given as a property; by default
    /// `sluice-sink-<sink id>-<token>`, so that two Sluice instances on one
    /// cluster never fence each other's sinks.
    pub transactional_id: Option<String>,
    /// Made at `CREATE SINK`: only progress markers carrying it are this
    /// sink's (another Sluice, or a sink created again, may reuse the
    /// transactional id and the progress topic).
    pub token: String,
}

/// One Kafka message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
}

impl SinkSpec {
    /// The compiled format.
    pub fn encoder(&self) -> Result<Arc<Encoder>> {
        let mut cached = self.encoder.0.lock();
        if let Some(e) = &*cached {
            return Ok(e.clone());
        }
        let e = Arc::new(Encoder::new(&self.format, &self.key, self.envelope)?);
        *cached = Some(e.clone());
        Ok(e)
    }
}

/// A key's deleted and inserted row in one change batch.
type BeforeAfter = (Option<usize>, Option<usize>);

/// The messages one change batch (rows with weights) means for a sink.
/// Per key, deletes and inserts of one batch net out: an update is one
/// message with the new row (UPSERT) or one `u` event (DEBEZIUM).
pub fn encode(spec: &SinkSpec, data: &RecordBatch, weights: &Int64Array) -> Result<Vec<Message>> {
    if data.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let enc = spec.encoder()?;
    let keys: Vec<Option<Vec<u8>>> = if spec.key.is_empty() {
        vec![None; data.num_rows()]
    } else {
        enc.keys(data, &spec.key)?
    };
    let mut out = Vec::new();
    match spec.envelope {
        SinkEnvelope::Append => {
            let rows = enc.values(data)?;
            for i in 0..data.num_rows() {
                let w = weights.value(i);
                if w < 0 {
                    return Err(Error::Internal("an APPEND sink received a delete".into()));
                }
                for _ in 0..w {
                    out.push(Message {
                        key: keys[i].clone(),
                        value: Some(rows[i].clone()),
                    });
                }
            }
        }
        SinkEnvelope::Upsert | SinkEnvelope::Debezium => {
            // Per key, in first-seen order: the deleted and inserted rows.
            let mut order: Vec<&Option<Vec<u8>>> = Vec::new();
            let mut per_key: std::collections::HashMap<&Option<Vec<u8>>, BeforeAfter> =
                std::collections::HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                let e = per_key.entry(k).or_insert_with(|| {
                    order.push(k);
                    (None, None)
                });
                if weights.value(i) < 0 {
                    e.0 = Some(i);
                } else if weights.value(i) > 0 {
                    e.1 = Some(i);
                }
            }
            if spec.envelope == SinkEnvelope::Upsert {
                let mut rows = enc.values(data)?;
                for k in order {
                    let (_, after) = per_key[k];
                    out.push(Message {
                        key: (*k).clone(),
                        value: after.map(|a| std::mem::take(&mut rows[a])),
                    });
                }
            } else {
                let mut events = Vec::with_capacity(order.len());
                let mut event_keys = Vec::with_capacity(order.len());
                for k in order {
                    let (before, after) = per_key[k];
                    let op = match (before, after) {
                        (None, Some(_)) => "c",
                        (Some(_), Some(_)) => "u",
                        (Some(_), None) => "d",
                        (None, None) => continue,
                    };
                    events.push((before, after, op));
                    event_keys.push((*k).clone());
                }
                for (key, value) in event_keys.into_iter().zip(enc.debezium(data, &events)?) {
                    out.push(Message {
                        key,
                        value: Some(value),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The outbox entry holding `msgs`.
pub fn encode_entry(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        for part in [&m.key, &m.value] {
            match part {
                None => out.push(0),
                Some(b) => {
                    out.push(1);
                    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }
    out
}

fn decode_entry(mut buf: &[u8]) -> Result<Vec<Message>> {
    let corrupt = || Error::Storage("corrupt sink outbox entry".into());
    let mut out = Vec::new();
    let part = |buf: &mut &[u8]| -> Result<Option<Vec<u8>>> {
        let (flag, rest) = buf.split_first().ok_or_else(corrupt)?;
        *buf = rest;
        if *flag == 0 {
            return Ok(None);
        }
        if buf.len() < 4 {
            return Err(corrupt());
        }
        let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + n {
            return Err(corrupt());
        }
        let v = buf[4..4 + n].to_vec();
        *buf = &buf[4 + n..];
        Ok(Some(v))
    };
    while !buf.is_empty() {
        let key = part(&mut buf)?;
        let value = part(&mut buf)?;
        out.push(Message { key, value });
    }
    Ok(out)
}

/// Where sink `id`'s outbox entries live.
pub fn outbox_prefix(id: u32) -> Vec<u8> {
    sys_key(SYS_SINK_OUTBOX, &id.to_be_bytes())
}

/// The key of outbox entry `seq` of sink `id`.
pub fn outbox_key(id: u32, seq: u64) -> Vec<u8> {
    let mut k = outbox_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Sub-keyspace of the system table holding sinks' sequence high-water
/// marks: `0u32 · 0x07 · sink id` → the sequence number after the last
/// entry Kafka has (u64 BE). Written with every delete of outbox entries,
/// so that sequence numbers never restart at 0 when the outbox is empty:
/// an `EXACTLY ONCE` progress marker names a sequence number, and a
/// reused one would drop new entries as if Kafka had them.
pub const SYS_SINK_SEQ: u8 = 0x07;

/// The key of sink `id`'s sequence high-water mark.
pub fn seq_key(id: u32) -> Vec<u8> {
    sys_key(SYS_SINK_SEQ, &id.to_be_bytes())
}

fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// The sequence number after the last entry of sink `id`, pending or
/// already sent.
pub fn next_seq(store: &Store, id: u32) -> Result<u64> {
    // The entries first, then the mark: a writer deleting entries
    // meanwhile raises the mark in the same batch, so whichever the scan
    // missed, the later read of the mark sees.
    let mut next = 0;
    let prefix = outbox_prefix(id);
    store.scan_prefix(&prefix, |k, _| {
        if let Some(s) = k.get(prefix.len()..).and_then(read_u64) {
            next = next.max(s + 1);
        }
        Ok(true)
    })?;
    let mark = store
        .get(&seq_key(id))?
        .and_then(|v| read_u64(&v))
        .unwrap_or(0);
    Ok(next.max(mark))
}

/// Deletes sink `id`'s outbox entries below `next` (Kafka has them) and
/// raises its high-water mark to `next`, atomically.
fn delete_below(store: &Store, id: u32, next: u64) -> Result<()> {
    let mut batch = rocksdb::WriteBatch::default();
    batch.delete_range(outbox_key(id, 0), outbox_key(id, next));
    let hwm = store
        .get(&seq_key(id))?
        .and_then(|v| read_u64(&v))
        .unwrap_or(0);
    batch.put(seq_key(id), hwm.max(next).to_be_bytes());
    store.write(batch)
}

/// Up to [`ROUND_ENTRIES`] pending entries of sink `id`: (sequence number,
/// messages).
/// (Also at most [`ROUND_MESSAGES`] messages, unless one entry alone has
/// more: an entry is never split.)
fn pending(store: &Store, id: u32) -> Result<Vec<(u64, Vec<Message>)>> {
    let prefix = outbox_prefix(id);
    let mut out: Vec<(u64, Vec<Message>)> = Vec::new();
    let mut messages = 0usize;
    store.scan_prefix(&prefix, |k, v| {
        let seq = k
            .get(prefix.len()..)
            .and_then(read_u64)
            .ok_or_else(|| Error::Storage("corrupt sink outbox key".into()))?;
        let msgs = decode_entry(v)?;
        if !out.is_empty() && messages + msgs.len() > ROUND_MESSAGES {
            return Ok(false);
        }
        messages += msgs.len();
        out.push((seq, msgs));
        Ok(out.len() < ROUND_ENTRIES)
    })?;
    Ok(out)
}

#[derive(Default)]
struct Delivery {
    errors: AtomicU64,
    last: Mutex<Option<String>>,
}

struct SinkContext(Arc<Delivery>);

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.0.errors.fetch_add(1, Ordering::Relaxed);
            *self.0.last.lock() = Some(e.to_string());
        }
    }
}

/// What `SHOW SINKS` reports of a writer.
#[derive(Debug, Clone, Default)]
pub struct SinkStatus {
    /// running, or `retrying: …`.
    pub state: String,
    /// Messages acknowledged by Kafka since start.
    pub sent: u64,
}

struct Shared {
    stop: AtomicBool,
    wake: Condvar,
    pending: Mutex<bool>,
    status: Mutex<SinkStatus>,
}

/// The thread draining one sink's outbox.
pub struct SinkWriter {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SinkWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkWriter").finish()
    }
}

impl SinkSpec {
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("socket.connection.setup.timeout.ms", "10000");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// Contacts the brokers and creates the topic if it is missing (with
    /// `PARTITIONS`, default 1), and registers Avro schemas with the
    /// registry (`<topic>-value`, `<topic>-key`), keeping their ids:
    /// `CREATE SINK` fails here, with nothing created, when the brokers or
    /// the registry cannot be reached.
    pub fn prepare(&mut self) -> Result<()> {
        ensure_topic(
            &self.client_config(),
            &self.topic,
            self.partitions.unwrap_or(1),
            false,
        )?;
        if let SinkFormat::Avro(a) = &mut self.format {
            if let Some(r) = a.registry.clone() {
                let subject = |kind: &str| format!("{}-{kind}", self.topic);
                a.value_id = Some(super::avro::register(
                    &r,
                    &subject("value"),
                    &a.value_schema,
                )?);
                if let Some(k) = &a.key_schema {
                    a.key_id = Some(super::avro::register(&r, &subject("key"), k)?);
                }
            }
        }
        Ok(())
    }
}

impl SinkWriter {
    /// Starts draining sink `id`'s outbox to Kafka (in transactions with
    /// `EXACTLY ONCE`).
    pub fn start(name: &str, id: u32, spec: &SinkSpec, store: Arc<Store>) -> Result<SinkWriter> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            pending: Mutex::new(true),
            status: Mutex::new(SinkStatus {
                state: "running".into(),
                sent: 0,
            }),
        });
        let thread = {
            let shared = shared.clone();
            let builder = std::thread::Builder::new().name(format!("sink-{name}"));
            match &spec.exactly_once {
                None => {
                    let delivery = Arc::new(Delivery::default());
                    let producer: BaseProducer<SinkContext> = spec
                        .client_config()
                        .create_with_context(SinkContext(delivery.clone()))
                        .map_err(|e| {
                            Error::Connector(format!("Kafka client configuration: {e}"))
                        })?;
                    let topic = spec.topic.clone();
                    builder.spawn(move || {
                        drain(id, &shared, || {
                            send_round(id, &topic, &producer, &delivery, &store)
                                .map_err(Failure::Retry)
                        })
                    })?
                }
                Some(eo) => {
                    let mut w = TxnWriter::new(id, spec, eo)?;
                    builder.spawn(move || drain(id, &shared, || w.round(&store)))?
                }
            }
        };
        Ok(SinkWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// New outbox entries were committed.
    pub fn notify(&self) {
        *self.shared.pending.lock() = true;
        self.shared.wake.notify_one();
    }

    /// Its state.
    pub fn status(&self) -> SinkStatus {
        self.shared.status.lock().clone()
    }
}

impl Drop for SinkWriter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Most outbox entries sent per round.
const ROUND_ENTRIES: usize = 64;
/// Most messages per round (one transaction, one flush), so that a round
/// of big entries (a snapshot) does not outlast the producer's timeouts.
const ROUND_MESSAGES: usize = 20_000;

/// Why a round failed.
#[derive(Debug)]
enum Failure {
    /// Try again after a backoff.
    Retry(Error),
    /// The writer cannot go on (fenced by another writer with the same
    /// transactional id, or another fatal producer error).
    Fatal(Error),
}

/// The writer thread: rounds until the outbox is empty, then waits for a
/// commit to add entries (or 500 ms).
fn drain(id: u32, shared: &Shared, mut round: impl FnMut() -> Result<u64, Failure>) {
    let mut backoff = Duration::from_millis(100);
    while !shared.stop.load(Ordering::Relaxed) {
        {
            let mut pending = shared.pending.lock();
            if !*pending {
                shared
                    .wake
                    .wait_for(&mut pending, Duration::from_millis(500));
            }
            *pending = false;
        }
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            match round() {
                Ok(0) => {
                    shared.status.lock().state = "running".into();
                    break;
                }
                Ok(n) => {
                    backoff = Duration::from_millis(100);
                    let mut st = shared.status.lock();
                    st.state = "running".into();
                    st.sent += n;
                }
                Err(Failure::Fatal(e)) => {
                    tracing::error!(sink = id, "sink stopped: {e}");
                    shared.status.lock().state = format!("failed: {e}");
                    return;
                }
                Err(Failure::Retry(e)) => {
                    tracing::warn!(sink = id, "sink retrying in {backoff:?}: {e}");
                    shared.status.lock().state = format!("retrying: {e}");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !shared.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Sends `m` to `topic` (partitioned by key), waiting while the
/// producer's queue is full.
fn send_message<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    topic: &str,
    m: &Message,
) -> std::result::Result<(), KafkaError> {
    let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
    if let Some(k) = &m.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &m.value {
        rec = rec.payload(v.as_slice());
    }
    loop {
        match producer.send(rec) {
            Ok(()) => break,
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                rec = r;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e),
        }
    }
    producer.poll(Duration::ZERO);
    Ok(())
}

/// Sends up to [`ROUND_ENTRIES`] pending entries and deletes them once
/// Kafka acknowledged all their messages. Returns the messages sent.
fn send_round(
    id: u32,
    topic: &str,
    producer: &BaseProducer<SinkContext>,
    delivery: &Delivery,
    store: &Store,
) -> Result<u64> {
    let entries = pending(store, id)?;
    let Some((last, _)) = entries.last() else {
        return Ok(0);
    };
    let last = *last;
    let errors_before = delivery.errors.load(Ordering::Relaxed);
    let mut sent = 0u64;
    for (_, msgs) in &entries {
        for m in msgs {
            send_message(producer, topic, m).map_err(|e| Error::Connector(e.to_string()))?;
            sent += 1;
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .map_err(|e| Error::Connector(format!("waiting for Kafka: {e}")))?;
    if delivery.errors.load(Ordering::Relaxed) != errors_before {
        let last = delivery.last.lock().clone().unwrap_or_default();
        return Err(Error::Connector(format!("delivery failed: {last}")));
    }
    // Acknowledged: now the entries may go.
    delete_below(store, id, last + 1)?;
    Ok(sent)
}

/// A progress marker: the sequence number after the last outbox entry
/// whose messages the same transaction committed.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// [`ExactlyOnce::token`] of the sink that wrote it.
    sink: String,
    /// Entries below this are in Kafka.
    next_seq: u64,
}

/// How long one transaction may take to commit before the writer starts
/// over with a new producer.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// The `EXACTLY ONCE` writer: a transactional producer, and what it needs
/// to find its progress marker again.
struct TxnWriter {
    id: u32,
    topic: String,
    progress_topic: String,
    token: String,
    config: ClientConfig,
    /// `None` until (re)initialized: `init_transactions` and recovery
    /// from the progress marker come before the first send.
    producer: Option<BaseProducer<SinkContext>>,
    delivery: Arc<Delivery>,
}

impl TxnWriter {
    fn new(id: u32, spec: &SinkSpec, eo: &ExactlyOnce) -> Result<TxnWriter> {
        let transactional_id = eo
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("sluice-sink-{id}-{}", eo.token));
        let mut config = spec.client_config();
        config.set("transactional.id", &transactional_id);
        // Validate the configuration now: CREATE SINK fails, not the thread.
        let _: BaseProducer = config
            .create()
            .map_err(|e| Error::Connector(format!("Kafka client configuration: {e}")))?;
        Ok(TxnWriter {
            id,
            topic: spec.topic.clone(),
            progress_topic: progress_topic(&transactional_id),
            token: eo.token.clone(),
            config,
            producer: None,
            delivery: Arc::new(Delivery::default()),
        })
    }

    /// Classifies a Kafka error of a transactional call.
    fn failure(&mut self, what: &str, e: KafkaError) -> Failure {
        let err = Error::Connector(format!("{what}: {e}"));
        match &e {
            KafkaError::Transaction(t) if t.is_fatal() => Failure::Fatal(err),
            KafkaError::Transaction(t) if t.txn_requires_abort() => {
                // Nothing of the transaction is visible; abort and send the
                // same entries again. If even the abort fails, start over.
                let aborted = self
                    .producer
                    .as_ref()
                    .map(|p| p.abort_transaction(TXN_TIMEOUT));
                match aborted {
                    Some(Ok(())) => Failure::Retry(err),
                    Some(Err(KafkaError::Transaction(a))) if a.is_fatal() => {
                        Failure::Fatal(Error::Connector(format!("{what}: {e}; aborting: {a}")))
                    }
                    _ => {
                        self.producer = None;
                        Failure::Retry(err)
                    }
                }
            }
            _ => {
                // Unknown outcome (a timeout of the commit, say): a new
                // producer's init_transactions settles the old transaction,
                // and the progress marker tells whether it committed.
                self.producer = None;
                Failure::Retry(err)
            }
        }
    }

    /// A new transactional producer: creates the progress topic if it is
    /// missing, fences any older producer with this transactional id (its
    /// open transaction is aborted), then drops the outbox entries the last
    /// committed progress marker says Kafka has.
    fn init(&mut self, store: &Store) -> Result<(), Failure> {
        ensure_topic(&self.config, &self.progress_topic, 1, true).map_err(Failure::Retry)?;
        let producer: BaseProducer<SinkContext> = self
            .config
            .create_with_context(SinkContext(self.delivery.clone()))
            .map_err(|e| Failure::Fatal(Error::Connector(e.to_string())))?;
        if let Err(e) = producer.init_transactions(TXN_TIMEOUT) {
            return Err(match &e {
                KafkaError::Transaction(t) if t.is_fatal() => {
                    Failure::Fatal(Error::Connector(format!("init_transactions: {e}")))
                }
                _ => Failure::Retry(Error::Connector(format!("init_transactions: {e}"))),
            });
        }
        if let Some(next) = self.read_progress().map_err(Failure::Retry)? {
            delete_below(store, self.id, next).map_err(Failure::Retry)?;
        }
        self.producer = Some(producer);
        Ok(())
    }

    /// The last committed progress marker of this sink, if any: read with
    /// `read_committed` backwards from the end of the progress topic, in
    /// growing windows (markers of aborted transactions are invisible; a
    /// marker and its commit record take two offsets).
    fn read_progress(&self) -> Result<Option<u64>> {
        let mut config = self.config.clone();
        for k in ["transactional.id", "enable.idempotence", "linger.ms"] {
            config.remove(k);
        }
        // `assign` needs a group id, though nothing joins or commits.
        let consumer: BaseConsumer = config
            .set("group.id", format!("sluice-sink-{}-progress", self.id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(|e| Error::Connector(format!("Kafka client configuration: {e}")))?;
        let timeout = Duration::from_secs(10);
        let (low, high) = consumer
            .fetch_watermarks(&self.progress_topic, 0, timeout)
            .map_err(|e| Error::Connector(format!("reading {}: {e}", self.progress_topic)))?;
        let (mut end, mut window) = (high, 16i64);
        while end > low {
            let start = (end - window).max(low);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.progress_topic, 0, Offset::Offset(start))
                .map_err(|e| Error::Connector(e.to_string()))?;
            consumer
                .assign(&tpl)
                .map_err(|e| Error::Connector(e.to_string()))?;
            let mut found = None;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if Instant::now() > deadline {
                    return Err(Error::Connector(format!(
                        "reading {}: no end within 30 s",
                        self.progress_topic
                    )));
                }
                match consumer.poll(Duration::from_millis(200)) {
                    None => continue,
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => {
                        return Err(Error::Connector(format!(
                            "reading {}: {e}",
                            self.progress_topic
                        )))
                    }
                    Some(Ok(m)) => {
                        if m.offset() >= end {
                            break;
                        }
                        let marker = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<Marker>(p).ok());
                        if let Some(mk) = marker.filter(|mk| mk.sink == self.token) {
                            found = Some(mk.next_seq);
                        }
                        if m.offset() + 1 >= end {
                            break;
                        }
                    }
                }
            }
            if found.is_some() {
                return Ok(found);
            }
            end = start;
            window = window.saturating_mul(4);
        }
        Ok(None)
    }

    /// One transaction: up to [`ROUND_ENTRIES`] whole outbox entries and
    /// the progress marker naming the entry after them; then the entries
    /// are deleted. Returns the messages sent.
    fn round(&mut self, store: &Store) -> Result<u64, Failure> {
        if self.producer.is_none() {
            self.init(store)?;
        }
        let entries = pending(store, self.id).map_err(Failure::Retry)?;
        let Some((last, _)) = entries.last() else {
            return Ok(0);
        };
        let next_seq = *last + 1;
        let marker = serde_json::to_vec(&Marker {
            sink: self.token.clone(),
            next_seq,
        })
        .map_err(|e| Failure::Retry(Error::Internal(e.to_string())))?;
        let Some(producer) = self.producer.as_ref() else {
            return Err(Failure::Retry(Error::Internal("no producer".into())));
        };
        let mut sent = 0u64;
        let result = (|| {
            producer
                .begin_transaction()
                .map_err(|e| ("begin_transaction", e))?;
            for (_, msgs) in &entries {
                for m in msgs {
                    send_message(producer, &self.topic, m).map_err(|e| ("send", e))?;
                    sent += 1;
                }
            }
            let progress = Message {
                key: Some(self.token.clone().into_bytes()),
                value: Some(marker),
            };
            send_message(producer, &self.progress_topic, &progress)
                .map_err(|e| ("send progress", e))?;
            // Flushes, and fails (abortable) if any delivery failed.
            producer
                .commit_transaction(TXN_TIMEOUT)
                .map_err(|e| ("commit_transaction", e))
        })();
        if let Err((what, e)) = result {
            return Err(self.failure(what, e));
        }
        // Committed: Kafka has the entries (and the marker saying so), so
        // a crash before this delete loses nothing and repeats nothing.
        if let Err(e) = delete_below(store, self.id, next_seq) {
            // Kafka has these entries but the outbox still does: start
            // over from the progress marker, or the retry would send them
            // again in a new transaction.
            self.producer = None;
            return Err(Failure::Retry(e));
        }
        Ok(sent)
    }
}

/// The topic holding the progress markers of the sink with this
/// transactional id.
pub fn progress_topic(transactional_id: &str) -> String {
    let name: String = transactional_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}-progress")
}

/// Creates `topic` if the brokers do not have it (compacted: only the
/// last record per key matters, for a progress topic).
fn ensure_topic(config: &ClientConfig, topic: &str, partitions: i32, compact: bool) -> Result<()> {
    let producer: BaseProducer = config
        .create()
        .map_err(|e| Error::Connector(format!("Kafka client configuration: {e}")))?;
    // All topics: asking for one by name may auto-create it.
    let md = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| {
            Error::Connector(format!(
                "could not reach the Kafka brokers at {}: {e}",
                config.get("bootstrap.servers").unwrap_or_default()
            ))
        })?;
    if md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| Error::Connector(e.to_string()))?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    if compact {
        new = new.set("cleanup.policy", "compact");
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = futures::executor::block_on(admin.create_topics([&new], &opts))
        .map_err(|e| Error::Connector(format!("creating topic {topic}: {e}")))?;
    for r in results {
        if let Err((t, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                return Err(Error::Connector(format!("creating topic {t}: {code}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn spec(envelope: SinkEnvelope, key: Vec<usize>) -> SinkSpec {
        SinkSpec {
            brokers: String::new(),
            topic: "t".into(),
            properties: vec![],
            connection: None,
            envelope,
            key,
            partitions: None,
            format: SinkFormat::Json,
            exactly_once: None,
            encoder: Default::default(),
        }
    }

    #[test]
    fn upsert_and_debezium_net_out_per_key() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let data = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 1, 2, 3])),
                Arc::new(StringArray::from(vec![
                    Some("old"),
                    Some("new"),
                    Some("gone"),
                    None,
                ])),
            ],
        )
        .unwrap();
        let w = Int64Array::from(vec![-1, 1, -1, 1]);
        let up = encode(&spec(SinkEnvelope::Upsert, vec![0]), &data, &w).unwrap();
        assert_eq!(
            up,
            vec![
                Message {
                    key: Some(br#"{"k":1}"#.to_vec()),
                    value: Some(br#"{"k":1,"v":"new"}"#.to_vec())
                },
                Message {
                    key: Some(br#"{"k":2}"#.to_vec()),
                    value: None
                },
                Message {
                    key: Some(br#"{"k":3}"#.to_vec()),
                    value: Some(br#"{"k":3,"v":null}"#.to_vec())
                },
            ]
        );
        let dbz = encode(&spec(SinkEnvelope::Debezium, vec![0]), &data, &w).unwrap();
        let ops: Vec<serde_json::Value> = dbz
            .iter()
            .map(|m| serde_json::from_slice(m.value.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(ops[0]["op"], "u");
        assert_eq!(ops[0]["before"]["v"], "old");
        assert_eq!(ops[1]["op"], "d");
        assert_eq!(ops[2]["op"], "c");
        assert!(encode(&spec(SinkEnvelope::Append, vec![]), &data, &w).is_err());
        let entry = encode_entry(&up);
        assert_eq!(decode_entry(&entry).unwrap(), up);
        assert!(decode_entry(&entry[..entry.len() - 1]).is_err());
    }

    /// Messages of outbox entry `seq`: two keyed ones.
    fn entry(seq: u64) -> Vec<Message> {
        (0..2)
            .map(|i| Message {
                key: Some(format!("k{seq}").into_bytes()),
                value: Some(format!("m{seq}.{i}").into_bytes()),
            })
            .collect()
    }

    fn put_entries(store: &Store, id: u32, seqs: std::ops::Range<u64>) {
        let mut batch = rocksdb::WriteBatch::default();
        for seq in seqs {
            batch.put(outbox_key(id, seq), encode_entry(&entry(seq)));
        }
        store.write(batch).unwrap();
    }

    /// Every value in `topic`, read with `read_committed`.
    fn committed_values(brokers: &str, topic: &str) -> Vec<String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "check")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(String::from_utf8_lossy(m.payload().unwrap()).to_string()),
                Some(Err(KafkaError::PartitionEOF(_))) => return out,
                Some(Err(e)) => panic!("{e}"),
                None => {}
            }
        }
        panic!("no end of {topic}");
    }

    /// Crash between the Kafka commit and the outbox delete: the next
    /// writer finds the progress marker and sends nothing twice.
    ///
    /// librdkafka's mock cluster speaks the transactional protocol
    /// (InitProducerId, AddPartitionsToTxn, EndTxn) but keeps no
    /// transaction state: no markers, so `read_committed` would see aborted
    /// records too; a new producer gets a new producer id, so an old one is
    /// not fenced; and `TxnOffsetCommit` is acknowledged without storing
    /// the offsets — which is why progress is a marker record in the same
    /// transaction, not a consumer-group offset (see the module docs). So
    /// this test aborts nothing (every record it reads was committed) and
    /// cannot show fencing, which real brokers do.
    #[test]
    fn exactly_once_survives_a_crash_between_kafka_commit_and_outbox_delete() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let id = 7;
        cluster.create_topic("out", 1, 1).unwrap();
        cluster
            .create_topic(&progress_topic("sluice-sink-7-tok"), 1, 1)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), false).unwrap());
        let mut spec = spec(SinkEnvelope::Upsert, vec![0]);
        spec.brokers = brokers.clone();
        spec.topic = "out".into();
        let eo = ExactlyOnce {
            transactional_id: None,
            token: "tok".into(),
        };
        spec.exactly_once = Some(eo.clone());

        // Writer A sends entries 0..3 in one transaction…
        put_entries(&store, id, 0..3);
        let mut a = TxnWriter::new(id, &spec, &eo).unwrap();
        assert_eq!(a.round(&store).unwrap(), 6);
        assert_eq!(next_seq(&store, id).unwrap(), 3);
        // …and "crashes" before deleting them: the store as it was.
        put_entries(&store, id, 0..3);
        let mut undo = rocksdb::WriteBatch::default();
        undo.delete(seq_key(id));
        store.write(undo).unwrap();

        // Writer B (the restarted sink) reads the marker: Kafka has 0..3.
        let b = SinkWriter::start("s", id, &spec, store.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pending(&store, id).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "{:?}", b.status());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(b.status().sent, 0, "nothing sent twice");
        // New entries go out once.
        put_entries(&store, id, 3..5);
        b.notify();
        while b.status().sent < 4 {
            assert!(Instant::now() < deadline, "{:?}", b.status());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(b.status().state, "running");
        drop(b);
        assert_eq!(next_seq(&store, id).unwrap(), 5, "sequence numbers go on");

        drop(a);
        // A third writer (another restart) sends what is left.
        put_entries(&store, id, 5..6);
        let mut c = TxnWriter::new(id, &spec, &eo).unwrap();
        assert_eq!(c.round(&store).unwrap(), 2);

        let want: Vec<String> = (0..6)
            .flat_map(|s| (0..2).map(move |i| format!("m{s}.{i}")))
            .collect();
        assert_eq!(committed_values(&brokers, "out"), want);
        let markers = committed_values(&brokers, &progress_topic("sluice-sink-7-tok"));
        assert_eq!(markers.len(), 3, "{markers:?}");
        assert!(markers[2].contains(r#""next_seq":6"#), "{markers:?}");
    }
}
