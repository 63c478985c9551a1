//! From DataFusion's optimized `LogicalPlan` to an incremental pipeline.
//!
//! [`plan_view`] walks the plan DataFusion's optimizer produced for a
//! materialized view's query and builds a [`Pipeline`] of operators that
//! maintain its result from the changes of the one relation it reads:
//! `TableScan` → source, `Filter` → [`Filter`], `Projection` →
//! [`Project`], `Aggregate` → [`HashAggregate`] (COUNT, SUM, AVG, MIN,
//! MAX), then a final [`Materialize`]. Expressions are compiled with
//! DataFusion's `create_physical_expr`, so every scalar expression
//! DataFusion evaluates works unchanged on change batches.
//!
//! Anything else (joins, other aggregates, ORDER BY/LIMIT, windows, unions,
//! subqueries) is refused with SQLSTATE 0A000 naming the construct: a view
//! that cannot be maintained exactly is never created.

use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan};
use datafusion::physical_expr::{create_physical_expr, PhysicalExpr};

use crate::catalog::types::SqlType;
use crate::catalog::ColumnDef;
use crate::dataflow::aggregate::{AggKind, AggSpec, HashAggregate};
use crate::dataflow::operator::{Filter, Materialize, Operator, Pipeline, Project};
use crate::error::{Error, Result};

/// A planned materialized view.
#[derive(Debug)]
pub struct PlannedView {
    /// The operators.
    pub pipeline: Pipeline,
    /// Name of the relation the view reads.
    pub source: String,
    /// The view's columns.
    pub columns: Vec<ColumnDef>,
}

/// Plans the maintenance of view `id` from its optimized query plan.
/// `resolve` maps a relation name to the object id whose changes feed it
/// (tables and materialized views; `None` for anything else). `names`
/// overrides output column names (PostgreSQL's, derived from the AST).
pub fn plan_view(
    plan: &LogicalPlan,
    id: u32,
    names: Option<&[String]>,
    resolve: &dyn Fn(&str) -> Option<u32>,
    state_ids: &mut dyn FnMut() -> Result<u32>,
) -> Result<PlannedView> {
    let mut ops: Vec<Box<dyn Operator>> = Vec::new();
    let mut cx = Walk { resolve, state_ids };
    let (source_id, source) = walk(plan, &mut ops, &mut cx)?;
    let out = plan.schema().as_arrow().clone();
    let mut columns = Vec::with_capacity(out.fields().len());
    let mut fields = Vec::with_capacity(out.fields().len());
    let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
    for (i, f) in out.fields().iter().enumerate() {
        let name = names
            .and_then(|n| n.get(i))
            .cloned()
            .unwrap_or_else(|| f.name().clone());
        if columns.iter().any(|c: &ColumnDef| c.name == name) {
            return Err(Error::Plan(format!(
                "column \"{name}\" specified more than once; give the view's columns distinct aliases"
            )));
        }
        let ty = SqlType::from_arrow(f.data_type())?;
        fields.push(Field::new(&name, ty.arrow_type(), true));
        exprs.push(Arc::new(
            datafusion::physical_expr::expressions::Column::new(f.name(), i),
        ));
        columns.push(ColumnDef {
            name,
            ty,
            nullable: true,
        });
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    // Rename and cast to the stored types (Project casts when they differ),
    // unless the rows already have the stored names and types.
    let same = schema
        .fields()
        .iter()
        .zip(out.fields())
        .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
    if !same {
        ops.push(Box::new(Project::new(exprs, schema.clone())));
    }
    let types = columns.iter().map(|c| c.ty.clone()).collect();
    ops.push(Box::new(Materialize::new(id, types, schema)));
    Ok(PlannedView {
        pipeline: Pipeline::new(source_id, id, ops),
        source,
        columns,
    })
}

fn physical(e: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
    Ok(create_physical_expr(
        e,
        schema,
        &ExecutionProps::new(),
        &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext::default(),
    )?)
}

struct Walk<'a> {
    resolve: &'a dyn Fn(&str) -> Option<u32>,
    state_ids: &'a mut dyn FnMut() -> Result<u32>,
}

