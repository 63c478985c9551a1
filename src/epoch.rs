//! The epoch driver: how source rows become committed view state.
//!
//! Table writes are maintained synchronously: each statement is its own
//! epoch (see [`Engine::commit`]). Sources have no statement to ride on, so
//! a driver thread ticks every checkpoint interval (`--checkpoint-interval`,
//! 100 ms by default) and runs one **epoch**:
//!
//! 1. take the engine's writer lock, so the epoch is ordered with every DML
//!    statement and DDL change;
//! 2. for each running source, take its new rows: a generator's rows due
//!    since its last epoch ([`GeneratorSpec::rows_due`]: by its rate, at
//!    most [`MAX_EPOCH_ROWS`]); a Kafka source's records its reader thread
//!    has polled and decoded since ([`KafkaReader::take`]), with the records
//!    it could not decode;
//! 3. push them through every view pipeline that reads the source
//!    ([`Engine::commit`]), staging all operator state and view rows into
//!    **one** RocksDB `WriteBatch` — together with each source's new
//!    position (an offset, or a Kafka source's offset per partition) and
//!    its bad records (`sluice_source_errors`);
//! 4. apply the batch. Only now is the epoch committed: SELECT sees all of
//!    it or none of it, and after `kill -9` the offsets and the state agree,
//!    so the restarted source resumes exactly after the last row the views
//!    counted — no gaps, no duplicates, and no recomputation.
//!
//! An epoch whose changes a view cannot process (say a division by zero in
//! its SELECT list) is retried one source at a time, and the source that
//! fails alone stops with its error visible in `SHOW SOURCES`; the others go
//! on. `FLUSH` asks the driver for an immediate epoch and waits for it, so
//! every row due before the `FLUSH` is visible in every view after it (for
//! a Kafka source: every record below the high watermarks it reads at the
//! time of the `FLUSH`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::HashMap;

use datafusion::arrow::array::{RecordBatch, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take_record_batch};
use datafusion::common::ScalarValue;
use parking_lot::{Condvar, Mutex};
use rocksdb::WriteBatch;
use tokio::sync::oneshot;

use crate::catalog::types::SqlType;
use crate::catalog::Table;
use crate::catalog::{
    encode_positions, read_positions, read_source_offset, source_error_key, source_errors_prefix,
    source_offset_key, Source, SourceConnector, StoredBadRecord,
};
use crate::connector::format::KeyedOp;
use crate::connector::kafka::{OnError, PartitionStats, Topics};
use crate::connector::{BadRecord, GeneratorSpec, KafkaReader, KafkaSpec, Positions};
use crate::dataflow::{ChangeBatch, TableChange};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::query::table::rows_to_batch;
use crate::state::encoding::{decode_row, encode_value, table_prefix};

/// Most rows one source contributes to one epoch: bounds an epoch's memory
/// and how long it holds the writer lock.
pub const MAX_EPOCH_ROWS: u64 = 64 * 1024;

/// How long `FLUSH` waits for a Kafka source to reach the high watermarks.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// A source's lifecycle as `SHOW SOURCES` reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceState {
    /// Producing rows.
    Running,
    /// A bounded source that produced all its rows.
    Finished,
    /// Stopped by an error.
    Failed(String),
}

impl std::fmt::Display for SourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceState::Running => f.write_str("running"),
            SourceState::Finished => f.write_str("finished"),
            SourceState::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Where a source's rows come from, with what the driver tracks of it.
/// (One per source: the Kafka variant's size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Feed {
    Generator {
        spec: GeneratorSpec,
        /// Where and when pacing restarted (creation or engine start): the
        /// rate applies from here, so downtime is not caught up in one
        /// burst.
        resumed_at: Instant,
        resumed_offset: u64,
    },
    Kafka {
        spec: KafkaSpec,
        reader: Option<KafkaReader>,
        /// Committed positions.
        positions: Positions,
        /// A keyed source's rows.
        table: Option<Arc<Table>>,
    },
}

/// A source the driver runs.
pub struct SourceRun {
    /// Source id.
    pub id: u32,
    /// Source name.
    pub name: String,
    feed: Feed,
    /// Generator: committed offset (rows `0..offset` are in every view
    /// reading it). Kafka: records committed since creation.
    pub offset: u64,
    /// Bad records committed to `sluice_source_errors`.
    pub errors: u64,
    /// Lifecycle.
    pub state: SourceState,
    /// A Kafka reader had more chunks than one epoch takes.
    more: bool,
}

