//! `SUBSCRIBE`, `COPY … TO STDOUT`, and cursors (`DECLARE`, `FETCH`,
//! `CLOSE`): results that reach the client over time.
//!
//! ```text
//! SUBSCRIBE [TO] name | (query) [WITH (SNAPSHOT [=] true|false, PROGRESS [[=] true|false])]
//! COPY (SUBSCRIBE … | query) | name TO STDOUT [[WITH] (FORMAT text|csv, HEADER [bool], DELIMITER 'c')]
//! DECLARE name [BINARY] [NO SCROLL] CURSOR [WITH[OUT] HOLD] FOR SUBSCRIBE … | query
//! FETCH [NEXT | FORWARD] [count | ALL] [FROM | IN] name [WITH (TIMEOUT [=] '1s' | seconds)]
//! CLOSE name | ALL
//! ```
//!
//! A `SUBSCRIBE` first sends the relation's rows as of the last commit (the
//! snapshot; `SNAPSHOT false` skips it) and then every committed change,
//! as rows `sluice_ts, sluice_diff, columns…` (see
//! [`crate::subscription`]). A subscription to a query, or to a plain view,
//! runs through a temporary materialized view that lives as long as the
//! subscription. It ends when the client cancels (psql: Ctrl-C), closes the
//! cursor or disconnects, or with SQLSTATE 54000 if it falls too far behind
//! (`SET subscribe_buffer_rows`).
//!
//! The wire layer streams a plain `SUBSCRIBE` as rows and `COPY` as
//! `CopyData` — psql prints `COPY (SUBSCRIBE …) TO STDOUT` as it arrives,
//! while it buffers a plain query's rows until the end. `FETCH` on a
//! subscription cursor waits until at least one row is there (or the
//! `TIMEOUT` passes), then returns what is ready, up to `count`. Cursors
//! over queries hold the query's result, computed at `DECLARE`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::catalog::{MvOwner, Relation};
use crate::engine::Engine;
use crate::error::{DataErrorKind, Error, Result};
use crate::query::StoredTable;
use crate::sql::tokens::Cursor as Tokens;
use crate::sql::{Ctx, Outcome, Rows};
use crate::subscription::Subscription;

/// One of the statements of this module.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamStatement {
    /// `SUBSCRIBE`.
    Subscribe(SubscribeSpec),
    /// `COPY … TO STDOUT`.
    Copy {
        /// What is copied.
        what: Target,
        /// Output options.
        options: CopyOptions,
    },
    /// `DECLARE … CURSOR FOR`.
    Declare {
        /// Cursor name.
        name: String,
        /// What it reads.
        what: Target,
    },
    /// `FETCH`.
    Fetch {
        /// Cursor name.
        name: String,
        /// Most rows to return; `None` for `ALL`.
        count: Option<usize>,
        /// How long to wait for a first row of a subscription.
        timeout: Option<Duration>,
    },
    /// `CLOSE name` (`None`: `CLOSE ALL`).
    Close(Option<String>),
}

/// What a statement reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A subscription.
    Subscribe(SubscribeSpec),
    /// A query's text.
    Query(String),
}

/// `SUBSCRIBE` and its options.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeSpec {
    /// A relation name, or a query's text.
    pub from: SubscribeFrom,
    /// Send the current rows first (default true).
    pub snapshot: bool,
    /// Send a progress row after every commit.
    pub progress: bool,
}

/// What a subscription follows.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscribeFrom {
    /// A relation.
    Relation(String),
    /// A query.
    Query(String),
}

/// `COPY … TO STDOUT` options.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyOptions {
    /// CSV instead of PostgreSQL's text format.
    pub csv: bool,
    /// CSV only: a header line first.
    pub header: bool,
    /// Column delimiter (tab for text, comma for CSV by default).
    pub delimiter: char,
}

