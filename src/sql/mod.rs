//! SQL statements: parsing and one handler per statement kind.
//!
//! [`parse`] turns text into sqlparser statements (DataFusion's re-export,
//! PostgreSQL dialect, with `datafusion-pg-catalog`'s rewrites so that client
//! introspection queries plan). [`prepare`] plans a statement once — for
//! queries and DML through DataFusion, which infers parameter types and the
//! result schema — and [`execute`] runs a prepared statement with bound
//! parameters. The simple query protocol is prepare + execute without
//! parameters, so both protocols share every code path.

pub mod create_mv;
pub mod create_table;
pub mod create_view;
pub mod dml;
pub mod drop;
pub mod select;
pub mod set;
pub mod show;
pub mod sink;
pub mod source;
pub mod subscribe;
pub mod tokens;
pub mod transaction;

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{self, Statement};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use crate::engine::Engine;
use crate::error::{Error, Result};
pub use set::Vars;

/// A parsed statement: sqlparser's, or one of ours that it does not know.
// sqlparser's `Statement` is large and is by far the common variant; boxing
// it would only add an allocation per statement.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Stmt {
    /// Parsed by sqlparser.
    Sql(Statement),
    /// `CREATE SOURCE`, `DROP SOURCE`, `SHOW SOURCES`.
    Source(source::SourceStatement),
    /// `SUBSCRIBE`, `COPY … TO STDOUT`, `DECLARE`, `FETCH`, `CLOSE`.
    Stream(subscribe::StreamStatement),
}

impl Stmt {
    /// Whether the wire layer streams its result over time (it must then be
    /// the only statement of its query string).
    pub fn is_streaming(&self) -> bool {
        matches!(
            self,
            Stmt::Stream(subscribe::StreamStatement::Subscribe(_))
                | Stmt::Stream(subscribe::StreamStatement::Copy { .. })
        )
    }
}

impl std::fmt::Display for Stmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stmt::Sql(s) => s.fmt(f),
            Stmt::Source(s) => s.fmt(f),
            Stmt::Stream(s) => s.fmt(f),
        }
    }
}