/// One source's contribution to an epoch.
struct Work {
    run: usize,
    rows: RecordBatch,
    bad: Vec<BadRecord>,
    /// A keyed source: its changes in record order, and where its rows live.
    keyed: Option<(Vec<KeyedOp>, Arc<Table>)>,
    advance: Advance,
}

enum Advance {
    Offset(u64),
    Positions(Positions),
}

impl SourceRun {
    fn new(engine: &Engine, source: &Source) -> Result<SourceRun> {
        let (feed, offset, errors) = match &source.def.connector {
            SourceConnector::Generator(spec) => {
                let offset = read_source_offset(&engine.store, source.def.id)?;
                (
                    Feed::Generator {
                        spec: spec.clone(),
                        resumed_at: Instant::now(),
                        resumed_offset: offset,
                    },
                    offset,
                    0,
                )
            }
            SourceConnector::Kafka(spec) => {
                let positions = read_positions(&engine.store, source.def.id)?;
                let decoder = source
                    .def
                    .decoder()?
                    .ok_or_else(|| Error::Internal("Kafka source without decoder".into()))?;
                let wake = engine.driver.wake.clone();
                let reader = KafkaReader::start(
                    &source.def.name,
                    spec,
                    decoder,
                    &positions,
                    Arc::new(move || wake.notify()),
                )?;
                let mut errors = 0u64;
                engine
                    .store
                    .scan_prefix(&source_errors_prefix(source.def.id), |_, _| {
                        errors += 1;
                        Ok(true)
                    })?;
                let offset = records_read(spec, &positions);
                (
                    Feed::Kafka {
                        spec: spec.clone(),
                        reader: Some(reader),
                        positions,
                        table: source.table.clone(),
                    },
                    offset,
                    errors,
                )
            }
        };
        let mut run = SourceRun {
            id: source.def.id,
            name: source.def.name.clone(),
            feed,
            offset,
            errors,
            state: SourceState::Running,
            more: false,
        };
        run.check_finished();
        Ok(run)
    }

    fn check_finished(&mut self) {
        if let Feed::Generator { spec, .. } = &self.feed {
            if self.state == SourceState::Running && spec.limit() == Some(self.offset) {
                self.state = SourceState::Finished;
            }
        }
    }

    fn fail(&mut self, e: &Error) {
        tracing::error!(source = %self.name, "source stopped: {e}");
        self.state = SourceState::Failed(e.to_string());
        self.more = false;
        if let Feed::Kafka { reader, .. } = &mut self.feed {
            // Stops its thread; a restart resumes from the committed
            // positions.
            *reader = None;
        }
    }

    /// A generator: the offset this epoch should advance it to.
    fn due(&self, now: Instant) -> u64 {
        match &self.feed {
            Feed::Generator {
                spec,
                resumed_at,
                resumed_offset,
            } => paced(spec, *resumed_at, *resumed_offset, now)
                .min(self.offset.saturating_add(MAX_EPOCH_ROWS)),
            Feed::Kafka { .. } => self.offset,
        }
    }

    /// The work of this source for one epoch, if it has any.
    fn work(&mut self, run: usize, now: Instant) -> Result<Option<Work>> {
        if self.state != SourceState::Running {
            return Ok(None);
        }
        let due = self.due(now);
        match &mut self.feed {
            Feed::Generator { spec, .. } => {
                if due <= self.offset {
                    return Ok(None);
                }
                Ok(Some(Work {
                    run,
                    rows: spec.generate(self.offset, due)?,
                    bad: Vec::new(),
                    keyed: None,
                    advance: Advance::Offset(due),
                }))
            }
            Feed::Kafka {
                spec,
                reader: Some(reader),
                positions,
                table,
            } => {
                let (chunks, more) = reader.take(MAX_EPOCH_ROWS as usize);
                self.more = more;
                let Some(first) = chunks.first() else {
                    return Ok(None);
                };
                let schema = first.batch.schema();
                let rows = concat_batches(&schema, chunks.iter().map(|c| &c.batch))?;
                let mut next = positions.clone();
                let mut bad = Vec::new();
                let mut ops = Vec::new();
                let mut base = 0;
                for c in chunks {
                    next.extend(c.positions);
                    bad.extend(c.bad);
                    for mut op in c.ops.unwrap_or_default() {
                        op.row = op.row.map(|r| r + base);
                        ops.push(op);
                    }
                    base += c.batch.num_rows();
                }
                if spec.on_error == OnError::Fail {
                    if let Some(b) = bad.first() {
                        return Err(Error::Decode(format!(
                            "record {}/{}@{} could not be decoded: {}",
                            b.topic, b.partition, b.offset, b.error
                        )));
                    }
                }
                Ok(Some(Work {
                    run,
                    rows,
                    bad,
                    keyed: table.clone().map(|t| (ops, t)),
                    advance: Advance::Positions(next),
                }))
            }
            Feed::Kafka { reader: None, .. } => Ok(None),
        }
    }

