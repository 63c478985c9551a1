//! pgwire handlers: the simple and extended query protocols, startup, cancel.
//!
//! pgwire does the protocol state machine (message framing, portals with
//! `max_rows` and `PortalSuspended`, skipping messages until `Sync` after an
//! error, cancel keys); this file adapts it to [`Session`]. Result rows are
//! encoded from Arrow by `arrow-pg` in text or binary per column.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
    DefaultServerParameterProvider, StartupHandler,
};
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, PgWireServerHandlers,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type, DEFAULT_NAME,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::{DataRow, NoData, ParameterDescription};
use pgwire::messages::extendedquery::{Describe, TARGET_TYPE_BYTE_STATEMENT};
use pgwire::messages::response::{NoticeResponse, TransactionStatus};
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;
use tokio::sync::Mutex;

use crate::engine::Engine;
use crate::error::Error;
use crate::server::errors::{from_pgwire, to_pgwire};
use crate::session::Session;
use crate::sql::{Outcome, Prepared, Rows};

/// All pgwire handlers, shared by every connection.
pub struct Handlers {
    backend: Arc<Backend>,
    startup: Arc<Startup>,
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    /// Handlers over `engine`.
    pub fn new(engine: Arc<Engine>) -> Handlers {
        let manager = Arc::new(ConnectionManager::new());
        Handlers {
            backend: Arc::new(Backend {
                parser: Arc::new(Parser {
                    engine: engine.clone(),
                }),
                engine,
            }),
            startup: Arc::new(Startup {
                manager: manager.clone(),
                params: server_parameters(),
            }),
            cancel: Arc::new(DefaultCancelHandler::new(manager)),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.backend.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.backend.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

fn server_parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = "15.0".to_string();
    p.server_encoding = "UTF8".to_string();
    p.client_encoding = Some("UTF8".to_string());
    p.time_zone = "UTC".to_string();
    p.date_style = "ISO, MDY".to_string();
    p.interval_style = "postgres".to_string();
    p.integer_datetimes = true;
    p.standard_conforming_strings = true;
    p.session_authorization = Some("sluice".to_string());
    p
}

/// Startup without authentication (trust, like a local PostgreSQL), with
/// the parameter statuses clients require and a cancel key.
pub struct Startup {
    manager: Arc<ConnectionManager>,
    params: DefaultServerParameterProvider,
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let PgWireFrontendMessage::Startup(ref startup) = message {
            protocol_negotiation(client, startup).await?;
            save_startup_parameters_to_metadata(client, startup);
            let (pid, secret) = RandomPidSecretKeyGenerator::default().generate(client);
            client.set_pid_and_secret_key(pid, secret.clone());
            let (handle, guard) = self.manager.register(pid, secret);
            client
                .session_extensions()
                .insert::<Arc<ConnectionHandle>>(handle);
            client.session_extensions().insert(guard);
            finish_authentication(client, &self.params).await?;
        }
        Ok(())
    }
}

/// Query handling for both protocols.
pub struct Backend {
    engine: Arc<Engine>,
    parser: Arc<Parser>,
}

type SessionRef = Arc<Mutex<Session>>;

impl Backend {
    /// The fields of a `FETCH` being described: its cursor's, which only
    /// the session knows. `None` for any other statement.
    async fn describe_fetch<C>(
        &self,
        client: &C,
        message: &Describe,
    ) -> PgWireResult<Option<Vec<FieldInfo>>>
    where
        C: ClientInfo + ClientPortalStore,
        C::PortalStore: PortalStore<Statement = Statement>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let (stmt, format) = if message.target_type == TARGET_TYPE_BYTE_STATEMENT {
            match client.portal_store().get_statement(name) {
                Some(Entry::Value(stmt)) => (stmt.statement.clone(), Format::UnifiedText),
                _ => return Ok(None),
            }
        } else {
            match client.portal_store().get_portal(name) {
                Some(Entry::Value(portal)) => (
                    portal.statement.statement.clone(),
                    portal.result_column_format.clone(),
                ),
                Some(Entry::Empty) => return Ok(None),
                // In PostgreSQL a `DECLARE`d cursor is a portal, and
                // drivers describe it by name (psycopg's named cursors do).
                None => {
                    let session = self.session(client);
                    let schema = session.lock().await.cursors.schema(name);
                    return match schema {
                        Some(schema) => {
                            Ok(Some(pg_fields(&schema, None, &Format::UnifiedText, None)?))
                        }
                        None => Ok(None),
                    };
                }
            }
        };
        let crate::sql::Stmt::Stream(crate::sql::subscribe::StreamStatement::Fetch {
            name: cursor,
            ..
        }) = &stmt.stmt
        else {
            return Ok(None);
        };
        let session = self.session(client);
        let schema = session.lock().await.cursors.schema(cursor);
        match schema {
            Some(schema) => Ok(Some(pg_fields(&schema, None, &format, None)?)),
            None => Err(to_pgwire(Error::InvalidCursor(cursor.clone()))),
        }
    }