impl std::fmt::Display for StreamStatement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamStatement::Subscribe(_) => f.write_str("SUBSCRIBE"),
            StreamStatement::Copy { .. } => f.write_str("COPY"),
            StreamStatement::Declare { name, .. } => write!(f, "DECLARE {name}"),
            StreamStatement::Fetch { name, .. } => write!(f, "FETCH {name}"),
            StreamStatement::Close(_) => f.write_str("CLOSE"),
        }
    }
}

/// Whether a statement starting with these (upper-cased) words is ours.
pub fn is_ours(words: &[String]) -> bool {
    match words.first().map(String::as_str) {
        Some("SUBSCRIBE" | "DECLARE" | "FETCH" | "CLOSE") => true,
        // COPY … FROM STDIN stays with sqlparser (and is unsupported).
        Some("COPY") => words.iter().any(|w| w == "STDOUT"),
        _ => false,
    }
}

/// Parses one statement from its tokens.
pub fn parse(tokens: &[Token]) -> Result<StreamStatement> {
    let mut c = Tokens::new(tokens);
    let s = statement(&mut c)?;
    c.end()?;
    Ok(s)
}

fn boolean(c: &mut Tokens<'_>) -> Result<bool> {
    let text = match c.peek() {
        Some(Token::Word(w)) => w.value.to_ascii_lowercase(),
        Some(Token::SingleQuotedString(s)) => s.to_ascii_lowercase(),
        _ => return Err(c.error("true or false")),
    };
    let v = match text.as_str() {
        "true" | "on" => true,
        "false" | "off" => false,
        _ => return Err(c.error("true or false")),
    };
    c.pos += 1;
    Ok(v)
}

/// A flag option: `NAME`, `NAME true`, `NAME = false`.
fn flag(c: &mut Tokens<'_>) -> Result<bool> {
    if matches!(c.peek(), Some(Token::Comma | Token::RParen)) {
        return Ok(true);
    }
    boolean(c)
}