    /// Records a committed epoch.
    fn advance(&mut self, work: Work) {
        self.errors += work.bad.len() as u64;
        match (work.advance, &mut self.feed) {
            (Advance::Offset(to), _) => self.offset = to,
            (
                Advance::Positions(next),
                Feed::Kafka {
                    spec,
                    reader,
                    positions,
                    ..
                },
            ) => {
                self.offset = records_read(spec, &next);
                if let Some(r) = reader {
                    r.commit_to_group(&next);
                }
                *positions = next;
            }
            (Advance::Positions(_), Feed::Generator { .. }) => {}
        }
    }

    fn describe(&self) -> String {
        match &self.feed {
            Feed::Generator { spec, .. } => describe_generator(spec),
            Feed::Kafka { spec, .. } => {
                let topics = match &spec.topics {
                    Topics::Name(n) => format!("topic '{n}'"),
                    Topics::Pattern(p) => format!("topic pattern '{p}'"),
                };
                format!("kafka {topics} ({})", spec.format)
            }
        }
    }

    fn state_text(&self) -> String {
        match (&self.state, &self.feed) {
            (
                SourceState::Running,
                Feed::Kafka {
                    reader: Some(r), ..
                },
            ) => match r.error() {
                Some(e) => format!("retrying: {e}"),
                None => "running".into(),
            },
            (s, _) => s.to_string(),
        }
    }
}

/// The offset a generator's rate has reached by `now`, pacing from where it
/// resumed.
fn paced(spec: &GeneratorSpec, resumed_at: Instant, resumed_offset: u64, now: Instant) -> u64 {
    spec.rows_due(resumed_offset, now.saturating_duration_since(resumed_at))
}

/// Records a Kafka source has committed since its start offsets.
fn records_read(spec: &KafkaSpec, positions: &Positions) -> u64 {
    positions
        .iter()
        .map(|((t, p), o)| (o - spec.start_of(t, *p)).max(0) as u64)
        .sum()
}

fn describe_generator(spec: &GeneratorSpec) -> String {
    match spec {
        GeneratorSpec::Counter { rate, max } => format!(
            "counter (rate {}{})",
            rate_text(*rate),
            max.map(|m| format!(", max {m}")).unwrap_or_default()
        ),
        GeneratorSpec::Nexmark {
            table,
            rate,
            events,
            ..
        } => format!(
            "nexmark {} (rate {}{})",
            match table {
                crate::connector::NexmarkTable::Person => "person",
                crate::connector::NexmarkTable::Auction => "auction",
                crate::connector::NexmarkTable::Bid => "bid",
            },
            rate_text(*rate),
            events.map(|e| format!(", events {e}")).unwrap_or_default()
        ),
    }
}

fn rate_text(rate: u64) -> String {
    if rate == 0 {
        "unlimited".into()
    } else {
        format!("{rate}/s")
    }
}

/// One row of `SHOW SOURCES`.
#[derive(Debug, Clone)]
pub struct SourceStatus {
    /// Name.
    pub name: String,
    /// What it reads.
    pub connector: String,
    /// Generator: committed offset; Kafka: records committed.
    pub offset: u64,
    /// running / finished / failed: … / retrying: …
    pub state: String,
    /// Bad records recorded.
    pub errors: u64,
}

/// One row of `sluice_source_partitions`.
#[derive(Debug, Clone)]
pub struct PartitionStatus {
    /// Source name.
    pub source: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Committed position (next offset to read).
    pub offset: i64,
    /// Reader's counters.
    pub stats: PartitionStats,
    /// Source state.
    pub state: String,
}

/// Shortest time between two epochs that records (not the interval) asked
/// for: a trickle of records must not turn every poll into its own fsync'd
/// epoch, while a burst is committed within a few milliseconds.
const MIN_EPOCH_GAP: Duration = Duration::from_millis(10);

