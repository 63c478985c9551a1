//! INSERT, UPDATE and DELETE: from DataFusion's DML plan to one commit.
//!
//! DataFusion plans the statement (`LogicalPlan::Dml`), which gives us type
//! checking, casts to the column types, defaults and parameter inference for
//! free. We never let DataFusion *execute* the write: [`execute`] runs only
//! the DML plan's input (the rows to insert, or the rows matched by the
//! WHERE clause), then turns them into
//!
//! * RocksDB puts and deletes (keys per [`crate::state::encoding`]), and
//! * a [`ChangeBatch`] (+1 inserted, −1 deleted rows),
//!
//! and hands both to [`Engine::commit`] — the single commit path of every
//! table write. The statement holds the engine's writer lock throughout, so
//! it is atomic and serialized with other writers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::{cast_with_options, concat_batches, CastOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::datasource::{provider_as_source, MemTable};
use datafusion::logical_expr::{
    DmlStatement, Expr, LogicalPlan, LogicalPlanBuilder, Projection, WriteOp,
};
use datafusion::sql::sqlparser::ast::{self, Statement};
use rocksdb::WriteBatch;

use crate::catalog::types::SqlType;
use crate::catalog::{Relation, Table};
use crate::dataflow::{ChangeBatch, TableChange};
use crate::engine::Engine;
use crate::error::{DataErrorKind, Error, Result};
use crate::state::encoding::table_prefix;

/// Rejects DML forms we do not support, before planning, with 0A000.
pub fn check_supported(stmt: &Statement) -> Result<()> {
    let unsupported = match stmt {
        Statement::Insert(i) if i.on.is_some() => "INSERT … ON CONFLICT",
        Statement::Update(u) if u.from.is_some() => "UPDATE … FROM",
        Statement::Delete(d) if d.using.is_some() => "DELETE … USING",
        _ => return Ok(()),
    };
    Err(Error::unsupported(format!(
        "{unsupported} is not supported yet"
    )))
}

/// Executes a planned DML statement; returns the affected rows (inserted,
/// deleted, or the new versions of updated rows), for the row count and
/// `RETURNING`.
pub async fn execute(
    engine: &Engine,
    stmt: &ast::Statement,
    dml: DmlStatement,
) -> Result<RecordBatch> {
    let name = dml.table_name.table().to_string();
    let table = match engine.catalog.get(&name) {
        Some(Relation::Table(t)) => t,
        Some(Relation::MaterializedView(_)) => {
            return Err(Error::WrongObjectType(format!(
                "cannot change materialized view \"{name}\"; it is maintained from its query"
            )))
        }
        Some(Relation::View(_)) => {
            return Err(Error::WrongObjectType(format!(
                "cannot change view \"{name}\"; views are read-only"
            )))
        }
        Some(Relation::Source(_)) => {
            return Err(Error::WrongObjectType(format!(
                "cannot change source \"{name}\"; sources are append-only streams"
            )))
        }
        None => return Err(Error::UndefinedTable(name)),
    };
    let _writer = engine.writer().await;
    let input = Arc::unwrap_or_clone(dml.input);
    let result = match dml.op {
        WriteOp::Insert(_) => insert(engine, &table, &input).await,
        WriteOp::Delete => delete(engine, &table, &input).await,
        WriteOp::Update => update(engine, &table, input).await,
        other => Err(Error::unsupported(format!("{other} is not supported"))),
    };
    result.map_err(|e| not_null_from_datafusion(e, &table, stmt))
}

/// DataFusion itself rejects a NULL bound for a NOT NULL column while
/// evaluating `VALUES` ("Column 'column2' is declared as non-nullable …"),
/// naming the VALUES column. Translate that into PostgreSQL's 23502 naming
/// the table column.
fn not_null_from_datafusion(e: Error, table: &Table, stmt: &ast::Statement) -> Error {
    let (Error::Internal(msg) | Error::Plan(msg)) = &e else {
        return e;
    };
    if !msg.contains("non-nullable but contains null") {
        return e;
    }
    let named = msg.split('\'').nth(1).unwrap_or_default();
    let column = if let Some(c) = table.def.columns.iter().find(|c| c.name == named) {
        c.name.clone()
    } else {
        let pos = named
            .strip_prefix("column")
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(1));
        let listed = match stmt {
            ast::Statement::Insert(i) if !i.columns.is_empty() => pos
                .and_then(|p| i.columns.get(p))
                .and_then(|name| crate::sql::object_name(name).ok()),
            _ => pos
                .and_then(|p| table.def.columns.get(p))
                .map(|c| c.name.clone()),
        };
        match listed {
            Some(c) => c,
            None => return e,
        }
    };
    Error::NotNullViolation {
        table: table.def.name.clone(),
        column,
    }
}

