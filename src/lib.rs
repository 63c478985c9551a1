//! # Sluice
//!
//! An embedded streaming SQL engine: one binary that speaks the PostgreSQL
//! wire protocol, stores tables in RocksDB, answers SQL through Apache
//! DataFusion and keeps materialized views up to date incrementally — over
//! tables, built-in generators and Kafka topics — and writes their changes
//! back to Kafka (see `docs/ARCHITECTURE.md`).
//!
//! ## Layers
//!
//! Data flows one way; no module imports one above it:
//!
//! ```text
//! server (pgwire) → session → sql (one handler per statement) → engine
//!                                                   ├─ planner   (LogicalPlan → Pipeline)
//!                                                   ├─ catalog   (tables, views, MVs; in RocksDB)
//!                                                   ├─ query     (DataFusion TableProviders)
//!                                                   ├─ dataflow  (change batches, operators)
//!                                                   └─ state     (RocksDB store, key encoding)
//! ```
//!
//! Leaf modules import none of these and serve every layer: [`error`], and
//! [`pgtext`], the PostgreSQL text form of Arrow values that the wire layer
//! sends and Kafka sinks write.
//!
//! ## Life of a SELECT
//!
//! `psql` sends `SELECT name FROM users WHERE id = 7`:
//!
//! 1. [`server::serve`] accepted the connection and handed the socket to
//!    pgwire's `process_socket` with our [`server::handler::Handlers`].
//! 2. pgwire decodes the Query message and calls
//!    `SimpleQueryHandler::do_query` on [`server::handler::Backend`], which
//!    parses the text with [`sql::parse`] (DataFusion's sqlparser,
//!    PostgreSQL dialect).
//! 3. [`sql::prepare`] plans the statement with DataFusion
//!    ([`engine::Engine::plan`]); the `users` name resolves through
//!    [`query::SluiceSchema`] (the catalog) to a [`query::StoredTable`].
//!    PostgreSQL column names (`?column?`, `count`) are derived from the AST
//!    by [`sql::select::pg_column_names`].
//! 4. [`session::Session::execute`] → [`sql::execute`] → [`sql::select::run`]
//!    → [`engine::Engine::run_plan`], which takes a read snapshot
//!    ([`engine::Engine::snapshot`]) while DataFusion builds the physical
//!    plan: [`query::StoredTable`]'s `scan` sees `id = 7` pins the primary
//!    key and does one RocksDB `multi_get` instead of a table scan, decoding
//!    rows with [`state::encoding::decode_row`].
//! 5. The batches come back as [`sql::Outcome::Rows`]; the handler encodes
//!    them with `arrow-pg` (text or binary per column) and pgwire sends
//!    RowDescription, DataRows and `SELECT 1`.
//!
//! ## Life of an INSERT
//!
//! Steps 1–3 as above, except DataFusion's plan is a `LogicalPlan::Dml`.
//! [`sql::dml::execute`] takes the writer lock, runs only the DML's input
//! (the rows, already cast to the column types), checks NOT NULL and the
//! primary key, encodes keys and rows ([`state::encoding`]), and calls
//! [`engine::Engine::commit`] with the [`dataflow::ChangeBatch`] of the
//! statement: one RocksDB `WriteBatch`, durable before the client hears
//! `INSERT 0 n`.
//!
//! ## Life of a row through a materialized view
//!
//! Before that `WriteBatch` is written, [`engine::Engine::commit`] hands the
//! statement's change batch (+1 per inserted row) to every
//! [`dataflow::operator::Pipeline`] reading the table (planned from the
//! view's query by [`planner::plan_view`]): a
//! [`dataflow::operator::Filter`] drops it or keeps it,
//! [`dataflow::operator::Project`] computes the view's columns, a
//! [`dataflow::join::Join`] looks the row's key up in the other side's
//! state, a [`dataflow::aggregate::HashAggregate`] reads its group's state
//! from RocksDB, updates it and emits −1 old / +1 new group row, a
//! [`dataflow::topn::TopN`] re-reads its window, and
//! [`dataflow::operator::Materialize`] adds the delta to the view's stored
//! rows — all staged into the same `WriteBatch` as the table write, so the
//! view is exactly as of every commit, after `kill -9` too.
//!
//! ## Life of a source row
//!
//! A generator source ([`connector::generator`]) is a pure function from
//! offset to row. Every checkpoint interval the epoch driver
//! ([`epoch`]) takes the writer lock, asks each source for the rows due
//! ([`connector::GeneratorSpec::generate`]), and passes them as change
//! batches to [`engine::Engine::commit`] — the path above, so every view
//! reading the source is maintained — with the sources' new offsets in the
//! same `WriteBatch`. A restart resumes each source at its committed
//! offset; `SELECT … FROM source` regenerates rows `0..offset`
//! ([`query::SourceTable`]).
//!
//! A Kafka record takes the same road with one more hop: the source's
//! reader thread ([`connector::KafkaReader`]) polls it, decodes it with
//! the other records of its poll ([`connector::RecordDecoder`]; a record
//! that fails becomes a [`connector::BadRecord`]), and hands the chunk to
//! the driver, which commits the rows, the bad records and every
//! partition's next offset in one batch.
//!
//! ## Life of a change on its way out
//!
//! Inside [`engine::Engine::commit`], after the views, every sink reading
//! a changed relation turns the change into Kafka messages
//! ([`connector::sink::encode`]) staged as one outbox entry in the same
//! batch. The sink's writer thread ([`connector::sink::SinkWriter`]) sends
//! the pending entries and deletes them once Kafka acknowledged them.
//!
//! After the batch is durable, `commit` stamps it with a commit timestamp
//! and pushes the changes of every subscribed relation to its
//! [`subscription::Subscription`]s; a `COPY (SUBSCRIBE …) TO STDOUT`
//! ([`sql::subscribe`]) is written out by [`server::stream`] and flushed
//! as each commit's batch arrives.
//!
//! Errors are one typed enum, [`error::Error`]; SQLSTATEs are assigned only
//! at the wire, in [`server::errors`].

#![warn(missing_docs)]

pub mod catalog;
pub mod config;
pub mod connector;
pub mod dataflow;
pub mod engine;
pub mod epoch;
pub mod error;
pub mod pgtext;
pub mod planner;
pub mod query;
pub mod server;
pub mod session;
pub mod sql;
pub mod state;
pub mod subscription;
pub mod system_tables;

/// mimalloc instead of glibc's malloc for every Rust allocation in the
/// process (server, tests and benchmarks alike, so they measure the same
/// thing). The epoch thread allocates per group and per key (staged
/// writes, encoded keys, scalar values) and the reader per batch; glibc's
/// malloc and free were a fifth of the epoch thread's samples in a GROUP BY
/// view (perf, `docs/benchmarks.md`). RocksDB's and librdkafka's C/C++
/// allocations keep the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