/// Wakes the driver before its interval is up: a `FLUSH`, or records a
/// Kafka reader has ready.
#[derive(Default)]
pub struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    /// Asks for an epoch now.
    pub fn notify(&self) {
        *self.pending.lock() = true;
        self.cv.notify_one();
    }
}

/// The driver's shared state; owned by the [`Engine`].
#[derive(Default)]
pub struct Driver {
    runs: Mutex<Vec<SourceRun>>,
    flush_waiters: Mutex<Vec<oneshot::Sender<()>>>,
    wake: Arc<Wake>,
    epochs: AtomicU64,
}

impl Driver {
    /// Starts running `source` from its committed position in the store.
    /// Callers hold the engine's writer lock.
    pub fn add(&self, engine: &Engine, source: &Source) -> Result<()> {
        let run = SourceRun::new(engine, source)?;
        self.runs.lock().push(run);
        Ok(())
    }

    /// Stops running the sources with these ids. Callers hold the engine's
    /// writer lock, so no epoch is in flight.
    pub fn remove(&self, ids: &[u32]) {
        let removed: Vec<SourceRun> = {
            let mut runs = self.runs.lock();
            let (gone, kept) = std::mem::take(&mut *runs)
                .into_iter()
                .partition(|r| ids.contains(&r.id));
            *runs = kept;
            gone
        };
        // Readers join their threads on drop: outside the lock.
        drop(removed);
    }