async fn insert(engine: &Engine, table: &Arc<Table>, input: &LogicalPlan) -> Result<RecordBatch> {
    let rows = collect_rows(engine, table, input).await?;
    if rows.num_rows() == 0 {
        return Ok(rows);
    }
    let mut batch = WriteBatch::default();
    let keys = table.row_keys(&rows, &mut batch)?;
    if !table.def.primary_key.is_empty() {
        check_unique(engine, table, &rows, &keys, &HashSet::new())?;
    }
    for (k, v) in keys.iter().zip(table.row_values(&rows)?) {
        batch.put(k, v);
    }
    commit(engine, table, batch, ChangeBatch::uniform(rows.clone(), 1)).await?;
    Ok(rows)
}

async fn delete(engine: &Engine, table: &Arc<Table>, input: &LogicalPlan) -> Result<RecordBatch> {
    let old = collect_rows(engine, table, input).await?;
    if old.num_rows() == 0 {
        return Ok(old);
    }
    let mut batch = WriteBatch::default();
    for k in stored_keys(engine, table, &old)? {
        batch.delete(k);
    }
    commit(engine, table, batch, ChangeBatch::uniform(old.clone(), -1)).await?;
    Ok(old)
}

async fn update(engine: &Engine, table: &Arc<Table>, input: LogicalPlan) -> Result<RecordBatch> {
    let ncols = table.def.columns.len();
    // DataFusion's UPDATE input projects the new row; also project the old
    // one so that we can delete it (the old key may differ from the new).
    let LogicalPlan::Projection(p) = input else {
        return Err(Error::Internal("unexpected UPDATE plan shape".into()));
    };
    let mut exprs = p.expr.clone();
    for (i, (qualifier, field)) in p.input.schema().iter().take(ncols).enumerate() {
        exprs.push(
            Expr::Column(Column::from((qualifier, field))).alias(format!("__sluice_old_{i}")),
        );
    }
    let plan = LogicalPlan::Projection(Projection::try_new(exprs, p.input.clone())?);
    let (_, batches) = engine.run_plan(&plan).await?;
    let Some(first) = batches.first() else {
        return Ok(RecordBatch::new_empty(table.schema.clone()));
    };
    let both = concat_batches(&first.schema(), &batches)?;
    if both.num_rows() == 0 {
        return Ok(RecordBatch::new_empty(table.schema.clone()));
    }
    let new = conform(
        table,
        &RecordBatch::try_new(table.schema.clone(), both.columns()[..ncols].to_vec())?,
    )?;
    let old = RecordBatch::try_new(
        table.schema.clone(),
        cast_columns(table, &both.columns()[ncols..])?,
    )?;

    let mut batch = WriteBatch::default();
    let old_keys = stored_keys(engine, table, &old)?;
    for k in &old_keys {
        batch.delete(k);
    }
    let new_keys = table.row_keys(&new, &mut batch)?;
    if !table.def.primary_key.is_empty() {
        let freed: HashSet<&[u8]> = old_keys.iter().map(|k| k.as_slice()).collect();
        check_unique(engine, table, &new, &new_keys, &freed)?;
    }
    for (k, v) in new_keys.iter().zip(table.row_values(&new)?) {
        batch.put(k, v);
    }
    let change = ChangeBatch::concat(
        &table.schema,
        &[
            ChangeBatch::uniform(old, -1),
            ChangeBatch::uniform(new.clone(), 1),
        ],
    )?;
    commit(engine, table, batch, change).await?;
    Ok(new)
}

/// Commits one statement's writes and its change batch for `table`.
async fn commit(
    engine: &Engine,
    table: &Table,
    batch: WriteBatch,
    changes: ChangeBatch,
) -> Result<()> {
    let change = TableChange {
        table_id: table.def.id,
        changes,
    };
    engine.commit(batch, vec![change]).await
}