/// `(name [=] value, …)` after `WITH`, each option parsed by `each`.
fn options(
    c: &mut Tokens<'_>,
    mut each: impl FnMut(&mut Tokens<'_>, &str) -> Result<()>,
) -> Result<()> {
    if !c.token(&Token::LParen) {
        return Err(c.error("("));
    }
    loop {
        let Some(name) = c.word() else {
            return Err(c.error("an option name"));
        };
        c.pos += 1;
        c.token(&Token::Eq);
        each(c, &name)?;
        if c.token(&Token::RParen) {
            return Ok(());
        }
        if !c.token(&Token::Comma) {
            return Err(c.error(", or )"));
        }
    }
}

fn statement(c: &mut Tokens<'_>) -> Result<StreamStatement> {
    match c.word().as_deref() {
        Some("SUBSCRIBE") => Ok(StreamStatement::Subscribe(subscribe(c)?)),
        Some("COPY") => copy(c),
        Some("DECLARE") => declare(c),
        Some("FETCH") => fetch(c),
        Some("CLOSE") => {
            c.pos += 1;
            if c.keyword("ALL") {
                return Ok(StreamStatement::Close(None));
            }
            Ok(StreamStatement::Close(Some(c.ident()?)))
        }
        _ => Err(c.error("SUBSCRIBE, COPY, DECLARE, FETCH or CLOSE")),
    }
}

fn subscribe(c: &mut Tokens<'_>) -> Result<SubscribeSpec> {
    c.expect_keyword("SUBSCRIBE")?;
    c.keyword("TO");
    let from = if c.token(&Token::LParen) {
        SubscribeFrom::Query(c.parenthesized_text()?)
    } else {
        SubscribeFrom::Relation(c.ident()?)
    };
    let mut spec = SubscribeSpec {
        from,
        snapshot: true,
        progress: false,
    };
    if c.keyword("WITH") {
        options(c, |c, name| {
            match name {
                "SNAPSHOT" => spec.snapshot = flag(c)?,
                "PROGRESS" => spec.progress = flag(c)?,
                other => {
                    return Err(Error::Syntax(format!(
                        "unknown SUBSCRIBE option {other}: expected SNAPSHOT or PROGRESS"
                    )))
                }
            }
            Ok(())
        })?;
    }
    Ok(spec)
}

/// `SUBSCRIBE …` or a query, to the end of `c`.
fn target(c: &mut Tokens<'_>) -> Result<Target> {
    if c.word().as_deref() == Some("SUBSCRIBE") {
        let s = subscribe(c)?;
        c.end()?;
        return Ok(Target::Subscribe(s));
    }
    Ok(Target::Query(c.rest_text()))
}

fn copy(c: &mut Tokens<'_>) -> Result<StreamStatement> {
    c.expect_keyword("COPY")?;
    let what = if c.token(&Token::LParen) {
        let start = c.pos;
        c.parenthesized_text()?;
        let mut inner = Tokens {
            tokens: c.tokens[start..c.pos - 1].to_vec(),
            pos: 0,
        };
        target(&mut inner)?
    } else {
        let name = c.ident()?;
        if c.peek() == Some(&Token::LParen) {
            return Err(Error::unsupported(
                "a column list in COPY is not supported; use COPY (SELECT …) TO STDOUT",
            ));
        }
        Target::Query(format!("SELECT * FROM \"{}\"", name.replace('"', "\"\"")))
    };
    c.expect_keyword("TO")?;
    c.expect_keyword("STDOUT")?;
    let mut options_ = CopyOptions {
        csv: false,
        header: false,
        delimiter: '\t',
    };
    let mut delimiter = None;
    let with = c.keyword("WITH");
    if with || c.peek() == Some(&Token::LParen) {
        options(c, |c, name| {
            match name {
                "FORMAT" => {
                    match c.word().as_deref() {
                        Some("CSV") => options_.csv = true,
                        Some("TEXT") => options_.csv = false,
                        Some("BINARY") => return Err(Error::unsupported(
                            "COPY … TO STDOUT (FORMAT binary) is not supported; use text or csv",
                        )),
                        _ => return Err(c.error("text or csv")),
                    }
                    c.pos += 1;
                }
                "HEADER" => options_.header = flag(c)?,
                "DELIMITER" => match c.peek() {
                    Some(Token::SingleQuotedString(s))
                        if s.chars().count() == 1
                            && !s.contains(['\n', '\r', '\\', '"', '.']) =>
                    {
                        delimiter = s.chars().next();
                        c.pos += 1;
                    }
                    _ => return Err(c.error(
                        "a one-character string other than a line break, backslash, quote or period",
                    )),
                },
                other => {
                    return Err(Error::unsupported(format!(
                        "COPY option {other} is not supported"
                    )))
                }
            }
            Ok(())
        })?;
    }
    if options_.csv {
        options_.delimiter = ',';
    }
    if let Some(d) = delimiter {
        options_.delimiter = d;
    }
    if options_.header && !options_.csv {
        return Err(Error::unsupported(
            "COPY HEADER is available only in CSV mode",
        ));
    }
    Ok(StreamStatement::Copy {
        what,
        options: options_,
    })
}

fn declare(c: &mut Tokens<'_>) -> Result<StreamStatement> {
    c.expect_keyword("DECLARE")?;
    let name = c.ident()?;
    if c.keyword("BINARY") {
        return Err(Error::unsupported("binary cursors are not supported"));
    }
    c.keyword("ASENSITIVE");
    c.keyword("INSENSITIVE");
    if c.keyword("NO") {
        c.expect_keyword("SCROLL")?;
    } else if c.keyword("SCROLL") {
        return Err(Error::unsupported(
            "scrollable cursors are not supported; cursors only move forward",
        ));
    }
    c.expect_keyword("CURSOR")?;
    if c.keyword("WITH") {
        c.expect_keyword("HOLD")?;
        return Err(Error::unsupported("WITH HOLD cursors are not supported"));
    }
    if c.keyword("WITHOUT") {
        c.expect_keyword("HOLD")?;
    }
    c.expect_keyword("FOR")?;
    let what = target(c)?;
    Ok(StreamStatement::Declare { name, what })
}

fn fetch(c: &mut Tokens<'_>) -> Result<StreamStatement> {
    c.expect_keyword("FETCH")?;
    let mut count = Some(1);
    if c.keyword("NEXT") {
    } else if c.keyword("FORWARD") {
        if c.keyword("ALL") {
            count = None;
        } else if let Some(n) = row_count(c)? {
            count = Some(n);
        }
    } else if c.keyword("ALL") {
        count = None;
    } else if let Some(n) = row_count(c)? {
        count = Some(n);
    } else if let Some(w) = c.word() {
        if matches!(
            w.as_str(),
            "PRIOR" | "FIRST" | "LAST" | "ABSOLUTE" | "RELATIVE" | "BACKWARD"
        ) {
            return Err(Error::unsupported(format!(
                "FETCH {w} is not supported; cursors only move forward"
            )));
        }
    }
    if !c.keyword("FROM") {
        c.keyword("IN");
    }
    let name = c.ident()?;
    let mut timeout = None;
    if c.keyword("WITH") {
        options(c, |c, opt| {
            if opt != "TIMEOUT" {
                return Err(Error::Syntax(format!(
                    "unknown FETCH option {opt}: expected TIMEOUT"
                )));
            }
            let t = match c.peek() {
                Some(Token::Number(n, _)) => seconds(n)?,
                Some(Token::SingleQuotedString(s)) => interval(s)?,
                _ => return Err(c.error("a timeout such as '1s'")),
            };
            c.pos += 1;
            timeout = Some(t);
            Ok(())
        })?;
    }
    Ok(StreamStatement::Fetch {
        name,
        count,
        timeout,
    })
}

fn row_count(c: &mut Tokens<'_>) -> Result<Option<usize>> {
    if let Some(Token::Number(n, _)) = c.peek() {
        let v = n.parse::<usize>().map_err(|_| {
            Error::Syntax(format!(
                "syntax error at or near \"{n}\": expected a row count"
            ))
        })?;
        c.pos += 1;
        return Ok(Some(v));
    }
    Ok(None)
}

fn seconds(n: &str) -> Result<Duration> {
    n.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| bad_timeout(n))
}