fn walk(
    plan: &LogicalPlan,
    ops: &mut Vec<Box<dyn Operator>>,
    cx: &mut Walk<'_>,
) -> Result<(u32, String)> {
    match plan {
        LogicalPlan::Projection(p) => {
            let src = walk(&p.input, ops, cx)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema()))
                .collect::<Result<Vec<_>>>()?;
            ops.push(Box::new(Project::new(
                exprs,
                Arc::new(p.schema.as_arrow().clone()),
            )));
            Ok(src)
        }
        LogicalPlan::Filter(f) => {
            let src = walk(&f.input, ops, cx)?;
            let pred = physical(&f.predicate, f.input.schema())?;
            ops.push(Box::new(Filter::new(
                pred,
                Arc::new(f.input.schema().as_arrow().clone()),
            )));
            Ok(src)
        }
        LogicalPlan::SubqueryAlias(a) => walk(&a.input, ops, cx),
        LogicalPlan::TableScan(scan) => {
            if scan.fetch.is_some() {
                return Err(Error::unsupported(
                    "LIMIT is not supported in a materialized view yet",
                ));
            }
            let name = scan.table_name.table().to_string();
            let id = (cx.resolve)(&name).ok_or_else(|| {
                Error::unsupported(format!(
                    "a materialized view cannot read \"{}\"; only tables and materialized views",
                    scan.table_name
                ))
            })?;
            let full = scan.source.schema();
            // Filters pushed into the scan need no operator here: our table
            // providers accept them as `Inexact` (`StoredTable::
            // supports_filters_pushdown`), so DataFusion keeps the Filter
            // node above the scan, and that node is planned as a Filter.
            let identity = scan
                .projection
                .as_ref()
                .is_none_or(|p| p.iter().copied().eq(0..full.fields().len()));
            if let (Some(proj), false) = (&scan.projection, identity) {
                let exprs: Vec<Arc<dyn PhysicalExpr>> = proj
                    .iter()
                    .map(|&i| {
                        Arc::new(datafusion::physical_expr::expressions::Column::new(
                            full.field(i).name(),
                            i,
                        )) as Arc<dyn PhysicalExpr>
                    })
                    .collect();
                ops.push(Box::new(Project::new(
                    exprs,
                    Arc::new(scan.projected_schema.as_arrow().clone()),
                )));
            }
            Ok((id, name))
        }
        LogicalPlan::Aggregate(agg) => {
            let src = walk(&agg.input, ops, cx)?;
            let input = agg.input.schema();
            let group_exprs = agg
                .group_expr
                .iter()
                .map(|e| match e {
                    Expr::GroupingSet(_) => Err(Error::unsupported(
                        "GROUPING SETS / ROLLUP / CUBE are not supported in a materialized view yet",
                    )),
                    e => physical(e, input),
                })
                .collect::<Result<Vec<_>>>()?;
            let out = agg.schema.as_arrow();
            let mut aggs = Vec::with_capacity(agg.aggr_expr.len());
            for (i, e) in agg.aggr_expr.iter().enumerate() {
                let Expr::AggregateFunction(f) = strip_alias(e) else {
                    return Err(Error::unsupported(format!(
                        "aggregate {e} is not supported"
                    )));
                };
                let name = f.func.name().to_ascii_lowercase();
                let kind = match name.as_str() {
                    "count" => AggKind::Count,
                    "sum" => AggKind::Sum,
                    "avg" | "mean" => AggKind::Avg,
                    "min" => AggKind::Min,
                    "max" => AggKind::Max,
                    _ => {
                        return Err(Error::unsupported(format!(
                            "aggregate function {name} is not supported in a materialized view yet"
                        )))
                    }
                };
                let p = &f.params;
                if p.distinct || p.filter.is_some() || !p.order_by.is_empty() || p.args.len() != 1 {
                    return Err(Error::unsupported(format!(
                        "{e} (DISTINCT, FILTER, ORDER BY or several arguments) is not supported in a materialized view yet"
                    )));
                }
                let arg = &p.args[0];
                let arg_type = arg.to_field(input)?.1.data_type().clone();
                aggs.push(AggSpec {
                    kind,
                    arg: physical(arg, input)?,
                    arg_type,
                    out_type: out.field(agg.group_expr.len() + i).data_type().clone(),
                });
            }
            let state_id = (cx.state_ids)()?;
            ops.push(Box::new(HashAggregate::new(
                state_id,
                group_exprs,
                aggs,
                Arc::new(out.clone()),
            )?));
            Ok(src)
        }
        other => Err(Error::unsupported(format!(
            "{} is not supported in a materialized view yet",
            node_name(other)
        ))),
    }
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

fn node_name(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Aggregate(_) => "GROUP BY / aggregate functions".into(),
        LogicalPlan::Join(_) => "JOIN".into(),
        LogicalPlan::Sort(_) => "ORDER BY".into(),
        LogicalPlan::Limit(_) => "LIMIT".into(),
        LogicalPlan::Window(_) => "a window function".into(),
        LogicalPlan::Union(_) => "UNION".into(),
        LogicalPlan::Distinct(_) => "DISTINCT".into(),
        LogicalPlan::Values(_) => "VALUES".into(),
        LogicalPlan::EmptyRelation(_) => "a query without FROM".into(),
        other => other.display().to_string(),
    }
}