    /// The committed offset of a running generator source.
    pub fn offset(&self, id: u32) -> Option<u64> {
        self.runs
            .lock()
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.offset)
    }

    /// The committed positions of a running Kafka source.
    pub fn positions(&self, id: u32) -> Option<Positions> {
        self.runs
            .lock()
            .iter()
            .find(|r| r.id == id)
            .and_then(|r| match &r.feed {
                Feed::Kafka { positions, .. } => Some(positions.clone()),
                Feed::Generator { .. } => None,
            })
    }

    /// `SHOW SOURCES`, by name.
    pub fn status(&self) -> Vec<SourceStatus> {
        let mut v: Vec<_> = self
            .runs
            .lock()
            .iter()
            .map(|r| SourceStatus {
                name: r.name.clone(),
                connector: r.describe(),
                offset: r.offset,
                state: r.state_text(),
                errors: r.errors,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// `sluice_source_partitions`: every partition of every Kafka source.
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        let runs = self.runs.lock();
        let mut out = Vec::new();
        for r in runs.iter() {
            let Feed::Kafka {
                reader, positions, ..
            } = &r.feed
            else {
                continue;
            };
            let stats = reader
                .as_ref()
                .map(|r| r.partition_stats())
                .unwrap_or_default();
            let mut keys: Vec<&(String, i32)> = positions.keys().chain(stats.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                out.push(PartitionStatus {
                    source: r.name.clone(),
                    topic: k.0.clone(),
                    partition: k.1,
                    offset: positions.get(k).copied().unwrap_or_default(),
                    stats: stats.get(k).cloned().unwrap_or_default(),
                    state: r.state_text(),
                });
            }
        }
        out.sort_by(|a, b| {
            (&a.source, &a.topic, a.partition).cmp(&(&b.source, &b.topic, b.partition))
        });
        out
    }

    /// Number of epochs committed since the engine started.
    pub fn epochs(&self) -> u64 {
        self.epochs.load(Ordering::Relaxed)
    }

    /// Waits until every running source has committed the rows due now:
    /// by its rate, or — without a rate limit — all of a bounded source's
    /// rows, or one more epoch of an unbounded one; for a Kafka source,
    /// every record below the partitions' current high watermarks. Returns
    /// at once when no source is running.
    pub async fn flush(&self) -> Result<()> {
        let now = Instant::now();
        let mut targets: Vec<(u32, u64)> = Vec::new();
        // Each Kafka source's watermark lookup, through its reader's
        // consumer (run below, off the lock).
        let mut kafka = Vec::new();
        for r in self.runs.lock().iter() {
            if r.state != SourceState::Running {
                continue;
            }
            match &r.feed {
                Feed::Generator {
                    spec,
                    resumed_at,
                    resumed_offset,
                } => {
                    let due = paced(spec, *resumed_at, *resumed_offset, now);
                    let cap = spec
                        .limit()
                        .unwrap_or(r.offset.saturating_add(MAX_EPOCH_ROWS));
                    targets.push((r.id, due.min(cap)));
                }
                Feed::Kafka {
                    reader: Some(reader),
                    ..
                } => kafka.push((r.id, r.name.clone(), reader.watermarks())),
                Feed::Kafka { reader: None, .. } => {}
            }
        }
        let mut marks: Vec<(u32, String, Positions)> = Vec::new();
        for (id, name, lookup) in kafka {
            let m = tokio::task::spawn_blocking(lookup)
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            marks.push((id, name, m));
        }
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        loop {
            let pending = {
                let runs = self.runs.lock();
                let gens = targets.iter().any(|(id, target)| {
                    runs.iter().any(|r| {
                        r.id == *id && r.state == SourceState::Running && r.offset < *target
                    })
                });
                let kafka = marks.iter().find(|(id, _, marks)| {
                    runs.iter().any(|r| match &r.feed {
                        Feed::Kafka { positions, .. }
                            if r.id == *id && r.state == SourceState::Running =>
                        {
                            marks
                                .iter()
                                .any(|(k, high)| positions.get(k).copied().unwrap_or(0) < *high)
                        }
                        _ => false,
                    })
                });
                if let Some((_, name, _)) = kafka {
                    if Instant::now() > deadline {
                        return Err(Error::Connector(format!(
                            "FLUSH gave up after {} s waiting for source \"{name}\" to reach the high watermarks of its partitions",
                            FLUSH_TIMEOUT.as_secs()
                        )));
                    }
                }
                gens || kafka.is_some()
            };
            if !pending {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            self.flush_waiters.lock().push(tx);
            self.wake.notify();
            // The driver answers after its next epoch; if it is gone (the
            // engine is shutting down) the sender is dropped: stop waiting.
            if rx.await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Starts the driver thread. It holds only a weak reference between epochs
/// and exits once the engine is dropped.
pub fn spawn(engine: &Arc<Engine>, interval: Duration) -> Result<()> {
    let weak: Weak<Engine> = Arc::downgrade(engine);
    std::thread::Builder::new()
        .name("sluice-epoch".into())
        .spawn(move || run(weak, interval))?;
    Ok(())
}

fn run(weak: Weak<Engine>, interval: Duration) {
    let mut behind = false;
    let mut last = Instant::now();
    loop {
        let Some(engine) = weak.upgrade() else {
            return;
        };
        let driver = &engine.driver;
        if !behind {
            let mut pending = driver.wake.pending.lock();
            if !*pending {
                driver.wake.cv.wait_for(&mut pending, interval);
            }
            *pending = false;
        }
        // Behind (a source has more than one epoch's worth): go at once.
        let since = last.elapsed();
        if !behind && since < MIN_EPOCH_GAP {
            std::thread::sleep(MIN_EPOCH_GAP - since);
        }
        last = Instant::now();
        let waiters = std::mem::take(&mut *driver.flush_waiters.lock());
        behind = match epoch(&engine) {
            Ok(behind) => behind,
            Err(e) => {
                tracing::error!("epoch failed: {e}");
                false
            }
        };
        for w in waiters {
            let _ = w.send(());
        }
    }
}

/// Runs one epoch. Returns whether some source is still behind (so the
/// next epoch should start at once).
fn epoch(engine: &Engine) -> Result<bool> {
    let _writer = futures::executor::block_on(engine.writer());
    let mut runs = engine.driver.runs.lock();
    let now = Instant::now();
    let mut work = Vec::new();
    for (i, r) in runs.iter_mut().enumerate() {
        match r.work(i, now) {
            Ok(Some(w)) => work.push(w),
            Ok(None) => {}
            Err(e) => r.fail(&e),
        }
    }
    if work.is_empty() {
        return Ok(false);
    }
    let full = work
        .iter()
        .any(|w| w.rows.num_rows() as u64 >= MAX_EPOCH_ROWS)
        || runs.iter().any(|r| r.more);
    match commit(engine, &runs, &work) {
        Ok(()) => {
            for w in work {
                let i = w.run;
                runs[i].advance(w);
            }
        }
        Err(e) if work.len() == 1 => runs[work[0].run].fail(&e),
        Err(_) => {
            // Find the culprit: each source alone.
            for w in work {
                let i = w.run;
                match commit(engine, &runs, std::slice::from_ref(&w)) {
                    Ok(()) => runs[i].advance(w),
                    Err(e) => runs[i].fail(&e),
                }
            }
        }
    }
    engine.driver.epochs.fetch_add(1, Ordering::Relaxed);
    let mut behind = full;
    for r in runs.iter_mut() {
        r.check_finished();
        behind |= r.state == SourceState::Running
            && matches!(r.feed, Feed::Generator { .. })
            && r.due(Instant::now()) > r.offset;
    }
    Ok(behind)
}

/// Commits the rows of `work` with the sources' new positions and bad
/// records in one batch.
fn commit(engine: &Engine, runs: &[SourceRun], work: &[Work]) -> Result<()> {
    let mut batch = WriteBatch::default();
    let mut changes = Vec::with_capacity(work.len());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    for w in work {
        let run = runs
            .get(w.run)
            .ok_or_else(|| Error::Internal("source run vanished".into()))?;
        match &w.advance {
            Advance::Offset(to) => batch.put(source_offset_key(run.id), to.to_be_bytes()),
            Advance::Positions(p) => batch.put(source_offset_key(run.id), encode_positions(p)?),
        }
        for b in &w.bad {
            let value = serde_json::to_vec(&StoredBadRecord {
                record: b.clone(),
                time_ms: now_ms,
            })
            .map_err(|e| Error::Internal(e.to_string()))?;
            batch.put(
                source_error_key(run.id, &b.topic, b.partition, b.offset),
                value,
            );
        }
        let change = match &w.keyed {
            None => ChangeBatch::uniform(w.rows.clone(), 1),
            Some((ops, table)) => upsert(engine, table, &w.rows, ops, &mut batch)?,
        };
        if !change.is_empty() {
            changes.push(TableChange {
                table_id: run.id,
                changes: change,
            });
        }
    }
    futures::executor::block_on(engine.commit(batch, changes))
}

/// Applies a keyed source's changes to its stored rows (staged in `batch`)
/// and returns the net change: per key, the stored row out and the last
/// record's row in — intermediate values within one epoch are never
/// visible, so they need not flow.
fn upsert(
    engine: &Engine,
    table: &Table,
    rows: &RecordBatch,
    ops: &[KeyedOp],
    batch: &mut WriteBatch,
) -> Result<ChangeBatch> {
    let mut last: HashMap<&[u8], Option<usize>> = HashMap::with_capacity(ops.len());
    for op in ops {
        last.insert(op.key.as_slice(), op.row);
    }
    let mut keys: Vec<(&[u8], Option<usize>)> = last.into_iter().collect();
    keys.sort();
    let prefix = table_prefix(table.def.id);
    let storage_keys: Vec<Vec<u8>> = keys
        .iter()
        .map(|(k, _)| {
            let mut key = prefix.to_vec();
            encode_value(
                &mut key,
                &SqlType::Bytea,
                &ScalarValue::Binary(Some(k.to_vec())),
            )?;
            Ok(key)
        })
        .collect::<Result<_>>()?;
    let old = engine.store.multi_get(&storage_keys)?;
    let inserted: Vec<u32> = keys
        .iter()
        .filter_map(|(_, r)| r.map(|r| r as u32))
        .collect();
    let new_rows = take_record_batch(rows, &UInt32Array::from(inserted))?;
    let new_values = table.row_values(&new_rows)?;
    let types = table.types();
    let mut deleted = Vec::new();
    // Indices into `new_rows` of the rows that change.
    let mut keep: Vec<u32> = Vec::new();
    let mut values = new_values.into_iter().enumerate();
    for ((storage_key, (_, row)), old) in storage_keys.iter().zip(&keys).zip(old) {
        let new = match row {
            Some(_) => Some(
                values
                    .next()
                    .ok_or_else(|| Error::Internal("upsert rows out of step".into()))?,
            ),
            None => None,
        };
        if old.is_some() && old.as_ref() == new.as_ref().map(|(_, v)| v) {
            // Unchanged: nothing to store or to send.
            continue;
        }
        if let Some(o) = &old {
            deleted.push(decode_row(o, &types)?);
        }
        match new {
            Some((i, v)) => {
                batch.put(storage_key, v);
                keep.push(i as u32);
            }
            None if old.is_some() => batch.delete(storage_key),
            None => {}
        }
    }
    let inserts = take_record_batch(&new_rows, &UInt32Array::from(keep))?;
    let deletes = rows_to_batch(&table.schema, deleted)?;
    ChangeBatch::concat(
        &table.schema,
        &[
            ChangeBatch::uniform(deletes, -1),
            ChangeBatch::uniform(inserts, 1),
        ],
    )
}
