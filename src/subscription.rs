//! Subscriptions: committed changes of one relation, pushed to a client.
//!
//! `SUBSCRIBE` (and cursors and `COPY` over it, see [`crate::sql::subscribe`])
//! registers a [`Subscription`] with the engine's [`Subscribers`] while it
//! holds the writer lock, right after reading the relation's rows (the
//! snapshot). Every later [`crate::engine::Engine::commit`] hands the
//! subscribers the changes of their relation *after* the commit's batch is
//! durable, tagged with the commit's timestamp — so a subscriber sees the
//! snapshot and then every committed change exactly once, in commit order,
//! and never an uncommitted one.
//!
//! **A slow client never stalls the engine.** The commit path only pushes
//! into an unbounded channel and counts the rows in it; once a subscription
//! holds more than its limit of undelivered rows, the commit path drops it
//! (closing the channel) and the client gets SQLSTATE 54000 and a message
//! naming the limit. Memory is bounded by the limit, the engine never waits.
//!
//! Output rows are the relation's columns behind `sluice_ts` (the commit's
//! timestamp, milliseconds since the Unix epoch, strictly increasing across
//! commits, equal for all changes of one commit), `sluice_diff` (the row's
//! multiplicity change: `1` inserted, `-1` deleted, an update is both) and,
//! with `PROGRESS`, `sluice_progressed` (true on a row that only says that
//! every change up to its `sluice_ts` has been sent).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{new_null_array, ArrayRef, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// The name of the timestamp column.
pub const TS_COLUMN: &str = "sluice_ts";
/// The name of the diff column.
pub const DIFF_COLUMN: &str = "sluice_diff";
/// The name of the progress column (`PROGRESS` only).
pub const PROGRESS_COLUMN: &str = "sluice_progressed";

/// What a subscriber is sent.
#[derive(Debug)]
enum Update {
    /// Changed rows of one commit.
    Rows {
        ts: i64,
        data: RecordBatch,
        weights: Int64Array,
    },
    /// Commit `ts` is complete (`PROGRESS` subscriptions only).
    Progress(i64),
}

/// Per-subscription counters shared by the commit path and the reader.
#[derive(Debug)]
struct Shared {
    /// Rows in the channel, not yet taken by the reader.
    buffered: AtomicUsize,
    /// Set when the commit path dropped the subscription for being behind.
    overflowed: AtomicBool,
    limit: usize,
}

struct Entry {
    relation: u32,
    progress: bool,
    tx: mpsc::UnboundedSender<Update>,
    shared: Arc<Shared>,
}

/// The engine's registry of live subscriptions and its commit clock.
pub struct Subscribers {
    entries: parking_lot::Mutex<Vec<Entry>>,
    /// Timestamp of the last commit.
    last_ts: AtomicI64,
}

impl Default for Subscribers {
    fn default() -> Self {
        Subscribers {
            entries: parking_lot::Mutex::new(Vec::new()),
            last_ts: AtomicI64::new(now_ms()),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Subscribers {
    /// The timestamp of the last commit (the snapshot a new subscription
    /// reads is as of it).
    pub fn last_ts(&self) -> i64 {
        self.last_ts.load(Ordering::SeqCst)
    }

    /// Takes the next commit timestamp: the wall clock in milliseconds, but
    /// always greater than the previous one.
    pub fn next_ts(&self) -> i64 {
        let now = now_ms();
        let prev = self
            .last_ts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(now.max(p + 1)))
            .unwrap_or(now);
        now.max(prev + 1)
    }

    /// Whether anyone subscribes (the commit path skips all work if not).
    pub fn is_empty(&self) -> bool {
        self.entries.lock().is_empty()
    }

    /// Registers a subscription to `relation`'s changes from the next
    /// commit on. Callers hold the engine's writer lock, so no commit
    /// falls between their snapshot and this.
    pub fn register(
        &self,
        relation: u32,
        schema: SchemaRef,
        progress: bool,
        limit: usize,
    ) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            buffered: AtomicUsize::new(0),
            overflowed: AtomicBool::new(false),
            limit,
        });
        self.entries.lock().push(Entry {
            relation,
            progress,
            tx,
            shared: shared.clone(),
        });
        Subscription {
            schema: output_schema(&schema, progress),
            input: schema,
            progress,
            rx,
            shared,
            ready: VecDeque::new(),
        }
    }

    /// Hands a committed change of `relation` to its subscribers.
    pub fn publish(&self, relation: u32, ts: i64, data: &RecordBatch, weights: &Int64Array) {
        let mut entries = self.entries.lock();
        entries.retain(|e| {
            if e.relation != relation {
                return true;
            }
            let n = data.num_rows();
            let before = e.shared.buffered.fetch_add(n, Ordering::SeqCst);
            // A reader that is caught up takes any one commit, however
            // big: the limit is on what piles up behind it.
            if before > 0 && before + n > e.shared.limit {
                e.shared.overflowed.store(true, Ordering::SeqCst);
                return false;
            }
            e.tx.send(Update::Rows {
                ts,
                data: data.clone(),
                weights: weights.clone(),
            })
            .is_ok()
        });
    }

    /// Ends commit `ts` for the `PROGRESS` subscribers, and forgets the
    /// subscriptions whose reader is gone.
    pub fn commit_done(&self, ts: i64) {
        let mut entries = self.entries.lock();
        entries.retain(|e| {
            if !e.progress {
                return !e.tx.is_closed();
            }
            let before = e.shared.buffered.fetch_add(1, Ordering::SeqCst);
            if before > 0 && before + 1 > e.shared.limit {
                e.shared.overflowed.store(true, Ordering::SeqCst);
                return false;
            }
            e.tx.send(Update::Progress(ts)).is_ok()
        });
    }

    /// Number of live subscriptions.
    pub fn count(&self) -> usize {
        self.entries.lock().len()
    }

    /// Drops every subscription to these relations (they were dropped);
    /// their readers end with an error.
    pub fn drop_relations(&self, ids: &[u32]) {
        self.entries.lock().retain(|e| !ids.contains(&e.relation));
    }
}

