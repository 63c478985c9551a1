//! `BEGIN`, `COMMIT`, `ROLLBACK`: the transaction guarantee Sluice gives.
//!
//! **Every statement is atomic and durable on its own**: its writes are one
//! RocksDB `WriteBatch`, applied when the statement succeeds. An explicit
//! block (`BEGIN … COMMIT`) is accepted so that drivers that wrap statements
//! in transactions work, and it follows PostgreSQL's *protocol*: the
//! transaction status in `ReadyForQuery` is `T` inside a block, and after an
//! error every statement but `COMMIT`/`ROLLBACK` fails with 25P02 until the
//! block ends. But statements inside a block are **not** grouped: each one
//! commits when it succeeds, and `ROLLBACK` cannot undo them. `ROLLBACK` of a
//! block that wrote anything therefore answers with a WARNING saying so.
//! Reads are statement-level consistent snapshots (`Engine::snapshot`).

use datafusion::sql::sqlparser::ast::Statement;

use crate::sql::source::SourceStatementKind;
use crate::sql::Stmt;

/// Statements allowed in a failed transaction block.
pub fn allowed_in_failed_block(stmt: &Stmt) -> bool {
    matches!(
        stmt,
        Stmt::Sql(Statement::Commit { .. } | Statement::Rollback { .. })
    )
}

/// Whether a statement writes data or the catalog.
pub fn is_write(stmt: &Stmt) -> bool {
    let stmt = match stmt {
        Stmt::Sql(s) => s,
        Stmt::Source(s) => return !matches!(s.kind, SourceStatementKind::Show),
        Stmt::Stream(_) => return false,
    };
    matches!(
        stmt,
        Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::CreateTable(_)
            | Statement::CreateView(_)
            | Statement::Drop { .. }
    )
}
