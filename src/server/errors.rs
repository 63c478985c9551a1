//! [`Error`] → SQLSTATE and a Postgres `ErrorResponse`: the only place codes live.

use pgwire::error::{ErrorInfo, PgWireError};

use crate::error::{DataErrorKind, Error};

/// The SQLSTATE PostgreSQL would send for `e`.
pub fn sqlstate(e: &Error) -> &'static str {
    match e {
        Error::Syntax(_) => "42601",
        Error::UndefinedTable(_) => "42P01",
        Error::UndefinedColumn(_) => "42703",
        Error::UndefinedObject(_) => "42704",
        Error::DuplicateObject(_) => "42P07",
        Error::WrongObjectType(_) => "42809",
        Error::DependentObjects(_) => "2BP01",
        Error::UniqueViolation { .. } => "23505",
        Error::NotNullViolation { .. } => "23502",
        Error::Data { kind, .. } => match kind {
            DataErrorKind::InvalidTextRepresentation => "22P02",
            DataErrorKind::NumericOutOfRange => "22003",
            DataErrorKind::DivisionByZero => "22012",
            DataErrorKind::InvalidDatetimeFormat => "22007",
            DataErrorKind::DatetimeOverflow => "22008",
            DataErrorKind::StringTooLong => "22001",
            DataErrorKind::InvalidParameterValue => "22023",
            DataErrorKind::Other => "22000",
        },
        Error::Plan(_) => "42804",
        Error::Unsupported(_) => "0A000",
        Error::InFailedTransaction => "25P02",
        Error::Canceled => "57014",
        Error::Storage(_) => "58030",
        Error::Io(_) => "58030",
        Error::Config(_) => "F0000",
        Error::Decode(_) => "22P02",
        Error::Connector(_) => "08001",
        Error::LimitExceeded(_) => "54000",
        Error::ObjectNotInPrerequisiteState(_) => "55000",
        Error::InvalidCursor(_) => "34000",
        Error::DuplicateCursor(_) => "42P03",
        Error::NoActiveTransaction(_) => "25P01",
        Error::Internal(_) => "XX000",
    }
}

/// The `ErrorInfo` sent to the client.
pub fn error_info(e: &Error) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".to_string(), sqlstate(e).to_string(), e.to_string());
    match e {
        Error::UniqueViolation { constraint, detail } => {
            info.detail = Some(detail.clone());
            info.constraint = Some(constraint.clone());
        }
        Error::NotNullViolation { table, column } => {
            info.table = Some(table.clone());
            info.column = Some(column.clone());
        }
        _ => {}
    }
    info
}

/// Wraps `e` for pgwire.
pub fn to_pgwire(e: Error) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(&e)))
}

/// Reclassifies errors pgwire or arrow-pg produced themselves (bad parameter
/// bytes, unsupported types) so clients still get a meaningful SQLSTATE.
pub fn from_pgwire(e: PgWireError) -> PgWireError {
    match e {
        PgWireError::UserError(_) => e,
        PgWireError::ApiError(inner) => to_pgwire(Error::data(
            DataErrorKind::InvalidParameterValue,
            inner.to_string(),
        )),
        other => other,
    }
}
