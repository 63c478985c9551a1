//! `SELECT …` (and `EXPLAIN`): run through DataFusion, named as PostgreSQL names columns.

use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{self, Expr, SelectItem, SetExpr, Statement};

use crate::catalog::types::SqlType;
use crate::engine::Engine;
use crate::error::Result;
use crate::sql::{normalize_ident, Outcome, Rows};

/// Runs a planned query.
pub async fn run(
    engine: &Engine,
    stmt: &Statement,
    plan: &LogicalPlan,
    names: Option<Vec<Option<String>>>,
) -> Result<Outcome> {
    let (schema, batches) = engine.run_plan(plan).await?;
    let tag = match stmt {
        Statement::Explain { .. } => "EXPLAIN",
        _ => "SELECT",
    };
    let names = names.map(|n| resolved_names(&n, &schema));
    Ok(Outcome::Rows(Rows {
        schema,
        batches,
        names,
        tag,
    }))
}

/// The result column names to report: PostgreSQL's where
/// [`pg_column_names`] derived one, DataFusion's otherwise.
pub fn resolved_names(
    names: &[Option<String>],
    schema: &datafusion::arrow::datatypes::Schema,
) -> Vec<String> {
    names
        .iter()
        .zip(schema.fields())
        .map(|(n, f)| n.clone().unwrap_or_else(|| f.name().clone()))
        .collect()
}

/// PostgreSQL's names for the result columns of `q`, where they can be
/// derived (`None` entries keep DataFusion's name): an unaliased expression
/// is `?column?`, a function call is named after the function, a column
/// reference after the column, a cast after its operand (or the type).
/// DataFusion requires unique names inside a plan, so these are applied only
/// when the result is described on the wire.
pub fn pg_column_names(q: &ast::Query, nfields: usize) -> Option<Vec<Option<String>>> {
    let select = first_select(&q.body)?;
    let wildcards = select
        .projection
        .iter()
        .filter(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        })
        .count();
    let fixed = select.projection.len() - wildcards;
    if wildcards > 1 || fixed > nfields {
        return None;
    }
    let mut out = Vec::with_capacity(nfields);
    for item in &select.projection {
        match item {
            SelectItem::UnnamedExpr(e) => out.push(Some(expr_name(e))),
            SelectItem::ExprWithAlias { alias, .. } => out.push(Some(normalize_ident(alias))),
            _ => out.extend(std::iter::repeat_n(None, nfields - fixed)),
        }
    }
    (out.len() == nfields).then_some(out)
}

fn first_select(body: &SetExpr) -> Option<&ast::Select> {
    match body {
        SetExpr::Select(s) => Some(s),
        SetExpr::SetOperation { left, .. } => first_select(left),
        SetExpr::Query(q) => first_select(&q.body),
        _ => None,
    }
}

/// PostgreSQL's name for an unaliased result expression.
pub fn expr_name(e: &Expr) -> String {
    match e {
        Expr::Identifier(id) => normalize_ident(id),
        Expr::CompoundIdentifier(ids) => ids.last().map(normalize_ident).unwrap_or_else(unknown),
        Expr::Function(f) => f
            .name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .map(normalize_ident)
            .unwrap_or_else(unknown),
        Expr::Cast {
            expr, data_type, ..
        } => {
            let inner = expr_name(expr);
            if inner != "?column?" {
                inner
            } else {
                type_name(data_type)
            }
        }
        Expr::TypedString(ts) => type_name(&ts.data_type),
        Expr::Nested(inner) => expr_name(inner),
        Expr::Case { .. } => "case".into(),
        Expr::Array(_) => "array".into(),
        Expr::Exists { .. } => "exists".into(),
        Expr::Extract { .. } => "extract".into(),
        Expr::Substring { .. } => "substring".into(),
        Expr::Trim { .. } => "btrim".into(),
        Expr::Position { .. } => "position".into(),
        Expr::Ceil { .. } => "ceil".into(),
        Expr::Floor { .. } => "floor".into(),
        _ => unknown(),
    }
}

fn unknown() -> String {
    "?column?".into()
}

/// The internal type name PostgreSQL uses for a cast's result column.
fn type_name(t: &ast::DataType) -> String {
    match SqlType::from_ast(t) {
        Ok(SqlType::Bool) => "bool",
        Ok(SqlType::Int2) => "int2",
        Ok(SqlType::Int4) => "int4",
        Ok(SqlType::Int8) => "int8",
        Ok(SqlType::Float4) => "float4",
        Ok(SqlType::Float8) => "float8",
        Ok(SqlType::Numeric { .. }) => "numeric",
        Ok(SqlType::Text) => "text",
        Ok(SqlType::Varchar(_)) => "varchar",
        Ok(SqlType::Bytea) => "bytea",
        Ok(SqlType::Date) => "date",
        Ok(SqlType::Time) => "time",
        Ok(SqlType::Timestamp) => "timestamp",
        Ok(SqlType::TimestampTz) => "timestamptz",
        Ok(SqlType::Interval) => "interval",
        Ok(SqlType::Json) => "json",
        Ok(SqlType::Jsonb) => "jsonb",
        _ => "?column?",
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str, n: usize) -> Vec<String> {
        let stmts = crate::sql::parse_sql(sql).unwrap();
        let Statement::Query(q) = &stmts[0] else {
            panic!()
        };
        pg_column_names(q, n)
            .unwrap()
            .into_iter()
            .map(|n| n.unwrap_or_else(|| "*".into()))
            .collect()
    }

    #[test]
    fn names_follow_postgres() {
        assert_eq!(names("SELECT 1, 2", 2), vec!["?column?", "?column?"]);
        assert_eq!(
            names("SELECT count(*), sum(a) FROM t", 2),
            vec!["count", "sum"]
        );
        assert_eq!(
            names("SELECT t.a, b AS x, a::int FROM t", 3),
            vec!["a", "x", "a"]
        );
        assert_eq!(names("SELECT '1'::int", 1), vec!["int4"]);
        assert_eq!(names("SELECT *, 1 FROM t", 3), vec!["*", "*", "?column?"]);
    }
}
