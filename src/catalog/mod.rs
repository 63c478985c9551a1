//! The catalog: tables, views, materialized views and sources; their ids,
//! columns and keys.
//!
//! Entries are persisted in RocksDB's system keyspace (see
//! [`crate::state::store`]) as JSON, keyed by object id, and loaded into
//! memory at startup. Every DDL change is one RocksDB `WriteBatch` (for
//! `DROP TABLE` that batch also deletes the table's rows), so the catalog and
//! the data can never disagree after a crash.
//!
//! The catalog knows nothing of DataFusion's table providers; `query`
//! exposes it to DataFusion as a `SchemaProvider`.

pub mod types;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::logical_expr::LogicalPlan;
use parking_lot::RwLock;
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use crate::connector::kafka::{KafkaSpec, Positions};
use crate::connector::{BadRecord, Envelope, GeneratorSpec, Meta, RecordDecoder};
use crate::error::{Error, Result};
use crate::state::encoding::{encode_row, table_prefix};
use crate::state::store::{
    prefix_end, sys_key, Store, SYS_CATALOG, SYS_META, SYS_OFFSET, SYS_ROWID, SYS_SOURCE_ERRORS,
};
use types::SqlType;

/// First id handed to user objects; ids below are reserved for the system.
const FIRST_USER_ID: u32 = 1000;

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnDef {
    /// Column name (lower-cased unless quoted).
    pub name: String,
    /// Declared type.
    pub ty: SqlType,
    /// Whether NULL is allowed (false for NOT NULL and primary-key columns).
    pub nullable: bool,
}

/// A durable table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableDef {
    /// Object id; also the key prefix of the table's rows.
    pub id: u32,
    /// Table name.
    pub name: String,
    /// Columns in order.
    pub columns: Vec<ColumnDef>,
    /// Indexes of the primary-key columns; empty means rows are keyed by a
    /// hidden row id.
    pub primary_key: Vec<usize>,
}

/// A (non-materialized) view: a named query, expanded at planning time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewDef {
    /// Object id.
    pub id: u32,
    /// View name.
    pub name: String,
    /// The defining `SELECT`, as text; re-planned at startup.
    pub sql: String,
    /// Names of the relations the query reads (for DROP … CASCADE).
    pub depends_on: Vec<String>,
}

/// An incrementally maintained materialized view.
///
/// Its rows are stored like a table's under its id: keyed by `key` (the
/// GROUP BY columns of an aggregate), or — when `key` is empty — by the
/// whole row with a trailing multiplicity, since a non-aggregate view can
/// hold duplicate rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MvDef {
    /// Object id; also the key prefix of the view's rows.
    pub id: u32,
    /// View name.
    pub name: String,
    /// The defining `SELECT`, as text; re-planned at startup.
    pub sql: String,
    /// Names of the relations the query reads.
    pub depends_on: Vec<String>,
    /// Output columns.
    pub columns: Vec<ColumnDef>,
    /// Key columns of the stored rows; empty means "whole row, counted".
    pub key: Vec<usize>,
    /// Key prefixes of the operators' state (e.g. aggregate groups), in
    /// planning order; dropped with the view.
    #[serde(default)]
    pub state_ids: Vec<u32>,
    /// Rows are only ever inserted (the query reads sources through
    /// filters, projections and inner joins): stored under hidden row ids,
    /// without multiplicities.
    #[serde(default)]
    pub append_only: bool,
    /// An append-only view's rows are stored as Arrow IPC chunks, one per
    /// commit (see [`crate::state::chunk`]); false for views created before
    /// chunks, which keep one entry per row.
    #[serde(default)]
    pub chunked: bool,
    /// Who made it: a user, or Sluice for a `SUBSCRIBE` to a query
    /// (dropped when the subscription ends, or at the next start).
    #[serde(default)]
    pub owner: MvOwner,
}