/// `sluice_ts, [sluice_progressed,] sluice_diff, columns…`.
pub fn output_schema(input: &SchemaRef, progress: bool) -> SchemaRef {
    let mut fields = vec![Field::new(TS_COLUMN, DataType::Int64, false)];
    if progress {
        fields.push(Field::new(PROGRESS_COLUMN, DataType::Boolean, false));
    }
    // Progress rows have no diff and no data: nullable then.
    fields.push(Field::new(DIFF_COLUMN, DataType::Int64, progress));
    for f in input.fields() {
        fields.push(f.as_ref().clone().with_nullable(true));
    }
    Arc::new(Schema::new(fields))
}

/// One client's subscription: the snapshot, then every committed change.
pub struct Subscription {
    schema: SchemaRef,
    input: SchemaRef,
    progress: bool,
    rx: mpsc::UnboundedReceiver<Update>,
    shared: Arc<Shared>,
    /// Output batches not yet taken (the snapshot, or what `try_next`
    /// looked at).
    ready: VecDeque<RecordBatch>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("schema", &self.schema)
            .finish()
    }
}

impl Subscription {
    /// The schema of the rows it yields.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Queues the snapshot: `batches` of the relation as of commit `ts`,
    /// each row with diff +1. (Called before anything is read.)
    pub fn push_snapshot(&mut self, ts: i64, batches: Vec<RecordBatch>) -> Result<()> {
        for b in batches.into_iter().filter(|b| b.num_rows() > 0) {
            let ones = Int64Array::from(vec![1i64; b.num_rows()]);
            let out = self.rows(ts, &b, &ones)?;
            self.ready.push_back(out);
        }
        Ok(())
    }

