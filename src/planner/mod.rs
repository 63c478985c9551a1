//! From DataFusion's optimized `LogicalPlan` to an incremental pipeline.
//!
//! [`plan_view`] walks the plan DataFusion's optimizer produced for a
//! materialized view's query and builds a [`Pipeline`] of operators that
//! maintain its result from the changes of the one relation it reads:
//! `TableScan` → source, `Filter` → [`Filter`], `Projection` →
//! [`Project`], `Aggregate` → [`HashAggregate`] (COUNT, SUM, AVG, MIN,
//! MAX), equi-`Join` → [`Join`] (INNER with any extra condition as a
//! filter above it; LEFT, RIGHT, FULL), `Union` (ALL; `UNION` is a DISTINCT aggregate above
//! it), `ORDER BY … LIMIT` and `ROW_NUMBER() OVER (…)` → [`TopN`], then a
//! final [`Materialize`]. Expressions are compiled with
//! DataFusion's `create_physical_expr`, so every scalar expression
//! DataFusion evaluates works unchanged on change batches.
//!
//! Anything else (semi/anti joins, other aggregates, other window
//! functions) is refused with SQLSTATE 0A000 naming the construct: a view
//! that cannot be maintained exactly is never created.

use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::common::NullEquality;
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::{Expr, ExprSchemable, FetchType, JoinType, LogicalPlan, SkipType};
use datafusion::physical_expr::{create_physical_expr, PhysicalExpr};

use crate::catalog::types::SqlType;
use crate::catalog::ColumnDef;
use crate::dataflow::aggregate::{AggKind, AggSpec, HashAggregate, StatFn};
use crate::dataflow::join::{Join, JoinSide};
use crate::dataflow::operator::{Filter, Layout, Materialize, Node, Operator, Pipeline, Project};
use crate::dataflow::topn::{SortKey, TopN, TopNMode};
use crate::error::{Error, Result};

/// A planned materialized view.
#[derive(Debug)]
pub struct PlannedView {
    /// The operators.
    pub pipeline: Pipeline,
    /// The relations the view reads: (id, name).
    pub sources: Vec<(u32, String)>,
    /// The view's columns.
    pub columns: Vec<ColumnDef>,
    /// Its input can never retract a row (see [`Materialize`]).
    pub append_only: bool,
    /// Output columns that are a unique key (empty: none known).
    pub key: Vec<usize>,
    /// How the view's rows are stored.
    pub layout: Layout,
}

/// Plans the maintenance of view `id` from its optimized query plan.
/// `resolve` maps a relation name to the object id whose changes feed it
/// (tables, sources and materialized views; `None` for anything else) and
/// whether those changes are insert-only (sources, append-only views). `names`
/// overrides output column names (PostgreSQL's, derived from the AST).
/// `stored_layout` is the layout of a view being restored.
pub fn plan_view(
    plan: &LogicalPlan,
    id: u32,
    names: Option<&[String]>,
    resolve: &dyn Fn(&str) -> Option<(u32, bool)>,
    state_ids: &mut dyn FnMut() -> Result<u32>,
    stored_layout: Option<Layout>,
) -> Result<PlannedView> {
    let mut cx = Walk {
        resolve,
        state_ids,
        sources: Vec::new(),
        append_only: Vec::new(),
    };
    let mut root = walk(plan, &mut cx)?;
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
        root = unary(Project::new(exprs, schema.clone()), root);
    }
    let types = columns.iter().map(|c| c.ty.clone()).collect();
    let append_only = root.append_only(&|id| cx.append_only.contains(&id));
    let key = if append_only {
        vec![]
    } else {
        unique_key(plan).unwrap_or_default()
    };
    // A view re-planned at startup keeps the layout its rows were stored
    // in (a view created by an older Sluice may predate a layout).
    let layout = stored_layout.unwrap_or(match (append_only, key.is_empty()) {
        (true, _) => Layout::Chunks,
        (false, false) => Layout::Keyed(key.clone()),
        (false, true) => Layout::Counted,
    });
    root = unary(Materialize::new(id, types, schema, layout.clone())?, root);
    Ok(PlannedView {
        pipeline: Pipeline::new(id, root),
        sources: cx.sources,
        columns,
        append_only,
        key,
        layout,
    })
}

