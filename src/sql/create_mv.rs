//! `CREATE MATERIALIZED VIEW name AS SELECT …` and its EXPLAIN.
//!
//! The query is planned by DataFusion, optimized, and turned into a
//! pipeline by [`crate::planner::plan_view`]. Under the writer lock (so no
//! commit can slip between the two steps) the view is **backfilled** — the
//! source's current rows flow through the pipeline as one +1 delta — and its
//! rows and catalog entry are written in one batch; from then on every
//! commit to the source maintains it in the same batch as the source write.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::sql::sqlparser::ast;
use rocksdb::WriteBatch;

use crate::catalog::{
    read_positions, read_source_offset, MvDef, MvOwner, Relation, SourceConnector,
};
use crate::dataflow::operator::{Layout, OpCtx};
use crate::dataflow::ChangeBatch;
use crate::engine::Engine;
use crate::epoch::MAX_EPOCH_ROWS;
use crate::error::{Error, Result};
use crate::planner::{plan_view, PlannedView};
use crate::query::StoredTable;
use crate::sql::create_view::referenced_relations;
use crate::sql::{object_name, select, Outcome, Rows};

fn check(cv: &ast::CreateView) -> Result<()> {
    if cv.or_replace || cv.or_alter {
        return Err(Error::unsupported(
            "CREATE OR REPLACE MATERIALIZED VIEW is not supported",
        ));
    }
    if !cv.columns.is_empty() {
        return Err(Error::unsupported(
            "a column list in CREATE MATERIALIZED VIEW is not supported; alias the columns in the query",
        ));
    }
    Ok(())
}

