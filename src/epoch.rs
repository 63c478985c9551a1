//! The epoch driver: how source rows become committed view state.
//!
//! Table writes are maintained synchronously: each statement is its own
//! epoch (see [`Engine::commit`]). Sources have no statement to ride on, so
//! a driver thread ticks every checkpoint interval (`--checkpoint-interval`,
//! 100 ms by default) and runs one **epoch**:
//!
//! 1. take the engine's writer lock, so the epoch is ordered with every DML
//!    statement and DDL change;
//! 2. for each running source, generate the rows due since its last epoch
//!    ([`GeneratorSpec::rows_due`]: by its rate, at most
//!    [`MAX_EPOCH_ROWS`]);
//! 3. push them through every view pipeline that reads the source
//!    ([`Engine::commit`]), staging all operator state and view rows into
//!    **one** RocksDB `WriteBatch` — together with each source's new offset;
//! 4. apply the batch. Only now is the epoch committed: SELECT sees all of
//!    it or none of it, and after `kill -9` the offsets and the state agree,
//!    so the restarted source resumes exactly after the last row the views
//!    counted — no gaps, no duplicates, and no recomputation.
//!
//! An epoch whose changes a view cannot process (say a division by zero in
//! its SELECT list) is retried one source at a time, and the source that
//! fails alone stops with its error visible in `SHOW SOURCES`; the others go
//! on. `FLUSH` asks the driver for an immediate epoch and waits for it, so
//! every row due before the `FLUSH` is visible in every view after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rocksdb::WriteBatch;
use tokio::sync::oneshot;

use crate::catalog::{read_source_offset, source_offset_key, Source};
use crate::connector::GeneratorSpec;
use crate::dataflow::{ChangeBatch, TableChange};
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Most rows one source contributes to one epoch: bounds an epoch's memory
/// and how long it holds the writer lock.
pub const MAX_EPOCH_ROWS: u64 = 64 * 1024;

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

/// A source the driver runs.
#[derive(Debug)]
pub struct SourceRun {
    /// Source id.
    pub id: u32,
    /// Source name.
    pub name: String,
    /// What it generates.
    pub spec: GeneratorSpec,
    /// Committed offset: rows `0..offset` are in every view reading it.
    pub offset: u64,
    /// Where and when pacing restarted (creation or engine start): the rate
    /// applies from here, so downtime is not caught up in one burst.
    resumed_at: Instant,
    resumed_offset: u64,
    /// Lifecycle.
    pub state: SourceState,
}

impl SourceRun {
    fn new(source: &Source, offset: u64) -> SourceRun {
        let mut run = SourceRun {
            id: source.def.id,
            name: source.def.name.clone(),
            spec: source.def.generator.clone(),
            offset,
            resumed_at: Instant::now(),
            resumed_offset: offset,
            state: SourceState::Running,
        };
        run.check_finished();
        run
    }

    fn check_finished(&mut self) {
        if self.state == SourceState::Running && self.spec.limit() == Some(self.offset) {
            self.state = SourceState::Finished;
        }
    }

    /// The offset this epoch should advance the source to.
    fn due(&self, now: Instant) -> u64 {
        let due = self.spec.rows_due(
            self.resumed_offset,
            now.saturating_duration_since(self.resumed_at),
        );
        due.min(self.offset.saturating_add(MAX_EPOCH_ROWS))
    }
}

/// The driver's shared state; owned by the [`Engine`].
#[derive(Default)]
pub struct Driver {
    runs: Mutex<Vec<SourceRun>>,
    flush_waiters: Mutex<Vec<oneshot::Sender<()>>>,
    wake: Condvar,
    epochs: AtomicU64,
}

impl Driver {
    /// Starts running `source` from its committed offset in the store.
    /// Callers hold the engine's writer lock.
    pub fn add(&self, engine: &Engine, source: &Source) -> Result<()> {
        let offset = read_source_offset(&engine.store, source.def.id)?;
        self.runs.lock().push(SourceRun::new(source, offset));
        Ok(())
    }

    /// Stops running the sources with these ids. Callers hold the engine's
    /// writer lock, so no epoch is in flight.
    pub fn remove(&self, ids: &[u32]) {
        self.runs.lock().retain(|r| !ids.contains(&r.id));
    }