/// Parses one or more `;`-separated statements, ours included.
pub fn parse(sql: &str) -> Result<Vec<Stmt>> {
    match source::split(sql)? {
        None => Ok(parse_sql(sql)?.into_iter().map(Stmt::Sql).collect()),
        Some(pieces) => {
            let mut out = Vec::new();
            for p in pieces {
                match p {
                    source::Piece::Source(s) => out.push(Stmt::Source(s)),
                    source::Piece::Stream(s) => out.push(Stmt::Stream(s)),
                    source::Piece::Sql(text) => {
                        out.extend(parse_sql(&text)?.into_iter().map(Stmt::Sql))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Parses statements sqlparser knows.
pub fn parse_sql(sql: &str) -> Result<Vec<Statement>> {
    thread_local! {
        static PARSER: PostgresCompatibilityParser = PostgresCompatibilityParser::new();
    }
    match PARSER.with(|p| p.parse(sql)) {
        Ok(stmts) => Ok(stmts),
        // sqlparser knows only MySQL's FLUSH; ours takes no arguments.
        Err(_)
            if sql
                .trim()
                .trim_end_matches(';')
                .trim()
                .eq_ignore_ascii_case("flush") =>
        {
            Ok(vec![Statement::Flush {
                object_type: ast::FlushType::Tables,
                location: None,
                channel: None,
                read_lock: false,
                export: false,
                tables: vec![],
            }])
        }
        Err(e) => Err(Error::from(e)),
    }
}

/// The one query of `text` (an embedded `SELECT`); a syntax error saying
/// `expected` for anything else.
pub fn parse_query(text: &str, expected: &str) -> Result<Box<ast::Query>> {
    let mut stmts = parse_sql(text)?;
    match (stmts.pop(), stmts.is_empty()) {
        (Some(Statement::Query(q)), true) => Ok(q),
        _ => Err(Error::Syntax(expected.to_string())),
    }
}

/// A statement ready to execute, possibly with parameters (`$1`…).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The source text.
    pub sql: String,
    /// The parsed statement.
    pub stmt: Stmt,
    /// DataFusion's plan, for queries and DML.
    pub plan: Option<LogicalPlan>,
    /// Result column names as PostgreSQL would print them, when they differ
    /// from DataFusion's (`?column?`, `count`, …).
    pub column_names: Option<Vec<Option<String>>>,
    /// The `RETURNING` list of an INSERT/UPDATE/DELETE.
    pub returning: Option<Arc<dml::Returning>>,
    /// The rows a `SUBSCRIBE` will send, as far as known at prepare time.
    pub stream_schema: Option<SchemaRef>,
}

impl Prepared {
    /// The result schema, if the statement returns rows.
    pub fn result_schema(&self) -> Option<SchemaRef> {
        if let Some(r) = &self.returning {
            return Some(r.schema.clone());
        }
        let stmt = match &self.stmt {
            Stmt::Sql(s) => s,
            Stmt::Source(s) => {
                return matches!(s.kind, source::SourceStatementKind::Show)
                    .then(source::show_schema)
            }
            // A subscription's columns are known once it runs; FETCH's
            // are the cursor's (the wire layer asks the session).
            Stmt::Stream(_) => return self.stream_schema.clone(),
        };
        match (&self.plan, stmt) {
            (Some(LogicalPlan::Dml(_)), _) => None,
            (Some(plan), _) => Some(Arc::new(plan.schema().as_arrow().clone())),
            (None, Statement::ShowTables { .. }) => Some(show::tables_schema()),
            (None, Statement::ShowViews { .. }) => Some(show::tables_schema()),
            (None, Statement::Explain { .. }) => {
                Some(Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
                    datafusion::arrow::datatypes::Field::new(
                        "QUERY PLAN",
                        datafusion::arrow::datatypes::DataType::Utf8,
                        false,
                    ),
                ])))
            }
            (None, Statement::ShowVariable { variable }) => Some(set::show_schema(variable)),
            _ => None,
        }
    }
}

/// What a statement produced.
#[derive(Debug)]
pub enum Outcome {
    /// Rows.
    Rows(Rows),
    /// A command completed: tag (`CREATE TABLE`) and affected rows.
    Command {
        /// Command tag text.
        tag: &'static str,
        /// Affected row count, for INSERT/UPDATE/DELETE.
        rows: Option<usize>,
    },
    /// `BEGIN`.
    Begin,
    /// `COMMIT` (tag `COMMIT`, or `ROLLBACK` when the block had failed).
    Commit(&'static str),
    /// `ROLLBACK`; `wrote` when statements of the block had already
    /// committed writes (which a ROLLBACK cannot undo, see [`transaction`]).
    Rollback {
        /// Whether the block had written.
        wrote: bool,
    },
    /// Rows that the wire layer sends as they come: a subscription (until
    /// the client cancels) or a `COPY … TO STDOUT`.
    Stream {
        /// The rows.
        stream: subscribe::Stream,
        /// `COPY` output options; `None` sends data rows.
        copy: Option<subscribe::CopyOptions>,
    },
    /// A `SET` whose new value clients track (`ParameterStatus`).
    SetReported {
        /// Parameter name as PostgreSQL reports it.
        name: String,
        /// New value.
        value: String,
    },
}

/// A result set.
#[derive(Debug)]
pub struct Rows {
    /// Arrow schema of `batches`.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Column names to report instead of the schema's.
    pub names: Option<Vec<String>>,
    /// Command tag (`SELECT`, `SHOW`, `EXPLAIN`, `INSERT` for RETURNING …).
    pub tag: &'static str,
}

/// Per-statement context handed to handlers.
pub struct Ctx<'a> {
    /// The shared engine.
    pub engine: &'a Arc<Engine>,
    /// The session's variables.
    pub vars: &'a mut Vars,
    /// The session's open cursors.
    pub cursors: &'a mut subscribe::Cursors,
    /// Whether a transaction block is open.
    pub in_block: bool,
}

/// Plans `stmt` for later execution.
pub async fn prepare(engine: &Engine, sql: &str, stmt: Stmt) -> Result<Prepared> {
    let mut returning = None;
    let Stmt::Sql(sql_stmt) = &stmt else {
        let (mut stream_schema, mut plan, mut column_names) = (None, None, None);
        match &stmt {
            Stmt::Stream(subscribe::StreamStatement::Subscribe(spec)) => {
                stream_schema = subscribe::schema_of(engine, spec).await?;
            }
            // A cursor's query is planned now, so that its parameters
            // (`DECLARE c CURSOR FOR SELECT … WHERE id > $1`) get types.
            Stmt::Stream(subscribe::StreamStatement::Declare {
                what: subscribe::Target::Query(q),
                ..
            }) => {
                let (p, names) = subscribe::plan_query(engine, q).await?;
                plan = Some(p);
                column_names = names;
            }
            _ => {}
        }
        return Ok(Prepared {
            sql: sql.to_string(),
            stmt,
            plan,
            column_names,
            returning: None,
            stream_schema,
        });
    };
    let (plan, column_names) = match sql_stmt {
        Statement::Query(q) => {
            let plan = engine.plan(sql_stmt).await?;
            let names = select::pg_column_names(q, plan.schema().fields().len());
            (Some(plan), names)
        }
        Statement::Explain { statement, .. } if matches!(statement.as_ref(), Statement::CreateView(cv) if cv.materialized) => {
            (None, None)
        }
        Statement::Explain { .. } => (Some(engine.plan(sql_stmt).await?), None),
        Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => {
            dml::check_supported(sql_stmt)?;
            let (without_returning, items) = dml::split_returning(sql_stmt);
            let plan = engine.plan(&without_returning).await?;
            let mut names = None;
            if let Some(items) = items {
                let r = dml::plan_returning(engine, &plan, &items).await?;
                names = Some(r.names.iter().cloned().map(Some).collect());
                returning = Some(Arc::new(r));
            }
            (Some(plan), names)
        }
        _ => (None, None),
    };
    Ok(Prepared {
        sql: sql.to_string(),
        stmt,
        plan,
        column_names,
        returning,
        stream_schema: None,
    })
}

/// Executes a prepared statement with bound parameters.
pub async fn execute(
    ctx: &mut Ctx<'_>,
    prepared: &Prepared,
    params: Option<&ParamValues>,
) -> Result<Outcome> {
    let stmt = match &prepared.stmt {
        Stmt::Sql(s) => s,
        Stmt::Source(s) => {
            reject_params(params)?;
            return source::execute(ctx.engine, s).await;
        }
        Stmt::Stream(s) => {
            let plan = match (&prepared.plan, params) {
                (Some(plan), Some(p)) => Some(plan.clone().replace_params_with_values(p)?),
                (Some(plan), None) => Some(plan.clone()),
                (None, _) => {
                    reject_params(params)?;
                    None
                }
            };
            return subscribe::execute(ctx, s, plan, prepared.column_names.clone()).await;
        }
    };
    if let Some(plan) = &prepared.plan {
        let plan = match params {
            Some(p) => plan.clone().replace_params_with_values(p)?,
            None => plan.clone(),
        };
        return match plan {
            LogicalPlan::Dml(dml) => {
                let affected = dml::execute(ctx.engine, stmt, dml).await?;
                let tag = match stmt {
                    Statement::Insert(_) => "INSERT",
                    Statement::Update(_) => "UPDATE",
                    _ => "DELETE",
                };
                match &prepared.returning {
                    Some(r) => Ok(Outcome::Rows(Rows {
                        schema: r.schema.clone(),
                        batches: r.eval(ctx.engine, affected).await?,
                        names: Some(r.names.clone()),
                        // pgwire appends the row count: `INSERT 0 n`.
                        tag: if tag == "INSERT" { "INSERT 0" } else { tag },
                    })),
                    None => Ok(Outcome::Command {
                        tag,
                        rows: Some(affected.num_rows()),
                    }),
                }
            }
            plan => select::run(ctx.engine, stmt, &plan, prepared.column_names.clone()).await,
        };
    }
    reject_params(params)?;
    match stmt {
        Statement::CreateTable(ct) => create_table::execute(ctx.engine, ct).await,
        Statement::CreateView(cv) => create_view::execute(ctx.engine, cv).await,
        Statement::Drop {
            object_type,
            if_exists,
            names,
            cascade,
            ..
        } => drop::execute(ctx.engine, *object_type, *if_exists, names, *cascade).await,
        Statement::Explain { statement, .. } => match statement.as_ref() {
            Statement::CreateView(cv) if cv.materialized => {
                create_mv::explain(ctx.engine, cv).await
            }
            _ => Err(Error::Internal("EXPLAIN without a plan".into())),
        },
        Statement::ShowTables { .. } => show::tables(ctx.engine),
        Statement::ShowViews { materialized, .. } => show::views(ctx.engine, *materialized),
        Statement::ShowVariable { variable } => set::show(ctx.vars, variable),
        Statement::Set(s) => set::set(ctx.vars, s),
        Statement::Reset(r) => set::reset(ctx.vars, r),
        Statement::Flush { tables, .. } if tables.is_empty() => {
            // Table writes maintain views inside their own commit: once no
            // write is in flight, everything written before is visible in
            // every view. Source rows wait for an epoch: ask for one now.
            ctx.engine.driver.flush().await?;
            drop(ctx.engine.writer().await);
            Ok(Outcome::Command {
                tag: "FLUSH",
                rows: None,
            })
        }
        Statement::StartTransaction { .. } => Ok(Outcome::Begin),
        Statement::Commit { .. } => Ok(Outcome::Commit("COMMIT")),
        Statement::Rollback { .. } => Ok(Outcome::Rollback { wrote: false }),
        Statement::Discard { .. } => Ok(Outcome::Command {
            tag: "DISCARD ALL",
            rows: None,
        }),
        Statement::Deallocate { .. } => Ok(Outcome::Command {
            tag: "DEALLOCATE",
            rows: None,
        }),
        other => Err(Error::unsupported(format!(
            "statement not supported: {}",
            statement_kind(other)
        ))),
    }
}

fn reject_params(params: Option<&ParamValues>) -> Result<()> {
    if params.is_some_and(|p| match p {
        ParamValues::List(l) => !l.is_empty(),
        ParamValues::Map(m) => !m.is_empty(),
    }) {
        return Err(Error::unsupported(
            "parameters are not supported in this statement",
        ));
    }
    Ok(())
}

/// A short name of a statement for error messages.
fn statement_kind(stmt: &Statement) -> String {
    let s = stmt.to_string();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The object name's last part, normalized as PostgreSQL does (unquoted
/// identifiers are lower-cased).
pub fn object_name(name: &ast::ObjectName) -> Result<String> {
    let parts: Vec<&ast::Ident> = name.0.iter().filter_map(|p| p.as_ident()).collect();
    let Some(last) = parts.last() else {
        return Err(Error::Syntax(format!("syntax error: invalid name {name}")));
    };
    if parts.len() > 1 {
        let schema = normalize_ident(parts[parts.len() - 2]);
        if schema != crate::engine::SCHEMA {
            return Err(Error::unsupported(format!(
                "schema \"{schema}\" does not exist; only \"public\" is supported"
            )));
        }
    }
    Ok(normalize_ident(last))
}

/// Lower-cases unquoted identifiers.
pub fn normalize_ident(id: &ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}