fn bad_timeout(s: &str) -> Error {
    Error::data(
        DataErrorKind::InvalidParameterValue,
        format!(
            "invalid TIMEOUT \"{s}\": expected a duration such as '500ms', '1s' or '2 minutes'"
        ),
    )
}

/// `'250ms'`, `'1s'`, `'1.5 seconds'`, `'2 min'`, `'0'`.
fn interval(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| bad_timeout(s))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "ms" | "millisecond" | "milliseconds" => 0.001,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        _ => return Err(bad_timeout(s)),
    };
    seconds(&(v * scale).to_string()).map_err(|_| bad_timeout(s))
}

/// A running subscription and the temporary view it may read.
pub struct Live {
    /// The subscription.
    pub sub: Subscription,
    _view: Option<TempView>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.sub.fmt(f)
    }
}

/// Drops a subscription's temporary materialized view when the
/// subscription ends.
struct TempView {
    engine: Arc<Engine>,
    name: String,
}

impl Drop for TempView {
    fn drop(&mut self) {
        let engine = self.engine.clone();
        let name = std::mem::take(&mut self.name);
        let task = async move {
            let _writer = engine.writer().await;
            if let Err(e) = engine.drop_objects(std::slice::from_ref(&name)) {
                tracing::warn!("dropping the view of a subscription failed: {e}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(task);
            }
            Err(_) => {
                std::thread::spawn(move || futures::executor::block_on(task));
            }
        }
    }
}

fn buffer_rows(ctx: &Ctx<'_>) -> Result<usize> {
    let (_, v) = ctx.vars.get("subscribe_buffer_rows")?;
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Error::data(
                DataErrorKind::InvalidParameterValue,
                format!(
                    "invalid subscribe_buffer_rows \"{v}\": expected a positive number of rows"
                ),
            )
        })
}