/// Runs a DML input plan and conforms its rows to the table.
async fn collect_rows(engine: &Engine, table: &Table, input: &LogicalPlan) -> Result<RecordBatch> {
    let (schema, batches) = engine.run_plan(input).await?;
    let all = concat_batches(&schema, &batches)?;
    if all.num_columns() != table.def.columns.len() {
        return Err(Error::Internal(format!(
            "DML input has {} columns, table \"{}\" has {}",
            all.num_columns(),
            table.def.name,
            table.def.columns.len()
        )));
    }
    conform(table, &all)
}

fn cast_columns(table: &Table, cols: &[ArrayRef]) -> Result<Vec<ArrayRef>> {
    let opts = CastOptions {
        safe: false,
        ..Default::default()
    };
    cols.iter()
        .zip(&table.def.columns)
        .map(|(a, c)| {
            let target = c.ty.arrow_type();
            if a.data_type() == &target {
                Ok(a.clone())
            } else {
                Ok(cast_with_options(a, &target, &opts)?)
            }
        })
        .collect()
}

/// Casts to the column types and checks NOT NULL and `varchar(n)` limits.
fn conform(table: &Table, rows: &RecordBatch) -> Result<RecordBatch> {
    let cols = cast_columns(table, rows.columns())?;
    for (a, c) in cols.iter().zip(&table.def.columns) {
        if !c.nullable && a.null_count() > 0 {
            return Err(Error::NotNullViolation {
                table: table.def.name.clone(),
                column: c.name.clone(),
            });
        }
        if let SqlType::Varchar(Some(max)) = c.ty {
            let s = a.as_string::<i32>();
            if let Some(v) = s
                .iter()
                .flatten()
                .find(|v| v.chars().count() > max as usize)
            {
                return Err(Error::data(
                    DataErrorKind::StringTooLong,
                    format!(
                        "value too long for type character varying({max}): \"{}\"",
                        v.chars().take(20).collect::<String>()
                    ),
                ));
            }
        }
    }
    Ok(RecordBatch::try_new(table.schema.clone(), cols)?)
}

/// Keys of stored rows equal to `rows`. With a primary key that is the
/// encoded key; without one, rows are matched by value (identical rows are
/// indistinguishable, so any `n` of them are the right `n`).
fn stored_keys(engine: &Engine, table: &Table, rows: &RecordBatch) -> Result<Vec<Vec<u8>>> {
    if !table.def.primary_key.is_empty() {
        let mut scratch = WriteBatch::default();
        return table.row_keys(rows, &mut scratch);
    }
    let mut wanted: HashMap<Vec<u8>, usize> = HashMap::new();
    for v in table.row_values(rows)? {
        *wanted.entry(v).or_default() += 1;
    }
    let mut remaining = rows.num_rows();
    let mut keys = Vec::with_capacity(remaining);
    engine
        .store
        .scan_prefix(&table_prefix(table.def.id), |k, v| {
            if let Some(c) = wanted.get_mut(v) {
                if *c > 0 {
                    *c -= 1;
                    remaining -= 1;
                    keys.push(k.to_vec());
                }
            }
            Ok(remaining > 0)
        })?;
    Ok(keys)
}

/// 23505 unless every key in `keys` is distinct and free (absent from the
/// table, or freed by this statement).
fn check_unique(
    engine: &Engine,
    table: &Table,
    rows: &RecordBatch,
    keys: &[Vec<u8>],
    freed: &HashSet<&[u8]>,
) -> Result<()> {
    let mut seen: HashSet<&[u8]> = HashSet::with_capacity(keys.len());
    let existing = engine.store.multi_get(keys)?;
    for (i, (k, old)) in keys.iter().zip(existing).enumerate() {
        let taken = old.is_some() && !freed.contains(k.as_slice());
        if taken || !seen.insert(k.as_slice()) {
            return Err(Error::UniqueViolation {
                constraint: table.pkey_name(),
                detail: key_detail(table, rows, i),
            });
        }
    }
    Ok(())
}