/// Who created a materialized view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MvOwner {
    /// `CREATE MATERIALIZED VIEW`.
    #[default]
    User,
    /// `SUBSCRIBE TO (SELECT …)`: temporary, not listed.
    Subscription,
    /// `CREATE SINK … AS SELECT`: not listed, dropped with the sink.
    Sink,
}

/// A source: an append-only stream that materialized views consume.
///
/// Its rows are not stored: only its offset is (in the system keyspace,
/// committed with every epoch), because a source can replay any offset
/// range (see [`crate::connector`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceDef {
    /// Object id; also the id its change batches carry.
    pub id: u32,
    /// Source name.
    pub name: String,
    /// Columns in order.
    pub columns: Vec<ColumnDef>,
    /// What produces the rows.
    #[serde(flatten)]
    pub connector: SourceConnector,
}

/// What produces a source's rows. (One per source definition: the Kafka
/// variant's size does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceConnector {
    /// A built-in generator.
    Generator(GeneratorSpec),
    /// Kafka topics.
    Kafka(KafkaSpec),
}

impl SourceDef {
    /// Arrow schema of its rows.
    pub fn schema(&self) -> SchemaRef {
        match &self.connector {
            SourceConnector::Generator(g) => g.schema(),
            SourceConnector::Kafka(_) => Arc::new(Schema::new(
                self.columns
                    .iter()
                    .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable))
                    .collect::<Vec<_>>(),
            )),
        }
    }

    /// Kafka: how many leading columns come from the record value.
    pub fn value_columns(&self) -> usize {
        match &self.connector {
            SourceConnector::Kafka(k) => self.columns.len().saturating_sub(k.include.len()),
            SourceConnector::Generator(_) => self.columns.len(),
        }
    }

    /// A keyed (UPSERT/DEBEZIUM) Kafka source: its rows are stored like a
    /// table's, keyed by the Kafka key column.
    pub fn keyed(&self) -> Option<usize> {
        match &self.connector {
            SourceConnector::Kafka(k) if k.envelope != Envelope::None => {
                let i = k.include.iter().position(|m| *m == Meta::Key)?;
                Some(self.value_columns() + i)
            }
            _ => None,
        }
    }

    /// Indices of the value columns declared `json`/`jsonb`.
    pub fn json_columns(&self) -> Vec<usize> {
        self.columns[..self.value_columns()]
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.ty, SqlType::Json | SqlType::Jsonb))
            .map(|(i, _)| i)
            .collect()
    }

    /// Kafka: a decoder of its records.
    pub fn decoder(&self) -> Result<Option<RecordDecoder>> {
        match &self.connector {
            SourceConnector::Kafka(k) => Ok(Some(
                RecordDecoder::new(
                    k.format.clone(),
                    self.schema(),
                    self.value_columns(),
                    k.include.clone(),
                    &self.json_columns(),
                )?
                .with_envelope(k.envelope)?
                .with_max_record_bytes(
                    k.max_record_bytes
                        .unwrap_or(crate::connector::format::DEFAULT_MAX_RECORD_BYTES),
                ),
            )),
            SourceConnector::Generator(_) => Ok(None),
        }
    }
}

/// A named Kafka connection: brokers and librdkafka properties that
/// sources (and sinks) reuse with `CONNECTION name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionDef {
    /// Object id.
    pub id: u32,
    /// Connection name (its own namespace, apart from relations).
    pub name: String,
    /// `bootstrap.servers`.
    pub brokers: String,
    /// librdkafka properties.
    pub properties: Vec<(String, String)>,
}

/// A sink: a relation's changes written to a Kafka topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkDef {
    /// Object id.
    pub id: u32,
    /// Sink name (shares the namespace of relations).
    pub name: String,
    /// The relation it reads.
    pub from: String,
    /// That relation's id.
    pub from_id: u32,
    /// The relation's columns (the message fields).
    pub columns: Vec<ColumnDef>,
    /// Where and how.
    pub spec: crate::connector::sink::SinkSpec,
}