/// Starts a subscription: under the writer lock, reads the snapshot and
/// registers for every later commit.
pub async fn open(engine: &Arc<Engine>, spec: &SubscribeSpec, limit: usize) -> Result<Live> {
    let _writer = engine.writer().await;
    let mut view = None;
    let relation = match &spec.from {
        SubscribeFrom::Relation(name) => match engine.catalog.get(name) {
            Some(Relation::View(_)) => {
                let q = format!("SELECT * FROM \"{}\"", name.replace('"', "\"\""));
                view = Some(temp_view(engine, &q).await?);
                engine
                    .catalog
                    .get(&view.as_ref().map(|v| v.name.clone()).unwrap_or_default())
            }
            other => other,
        },
        SubscribeFrom::Query(q) => {
            view = Some(temp_view(engine, q).await?);
            engine
                .catalog
                .get(&view.as_ref().map(|v| v.name.clone()).unwrap_or_default())
        }
    };
    let (id, schema, table) = match relation {
        Some(Relation::Table(t)) => (t.def.id, t.schema.clone(), Some(t)),
        Some(Relation::MaterializedView(m)) => {
            (m.def.id, m.table.schema.clone(), Some(m.table.clone()))
        }
        Some(Relation::Source(s)) => match &s.table {
            Some(t) => (s.def.id, t.schema.clone(), Some(t.clone())),
            // An append-only source keeps no rows: it has no snapshot,
            // only what arrives from now on.
            None => (s.def.id, s.def.schema(), None),
        },
        Some(Relation::View(_)) | None => {
            let SubscribeFrom::Relation(name) = &spec.from else {
                return Err(Error::Internal("subscription view vanished".into()));
            };
            return Err(Error::UndefinedTable(name.clone()));
        }
    };
    let ts = engine.subscribers.last_ts();
    let mut sub = engine
        .subscribers
        .register(id, schema, spec.progress, limit);
    if spec.snapshot {
        if let Some(t) = table {
            let rows = StoredTable::new(t, engine.store.clone()).read(&[], None)?;
            sub.push_snapshot(ts, rows)?;
        }
    }
    Ok(Live { sub, _view: view })
}

/// The rows a subscription will send, for describing it before it runs.
pub async fn schema_of(engine: &Engine, spec: &SubscribeSpec) -> Result<Option<SchemaRef>> {
    let input = match &spec.from {
        SubscribeFrom::Relation(name) => match engine.catalog.get(name) {
            Some(Relation::Table(t)) => t.schema.clone(),
            Some(Relation::MaterializedView(m)) => m.table.schema.clone(),
            Some(Relation::Source(s)) => match &s.table {
                Some(t) => t.schema.clone(),
                None => s.def.schema(),
            },
            Some(Relation::View(_)) => {
                let q = format!("SELECT * FROM \"{}\"", name.replace('"', "\"\""));
                query_rows_schema(engine, &q).await?
            }
            None => return Err(Error::UndefinedTable(name.clone())),
        },
        SubscribeFrom::Query(q) => query_rows_schema(engine, q).await?,
    };
    Ok(Some(crate::subscription::output_schema(
        &input,
        spec.progress,
    )))
}

/// The one `SELECT` of `text`.
fn one_query(text: &str) -> Result<Box<ast::Query>> {
    crate::sql::parse_query(text, "expected one SELECT (or a relation name) here")
}

/// A query's result schema with PostgreSQL's column names.
async fn query_rows_schema(engine: &Engine, text: &str) -> Result<SchemaRef> {
    let q = one_query(text)?;
    let plan = engine.plan(&ast::Statement::Query(q.clone())).await?;
    let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
    Ok(
        match crate::sql::select::pg_column_names(&q, schema.fields().len()) {
            Some(names) => rename(
                &schema,
                &crate::sql::select::resolved_names(&names, &schema),
            ),
            None => schema,
        },
    )
}

