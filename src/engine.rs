//! The engine: everything shared by all sessions.
//!
//! [`Engine`] owns the RocksDB [`Store`], the [`Catalog`], the DataFusion
//! `SessionContext` that plans and runs queries against them, and the
//! **commit path**: every write to a table, from any statement, ends in
//! [`Engine::commit`], which applies one RocksDB `WriteBatch` and then
//! publishes the statement's [`TableChange`]s (change batches) on the change
//! feed that incrementally maintained views consume.
//!
//! Concurrency: writers are serialized by [`Engine::writer`] (a statement
//! holds it from reading the rows it changes to its commit, so UPDATEs never
//! lose each other's effects). Readers take [`Engine::snapshot`] while their
//! scans read RocksDB; a commit takes the same lock exclusively for the
//! instant of its `WriteBatch`, so one statement never sees half of another's
//! writes, even across tables.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{create_udf, ColumnarValue, LogicalPlan, Volatility};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast;
use datafusion_pg_catalog::pg_catalog::{context::EmptyContextProvider, setup_pg_catalog};
use rocksdb::WriteBatch;
use tokio::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::catalog::{Catalog, CatalogEntry, MvOwner, Relation};
use crate::config::Config;
use crate::dataflow::operator::{Layout, OpCtx, Pipeline};
use crate::dataflow::TableChange;
use crate::error::{Error, Result};
use crate::query::SluiceSchema;
use crate::state::Store;
use crate::subscription::Subscribers;

/// DataFusion catalog name (what `current_database()` returns).
pub const DATABASE: &str = "sluice";
/// The schema user objects live in.
pub const SCHEMA: &str = "public";

/// Text of `SELECT version()`.
pub fn version_string() -> String {
    format!(
        "PostgreSQL 15.0 (Sluice {}) on x86_64-pc-linux-gnu, an embedded streaming SQL engine",
        env!("CARGO_PKG_VERSION")
    )
}

/// Shared engine state.
pub struct Engine {
    /// Configuration it was opened with.
    pub config: Config,
    /// The RocksDB store.
    pub store: Arc<Store>,
    /// Tables and views.
    pub catalog: Arc<Catalog>,
    ctx: SessionContext,
    /// Query execution runs here, not on the network runtime: a CPU-heavy
    /// query must never starve connection handling (cancel requests, other
    /// clients), and dropping the waiting future aborts the query's task.
    exec: Option<tokio::runtime::Runtime>,
    writer: Mutex<()>,
    snapshot: Arc<RwLock<()>>,
    /// Pipelines of the materialized views, run inside every commit.
    pipelines: parking_lot::Mutex<Vec<Pipeline>>,
    /// The sources the epoch driver runs.
    pub driver: crate::epoch::Driver,
    /// Running sinks: their outboxes are staged in every commit.
    sinks: parking_lot::Mutex<Vec<SinkRun>>,
    /// Live `SUBSCRIBE`s, fed by every commit, and the commit clock.
    pub subscribers: Arc<Subscribers>,
}