/// Output columns of `plan` that form a unique key: the GROUP BY columns of
/// a top-level aggregate, followed up through filters and projections that
/// keep them as plain columns. `None` when there is no such key.
fn unique_key(plan: &LogicalPlan) -> Option<Vec<usize>> {
    match plan {
        LogicalPlan::Aggregate(a) if !a.group_expr.is_empty() => {
            Some((0..a.group_expr.len()).collect())
        }
        // `rn = 1` / `rn <= 1` over ROW_NUMBER() OVER (PARTITION BY p …):
        // one row per partition, so the partition columns are a key.
        LogicalPlan::Filter(f) => match f.input.as_ref() {
            LogicalPlan::Window(w) if row_number_bound(&f.predicate, w) == Some(1) => {
                partition_columns(w)
            }
            _ => unique_key(&f.input),
        },
        LogicalPlan::SubqueryAlias(s) => unique_key(&s.input),
        LogicalPlan::Sort(s) if s.fetch.is_none() => unique_key(&s.input),
        LogicalPlan::Projection(p) => {
            let inner = unique_key(&p.input)?;
            let input = p.input.schema();
            inner
                .iter()
                .map(|&k| {
                    let (qualifier, field) = input.qualified_field(k);
                    p.expr.iter().position(|e| match strip_alias(e) {
                        Expr::Column(c) => {
                            c.name == *field.name() && c.relation.as_ref() == qualifier
                        }
                        _ => false,
                    })
                })
                .collect()
        }
        _ => None,
    }
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
    resolve: &'a dyn Fn(&str) -> Option<(u32, bool)>,
    state_ids: &'a mut dyn FnMut() -> Result<u32>,
    sources: Vec<(u32, String)>,
    /// Ids of the insert-only relations read.
    append_only: Vec<u32>,
}

fn unary(op: impl Operator + 'static, input: Node) -> Node {
    Node::Unary {
        op: Box::new(op),
        input: Box::new(input),
    }
}

fn sql_types(schema: &DFSchema) -> Result<Vec<SqlType>> {
    schema
        .fields()
        .iter()
        .map(|f| SqlType::from_arrow(f.data_type()))
        .collect()
}