    fn rows(&self, ts: i64, data: &RecordBatch, weights: &Int64Array) -> Result<RecordBatch> {
        let n = data.num_rows();
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![ts; n]))];
        if self.progress {
            cols.push(Arc::new(BooleanArray::from(vec![false; n])));
        }
        cols.push(Arc::new(weights.clone()));
        cols.extend(data.columns().iter().cloned());
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }

    fn progress_row(&self, ts: i64) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![ts])),
            Arc::new(BooleanArray::from(vec![true])),
            new_null_array(&DataType::Int64, 1),
        ];
        for f in self.input.fields() {
            cols.push(new_null_array(f.data_type(), 1));
        }
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }

    fn convert(&mut self, u: Update) -> Result<RecordBatch> {
        match u {
            Update::Rows { ts, data, weights } => {
                self.shared
                    .buffered
                    .fetch_sub(data.num_rows(), Ordering::SeqCst);
                self.rows(ts, &data, &weights)
            }
            Update::Progress(ts) => {
                self.shared.buffered.fetch_sub(1, Ordering::SeqCst);
                self.progress_row(ts)
            }
        }
    }

    fn closed(&self) -> Error {
        if self.shared.overflowed.load(Ordering::SeqCst) {
            Error::LimitExceeded(format!(
                "subscription fell too far behind: more than {} changed rows were waiting for the client; read faster or raise subscribe_buffer_rows",
                self.shared.limit
            ))
        } else {
            Error::ObjectNotInPrerequisiteState("the subscribed relation was dropped".into())
        }
    }

    /// The next batch of rows, waiting until there is one.
    pub async fn next(&mut self) -> Result<RecordBatch> {
        if let Some(b) = self.ready.pop_front() {
            return Ok(b);
        }
        match self.rx.recv().await {
            Some(u) => self.convert(u),
            None => Err(self.closed()),
        }
    }

    /// The next batch if one is ready now.
    pub fn try_next(&mut self) -> Result<Option<RecordBatch>> {
        if let Some(b) = self.ready.pop_front() {
            return Ok(Some(b));
        }
        match self.rx.try_recv() {
            Ok(u) => self.convert(u).map(Some),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(self.closed()),
        }
    }

    /// Puts back rows a reader took but could not use (a `FETCH` of fewer
    /// rows than a batch holds).
    pub fn unread(&mut self, b: RecordBatch) {
        if b.num_rows() > 0 {
            self.ready.push_front(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int32Array;

    fn batch(v: &[i32]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(v.to_vec()))]).unwrap()
    }

    #[tokio::test]
    async fn snapshot_then_changes_in_order() {
        let subs = Subscribers::default();
        let b = batch(&[1, 2]);
        let mut s = subs.register(7, b.schema(), false, 100);
        s.push_snapshot(5, vec![b.clone()]).unwrap();
        subs.publish(8, 6, &batch(&[9]), &Int64Array::from(vec![1]));
        subs.publish(7, 6, &batch(&[3]), &Int64Array::from(vec![-1]));
        let first = s.next().await.unwrap();
        assert_eq!(first.num_rows(), 2);
        let second = s.next().await.unwrap();
        assert_eq!(
            second.column(0).as_ref(),
            &Int64Array::from(vec![6]) as &dyn datafusion::arrow::array::Array
        );
        assert_eq!(
            second.column(1).as_ref(),
            &Int64Array::from(vec![-1]) as &dyn datafusion::arrow::array::Array
        );
        assert!(s.try_next().unwrap().is_none());
    }

    #[tokio::test]
    async fn slow_reader_is_dropped_not_waited_for() {
        let subs = Subscribers::default();
        let b = batch(&[1, 2, 3]);
        let mut s = subs.register(1, b.schema(), false, 5);
        let w = Int64Array::from(vec![1, 1, 1]);
        subs.publish(1, 1, &b, &w);
        subs.publish(1, 2, &b, &w); // 6 rows > 5: dropped
        assert_eq!(subs.count(), 0);
        // What was buffered before is still delivered, then the error.
        assert_eq!(s.next().await.unwrap().num_rows(), 3);
        let e = s.next().await.unwrap_err();
        assert!(matches!(e, Error::LimitExceeded(_)), "{e}");
    }

    #[tokio::test]
    async fn a_caught_up_reader_takes_a_commit_bigger_than_the_limit() {
        let subs = Subscribers::default();
        let b = batch(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut s = subs.register(1, b.schema(), false, 5);
        subs.publish(1, 1, &b, &Int64Array::from(vec![1; 8]));
        assert_eq!(subs.count(), 1);
        assert_eq!(s.next().await.unwrap().num_rows(), 8);
    }

    #[tokio::test]
    async fn progress_rows_follow_commits() {
        let subs = Subscribers::default();
        let b = batch(&[1]);
        let mut s = subs.register(1, b.schema(), true, 100);
        subs.publish(1, 10, &b, &Int64Array::from(vec![1]));
        subs.commit_done(10);
        let rows = s.next().await.unwrap();
        assert_eq!(rows.num_columns(), 4);
        let p = s.next().await.unwrap();
        assert!(p.column(2).is_null(0));
        assert_eq!(
            p.column(1).as_ref(),
            &BooleanArray::from(vec![true]) as &dyn datafusion::arrow::array::Array
        );
    }

    #[test]
    fn timestamps_strictly_increase() {
        let subs = Subscribers::default();
        let a = subs.next_ts();
        let b = subs.next_ts();
        assert!(b > a);
        assert_eq!(subs.last_ts(), b);
    }
}