impl Engine {
    /// Opens the data directory and prepares DataFusion.
    pub fn open(config: Config) -> Result<Arc<Engine>> {
        let store = Arc::new(Store::open(&config.data_dir, config.fsync)?);
        let (catalog, views) = Catalog::load(store.clone())?;
        let catalog = Arc::new(catalog);

        let session_config = SessionConfig::new()
            .with_default_catalog_and_schema(DATABASE, SCHEMA)
            .with_information_schema(true)
            .set_str("datafusion.sql_parser.dialect", "PostgreSQL")
            .set_bool("datafusion.execution.parquet.pushdown_filters", false)
            .with_target_partitions(2);
        let ctx = SessionContext::new_with_config(session_config);
        let schema = Arc::new(SluiceSchema::new(catalog.clone(), store.clone()));
        ctx.catalog(DATABASE)
            .ok_or_else(|| Error::Internal("default catalog missing".into()))?
            .register_schema(SCHEMA, schema.clone())?;
        setup_pg_catalog(&ctx, DATABASE, EmptyContextProvider)
            .map_err(|e| Error::Internal(format!("pg_catalog setup failed: {e}")))?;
        let version = version_string();
        ctx.register_udf(create_udf(
            "version",
            vec![],
            DataType::Utf8,
            Volatility::Immutable,
            Arc::new(move |_| {
                Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                    version.clone(),
                ))))
            }),
        ));

        ctx.register_udf(crate::query::functions::bytea_in_udf());
        ctx.register_udf(crate::query::functions::pg_sleep_udf());
        ctx.register_udf(crate::query::functions::interval_in_udf());
        ctx.add_analyzer_rule(Arc::new(crate::query::functions::PgTextInput::default()));

        let engine = Arc::new(Engine {
            config,
            store,
            catalog,
            ctx,
            exec: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(
                        std::thread::available_parallelism()
                            .map(|n| n.get())
                            .unwrap_or(2),
                    )
                    .thread_name("sluice-exec")
                    .enable_all()
                    .build()?,
            ),
            writer: Mutex::new(()),
            snapshot: Arc::new(RwLock::new(())),
            pipelines: parking_lot::Mutex::new(Vec::new()),
            driver: crate::epoch::Driver::default(),
            sinks: parking_lot::Mutex::new(Vec::new()),
            subscribers: Arc::new(Subscribers::default()),
        });
        let weak: std::sync::Weak<Engine> = Arc::downgrade(&engine);
        schema.set_system_tables(weak);
        // Views are stored as SQL and re-planned in creation order, which is
        // a valid dependency order (a view can only read older relations).
        // Materialized views get their pipelines back; their rows and state
        // are already in RocksDB, exactly as of the last commit.
        let mut leftovers = Vec::new();
        for entry in views {
            match entry {
                CatalogEntry::View(def) => {
                    let plan = engine.plan_view_sql(&def.sql)?;
                    engine.catalog.restore_view(def, plan);
                }
                CatalogEntry::MaterializedView(def) => {
                    let plan = engine.plan_view_sql(&def.sql)?;
                    let plan = engine.state().optimize(&plan)?;
                    let names: Vec<String> = def.columns.iter().map(|c| c.name.clone()).collect();
                    let mut stored = def.state_ids.clone().into_iter();
                    let planned = crate::planner::plan_view(
                        &plan,
                        def.id,
                        Some(&names),
                        &|n| engine.source_id(n),
                        &mut || {
                            stored.next().ok_or_else(|| {
                                Error::Internal(format!("view \"{}\" lost its state ids", def.name))
                            })
                        },
                        Some(Layout::of_stored(&def)),
                    )?;
                    if planned.columns != def.columns {
                        return Err(Error::Internal(format!(
                            "materialized view \"{}\" plans to different columns than it stored",
                            def.name
                        )));
                    }
                    if def.owner == MvOwner::Subscription {
                        leftovers.push(def.name.clone());
                    }
                    engine.catalog.register_mv(def);
                    engine.add_pipeline(planned.pipeline);
                }
                CatalogEntry::Source(def) => {
                    let source = engine.catalog.restore_source(def);
                    engine.driver.add(&engine, &source)?;
                }
                CatalogEntry::Sink(def) => {
                    engine.catalog.restore_sink(def.clone());
                    engine.start_sink(&def)?;
                }
                CatalogEntry::Table(_) | CatalogEntry::Connection(_) => {}
            }
        }
        // Views of subscriptions that were open when Sluice stopped, and
        // the view of a `CREATE SINK … AS SELECT` that crashed before its
        // sink was written.
        for name in engine.catalog.mv_names_owned_by(MvOwner::Sink) {
            if engine.catalog.dependents(&name).is_empty() {
                leftovers.push(name);
            }
        }
        engine.drop_objects(&leftovers)?;
        crate::epoch::spawn(&engine, engine.config.checkpoint_interval)?;
        Ok(engine)
    }

    /// A fresh DataFusion session state for one statement.
    pub fn state(&self) -> SessionState {
        self.ctx.state()
    }

    /// Plans a parsed statement with DataFusion.
    pub async fn plan(&self, stmt: &ast::Statement) -> Result<LogicalPlan> {
        let state = self.state();
        Ok(state
            .statement_to_plan(DfStatement::Statement(Box::new(stmt.clone())))
            .await?)
    }

    fn plan_view_sql(&self, sql: &str) -> Result<LogicalPlan> {
        let stmts = crate::sql::parse_sql(sql)?;
        let [ast::Statement::Query(q)] = stmts.as_slice() else {
            return Err(Error::Internal(format!(
                "stored view is not a query: {sql}"
            )));
        };
        let stmt = ast::Statement::Query(q.clone());
        // Views are planned synchronously at startup: DataFusion's planner
        // only awaits table resolution, which is in-memory here.
        futures::executor::block_on(self.plan(&stmt))
    }

    /// Runs a (non-DML) plan to completion under a consistent snapshot.
    pub async fn run_plan(&self, plan: &LogicalPlan) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let state = self.state();
        let plan = plan.clone();
        let snapshot = self.snapshot.clone();
        let task = async move {
            let physical = {
                // Table scans read RocksDB while the physical plan is built.
                let _snapshot = snapshot.read_owned().await;
                state.create_physical_plan(&plan).await?
            };
            let schema = physical.schema();
            let batches = datafusion::physical_plan::collect(physical, state.task_ctx()).await?;
            Ok::<_, Error>((schema, batches))
        };
        let exec = self
            .exec
            .as_ref()
            .ok_or_else(|| Error::Internal("engine is shutting down".into()))?;
        let handle = AbortOnDrop(exec.spawn(task));
        match handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(Error::Internal(format!("query panicked: {e}"))),
            Err(e) => Err(Error::Internal(format!("query task failed: {e}"))),
        }
    }

    /// Serializes writers: hold the guard from reading the rows a statement
    /// changes until its [`Engine::commit`] returns.
    pub async fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    /// Excludes commits while held: reads under it see one committed state.
    pub async fn snapshot(&self) -> RwLockReadGuard<'_, ()> {
        self.snapshot.read().await
    }

    /// The id whose changes feed a view reading relation `name` (a table,
    /// a materialized view or a source), and whether those changes are
    /// insert-only (a source, an append-only view).
    pub fn source_id(&self, name: &str) -> Option<(u32, bool)> {
        match self.catalog.get(name)? {
            Relation::Table(t) => Some((t.def.id, false)),
            Relation::MaterializedView(m) => Some((m.def.id, m.def.append_only)),
            // A keyed (UPSERT/DEBEZIUM) source also deletes rows.
            Relation::Source(s) => Some((s.def.id, s.table.is_none())),
            Relation::View(_) => None,
        }
    }

    /// Drops relations and sinks (names [`crate::sql::drop::collect`]
    /// gathered) in one atomic catalog change. Callers hold the writer
    /// lock, so no commit or epoch is in flight: pipelines, sources and
    /// sinks stop before their state goes, and subscriptions to them end.
    pub fn drop_objects(&self, names: &[String]) -> Result<()> {
        let mut mv_ids = Vec::new();
        let mut source_ids = Vec::new();
        let mut sink_ids = Vec::new();
        let mut relation_ids = Vec::new();
        for n in names {
            if let Some(k) = self.catalog.sink(n) {
                sink_ids.push(k.id);
            }
            match self.catalog.get(n) {
                Some(Relation::MaterializedView(m)) => mv_ids.push(m.def.id),
                Some(Relation::Source(s)) => source_ids.push(s.def.id),
                Some(Relation::Table(t)) => relation_ids.push(t.def.id),
                _ => {}
            }
        }
        relation_ids.extend(&mv_ids);
        relation_ids.extend(&source_ids);
        self.stop_sinks(&sink_ids);
        self.remove_pipelines(&mv_ids);
        self.driver.remove(&source_ids);
        self.subscribers.drop_relations(&relation_ids);
        self.catalog.drop_relations(names)
    }

    /// Starts maintaining a materialized view.
    pub fn add_pipeline(&self, p: Pipeline) {
        self.pipelines.lock().push(p);
    }

    /// Stops maintaining the views with these ids.
    pub fn remove_pipelines(&self, sinks: &[u32]) {
        self.pipelines.lock().retain(|p| !sinks.contains(&p.sink));
    }

    /// Runs `changes` through every view pipeline they feed (and the views'
    /// own changes through the views that read them), staging all state and
    /// view rows into `batch`. Returns every change, the views' included.
    fn propagate(
        &self,
        batch: &mut WriteBatch,
        mut changes: Vec<TableChange>,
    ) -> Result<Vec<TableChange>> {
        let mut pipelines = self.pipelines.lock();
        if pipelines.is_empty() {
            return Ok(changes);
        }
        let mut ctx = OpCtx::new(&self.store, batch);
        let mut i = 0;
        while i < changes.len() {
            let source = changes[i].table_id;
            let mut produced = Vec::new();
            for p in pipelines.iter_mut().filter(|p| p.reads(source)) {
                if let Some(out) = p.process(source, &changes[i].changes, &mut ctx)? {
                    if !out.is_empty() {
                        produced.push(TableChange {
                            table_id: p.sink,
                            changes: out,
                        });
                    }
                }
            }
            changes.extend(produced);
            i += 1;
        }
        Ok(changes)
    }

    /// Applies a batch atomically and durably, excluding readers for the
    /// instant of the write.
    pub async fn apply(&self, batch: WriteBatch) -> Result<()> {
        let _exclusive = self.snapshot.write().await;
        self.store.write(batch)
    }

    /// The commit path: maintains every materialized view the changes feed
    /// (in the same batch), stages every sink's messages into its outbox
    /// (same batch), applies `batch` atomically and durably, then wakes the
    /// sinks and hands the changes to the subscriptions, tagged with the
    /// commit's timestamp.
    pub async fn commit(&self, mut batch: WriteBatch, changes: Vec<TableChange>) -> Result<()> {
        let changes = self.propagate(&mut batch, changes)?;
        let woken = self.stage_sinks(&mut batch, &changes)?;
        self.apply(batch).await?;
        if !woken.is_empty() {
            for s in self.sinks.lock().iter().filter(|s| woken.contains(&s.id)) {
                s.writer.notify();
            }
        }
        let ts = self.subscribers.next_ts();
        if !self.subscribers.is_empty() {
            for c in changes.iter().filter(|c| !c.changes.is_empty()) {
                self.subscribers
                    .publish(c.table_id, ts, &c.changes.data, &c.changes.weights);
            }
            self.subscribers.commit_done(ts);
        }
        Ok(())
    }

    /// Stages the outbox entries `changes` mean for every sink; returns
    /// the sinks that got one.
    fn stage_sinks(&self, batch: &mut WriteBatch, changes: &[TableChange]) -> Result<Vec<u32>> {
        let mut sinks = self.sinks.lock();
        let mut woken = Vec::new();
        for s in sinks.iter_mut() {
            let mut msgs = Vec::new();
            for c in changes.iter().filter(|c| c.table_id == s.from_id) {
                msgs.extend(crate::connector::sink::encode(
                    &s.spec,
                    &c.changes.data,
                    &c.changes.weights,
                )?);
            }
            if !msgs.is_empty() {
                batch.put(
                    crate::connector::sink::outbox_key(s.id, s.next_seq),
                    crate::connector::sink::encode_entry(&msgs),
                );
                s.next_seq += 1;
                woken.push(s.id);
            }
        }
        Ok(woken)
    }

    /// Starts a sink's writer (its outbox is already in the store).
    /// Callers hold the writer lock.
    pub fn start_sink(&self, def: &crate::catalog::SinkDef) -> Result<()> {
        let writer = crate::connector::sink::SinkWriter::start(
            &def.name,
            def.id,
            &def.spec,
            self.store.clone(),
        )?;
        let next_seq = crate::connector::sink::next_seq(&self.store, def.id)?;
        self.sinks.lock().push(SinkRun {
            id: def.id,
            from_id: def.from_id,
            spec: def.spec.clone(),
            next_seq,
            writer,
        });
        Ok(())
    }

    /// Stops the sinks with these ids.
    pub fn stop_sinks(&self, ids: &[u32]) {
        let stopped: Vec<SinkRun> = {
            let mut sinks = self.sinks.lock();
            let (gone, kept) = std::mem::take(&mut *sinks)
                .into_iter()
                .partition(|s| ids.contains(&s.id));
            *sinks = kept;
            gone
        };
        drop(stopped);
    }

    /// (id, state, messages sent) of the running sinks.
    pub fn sink_status(&self) -> Vec<(u32, crate::connector::sink::SinkStatus)> {
        self.sinks
            .lock()
            .iter()
            .map(|s| (s.id, s.writer.status()))
            .collect()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // A runtime may not be dropped from inside another runtime.
        if let Some(rt) = self.exec.take() {
            rt.shutdown_background();
        }
    }
}

/// A running sink: what `commit` needs to stage its outbox.
struct SinkRun {
    id: u32,
    from_id: u32,
    spec: crate::connector::sink::SinkSpec,
    /// Sequence number of its next outbox entry.
    next_seq: u64,
    writer: crate::connector::sink::SinkWriter,
}

/// A task handle that aborts the task when dropped (e.g. when the client
/// cancels the statement and pgwire drops the statement's future).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}
