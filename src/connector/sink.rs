//! Kafka sinks: changes encoded into an outbox in RocksDB, drained to a
//! topic by a writer thread.
//!
//! Exactly-once *into the outbox*: the commit that changes a relation also
//! stages, in the same `WriteBatch`, the Kafka messages those changes mean
//! for every sink reading it ([`encode`]), under the sink's next sequence
//! number. A new sink's first outbox entry is the relation's contents at
//! creation (the snapshot), written with its catalog entry. So the outbox
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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch};
use parking_lot::{Condvar, Mutex};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use serde::{Deserialize, Serialize};

use super::sink_format::{Encoder, SinkFormat};
use crate::error::{Error, Result};
use crate::state::store::{prefix_end, sys_key, Store};

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
    /// `sluice-sink-<sink id>`.
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
            let mut per_key: std::collections::HashMap<
                &Option<Vec<u8>>,
                (Option<usize>, Option<usize>),
            > = std::collections::HashMap::new();
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

/// The sequence number after the last pending entry of sink `id`.
pub fn next_seq(store: &Store, id: u32) -> Result<u64> {
    let mut next = 0;
    let prefix = outbox_prefix(id);
    store.scan_prefix(&prefix, |k, _| {
        if let Some(s) = k.get(prefix.len()..prefix.len() + 8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(s);
            next = u64::from_be_bytes(b) + 1;
        }
        Ok(true)
    })?;
    Ok(next)
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
        let producer: BaseProducer = self
            .client_config()
            .create()
            .map_err(|e| Error::Connector(format!("Kafka client configuration: {e}")))?;
        let md = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| {
                Error::Connector(format!(
                    "could not reach the Kafka brokers at {}: {e}",
                    self.brokers
                ))
            })?;
        let exists = md
            .topics()
            .iter()
            .any(|t| t.name() == self.topic && t.error().is_none());
        if !exists {
            let admin: AdminClient<DefaultClientContext> = self
                .client_config()
                .create()
                .map_err(|e| Error::Connector(e.to_string()))?;
            let topic = NewTopic::new(
                &self.topic,
                self.partitions.unwrap_or(1),
                TopicReplication::Fixed(1),
            );
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let results = futures::executor::block_on(admin.create_topics([&topic], &opts))
                .map_err(|e| Error::Connector(format!("creating topic {}: {e}", self.topic)))?;
            for r in results {
                if let Err((t, code)) = r {
                    if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                        return Err(Error::Connector(format!("creating topic {t}: {code}")));
                    }
                }
            }
        }
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
    /// Starts draining sink `id`'s outbox to Kafka.
    pub fn start(name: &str, id: u32, spec: &SinkSpec, store: Arc<Store>) -> Result<SinkWriter> {
        let delivery = Arc::new(Delivery::default());
        let producer: BaseProducer<SinkContext> = spec
            .client_config()
            .create_with_context(SinkContext(delivery.clone()))
            .map_err(|e| Error::Connector(format!("Kafka client configuration: {e}")))?;
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
            let topic = spec.topic.clone();
            std::thread::Builder::new()
                .name(format!("sink-{name}"))
                .spawn(move || drain(id, &topic, &producer, &delivery, &store, &shared))?
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

fn drain(
    id: u32,
    topic: &str,
    producer: &BaseProducer<SinkContext>,
    delivery: &Delivery,
    store: &Store,
    shared: &Shared,
) {
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
            match send_round(id, topic, producer, delivery, store) {
                Ok(0) => break,
                Ok(n) => {
                    backoff = Duration::from_millis(100);
                    let mut st = shared.status.lock();
                    st.state = "running".into();
                    st.sent += n;
                }
                Err(e) => {
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

/// Sends up to [`ROUND_ENTRIES`] pending entries and deletes them once
/// Kafka acknowledged all their messages. Returns the messages sent.
fn send_round(
    id: u32,
    topic: &str,
    producer: &BaseProducer<SinkContext>,
    delivery: &Delivery,
    store: &Store,
) -> Result<u64> {
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    store.scan_prefix(&outbox_prefix(id), |k, v| {
        entries.push((k.to_vec(), v.to_vec()));
        Ok(entries.len() < ROUND_ENTRIES)
    })?;
    if entries.is_empty() {
        return Ok(0);
    }
    let errors_before = delivery.errors.load(Ordering::Relaxed);
    let mut sent = 0u64;
    for (_, v) in &entries {
        for m in decode_entry(v)? {
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
                    Err((e, _)) => return Err(Error::Connector(e.to_string())),
                }
            }
            sent += 1;
            producer.poll(Duration::ZERO);
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
    let mut batch = rocksdb::WriteBatch::default();
    let first = &entries[0].0;
    let last = &entries[entries.len() - 1].0;
    batch.delete_range(first.clone(), prefix_end(last));
    store.write(batch)?;
    Ok(sent)
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
}