/// `Key (a, b)=(1, x) already exists.`
fn key_detail(table: &Table, rows: &RecordBatch, row: usize) -> String {
    let names: Vec<&str> = table
        .def
        .primary_key
        .iter()
        .map(|&i| table.def.columns[i].name.as_str())
        .collect();
    let values: Vec<String> = table
        .def
        .primary_key
        .iter()
        .map(|&i| {
            ScalarValue::try_from_array(rows.column(i).as_ref(), row)
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
        .collect();
    format!(
        "Key ({})=({}) already exists.",
        names.join(", "),
        values.join(", ")
    )
}

/// A DML statement's `RETURNING` list, planned against the table's columns
/// when the statement is prepared (so Describe can report its columns).
#[derive(Debug)]
pub struct Returning {
    table: String,
    table_schema: SchemaRef,
    exprs: Vec<Expr>,
    /// Result schema.
    pub schema: SchemaRef,
    /// Column names as PostgreSQL reports them.
    pub names: Vec<String>,
}

/// Splits `RETURNING` off a DML statement: DataFusion plans the rest.
pub fn split_returning(stmt: &Statement) -> (Statement, Option<Vec<ast::SelectItem>>) {
    let mut s = stmt.clone();
    let items = match &mut s {
        Statement::Insert(i) => i.returning.take(),
        Statement::Update(u) => u.returning.take(),
        Statement::Delete(d) => d.returning.take(),
        _ => None,
    };
    (s, items)
}

/// Plans `items` over the rows of the table a DML plan writes.
pub async fn plan_returning(
    engine: &Engine,
    plan: &LogicalPlan,
    items: &[ast::SelectItem],
) -> Result<Returning> {
    let LogicalPlan::Dml(dml) = plan else {
        return Err(Error::Internal("RETURNING on a non-DML plan".into()));
    };
    let name = dml.table_name.table().to_string();
    let table = engine
        .catalog
        .table(&name)
        .ok_or_else(|| Error::UndefinedTable(name.clone()))?;
    let df_schema = DFSchema::try_from_qualified_schema(name.as_str(), &table.schema)?;
    let state = engine.state();
    let mut exprs = Vec::new();
    let mut names = Vec::new();
    for item in items {
        match item {
            ast::SelectItem::UnnamedExpr(e) => {
                let expr = state.create_logical_expr_from_sql_expr(
                    ast::ExprWithAlias {
                        expr: e.clone(),
                        alias: None,
                    },
                    &df_schema,
                )?;
                exprs.push(expr);
                names.push(super::select::expr_name(e));
            }
            ast::SelectItem::ExprWithAlias { expr, alias } => {
                exprs.push(state.create_logical_expr_from_sql_expr(
                    ast::ExprWithAlias {
                        expr: expr.clone(),
                        alias: None,
                    },
                    &df_schema,
                )?);
                names.push(super::normalize_ident(alias));
            }
            ast::SelectItem::Wildcard(_) | ast::SelectItem::QualifiedWildcard(..) => {
                for c in &table.def.columns {
                    exprs.push(Expr::Column(Column::new(Some(name.as_str()), &c.name)));
                    names.push(c.name.clone());
                }
            }
            other => {
                return Err(Error::unsupported(format!(
                    "RETURNING item {other} is not supported"
                )))
            }
        }
    }
    // Projection names must be unique inside a plan; PostgreSQL's may repeat.
    let exprs: Vec<Expr> = exprs
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.alias(format!("__returning_{i}")))
        .collect();
    let mut r = Returning {
        table: name,
        table_schema: table.schema.clone(),
        exprs,
        schema: table.schema.clone(),
        names,
    };
    r.schema = r
        .plan(RecordBatch::new_empty(table.schema.clone()))?
        .schema()
        .inner()
        .clone();
    Ok(r)
}

impl Returning {
    fn plan(&self, rows: RecordBatch) -> Result<LogicalPlan> {
        let mem = MemTable::try_new(self.table_schema.clone(), vec![vec![rows]])?;
        Ok(
            LogicalPlanBuilder::scan(self.table.as_str(), provider_as_source(Arc::new(mem)), None)?
                .project(self.exprs.clone())?
                .build()?,
        )
    }

    /// Evaluates the list over the affected rows.
    pub async fn eval(&self, engine: &Engine, rows: RecordBatch) -> Result<Vec<RecordBatch>> {
        let (_, batches) = engine.run_plan(&self.plan(rows)?).await?;
        Ok(batches)
    }
}