/// Creates the temporary view a subscription to `query` reads. Callers
/// hold the writer lock.
async fn temp_view(engine: &Arc<Engine>, query: &str) -> Result<TempView> {
    let q = one_query(query)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let name = loop {
        let n = format!(
            "sluice_subscribe_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        if engine.catalog.get(&n).is_none() {
            break n;
        }
    };
    crate::sql::create_mv::create_locked(engine, name.clone(), &q, MvOwner::Subscription).await?;
    Ok(TempView {
        engine: engine.clone(),
        name,
    })
}

/// A session's open cursors.
#[derive(Debug, Default)]
pub struct Cursors {
    open: HashMap<String, Cursor>,
}

impl Cursors {
    /// Closes every cursor (at the end of a transaction block, as in
    /// PostgreSQL).
    pub fn close_all(&mut self) {
        self.open.clear();
    }

    /// The result schema of cursor `name`, for describing a `FETCH`.
    pub fn schema(&self, name: &str) -> Option<SchemaRef> {
        self.open.get(name).map(|c| match c {
            Cursor::Rows { schema, .. } => schema.clone(),
            Cursor::Live(l) => l.sub.schema(),
        })
    }
}

#[derive(Debug)]
enum Cursor {
    Rows {
        schema: SchemaRef,
        batches: VecDeque<RecordBatch>,
    },
    Live(Live),
}

/// Plans a cursor's query: DataFusion's plan and PostgreSQL's column names.
pub async fn plan_query(
    engine: &Engine,
    text: &str,
) -> Result<(LogicalPlan, Option<Vec<Option<String>>>)> {
    let q = one_query(text)?;
    let plan = engine.plan(&ast::Statement::Query(q.clone())).await?;
    let names = crate::sql::select::pg_column_names(&q, plan.schema().fields().len());
    Ok((plan, names))
}

/// Runs a query (planned, parameters bound) to completion.
async fn query_rows(
    engine: &Engine,
    text: &str,
    planned: Option<(LogicalPlan, Option<Vec<Option<String>>>)>,
) -> Result<Rows> {
    let (plan, names) = match planned {
        Some(p) => p,
        None => plan_query(engine, text).await?,
    };
    let stmt = ast::Statement::Query(one_query(text)?);
    match crate::sql::select::run(engine, &stmt, &plan, names).await? {
        Outcome::Rows(r) => Ok(r),
        _ => Err(Error::Internal("query without rows".into())),
    }
}

/// What the wire layer streams.
#[derive(Debug)]
pub enum Stream {
    /// Rows of a subscription, until the client cancels.
    Live(Live),
    /// A finished result, as `COPY` data.
    Rows(Rows),
}