fn walk(plan: &LogicalPlan, cx: &mut Walk<'_>) -> Result<Node> {
    match plan {
        LogicalPlan::Projection(p) => {
            let input = walk(&p.input, cx)?;
            let exprs = p
                .expr
                .iter()
                .map(|e| physical(e, p.input.schema()))
                .collect::<Result<Vec<_>>>()?;
            Ok(unary(
                Project::new(exprs, Arc::new(p.schema.as_arrow().clone())),
                input,
            ))
        }
        LogicalPlan::Filter(f) => {
            let input = match f.input.as_ref() {
                LogicalPlan::Window(w) => row_number(w, cx, row_number_bound(&f.predicate, w))?,
                _ => walk(&f.input, cx)?,
            };
            let pred = physical(&f.predicate, f.input.schema())?;
            Ok(unary(
                Filter::new(pred, Arc::new(f.input.schema().as_arrow().clone())),
                input,
            ))
        }
        LogicalPlan::SubqueryAlias(a) => walk(&a.input, cx),
        LogicalPlan::Window(w) => row_number(w, cx, None),
        LogicalPlan::Limit(limit) => {
            let (skip, fetch) = match (limit.get_skip_type()?, limit.get_fetch_type()?) {
                (SkipType::Literal(s), FetchType::Literal(f)) => (s, f),
                _ => {
                    return Err(Error::unsupported(
                        "LIMIT/OFFSET must be constants in a materialized view",
                    ))
                }
            };
            let LogicalPlan::Sort(sort) = limit.input.as_ref() else {
                return Err(Error::unsupported(
                    "LIMIT without ORDER BY is not deterministic and not supported in a materialized view",
                ));
            };
            // The optimizer may have pushed the limit into the sort too.
            let fetch = match (fetch, sort.fetch) {
                (Some(f), Some(sf)) => Some(f.min(sf.saturating_sub(skip))),
                (f, None) => f,
                (None, Some(sf)) => Some(sf.saturating_sub(skip)),
            };
            let Some(fetch) = fetch else {
                return Err(Error::unsupported(
                    "OFFSET without LIMIT is not supported in a materialized view yet",
                ));
            };
            top_n(sort, skip, fetch, cx)
        }
        LogicalPlan::Sort(sort) => match sort.fetch {
            Some(fetch) => top_n(sort, 0, fetch, cx),
            // ORDER BY alone does not change which rows a view holds (a
            // view, like a table, has no order: ORDER BY when you SELECT).
            None => walk(&sort.input, cx),
        },
        LogicalPlan::Union(u) => Ok(Node::Union {
            inputs: u
                .inputs
                .iter()
                .map(|i| walk(i, cx))
                .collect::<Result<_>>()?,
            schema: Arc::new(u.schema.as_arrow().clone()),
        }),
        LogicalPlan::TableScan(scan) => {
            if scan.fetch.is_some() {
                return Err(Error::unsupported(
                    "LIMIT is not supported in a materialized view yet",
                ));
            }
            let name = scan.table_name.table().to_string();
            let (id, append_only) = (cx.resolve)(&name).ok_or_else(|| {
                Error::unsupported(format!(
                    "a materialized view cannot read \"{}\"; only tables, sources and materialized views",
                    scan.table_name
                ))
            })?;
            if !cx.sources.iter().any(|(i, _)| *i == id) {
                cx.sources.push((id, name));
            }
            if append_only && !cx.append_only.contains(&id) {
                cx.append_only.push(id);
            }
            let full = scan.source.schema();
            // Filters pushed into the scan need no operator here: our table
            // providers accept them as `Inexact` (`StoredTable::
            // supports_filters_pushdown`), so DataFusion keeps the Filter
            // node above the scan, and that node is planned as a Filter.
            let identity = scan
                .projection
                .as_ref()
                .is_none_or(|p| p.iter().copied().eq(0..full.fields().len()));
            let mut node = Node::Source(id);
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
                node = unary(
                    Project::new(exprs, Arc::new(scan.projected_schema.as_arrow().clone())),
                    node,
                );
            }
            Ok(node)
        }
        LogicalPlan::Join(j) => {
            let (left_outer, right_outer) = match j.join_type {
                JoinType::Inner => (false, false),
                JoinType::Left => (true, false),
                JoinType::Right => (false, true),
                JoinType::Full => (true, true),
                other => {
                    return Err(Error::unsupported(format!(
                        "{} JOIN is not supported in a materialized view yet",
                        other.to_string().to_uppercase()
                    )))
                }
            };
            if j.null_equality != NullEquality::NullEqualsNothing {
                return Err(Error::unsupported(
                    "joins where NULL equals NULL are not supported in a materialized view yet",
                ));
            }
            let left = walk(&j.left, cx)?;
            let right = walk(&j.right, cx)?;
            let insert_only = |n: &Node| n.append_only(&|id| cx.append_only.contains(&id));
            let (left_append, right_append) = (insert_only(&left), insert_only(&right));
            let (ls, rs) = (j.left.schema(), j.right.schema());
            let mut left_keys = Vec::new();
            let mut right_keys = Vec::new();
            let mut key_types = Vec::new();
            for (l, r) in &j.on {
                let lt = l.to_field(ls)?.1.data_type().clone();
                let rt = r.to_field(rs)?.1.data_type().clone();
                // Compare keys in one common type (DataFusion has coerced
                // them already; a cast is a no-op then).
                let t = SqlType::from_arrow(&lt)?;
                if SqlType::from_arrow(&rt)? != t {
                    return Err(Error::unsupported(format!(
                        "join keys of different types ({lt} and {rt}) are not supported in a materialized view yet"
                    )));
                }
                left_keys.push(physical(l, ls)?);
                right_keys.push(physical(r, rs)?);
                key_types.push(t);
            }
            let join = Join::new(
                JoinSide {
                    state_id: (cx.state_ids)()?,
                    keys: left_keys,
                    key_types: key_types.clone(),
                    row_types: sql_types(ls)?,
                    append_only: left_append,
                },
                JoinSide {
                    state_id: (cx.state_ids)()?,
                    keys: right_keys,
                    key_types,
                    row_types: sql_types(rs)?,
                    append_only: right_append,
                },
                Arc::new(j.schema.as_arrow().clone()),
            )
            .with_outer(left_outer, right_outer);
            let outer = left_outer || right_outer;
            // An outer join's extra ON condition decides what matches (and
            // so what is NULL-extended); an inner join's is a plain filter.
            let join = match (&j.filter, outer) {
                (Some(f), true) => join.with_filter(physical(f, &j.schema)?),
                _ => join,
            };
            let mut node = Node::Join {
                op: Box::new(join),
                left: Box::new(left),
                right: Box::new(right),
            };
            if let (Some(filter), false) = (&j.filter, outer) {
                node = unary(
                    Filter::new(
                        physical(filter, &j.schema)?,
                        Arc::new(j.schema.as_arrow().clone()),
                    ),
                    node,
                );
            }
            Ok(node)
        }
        LogicalPlan::Aggregate(agg) => {
            let input_node = walk(&agg.input, cx)?;
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
                    "bool_and" => AggKind::BoolAnd,
                    "bool_or" => AggKind::BoolOr,
                    other if StatFn::from_name(other).is_some() => AggKind::Stat(
                        StatFn::from_name(other)
                            .ok_or_else(|| Error::Internal("statistic".into()))?,
                    ),
                    _ => {
                        return Err(Error::unsupported(format!(
                            "aggregate function {name} is not supported in a materialized view yet"
                        )))
                    }
                };
                let p = &f.params;
                let arity = match kind {
                    AggKind::Stat(s) if s.binary() => 2,
                    _ => 1,
                };
                // DISTINCT changes nothing for MIN/MAX; COUNT(DISTINCT x)
                // keeps the same value multiset MIN/MAX keep.
                let kind = match (p.distinct, kind) {
                    (true, AggKind::Count) => AggKind::CountDistinct,
                    (true, AggKind::Min | AggKind::Max) | (false, _) => kind,
                    (true, _) => {
                        return Err(Error::unsupported(format!(
                            "{e}: only COUNT, MIN and MAX take DISTINCT in a materialized view yet"
                        )))
                    }
                };
                if p.filter.is_some() || !p.order_by.is_empty() || p.args.len() != arity {
                    return Err(Error::unsupported(format!(
                        "{e} (FILTER, ORDER BY or several arguments) is not supported in a materialized view yet; FILTER (WHERE c) can be written as a CASE WHEN c THEN … END argument"
                    )));
                }
                let arg = &p.args[0];
                let arg_type = arg.to_field(input)?.1.data_type().clone();
                let arg2 = match p.args.get(1) {
                    Some(b) => Some((
                        physical(b, input)?,
                        b.to_field(input)?.1.data_type().clone(),
                    )),
                    None => None,
                };
                if let Some((_, t)) = &arg2 {
                    if !(t.is_integer() || is_float_or_decimal(t)) {
                        return Err(Error::unsupported(format!(
                            "{e} of {t} is not supported in a materialized view yet"
                        )));
                    }
                }
                aggs.push(AggSpec {
                    kind,
                    arg: physical(arg, input)?,
                    arg_type,
                    arg2,
                    out_type: out.field(agg.group_expr.len() + i).data_type().clone(),
                });
            }
            let state_id = (cx.state_ids)()?;
            // Over an insert-only input MIN/MAX never retract: they keep
            // only the extreme instead of every value.
            let insert_only = input_node.append_only(&|id| cx.append_only.contains(&id));
            Ok(unary(
                HashAggregate::new(state_id, group_exprs, aggs, Arc::new(out.clone()))?
                    .insert_only(insert_only),
                input_node,
            ))
        }
        other => Err(Error::unsupported(format!(
            "{} is not supported in a materialized view yet",
            node_name(other)
        ))),
    }
}