    fn session<C: ClientInfo>(&self, client: &C) -> SessionRef {
        let engine = self.engine.clone();
        let s: Arc<SessionRef> = client
            .session_extensions()
            .get_or_insert_with(move || Arc::new(Mutex::new(Session::new(engine))));
        (*s).clone()
    }
}

/// Converts an outcome to a pgwire response, sending side messages
/// (`ParameterStatus`, warnings) first.
async fn respond<C>(
    client: &mut C,
    outcome: Outcome,
    format: &Format,
    send_describe: bool,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    Ok(match outcome {
        Outcome::Stream { stream, copy } => {
            let opts = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            return super::stream::send(client, stream, copy, format, opts, send_describe).await;
        }
        Outcome::Rows(rows) => {
            let opts = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            Response::Query(rows_response(rows, format, opts)?)
        }
        Outcome::Command { tag, rows } => {
            let mut t = Tag::new(tag);
            if tag == "INSERT" {
                t = t.with_oid(0);
            }
            if let Some(n) = rows {
                t = t.with_rows(n);
            }
            Response::Execution(t)
        }
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::Commit(tag) => Response::TransactionEnd(Tag::new(tag)),
        Outcome::Rollback { wrote } => {
            if wrote {
                let notice = ErrorInfo::new(
                    "WARNING".into(),
                    "01000".into(),
                    "statements in this transaction block were already committed; Sluice commits every statement on its own and ROLLBACK cannot undo them".into(),
                );
                client
                    .feed(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(
                        notice,
                    )))
                    .await?;
            }
            Response::TransactionEnd(Tag::new("ROLLBACK"))
        }
        Outcome::SetReported { name, value } => {
            client
                .metadata_mut()
                .insert(name.to_ascii_lowercase(), value.clone());
            client
                .feed(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                    name, value,
                )))
                .await?;
            Response::Execution(Tag::new("SET"))
        }
    })
}

/// Field descriptions for a result schema, with PostgreSQL column names.
pub(super) fn pg_fields(
    schema: &SchemaRef,
    names: Option<&[String]>,
    format: &Format,
    opts: Option<Arc<FormatOptions>>,
) -> PgWireResult<Vec<FieldInfo>> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let ty = arrow_pg::datatypes::field_into_pg_type(f)?;
            let name = names
                .and_then(|n| n.get(i))
                .cloned()
                .unwrap_or_else(|| f.name().clone());
            let mut info = FieldInfo::new(name, None, None, ty, format.format_for(i));
            if let Some(o) = &opts {
                info = info.with_format_options(o.clone());
            }
            Ok(info)
        })
        .collect()
}

fn rows_response(
    rows: Rows,
    format: &Format,
    opts: Arc<FormatOptions>,
) -> PgWireResult<QueryResponse> {
    let fields = Arc::new(pg_fields(
        &rows.schema,
        rows.names.as_deref(),
        format,
        Some(opts),
    )?);
    let mut data = Vec::new();
    for batch in rows.batches {
        data.extend(data_rows(&fields, batch));
    }
    let mut resp = QueryResponse::new(fields, futures::stream::iter(data));
    resp.set_command_tag(rows.tag);
    Ok(resp)
}