/// What the catalog persists per object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatalogEntry {
    /// A table.
    Table(TableDef),
    /// A view.
    View(ViewDef),
    /// A materialized view.
    MaterializedView(MvDef),
    /// A source.
    Source(SourceDef),
    /// A connection.
    Connection(ConnectionDef),
    /// A sink.
    Sink(SinkDef),
}

impl CatalogEntry {
    fn id(&self) -> u32 {
        match self {
            CatalogEntry::Source(s) => s.id,
            CatalogEntry::Connection(c) => c.id,
            CatalogEntry::Sink(s) => s.id,
            CatalogEntry::Table(t) => t.id,
            CatalogEntry::View(v) => v.id,
            CatalogEntry::MaterializedView(m) => m.id,
        }
    }
}

/// A table as the engine uses it: definition, Arrow schema, row-id counter.
#[derive(Debug)]
pub struct Table {
    /// The persisted definition.
    pub def: TableDef,
    /// Arrow schema of the table's rows.
    pub schema: SchemaRef,
    /// Next hidden row id (tables without a primary key).
    next_row_id: AtomicU64,
    /// Stored values end with a `u64` multiplicity (materialized views
    /// keyed by the whole row).
    pub counted: bool,
    /// Stored values are Arrow IPC chunks of many rows (append-only
    /// materialized views).
    pub chunked: bool,
}

impl Table {
    fn new(def: TableDef, next_row_id: u64) -> Table {
        let fields: Vec<Field> = def
            .columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable))
            .collect();
        Table {
            schema: Arc::new(Schema::new(fields)),
            def,
            next_row_id: AtomicU64::new(next_row_id),
            counted: false,
            chunked: false,
        }
    }

    /// The storage layout of a materialized view's rows.
    pub fn for_mv(def: &MvDef) -> Table {
        let mut t = Table::new(
            TableDef {
                id: def.id,
                name: def.name.clone(),
                columns: def.columns.clone(),
                primary_key: def.key.clone(),
            },
            0,
        );
        t.counted = def.key.is_empty() && !def.append_only;
        t.chunked = def.append_only && def.chunked;
        t
    }

    /// Column types in order.
    pub fn types(&self) -> Vec<SqlType> {
        self.def.columns.iter().map(|c| c.ty.clone()).collect()
    }

    /// Reserves `n` hidden row ids and stages the new counter in `batch`.
    /// Callers hold the engine's writer lock, so reservations never overlap.
    pub fn reserve_row_ids(&self, n: u64, batch: &mut WriteBatch) -> u64 {
        let first = self.next_row_id.fetch_add(n, Ordering::SeqCst);
        batch.put(
            sys_key(SYS_ROWID, &self.def.id.to_be_bytes()),
            (first + n).to_be_bytes(),
        );
        first
    }

    /// Storage keys for new rows: the encoded primary key, or fresh row ids.
    pub fn row_keys(&self, rows: &RecordBatch, batch: &mut WriteBatch) -> Result<Vec<Vec<u8>>> {
        let table = self;
        let prefix = table_prefix(table.def.id);
        let n = rows.num_rows();
        if table.def.primary_key.is_empty() {
            let first = table.reserve_row_ids(n as u64, batch);
            return Ok((0..n as u64)
                .map(|i| {
                    let mut k = prefix.to_vec();
                    k.extend_from_slice(&(first + i).to_be_bytes());
                    k
                })
                .collect());
        }
        let types: Vec<&SqlType> = table
            .def
            .primary_key
            .iter()
            .map(|&i| &table.def.columns[i].ty)
            .collect();
        let arrays: Vec<&ArrayRef> = table
            .def
            .primary_key
            .iter()
            .map(|&i| rows.column(i))
            .collect();
        (0..n)
            .map(|r| {
                let mut k = prefix.to_vec();
                encode_row(&mut k, &types, &arrays, r)?;
                Ok(k)
            })
            .collect()
    }

    /// Stored values of `rows`.
    pub fn row_values(&self, rows: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let table = self;
        let types: Vec<&SqlType> = table.def.columns.iter().map(|c| &c.ty).collect();
        let arrays: Vec<&ArrayRef> = rows.columns().iter().collect();
        (0..rows.num_rows())
            .map(|r| {
                let mut v = Vec::new();
                encode_row(&mut v, &types, &arrays, r)?;
                Ok(v)
            })
            .collect()
    }

    /// The primary-key constraint name PostgreSQL would use.
    pub fn pkey_name(&self) -> String {
        format!("{}_pkey", self.def.name)
    }
}

