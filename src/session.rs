//! A client session: its variables and transaction-block bookkeeping.
//!
//! The wire layer keeps one [`Session`] per connection and calls
//! [`Session::prepare`] (Parse, or each statement of a simple query) and
//! [`Session::execute`] (Execute). The session knows nothing of the wire
//! protocol; it turns statements into [`Outcome`]s via [`crate::sql`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use datafusion::common::ParamValues;
use futures::FutureExt;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sql::{self, transaction, Ctx, Outcome, Prepared, Vars};

/// Per-connection state.
pub struct Session {
    engine: Arc<Engine>,
    /// `SET` variables.
    pub vars: Vars,
    /// Whether the current transaction block has committed any write.
    wrote_in_block: bool,
    /// Open cursors (`DECLARE`).
    pub cursors: sql::subscribe::Cursors,
}

impl Session {
    /// A new session on `engine`.
    pub fn new(engine: Arc<Engine>) -> Session {
        Session {
            engine,
            vars: Vars::default(),
            wrote_in_block: false,
            cursors: sql::subscribe::Cursors::default(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Parses and plans every statement of `sql` (a simple query).
    pub fn parse(sql: &str) -> Result<Vec<sql::Stmt>> {
        sql::parse(sql)
    }

    /// Prepares one statement (extended protocol Parse). `None` for an empty
    /// query string.
    pub async fn prepare(engine: &Engine, sql: &str) -> Result<Option<Prepared>> {
        let mut stmts = sql::parse(sql)?;
        match stmts.len() {
            0 => Ok(None),
            1 => {
                let stmt = stmts
                    .pop()
                    .ok_or_else(|| Error::Internal("no statement".into()))?;
                Ok(Some(sql::prepare(engine, sql, stmt).await?))
            }
            _ => Err(Error::Syntax(
                "cannot insert multiple commands into a prepared statement".into(),
            )),
        }
    }

    /// Executes a prepared statement. `failed_block` is true when an earlier
    /// statement of the current transaction block failed: then only COMMIT
    /// and ROLLBACK run (25P02 otherwise), as in PostgreSQL.
    ///
    /// A panic anywhere below is caught and reported as an internal error,
    /// so no statement can take the server (or even the connection) down.
    pub async fn execute(
        &mut self,
        prepared: &Prepared,
        params: Option<&ParamValues>,
        in_block: bool,
        failed_block: bool,
    ) -> Result<Outcome> {
        if failed_block && !transaction::allowed_in_failed_block(&prepared.stmt) {
            return Err(Error::InFailedTransaction);
        }
        let engine = self.engine.clone();
        let mut ctx = Ctx {
            engine: &engine,
            vars: &mut self.vars,
            cursors: &mut self.cursors,
            in_block,
        };
        let result = AssertUnwindSafe(sql::execute(&mut ctx, prepared, params))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(sql = %prepared.sql, "statement panicked: {msg}");
                Err(Error::Internal(format!(
                    "statement failed unexpectedly: {msg}"
                )))
            })?;
        Ok(match result {
            Outcome::Begin => {
                self.wrote_in_block = false;
                Outcome::Begin
            }
            Outcome::Commit(_) => {
                self.wrote_in_block = false;
                self.cursors.close_all();
                Outcome::Commit(if failed_block { "ROLLBACK" } else { "COMMIT" })
            }
            Outcome::Rollback { .. } => {
                self.cursors.close_all();
                let wrote = std::mem::take(&mut self.wrote_in_block);
                Outcome::Rollback { wrote }
            }
            other => {
                if in_block && transaction::is_write(&prepared.stmt) {
                    self.wrote_in_block = true;
                }
                other
            }
        })
    }
}