/// Runs one of this module's statements.
///
/// `plan` is the prepared plan of a `DECLARE`'s query with its parameters
/// bound, and `names` its PostgreSQL column names.
pub async fn execute(
    ctx: &mut Ctx<'_>,
    s: &StreamStatement,
    plan: Option<LogicalPlan>,
    names: Option<Vec<Option<String>>>,
) -> Result<Outcome> {
    match s {
        StreamStatement::Subscribe(spec) => {
            let limit = buffer_rows(ctx)?;
            Ok(Outcome::Stream {
                stream: Stream::Live(open(ctx.engine, spec, limit).await?),
                copy: None,
            })
        }
        StreamStatement::Copy { what, options } => {
            let stream = match what {
                Target::Subscribe(spec) => {
                    Stream::Live(open(ctx.engine, spec, buffer_rows(ctx)?).await?)
                }
                Target::Query(q) => Stream::Rows(query_rows(ctx.engine, q, None).await?),
            };
            Ok(Outcome::Stream {
                stream,
                copy: Some(options.clone()),
            })
        }
        StreamStatement::Declare { name, what } => {
            if !ctx.in_block {
                return Err(Error::NoActiveTransaction(
                    "DECLARE CURSOR can only be used in transaction blocks".into(),
                ));
            }
            if ctx.cursors.open.contains_key(name) {
                return Err(Error::DuplicateCursor(name.clone()));
            }
            let cursor = match what {
                Target::Subscribe(spec) => {
                    Cursor::Live(open(ctx.engine, spec, buffer_rows(ctx)?).await?)
                }
                Target::Query(q) => {
                    let rows = query_rows(ctx.engine, q, plan.map(|p| (p, names))).await?;
                    let schema = rows.schema.clone();
                    let schema = match &rows.names {
                        Some(names) => rename(&schema, names),
                        None => schema,
                    };
                    Cursor::Rows {
                        batches: rows
                            .batches
                            .into_iter()
                            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
                            .collect::<std::result::Result<_, _>>()?,
                        schema,
                    }
                }
            };
            ctx.cursors.open.insert(name.clone(), cursor);
            Ok(Outcome::Command {
                tag: "DECLARE CURSOR",
                rows: None,
            })
        }
        StreamStatement::Fetch {
            name,
            count,
            timeout,
        } => {
            let cursor = ctx
                .cursors
                .open
                .get_mut(name)
                .ok_or_else(|| Error::InvalidCursor(name.clone()))?;
            let limit = count.unwrap_or(usize::MAX);
            let (schema, batches) = match cursor {
                Cursor::Rows { schema, batches } => (schema.clone(), take(batches, limit)),
                Cursor::Live(live) => {
                    let schema = live.sub.schema();
                    let batches = fetch_live(&mut live.sub, limit, *timeout).await;
                    match batches {
                        Ok(b) => (schema, b),
                        Err(e) => {
                            // The subscription is over; so is the cursor.
                            ctx.cursors.open.remove(name);
                            return Err(e);
                        }
                    }
                }
            };
            Ok(Outcome::Rows(Rows {
                schema,
                batches,
                names: None,
                tag: "FETCH",
            }))
        }
        StreamStatement::Close(name) => {
            match name {
                None => ctx.cursors.close_all(),
                Some(n) => {
                    if ctx.cursors.open.remove(n).is_none() {
                        return Err(Error::InvalidCursor(n.clone()));
                    }
                }
            }
            Ok(Outcome::Command {
                tag: "CLOSE CURSOR",
                rows: None,
            })
        }
    }
}

fn rename(schema: &SchemaRef, names: &[String]) -> SchemaRef {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .zip(names)
        .map(|(f, n)| f.as_ref().clone().with_name(n.clone()))
        .collect();
    Arc::new(datafusion::arrow::datatypes::Schema::new(fields))
}

/// Up to `limit` rows from the front of `batches`.
fn take(batches: &mut VecDeque<RecordBatch>, limit: usize) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut left = limit;
    while left > 0 {
        let Some(b) = batches.pop_front() else { break };
        if b.num_rows() > left {
            out.push(b.slice(0, left));
            batches.push_front(b.slice(left, b.num_rows() - left));
            break;
        }
        left -= b.num_rows();
        out.push(b);
    }
    out
}