/// A view as the engine uses it: definition and its planned query.
#[derive(Debug)]
pub struct View {
    /// The persisted definition.
    pub def: ViewDef,
    /// The planned defining query.
    pub plan: LogicalPlan,
}

/// A materialized view as the engine uses it.
#[derive(Debug)]
pub struct MaterializedView {
    /// The persisted definition.
    pub def: MvDef,
    /// Its rows' storage layout (read like a table).
    pub table: Arc<Table>,
}

/// A source as the engine uses it.
#[derive(Debug)]
pub struct Source {
    /// The persisted definition.
    pub def: SourceDef,
    /// Arrow schema of its rows.
    pub schema: SchemaRef,
    /// A keyed (UPSERT/DEBEZIUM) source's current rows, stored like a
    /// table under the source's id, keyed by the Kafka key.
    pub table: Option<Arc<Table>>,
}

impl Source {
    fn new(def: SourceDef) -> Source {
        let table = def.keyed().map(|key| {
            Arc::new(Table::new(
                TableDef {
                    id: def.id,
                    name: def.name.clone(),
                    columns: def.columns.clone(),
                    primary_key: vec![key],
                },
                0,
            ))
        });
        Source {
            schema: def.schema(),
            table,
            def,
        }
    }
}

/// A relation found by name.
#[derive(Debug, Clone)]
pub enum Relation {
    /// A source.
    Source(Arc<Source>),
    /// A table.
    Table(Arc<Table>),
    /// A view.
    View(Arc<View>),
    /// A materialized view.
    MaterializedView(Arc<MaterializedView>),
}

#[derive(Default)]
struct State {
    tables: BTreeMap<String, Arc<Table>>,
    views: BTreeMap<String, Arc<View>>,
    mvs: BTreeMap<String, Arc<MaterializedView>>,
    sources: BTreeMap<String, Arc<Source>>,
    connections: BTreeMap<String, ConnectionDef>,
    sinks: BTreeMap<String, SinkDef>,
    next_id: u32,
}

/// The in-memory catalog, backed by the store.
pub struct Catalog {
    store: Arc<Store>,
    state: RwLock<State>,
}

impl Catalog {
    /// Loads the catalog from the store. Views, materialized views and
    /// sources are returned, in creation order, for the caller to re-plan
    /// and restore.
    pub fn load(store: Arc<Store>) -> Result<(Catalog, Vec<CatalogEntry>)> {
        let mut state = State {
            next_id: FIRST_USER_ID,
            ..Default::default()
        };
        if let Some(v) = store.get(&sys_key(SYS_META, b"next_object_id"))? {
            let bytes: [u8; 4] = v
                .as_slice()
                .try_into()
                .map_err(|_| Error::Storage("corrupt next_object_id".into()))?;
            state.next_id = u32::from_be_bytes(bytes);
        }
        let mut entries = Vec::new();
        store.scan_prefix(&sys_key(SYS_CATALOG, &[]), |_, v| {
            let e: CatalogEntry = serde_json::from_slice(v)
                .map_err(|e| Error::Storage(format!("corrupt catalog entry: {e}")))?;
            entries.push(e);
            Ok(true)
        })?;
        entries.sort_by_key(|e| e.id());
        let mut views = Vec::new();
        for e in entries {
            match e {
                CatalogEntry::Table(def) => {
                    let next = match store.get(&sys_key(SYS_ROWID, &def.id.to_be_bytes()))? {
                        Some(v) => u64::from_be_bytes(
                            v.as_slice()
                                .try_into()
                                .map_err(|_| Error::Storage("corrupt row id counter".into()))?,
                        ),
                        None => 0,
                    };
                    state
                        .tables
                        .insert(def.name.clone(), Arc::new(Table::new(def, next)));
                }
                CatalogEntry::Connection(def) => {
                    state.connections.insert(def.name.clone(), def);
                }
                other => views.push(other),
            }
        }
        Ok((
            Catalog {
                store,
                state: RwLock::new(state),
            },
            views,
        ))
    }