/// Rejects a query calling a function whose result its arguments do not
/// fix — volatile (`random()`, `uuid()`) or stable (`now()`,
/// `current_date`): checked before the optimizer, which folds the stable
/// ones into constants. A view is maintained by applying changes, so a
/// DELETE would recompute `random()` and retract a row that was never
/// inserted (the write failed with an internal error), and `now()` would
/// freeze at CREATE time where the same query run in batch reads the clock.
fn reject_nondeterministic(plan: &LogicalPlan, owner: MvOwner) -> Result<()> {
    let mut found = None;
    plan.apply_with_subqueries(|p| {
        p.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e {
                    if f.func.signature().volatility != Volatility::Immutable {
                        found = Some(f.func.name().to_string());
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    match found {
        Some(name) => {
            // Sinks and SUBSCRIBE over a query run on an internal view:
            // name what the user wrote.
            let what = match owner {
                MvOwner::User => "materialized views",
                MvOwner::Sink => "a sink's query",
                MvOwner::Subscription => "SUBSCRIBE's query",
            };
            Err(Error::unsupported(format!(
                "{what} cannot call {name}(): its result is not determined by its arguments, \
                 so the continuously maintained result could not stay equal to the query"
            )))
        }
        None => Ok(()),
    }
}

/// DataFusion's optimized plan of the view's query and PostgreSQL's names
/// for its columns.
async fn optimized(
    engine: &Engine,
    query: &ast::Query,
    owner: MvOwner,
) -> Result<(LogicalPlan, Option<Vec<String>>)> {
    let stmt = ast::Statement::Query(Box::new(query.clone()));
    let logical = engine.plan(&stmt).await?;
    reject_nondeterministic(&logical, owner)?;
    let names: Option<Vec<String>> =
        select::pg_column_names(query, logical.schema().fields().len())
            .map(|n| select::resolved_names(&n, logical.schema().as_arrow()));
    Ok((engine.state().optimize(&logical)?, names))
}

/// Creates and backfills a materialized view.
pub async fn execute(engine: &Engine, cv: &ast::CreateView) -> Result<Outcome> {
    check(cv)?;
    let name = object_name(&cv.name)?;
    let done = Outcome::Command {
        tag: "CREATE MATERIALIZED VIEW",
        rows: None,
    };
    let _writer = engine.writer().await;
    if engine.catalog.get(&name).is_some() {
        if cv.if_not_exists {
            return Ok(done);
        }
        return Err(Error::DuplicateObject(name));
    }
    create_locked(engine, name, &cv.query, MvOwner::User).await?;
    Ok(done)
}

/// Creates and backfills materialized view `name` over `query`. Callers
/// hold the engine's writer lock (and checked that the name is free).
pub async fn create_locked(
    engine: &Engine,
    name: String,
    query: &ast::Query,
    owner: MvOwner,
) -> Result<MvDef> {
    let mut batch = WriteBatch::default();
    let id = engine.catalog.reserve_id(&mut batch);
    let (logical, names) = optimized(engine, query, owner).await?;
    let mut state_ids = Vec::new();
    let planned = plan_view(
        &logical,
        id,
        names.as_deref(),
        &|n| engine.source_id(n),
        &mut || {
            let sid = engine.catalog.reserve_id(&mut batch);
            state_ids.push(sid);
            Ok(sid)
        },
        None,
    )?;
    let PlannedView {
        mut pipeline,
        sources,
        columns,
        append_only,
        key,
        layout,
    } = planned;

    // Backfill: each source's current rows, as one insertion delta each
    // (a join sees the second source's rows meet the first's state).
    {
        let mut ctx = OpCtx::new(&engine.store, &mut batch);
        pipeline.init(&mut ctx)?;
        for (source_id, source) in &sources {
            let table = match engine.catalog.get(source) {
                Some(Relation::Table(t)) => t,
                Some(Relation::MaterializedView(m)) => m.table.clone(),
                Some(Relation::Source(s)) if s.table.is_some() => match &s.table {
                    Some(t) => t.clone(),
                    None => return Err(Error::Internal("keyed source without rows".into())),
                },
                Some(Relation::Source(s)) => match &s.def.connector {
                    SourceConnector::Generator(g) => {
                        // A generator's rows so far are regenerated from
                        // offset 0 to its committed offset, in epoch-sized
                        // pieces.
                        let end = read_source_offset(&engine.store, s.def.id)?;
                        let mut from = 0;
                        while from < end {
                            let to = end.min(from + MAX_EPOCH_ROWS);
                            let rows = g.generate(from, to)?;
                            pipeline.process(
                                *source_id,
                                &ChangeBatch::uniform(rows, 1),
                                &mut ctx,
                            )?;
                            from = to;
                        }
                        continue;
                    }
                    SourceConnector::Kafka(k) => {
                        // A Kafka source's records so far are read again,
                        // from its start offsets to its committed
                        // positions: exactly what the other views counted
                        // (as long as the topic retains them).
                        let decoder = s.def.decoder()?.ok_or_else(|| {
                            Error::Internal("Kafka source without decoder".into())
                        })?;
                        let to = read_positions(&engine.store, s.def.id)?;
                        let from = k.initial_positions();
                        for rows in k.read_range(&s.def.name, &decoder, &from, &to, None)? {
                            if rows.num_rows() > 0 {
                                pipeline.process(
                                    *source_id,
                                    &ChangeBatch::uniform(rows, 1),
                                    &mut ctx,
                                )?;
                            }
                        }
                        continue;
                    }
                },
                _ => return Err(Error::UndefinedTable(source.clone())),
            };
            for b in StoredTable::new(table, engine.store.clone()).read(&[], None)? {
                if b.num_rows() > 0 {
                    pipeline.process(*source_id, &ChangeBatch::uniform(b, 1), &mut ctx)?;
                }
            }
        }
    }
    let def = MvDef {
        id,
        name,
        sql: query.to_string(),
        depends_on: referenced_relations(engine, query),
        columns,
        key,
        state_ids,
        append_only,
        chunked: layout == Layout::Chunks,
        owner,
    };
    engine.catalog.stage_mv(&def, &mut batch)?;
    engine.apply(batch).await?;
    engine.catalog.register_mv(def.clone());
    engine.add_pipeline(pipeline);
    Ok(def)
}

/// `EXPLAIN CREATE MATERIALIZED VIEW`: the pipeline, sink first.
pub async fn explain(engine: &Engine, cv: &ast::CreateView) -> Result<Outcome> {
    check(cv)?;
    let (logical, names) = optimized(engine, &cv.query, MvOwner::User).await?;
    let mut next = 0u32;
    let planned = plan_view(
        &logical,
        0,
        names.as_deref(),
        &|n| engine.source_id(n),
        &mut || {
            next += 1;
            Ok(next)
        },
        None,
    )?;
    let mut lines = planned.pipeline.explain();
    for (id, name) in &planned.sources {
        let needle = format!("Source: relation {id}");
        for l in lines.iter_mut() {
            if l.trim_start() == needle {
                *l = l.replace(&needle, &format!("Source: {name}"));
            }
        }
    }
    let schema = Arc::new(Schema::new(vec![Field::new(
        "QUERY PLAN",
        DataType::Utf8,
        false,
    )]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(lines))])?;
    Ok(Outcome::Rows(Rows {
        schema,
        batches: vec![batch],
        names: None,
        tag: "EXPLAIN",
    }))
}