/// `FETCH` on a subscription: waits for a first row (at most `timeout`),
/// then takes what is ready, up to `limit` rows.
async fn fetch_live(
    sub: &mut Subscription,
    limit: usize,
    timeout: Option<Duration>,
) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let first = match timeout {
        None => Some(sub.next().await?),
        Some(t) => match tokio::time::timeout(t, sub.next()).await {
            Ok(b) => Some(b?),
            Err(_) => None,
        },
    };
    let mut left = limit;
    let mut next = first;
    while let Some(b) = next {
        if b.num_rows() > left {
            out.push(b.slice(0, left));
            sub.unread(b.slice(left, b.num_rows() - left));
            break;
        }
        left -= b.num_rows();
        out.push(b);
        if left == 0 {
            break;
        }
        // An error after some rows: deliver those; the next FETCH reports it.
        next = sub.try_next().unwrap_or_default();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::tokenizer::Tokenizer;

    fn one(sql: &str) -> Result<StreamStatement> {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
            .tokenize()
            .unwrap();
        parse(&tokens)
    }

    #[test]
    fn parses_subscribe() {
        let s = one("SUBSCRIBE TO mv").unwrap();
        assert_eq!(
            s,
            StreamStatement::Subscribe(SubscribeSpec {
                from: SubscribeFrom::Relation("mv".into()),
                snapshot: true,
                progress: false
            })
        );
        let s = one(
            "subscribe (SELECT a, count(*) FROM t GROUP BY a) with (snapshot = false, progress)",
        )
        .unwrap();
        let StreamStatement::Subscribe(spec) = s else {
            panic!()
        };
        assert!(!spec.snapshot && spec.progress);
        assert_eq!(
            spec.from,
            SubscribeFrom::Query("SELECT a , count ( * ) FROM t GROUP BY a".into())
        );
        assert!(one("SUBSCRIBE TO").is_err());
        assert!(one("SUBSCRIBE mv WITH (COLOUR true)").is_err());
        assert!(one("SUBSCRIBE (SELECT 1").is_err());
    }

    #[test]
    fn parses_copy_and_cursors() {
        let s = one("COPY (SUBSCRIBE mv) TO STDOUT").unwrap();
        assert!(
            matches!(s, StreamStatement::Copy { what: Target::Subscribe(_), ref options } if !options.csv)
        );
        let s = one("COPY t TO STDOUT WITH (FORMAT csv, HEADER)").unwrap();
        let StreamStatement::Copy { what, options } = s else {
            panic!()
        };
        assert_eq!(what, Target::Query("SELECT * FROM \"t\"".into()));
        assert!(options.csv && options.header && options.delimiter == ',');
        assert!(one("COPY t TO STDOUT (FORMAT binary)").is_err());
        let s = one("DECLARE \"C1\" CURSOR WITHOUT HOLD FOR SUBSCRIBE mv").unwrap();
        assert!(
            matches!(s, StreamStatement::Declare { ref name, what: Target::Subscribe(_) } if name == "C1")
        );
        let s = one("declare c no scroll cursor for select * from t where x > 1").unwrap();
        assert!(
            matches!(s, StreamStatement::Declare { what: Target::Query(ref q), .. } if q == "select * from t where x > 1")
        );
        assert_eq!(
            one("FETCH FORWARD 100 FROM c").unwrap(),
            StreamStatement::Fetch {
                name: "c".into(),
                count: Some(100),
                timeout: None
            }
        );
        assert_eq!(
            one("FETCH ALL c WITH (TIMEOUT = '250ms')").unwrap(),
            StreamStatement::Fetch {
                name: "c".into(),
                count: None,
                timeout: Some(Duration::from_millis(250))
            }
        );
        assert_eq!(
            one("FETCH c").unwrap(),
            StreamStatement::Fetch {
                name: "c".into(),
                count: Some(1),
                timeout: None
            }
        );
        assert!(one("FETCH BACKWARD 1 FROM c").is_err());
        assert!(one("FETCH 1 c WITH (TIMEOUT 'soon')").is_err());
        assert_eq!(one("CLOSE ALL").unwrap(), StreamStatement::Close(None));
    }

    #[test]
    fn intervals() {
        assert_eq!(interval("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(
            interval("1.5 seconds").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(interval("2 min").unwrap(), Duration::from_secs(120));
        assert_eq!(interval("0").unwrap(), Duration::ZERO);
        assert!(interval("-1s").is_err());
        // Too big for a Duration: an error, not a panic.
        assert!(seconds("1e20").is_err());
        assert!(interval("100000000000000000000").is_err());
        assert!(one("FETCH c WITH (TIMEOUT 1e20)").is_err());
        assert!(one("COPY t TO STDOUT (DELIMITER '\\')").is_err());
    }
}