    /// Looks a relation up by name.
    pub fn get(&self, name: &str) -> Option<Relation> {
        let s = self.state.read();
        if let Some(t) = s.tables.get(name) {
            return Some(Relation::Table(t.clone()));
        }
        if let Some(m) = s.mvs.get(name) {
            return Some(Relation::MaterializedView(m.clone()));
        }
        if let Some(src) = s.sources.get(name) {
            return Some(Relation::Source(src.clone()));
        }
        s.views.get(name).map(|v| Relation::View(v.clone()))
    }

    /// Names of the materialized views Sluice made for `owner`.
    pub fn mv_names_owned_by(&self, owner: MvOwner) -> Vec<String> {
        self.state
            .read()
            .mvs
            .values()
            .filter(|m| m.def.owner == owner)
            .map(|m| m.def.name.clone())
            .collect()
    }

    /// Names of all materialized views, sorted.
    pub fn mv_names(&self) -> Vec<String> {
        self.state
            .read()
            .mvs
            .values()
            .filter(|m| m.def.owner == MvOwner::User)
            .map(|m| m.def.name.clone())
            .collect()
    }

    /// All sources, sorted by name.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        self.state.read().sources.values().cloned().collect()
    }

    /// Looks a table up by name.
    pub fn table(&self, name: &str) -> Option<Arc<Table>> {
        self.state.read().tables.get(name).cloned()
    }

    /// Names of all relations, sorted.
    pub fn relation_names(&self) -> Vec<String> {
        let s = self.state.read();
        let mut names: Vec<String> = s
            .tables
            .keys()
            .chain(s.views.keys())
            .chain(s.mvs.keys())
            .chain(s.sources.keys())
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Names of all tables, sorted.
    pub fn table_names(&self) -> Vec<String> {
        self.state.read().tables.keys().cloned().collect()
    }

    /// Names of all views, sorted.
    pub fn view_names(&self) -> Vec<String> {
        self.state.read().views.keys().cloned().collect()
    }

    /// Views and materialized views that read `name` directly.
    pub fn dependents(&self, name: &str) -> Vec<String> {
        let s = self.state.read();
        let views = s
            .views
            .values()
            .filter(|v| v.def.depends_on.iter().any(|d| d == name))
            .map(|v| v.def.name.clone());
        let mvs = s
            .mvs
            .values()
            .filter(|m| m.def.depends_on.iter().any(|d| d == name))
            .map(|m| m.def.name.clone());
        let sinks = s
            .sinks
            .values()
            .filter(|k| k.from == name)
            .map(|k| k.name.clone());
        views.chain(mvs).chain(sinks).collect()
    }

    fn allocate_id(state: &mut State, batch: &mut WriteBatch) -> u32 {
        let id = state.next_id;
        state.next_id += 1;
        batch.put(
            sys_key(SYS_META, b"next_object_id"),
            state.next_id.to_be_bytes(),
        );
        id
    }

    fn ensure_free(state: &State, name: &str) -> Result<()> {
        if state.tables.contains_key(name)
            || state.views.contains_key(name)
            || state.mvs.contains_key(name)
            || state.sources.contains_key(name)
            || state.sinks.contains_key(name)
        {
            return Err(Error::DuplicateObject(name.to_string()));
        }
        Ok(())
    }

    /// Creates a table; `def.id` is assigned here.
    pub fn create_table(&self, mut def: TableDef) -> Result<Arc<Table>> {
        let mut state = self.state.write();
        Self::ensure_free(&state, &def.name)?;
        let mut batch = WriteBatch::default();
        def.id = Self::allocate_id(&mut state, &mut batch);
        put_entry(&mut batch, &CatalogEntry::Table(def.clone()))?;
        self.store.write(batch)?;
        let table = Arc::new(Table::new(def, 0));
        state.tables.insert(table.def.name.clone(), table.clone());
        Ok(table)
    }

    /// Creates a view from its planned query; `def.id` is assigned here.
    pub fn create_view(&self, mut def: ViewDef, plan: LogicalPlan) -> Result<()> {
        let mut state = self.state.write();
        Self::ensure_free(&state, &def.name)?;
        let mut batch = WriteBatch::default();
        def.id = Self::allocate_id(&mut state, &mut batch);
        put_entry(&mut batch, &CatalogEntry::View(def.clone()))?;
        self.store.write(batch)?;
        state
            .views
            .insert(def.name.clone(), Arc::new(View { def, plan }));
        Ok(())
    }

    /// Reserves an object id (for a materialized view whose rows must be
    /// written, under that id, in the same batch as its catalog entry).
    pub fn reserve_id(&self, batch: &mut WriteBatch) -> u32 {
        Self::allocate_id(&mut self.state.write(), batch)
    }

    /// Stages a new materialized view's entry in `batch`; the caller writes
    /// the batch (with the view's backfilled rows) and then calls
    /// [`Catalog::register_mv`].
    pub fn stage_mv(&self, def: &MvDef, batch: &mut WriteBatch) -> Result<()> {
        Self::ensure_free(&self.state.read(), &def.name)?;
        put_entry(batch, &CatalogEntry::MaterializedView(def.clone()))
    }

    /// Makes a materialized view visible (after creation or at startup).
    pub fn register_mv(&self, def: MvDef) -> Arc<MaterializedView> {
        let mv = Arc::new(MaterializedView {
            table: Arc::new(Table::for_mv(&def)),
            def,
        });
        self.state
            .write()
            .mvs
            .insert(mv.def.name.clone(), mv.clone());
        mv
    }

    /// Creates a source; `def.id` is assigned here. Its position starts at
    /// the beginning (offset 0, or a Kafka source's resolved start
    /// offsets), written in the same batch as its entry.
    pub fn create_source(&self, mut def: SourceDef) -> Result<Arc<Source>> {
        let mut state = self.state.write();
        Self::ensure_free(&state, &def.name)?;
        let mut batch = WriteBatch::default();
        def.id = Self::allocate_id(&mut state, &mut batch);
        put_entry(&mut batch, &CatalogEntry::Source(def.clone()))?;
        match &def.connector {
            SourceConnector::Generator(_) => {
                batch.put(source_offset_key(def.id), 0u64.to_be_bytes())
            }
            SourceConnector::Kafka(k) => batch.put(
                source_offset_key(def.id),
                encode_positions(&k.initial_positions())?,
            ),
        }
        self.store.write(batch)?;
        let source = Arc::new(Source::new(def));
        state
            .sources
            .insert(source.def.name.clone(), source.clone());
        Ok(source)
    }

    /// A sink by name.
    pub fn sink(&self, name: &str) -> Option<SinkDef> {
        self.state.read().sinks.get(name).cloned()
    }

    /// All sinks, by name.
    pub fn sinks(&self) -> Vec<SinkDef> {
        self.state.read().sinks.values().cloned().collect()
    }

    /// Creates a sink; `def.id` is assigned here and `stage` adds to the
    /// same atomic batch (the snapshot into its outbox).
    pub fn create_sink(
        &self,
        mut def: SinkDef,
        stage: impl FnOnce(u32, &mut WriteBatch) -> Result<()>,
    ) -> Result<SinkDef> {
        let mut state = self.state.write();
        Self::ensure_free(&state, &def.name)?;
        let mut batch = WriteBatch::default();
        def.id = Self::allocate_id(&mut state, &mut batch);
        put_entry(&mut batch, &CatalogEntry::Sink(def.clone()))?;
        stage(def.id, &mut batch)?;
        self.store.write(batch)?;
        state.sinks.insert(def.name.clone(), def.clone());
        Ok(def)
    }

    /// Re-registers a sink loaded at startup.
    pub fn restore_sink(&self, def: SinkDef) {
        self.state.write().sinks.insert(def.name.clone(), def);
    }

    /// A connection by name.
    pub fn connection(&self, name: &str) -> Option<ConnectionDef> {
        self.state.read().connections.get(name).cloned()
    }

    /// All connections, by name.
    pub fn connections(&self) -> Vec<ConnectionDef> {
        self.state.read().connections.values().cloned().collect()
    }

    /// Creates a connection; `def.id` is assigned here.
    pub fn create_connection(&self, mut def: ConnectionDef) -> Result<()> {
        let mut state = self.state.write();
        if state.connections.contains_key(&def.name) {
            return Err(Error::DuplicateObject(def.name));
        }
        let mut batch = WriteBatch::default();
        def.id = Self::allocate_id(&mut state, &mut batch);
        put_entry(&mut batch, &CatalogEntry::Connection(def.clone()))?;
        self.store.write(batch)?;
        state.connections.insert(def.name.clone(), def);
        Ok(())
    }

    /// Drops a connection (its users checked by the caller).
    pub fn drop_connection(&self, name: &str) -> Result<()> {
        let mut state = self.state.write();
        if let Some(c) = state.connections.get(name) {
            let mut batch = WriteBatch::default();
            batch.delete(sys_key(SYS_CATALOG, &c.id.to_be_bytes()));
            self.store.write(batch)?;
            state.connections.remove(name);
        }
        Ok(())
    }

    /// Re-registers a source loaded at startup.
    pub fn restore_source(&self, def: SourceDef) -> Arc<Source> {
        let source = Arc::new(Source::new(def));
        self.state
            .write()
            .sources
            .insert(source.def.name.clone(), source.clone());
        source
    }

    /// Re-registers a view loaded at startup.
    pub fn restore_view(&self, def: ViewDef, plan: LogicalPlan) {
        self.state
            .write()
            .views
            .insert(def.name.clone(), Arc::new(View { def, plan }));
    }

    /// Drops relations (already checked for dependents by the caller) in one
    /// atomic batch, deleting table rows with them.
    pub fn drop_relations(&self, names: &[String]) -> Result<()> {
        let mut state = self.state.write();
        let mut batch = WriteBatch::default();
        for name in names {
            if let Some(t) = state.tables.get(name) {
                let id = t.def.id;
                batch.delete(sys_key(SYS_CATALOG, &id.to_be_bytes()));
                batch.delete(sys_key(SYS_ROWID, &id.to_be_bytes()));
                let prefix = table_prefix(id);
                batch.delete_range(prefix.to_vec(), prefix_end(&prefix));
            } else if let Some(src) = state.sources.get(name) {
                batch.delete(sys_key(SYS_CATALOG, &src.def.id.to_be_bytes()));
                batch.delete(source_offset_key(src.def.id));
                let errors = source_errors_prefix(src.def.id);
                batch.delete_range(errors.clone(), prefix_end(&errors));
                // A keyed source's rows.
                let prefix = table_prefix(src.def.id);
                batch.delete_range(prefix.to_vec(), prefix_end(&prefix));
            } else if let Some(k) = state.sinks.get(name) {
                batch.delete(sys_key(SYS_CATALOG, &k.id.to_be_bytes()));
                let outbox = crate::connector::sink::outbox_prefix(k.id);
                batch.delete_range(outbox.clone(), prefix_end(&outbox));
                batch.delete(crate::connector::sink::seq_key(k.id));
            } else if let Some(v) = state.views.get(name) {
                batch.delete(sys_key(SYS_CATALOG, &v.def.id.to_be_bytes()));
            } else if let Some(m) = state.mvs.get(name) {
                batch.delete(sys_key(SYS_CATALOG, &m.def.id.to_be_bytes()));
                for id in std::iter::once(m.def.id).chain(m.def.state_ids.iter().copied()) {
                    // Row-id counters of append-only state, if any.
                    batch.delete(sys_key(SYS_ROWID, &id.to_be_bytes()));
                    let prefix = table_prefix(id);
                    batch.delete_range(prefix.to_vec(), prefix_end(&prefix));
                }
            }
        }
        self.store.write(batch)?;
        for name in names {
            state.tables.remove(name);
            state.views.remove(name);
            state.mvs.remove(name);
            state.sources.remove(name);
            state.sinks.remove(name);
        }
        Ok(())
    }
}