/// `ORDER BY … LIMIT fetch OFFSET skip` over `sort`'s input.
fn top_n(
    sort: &datafusion::logical_expr::Sort,
    skip: usize,
    fetch: usize,
    cx: &mut Walk<'_>,
) -> Result<Node> {
    let input = walk(&sort.input, cx)?;
    let in_schema = sort.input.schema();
    let keys = sort_keys(&sort.expr, in_schema)?;
    let state_id = (cx.state_ids)()?;
    let append_only = input.append_only(&|id| cx.append_only.contains(&id));
    Ok(unary(
        TopN::new(
            state_id,
            vec![],
            keys,
            sql_types(in_schema)?,
            TopNMode::Limit {
                offset: skip,
                limit: fetch,
            },
            Arc::new(in_schema.as_arrow().clone()),
        )
        .with_append_only(append_only),
        input,
    ))
}

fn sort_keys(
    sort: &[datafusion::logical_expr::SortExpr],
    schema: &DFSchema,
) -> Result<Vec<SortKey>> {
    sort.iter()
        .map(|k| {
            Ok(SortKey {
                expr: physical(&k.expr, schema)?,
                ty: SqlType::from_arrow(k.expr.to_field(schema)?.1.data_type())?,
                asc: k.asc,
                nulls_first: k.nulls_first,
            })
        })
        .collect()
}