    /// The committed offset of a running source.
    pub fn offset(&self, id: u32) -> Option<u64> {
        self.runs
            .lock()
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.offset)
    }

    /// (name, generator, offset, state) of every source, by name.
    pub fn status(&self) -> Vec<(String, GeneratorSpec, u64, SourceState)> {
        let mut v: Vec<_> = self
            .runs
            .lock()
            .iter()
            .map(|r| (r.name.clone(), r.spec.clone(), r.offset, r.state.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of epochs committed since the engine started.
    pub fn epochs(&self) -> u64 {
        self.epochs.load(Ordering::Relaxed)
    }

    /// Waits until every running source has committed the rows due now:
    /// by its rate, or — without a rate limit — all of a bounded source's
    /// rows, or one more epoch of an unbounded one. Returns at once when no
    /// source is running.
    pub async fn flush(&self) {
        let now = Instant::now();
        let targets: Vec<(u32, u64)> = self
            .runs
            .lock()
            .iter()
            .filter(|r| r.state == SourceState::Running)
            .map(|r| {
                let due = r.spec.rows_due(
                    r.resumed_offset,
                    now.saturating_duration_since(r.resumed_at),
                );
                let cap = r
                    .spec
                    .limit()
                    .unwrap_or(r.offset.saturating_add(MAX_EPOCH_ROWS));
                (r.id, due.min(cap))
            })
            .collect();
        loop {
            let pending = {
                let runs = self.runs.lock();
                targets.iter().any(|(id, target)| {
                    runs.iter().any(|r| {
                        r.id == *id && r.state == SourceState::Running && r.offset < *target
                    })
                })
            };
            if !pending {
                return;
            }
            let (tx, rx) = oneshot::channel();
            self.flush_waiters.lock().push(tx);
            self.wake.notify_one();
            // The driver answers after its next epoch; if it is gone (the
            // engine is shutting down) the sender is dropped: stop waiting.
            if rx.await.is_err() {
                return;
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
    loop {
        let Some(engine) = weak.upgrade() else {
            return;
        };
        let driver = &engine.driver;
        if !behind {
            let mut waiters = driver.flush_waiters.lock();
            if waiters.is_empty() {
                driver.wake.wait_for(&mut waiters, interval);
            }
        }
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

/// Runs one epoch. Returns whether some source is still behind its rate
/// (so the next epoch should start at once).
fn epoch(engine: &Engine) -> Result<bool> {
    let _writer = futures::executor::block_on(engine.writer());
    let mut runs = engine.driver.runs.lock();
    let now = Instant::now();
    let work: Vec<(usize, u64)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == SourceState::Running)
        .map(|(i, r)| (i, r.due(now)))
        .filter(|(i, due)| *due > runs[*i].offset)
        .collect();
    if work.is_empty() {
        return Ok(false);
    }
    match commit(engine, &runs, &work) {
        Ok(()) => {
            for (i, to) in &work {
                runs[*i].offset = *to;
            }
        }
        Err(e) if work.len() == 1 => {
            tracing::error!(source = %runs[work[0].0].name, "source stopped: {e}");
            runs[work[0].0].state = SourceState::Failed(e.to_string());
        }
        Err(_) => {
            // Find the culprit: each source alone.
            for item in &work {
                match commit(engine, &runs, std::slice::from_ref(item)) {
                    Ok(()) => runs[item.0].offset = item.1,
                    Err(e) => {
                        tracing::error!(source = %runs[item.0].name, "source stopped: {e}");
                        runs[item.0].state = SourceState::Failed(e.to_string());
                    }
                }
            }
        }
    }
    engine.driver.epochs.fetch_add(1, Ordering::Relaxed);
    let mut behind = false;
    for r in runs.iter_mut() {
        r.check_finished();
        behind |= r.state == SourceState::Running && r.due(Instant::now()) > r.offset;
    }
    Ok(behind)
}

/// Generates the rows of `work` (source index, new offset) and commits them
/// with the new offsets in one batch.
fn commit(engine: &Engine, runs: &[SourceRun], work: &[(usize, u64)]) -> Result<()> {
    let mut batch = WriteBatch::default();
    let mut changes = Vec::with_capacity(work.len());
    for (i, to) in work {
        let run = runs
            .get(*i)
            .ok_or_else(|| Error::Internal("source run vanished".into()))?;
        let rows = run.spec.generate(run.offset, *to)?;
        batch.put(source_offset_key(run.id), to.to_be_bytes());
        changes.push(TableChange {
            table_id: run.id,
            changes: ChangeBatch::uniform(rows, 1),
        });
    }
    futures::executor::block_on(engine.commit(batch, changes))
}