/// The data rows of `batch` for `fields`: PostgreSQL's own text format
/// when every column is text and has a text encoder, arrow-pg otherwise.
pub(super) fn data_rows(
    fields: &Arc<Vec<FieldInfo>>,
    batch: datafusion::arrow::array::RecordBatch,
) -> Vec<PgWireResult<DataRow>> {
    let all_text = fields.iter().all(|f| f.format() == FieldFormat::Text);
    match all_text.then(|| text_rows(&batch)).flatten() {
        Some(encoded) => encoded.into_iter().map(Ok).collect(),
        None => arrow_pg::datatypes::encode_recordbatch(fields.clone(), batch).collect(),
    }
}

/// Encodes a batch in PostgreSQL's text format; `None` if some column type
/// has no text encoder in [`crate::pgtext`].
fn text_rows(batch: &datafusion::arrow::array::RecordBatch) -> Option<Vec<DataRow>> {
    let mut rows = Vec::with_capacity(batch.num_rows());
    let mut cell = String::new();
    for r in 0..batch.num_rows() {
        let mut data = bytes::BytesMut::new();
        for col in batch.columns() {
            cell.clear();
            if crate::pgtext::write_value(col, r, &mut cell)? {
                data.extend_from_slice(&(cell.len() as i32).to_be_bytes());
                data.extend_from_slice(cell.as_bytes());
            } else {
                data.extend_from_slice(&(-1i32).to_be_bytes());
            }
        }
        rows.push(DataRow::new(data, batch.num_columns() as i16));
    }
    Some(rows)
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stmts = Session::parse(query).map_err(to_pgwire)?;
        if stmts.len() > 1 && stmts.iter().any(|s| s.is_streaming()) {
            return Err(to_pgwire(Error::unsupported(
                "SUBSCRIBE and COPY … TO STDOUT must be the only statement of their query string",
            )));
        }
        let session = self.session(client);
        let mut session = session.lock().await;
        let mut status = client.transaction_status();
        let mut responses = Vec::with_capacity(stmts.len());
        for stmt in stmts {
            let sql = stmt.to_string();
            let result = match crate::sql::prepare(&self.engine, &sql, stmt).await {
                Ok(prepared) => {
                    session
                        .execute(
                            &prepared,
                            None,
                            status != TransactionStatus::Idle,
                            status == TransactionStatus::Error,
                        )
                        .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(outcome) => {
                    status = match &outcome {
                        Outcome::Begin => status.to_in_transaction_state(),
                        Outcome::Commit(_) | Outcome::Rollback { .. } => status.to_idle_state(),
                        _ => status,
                    };
                    responses.push(respond(client, outcome, &Format::UnifiedText, true).await?);
                }
                Err(e) => {
                    responses.push(Response::Error(Box::new(
                        crate::server::errors::error_info(&e),
                    )));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

/// The statement type pgwire stores for Parse/Bind.
pub type Statement = Arc<Prepared>;

/// Plans statements at Parse time.
pub struct Parser {
    engine: Arc<Engine>,
}

/// Parameter types inferred by DataFusion, in `$1, $2, …` order.
/// A parameter DataFusion could not type from context takes the type it
/// is cast to (`$1::int`), as in PostgreSQL.
fn parameter_types(plan: &LogicalPlan) -> Vec<Option<DataType>> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::Expr;
    let Ok(mut types) = plan.get_parameter_types() else {
        return vec![];
    };
    let _ = plan.apply_with_subqueries(|node| {
        for e in node.expressions() {
            let _ = e.apply(|e| {
                if let Expr::Cast(c) = e {
                    if let Expr::Placeholder(p) = c.expr.as_ref() {
                        if let Some(slot @ None) = types.get_mut(&p.id) {
                            *slot = Some(c.field.data_type().clone());
                        }
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let mut entries: Vec<(u32, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(k, v)| {
            k.trim_start_matches('$')
                .parse::<u32>()
                .ok()
                .map(|i| (i, v))
        })
        .collect();
    entries.sort_by_key(|(i, _)| *i);
    let max = entries.last().map(|(i, _)| *i).unwrap_or(0) as usize;
    let mut out = vec![None; max];
    for (i, v) in entries {
        if i >= 1 {
            out[i as usize - 1] = v;
        }
    }
    out
}

fn wire_type(t: &Option<DataType>) -> Type {
    match t {
        Some(dt) => arrow_pg::datatypes::into_pg_type(dt).unwrap_or(Type::TEXT),
        // PostgreSQL resolves an otherwise unconstrained parameter as text.
        None => Type::TEXT,
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(Session::prepare(&self.engine, sql)
            .await
            .map_err(to_pgwire)?
            .map(Arc::new))
    }

    fn get_parameter_types(&self, stmt: &Statement) -> PgWireResult<Vec<Type>> {
        Ok(match &stmt.plan {
            Some(plan) => parameter_types(plan).iter().map(wire_type).collect(),
            None => vec![],
        })
    }

    fn get_result_schema(
        &self,
        stmt: &Statement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match stmt.result_schema() {
            Some(schema) => {
                let names: Option<Vec<String>> = stmt
                    .column_names
                    .as_ref()
                    .map(|n| crate::sql::select::resolved_names(n, &schema));
                pg_fields(
                    &schema,
                    names.as_deref(),
                    format.unwrap_or(&Format::UnifiedBinary),
                    None,
                )
            }
            None => Ok(vec![]),
        }
    }
}

/// Decodes bound parameters and casts them to the types the plan expects.
fn bind_params(portal: &Portal<Statement>) -> PgWireResult<Option<ParamValues>> {
    let Some(plan) = &portal.statement.statement.plan else {
        return Ok(if portal.parameter_len() == 0 {
            None
        } else {
            Some(ParamValues::List(vec![]))
        });
    };
    let inferred = parameter_types(plan);
    let wire: Vec<Type> = inferred.iter().map(wire_type).collect();
    let inferred_refs: Vec<Option<&DataType>> = inferred.iter().map(|t| t.as_ref()).collect();
    let wire_refs: Vec<Option<&Type>> = wire.iter().map(Some).collect();
    let values = arrow_pg::datatypes::df::deserialize_parameters_with_server_types(
        portal,
        &inferred_refs,
        &wire_refs,
    )
    .map_err(from_pgwire)?;
    let ParamValues::List(list) = values else {
        return Ok(Some(values));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, mut v) in list.into_iter().enumerate() {
        if let Some(Some(target)) = inferred.get(i) {
            if v.value.data_type() != *target {
                v.value = v
                    .value
                    .cast_to(target)
                    .map_err(|e| to_pgwire(Error::from(e)))?;
            }
        }
        out.push(v);
    }
    Ok(Some(ParamValues::List(out)))
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = Statement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    /// PostgreSQL answers Describe(statement) of a statement that returns no
    /// rows with ParameterDescription + NoData; pgwire sends an empty
    /// RowDescription when the statement has parameters, which makes pgjdbc
    /// reject `executeUpdate` ("a result was returned"). Send NoData.
    async fn on_describe<C>(&self, client: &mut C, message: Describe) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let Some(fields) = self.describe_fetch(client, &message).await? {
            if message.target_type == TARGET_TYPE_BYTE_STATEMENT {
                client
                    .feed(PgWireBackendMessage::ParameterDescription(
                        ParameterDescription::new(vec![]),
                    ))
                    .await?;
            }
            client
                .send(PgWireBackendMessage::RowDescription(
                    pgwire::messages::data::RowDescription::new(
                        fields.iter().map(Into::into).collect(),
                    ),
                ))
                .await?;
            return Ok(());
        }
        if message.target_type == TARGET_TYPE_BYTE_STATEMENT {
            let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
            if let Some(Entry::Value(stmt)) = client.portal_store().get_statement(name) {
                let resp = self.do_describe_statement(client, &stmt).await?;
                if resp.fields.is_empty() {
                    client
                        .feed(PgWireBackendMessage::ParameterDescription(
                            ParameterDescription::new(
                                resp.parameters.iter().map(|t| t.oid()).collect(),
                            ),
                        ))
                        .await?;
                    client
                        .send(PgWireBackendMessage::NoData(NoData::new()))
                        .await?;
                    return Ok(());
                }
            }
        }
        self._on_describe(client, message).await
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = portal.statement.statement.clone();
        let params = bind_params(portal)?;
        let status = client.transaction_status();
        let session = self.session(client);
        let outcome = {
            let mut session = session.lock().await;
            session
                .execute(
                    &prepared,
                    params.as_ref(),
                    status != TransactionStatus::Idle,
                    status == TransactionStatus::Error,
                )
                .await
                .map_err(to_pgwire)?
        };
        respond(client, outcome, &portal.result_column_format, false).await
    }
}