/// `ROW_NUMBER() OVER (PARTITION BY … ORDER BY …)`: the only window
/// function maintained so far.
/// Positions (in the window's output, which starts with its input's
/// columns) of a single window function's PARTITION BY columns, when they
/// are all plain columns and there is at least one.
fn partition_columns(w: &datafusion::logical_expr::Window) -> Option<Vec<usize>> {
    let [e] = w.window_expr.as_slice() else {
        return None;
    };
    let Expr::WindowFunction(wf) = strip_alias(e) else {
        return None;
    };
    let parts = &wf.params.partition_by;
    if parts.is_empty() {
        return None;
    }
    let input = w.input.schema();
    parts
        .iter()
        .map(|p| match p {
            Expr::Column(c) => input.index_of_column(c).ok(),
            _ => None,
        })
        .collect()
}

/// The `n` of a filter `rn <= n` (`rn < n + 1`, `rn = n`) on the window's
/// output column: only positions up to `n` can pass it.
fn row_number_bound(predicate: &Expr, w: &datafusion::logical_expr::Window) -> Option<usize> {
    use datafusion::logical_expr::{BinaryExpr, Operator as Op};
    let rn = w.schema.fields().last()?.name().clone();
    let mut bound = None;
    for conj in datafusion::logical_expr::utils::split_conjunction(predicate) {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conj else {
            continue;
        };
        let (Expr::Column(c), Expr::Literal(v, _)) = (strip_cast(left), strip_cast(right)) else {
            continue;
        };
        if c.name != rn {
            continue;
        }
        let Ok(datafusion::common::ScalarValue::UInt64(Some(n))) =
            v.cast_to(&datafusion::arrow::datatypes::DataType::UInt64)
        else {
            continue;
        };
        let n = usize::try_from(n).ok()?;
        let b = match op {
            Op::LtEq | Op::Eq => n,
            Op::Lt => n.saturating_sub(1),
            _ => continue,
        };
        bound = Some(bound.map_or(b, |x: usize| x.min(b)));
    }
    bound
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        other => other,
    }
}

fn row_number(
    w: &datafusion::logical_expr::Window,
    cx: &mut Walk<'_>,
    limit: Option<usize>,
) -> Result<Node> {
    use datafusion::logical_expr::expr::{WindowFunction, WindowFunctionParams};
    let [e] = w.window_expr.as_slice() else {
        return Err(Error::unsupported(
            "several window functions in one materialized view are not supported yet",
        ));
    };
    let Expr::WindowFunction(wf) = strip_alias(e) else {
        return Err(Error::unsupported(format!(
            "window expression {e} is not supported"
        )));
    };
    let WindowFunction {
        fun,
        params:
            WindowFunctionParams {
                args,
                partition_by,
                order_by,
                filter,
                ..
            },
        ..
    } = wf.as_ref();
    if !fun.name().eq_ignore_ascii_case("row_number") || !args.is_empty() || filter.is_some() {
        return Err(Error::unsupported(format!(
            "window function {} is not supported in a materialized view yet; only ROW_NUMBER()",
            fun.name()
        )));
    }
    let input = walk(&w.input, cx)?;
    let in_schema = w.input.schema();
    let partition = partition_by
        .iter()
        .map(|p| {
            Ok((
                physical(p, in_schema)?,
                SqlType::from_arrow(p.to_field(in_schema)?.1.data_type())?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let keys = sort_keys(order_by, in_schema)?;
    let state_id = (cx.state_ids)()?;
    let append_only = input.append_only(&|id| cx.append_only.contains(&id));
    Ok(unary(
        TopN::new(
            state_id,
            partition,
            keys,
            sql_types(in_schema)?,
            TopNMode::RowNumber { limit },
            Arc::new(w.schema.as_arrow().clone()),
        )
        .with_append_only(append_only),
        input,
    ))
}

fn is_float_or_decimal(t: &datafusion::arrow::datatypes::DataType) -> bool {
    use datafusion::arrow::datatypes::DataType as D;
    matches!(t, D::Float16 | D::Float32 | D::Float64 | D::Decimal128(..))
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