/// Where a source's committed offset lives (u64 big-endian).
pub fn source_offset_key(id: u32) -> Vec<u8> {
    sys_key(SYS_OFFSET, &id.to_be_bytes())
}

/// A source's committed offset as `store` holds it.
pub fn read_source_offset(store: &Store, id: u32) -> Result<u64> {
    match store.get(&source_offset_key(id))? {
        Some(v) => Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(
            |_| Error::Storage(format!("corrupt offset of source {id}")),
        )?)),
        None => Ok(0),
    }
}

/// A Kafka source's committed positions as `store` holds them.
pub fn read_positions(store: &Store, id: u32) -> Result<Positions> {
    match store.get(&source_offset_key(id))? {
        Some(v) => {
            let list: Vec<(String, i32, i64)> = serde_json::from_slice(&v)
                .map_err(|e| Error::Storage(format!("corrupt positions of source {id}: {e}")))?;
            Ok(list.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
        }
        None => Ok(Positions::new()),
    }
}

/// The stored form of a Kafka source's positions.
pub fn encode_positions(p: &Positions) -> Result<Vec<u8>> {
    let list: Vec<(&str, i32, i64)> = p.iter().map(|((t, p), o)| (t.as_str(), *p, *o)).collect();
    serde_json::to_vec(&list).map_err(|e| Error::Internal(e.to_string()))
}

/// Where a source's bad records live: `0u32 · 0x05 · source id`, then the
/// record's topic, partition and offset — so a record replayed after a
/// crash overwrites its own entry instead of adding a second one.
pub fn source_errors_prefix(id: u32) -> Vec<u8> {
    sys_key(SYS_SOURCE_ERRORS, &id.to_be_bytes())
}

/// The key of one bad record of source `id`.
pub fn source_error_key(id: u32, topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut k = source_errors_prefix(id);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// A bad record as `sluice_source_errors` stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredBadRecord {
    /// The record.
    #[serde(flatten)]
    pub record: BadRecord,
    /// When it was read (ms since the epoch).
    pub time_ms: i64,
}

fn put_entry(batch: &mut WriteBatch, entry: &CatalogEntry) -> Result<()> {
    let json = serde_json::to_vec(entry).map_err(|e| Error::Internal(e.to_string()))?;
    batch.put(sys_key(SYS_CATALOG, &entry.id().to_be_bytes()), json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory written before chunked views has append-only views
    /// without the `chunked` field: they keep reading their per-row layout.
    #[test]
    fn append_only_views_from_before_chunks_keep_their_row_layout() {
        let old = r#"{"materialized_view":{"id":3,"name":"v","sql":"SELECT n FROM c",
            "depends_on":["c"],"columns":[{"name":"n","ty":"int8","nullable":true}],
            "key":[],"state_ids":[],"append_only":true}}"#;
        let CatalogEntry::MaterializedView(def) = serde_json::from_str(old).unwrap() else {
            panic!("not a view")
        };
        assert!(def.append_only && !def.chunked);
        let t = Table::for_mv(&def);
        assert!(!t.chunked && !t.counted);
        let new = MvDef {
            chunked: true,
            ..def
        };
        let back: CatalogEntry = serde_json::from_slice(
            &serde_json::to_vec(&CatalogEntry::MaterializedView(new)).unwrap(),
        )
        .unwrap();
        let CatalogEntry::MaterializedView(def) = back else {
            panic!("not a view")
        };
        assert!(Table::for_mv(&def).chunked);
    }
}
