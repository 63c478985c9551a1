//! The one error type of the crate.
//!
//! Every layer returns [`Error`]; only the wire layer (`server::errors`) turns
//! it into a SQLSTATE and a Postgres `ErrorResponse`. Errors are *typed* here,
//! not strings with codes baked in, so that the mapping lives in one place and
//! a test can assert the class of an error without parsing text.
//!
//! DataFusion reports its own errors as `DataFusionError`; [`Error::from`]
//! classifies them (syntax, unknown table/column, data errors such as a bad
//! cast or a division by zero, unsupported features) so that a client sees the
//! same SQLSTATE it would see from PostgreSQL.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Result alias used throughout Sluice.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The class of a data exception (SQLSTATE class 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataErrorKind {
    /// 22P02: a value could not be parsed as the target type (`'abc'::int`).
    InvalidTextRepresentation,
    /// 22003: a number does not fit its type.
    NumericOutOfRange,
    /// 22012: division by zero.
    DivisionByZero,
    /// 22007: a date/time value could not be parsed.
    InvalidDatetimeFormat,
    /// 22008: a date/time value is out of range.
    DatetimeOverflow,
    /// 22001: a string is longer than `varchar(n)` allows.
    StringTooLong,
    /// 22023: an invalid parameter value (wire parameters, SET values).
    InvalidParameterValue,
    /// 22000: any other data exception.
    Other,
}

/// Every failure Sluice can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The statement could not be parsed.
    #[error("{0}")]
    Syntax(String),
    /// A table, view or other relation does not exist.
    #[error("relation \"{0}\" does not exist")]
    UndefinedTable(String),
    /// A column does not exist.
    #[error("{0}")]
    UndefinedColumn(String),
    /// A named object other than a relation (a setting, a prepared statement)
    /// does not exist.
    #[error("{0}")]
    UndefinedObject(String),
    /// An object with this name already exists.
    #[error("relation \"{0}\" already exists")]
    DuplicateObject(String),
    /// The object is of the wrong kind for the statement (DROP VIEW on a table).
    #[error("{0}")]
    WrongObjectType(String),
    /// Other objects depend on the one being dropped.
    #[error("{0}")]
    DependentObjects(String),
    /// A primary key would be duplicated.
    #[error("duplicate key value violates unique constraint \"{constraint}\"")]
    UniqueViolation {
        /// Constraint name, `<table>_pkey` as in PostgreSQL.
        constraint: String,
        /// `Key (a)=(1) already exists.`
        detail: String,
    },
    /// A NULL would be stored in a NOT NULL column.
    #[error(
        "null value in column \"{column}\" of relation \"{table}\" violates not-null constraint"
    )]
    NotNullViolation {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
    },
    /// A value is invalid for its type (class 22).
    #[error("{message}")]
    Data {
        /// Which data exception.
        kind: DataErrorKind,
        /// Human-readable message.
        message: String,
    },
    /// Types do not match (e.g. `1 + 'a'::bytea`), or another planning error.
    #[error("{0}")]
    Plan(String),
    /// The feature is not supported (yet).
    #[error("{0}")]
    Unsupported(String),
    /// A statement other than COMMIT/ROLLBACK in a failed transaction block.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedTransaction,
    /// The statement was canceled by the client.
    #[error("canceling statement due to user request")]
    Canceled,
    /// The storage engine failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// An I/O error (data directory, sockets).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Invalid configuration (command line, environment, data directory).
    #[error("{0}")]
    Config(String),
    /// A record from an external system could not be decoded.
    #[error("{0}")]
    Decode(String),
    /// An external system (a Kafka broker) could not be reached or refused
    /// a request.
    #[error("{0}")]
    Connector(String),
    /// A resource limit was hit (a subscriber fell too far behind).
    #[error("{0}")]
    LimitExceeded(String),
    /// The object is not in a state the statement needs (a subscription
    /// whose relation was dropped).
    #[error("{0}")]
    ObjectNotInPrerequisiteState(String),
    /// No cursor of this name is open.
    #[error("cursor \"{0}\" does not exist")]
    InvalidCursor(String),
    /// A cursor of this name is already open.
    #[error("cursor \"{0}\" already exists")]
    DuplicateCursor(String),
    /// The statement needs a transaction block (`DECLARE` outside `BEGIN`).
    #[error("{0}")]
    NoActiveTransaction(String),
    /// A bug: something that should not happen did. Never a panic.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for a data exception.
    pub fn data(kind: DataErrorKind, message: impl Into<String>) -> Self {
        Error::Data {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for an unsupported feature.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::Unsupported(message.into())
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Storage(e.into_string())
    }
}

impl From<ArrowError> for Error {
    fn from(e: ArrowError) -> Self {
        classify_arrow(&e).unwrap_or_else(|| Error::Internal(e.to_string()))
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        classify_datafusion(e)
    }
}

impl From<datafusion::sql::sqlparser::parser::ParserError> for Error {
    fn from(e: datafusion::sql::sqlparser::parser::ParserError) -> Self {
        Error::Syntax(strip_parser_prefix(&e.to_string()))
    }
}

fn strip_parser_prefix(msg: &str) -> String {
    let msg = msg
        .strip_prefix("sql parser error: ")
        .unwrap_or(msg)
        .to_string();
    format!("syntax error: {msg}")
}

/// Classifies an Arrow error by its variant and, where Arrow only gives a
/// string, by the wording of the kernels that produce it.
fn classify_arrow(e: &ArrowError) -> Option<Error> {
    use DataErrorKind::*;
    let msg = e.to_string();
    if let Some(pg) = postgres_wording(&msg) {
        let kind = match e {
            ArrowError::DivideByZero => DivisionByZero,
            _ => classify_data_message(&msg).unwrap_or(Other),
        };
        return Some(Error::data(kind, pg));
    }
    let kind = match e {
        ArrowError::DivideByZero => DivisionByZero,
        ArrowError::ArithmeticOverflow(_) => NumericOutOfRange,
        ArrowError::CastError(m) | ArrowError::ParseError(m) | ArrowError::ComputeError(m) => {
            classify_data_message(m)?
        }
        ArrowError::InvalidArgumentError(m) => classify_data_message(m)?,
        _ => return None,
    };
    Some(Error::data(kind, clean_message(&msg)))
}

/// Maps the wording of Arrow/DataFusion cast and arithmetic messages to a
/// data exception class.
fn classify_data_message(m: &str) -> Option<DataErrorKind> {
    use DataErrorKind::*;
    let lower = m.to_ascii_lowercase();
    if lower.contains("divide by zero") || lower.contains("division by zero") {
        Some(DivisionByZero)
    } else if lower.contains("overflow")
        || lower.contains("out of range")
        || lower.contains("too large to store")
        || lower.contains("is too large")
        || lower.contains("can't cast value")
        || lower.contains("cannot be casted")
        || lower.contains("precision")
    {
        Some(NumericOutOfRange)
    } else if (lower.contains("timestamp") || lower.contains("date") || lower.contains("time"))
        && (lower.contains("parse") || lower.contains("cast") || lower.contains("invalid"))
    {
        Some(InvalidDatetimeFormat)
    } else if lower.contains("cannot cast string")
        || lower.contains("can't parse")
        || lower.contains("cannot parse")
        || lower.contains("error parsing")
        || lower.contains("invalid digit")
        || lower.contains("invalid input syntax")
        || lower.contains("parse error")
    {
        Some(InvalidTextRepresentation)
    } else {
        None
    }
}

/// Rewrites Arrow's messages for the common data errors into PostgreSQL's
/// wording, which users and tools recognise.
fn postgres_wording(msg: &str) -> Option<String> {
    if msg.contains("Divide by zero") || msg.contains("divide by zero") {
        return Some("division by zero".into());
    }
    // "Cannot cast string 'abc' to value of Int32 type"
    let start = msg.find("Cannot cast string '")? + "Cannot cast string '".len();
    let rest = &msg[start..];
    let end = rest.rfind("' to value of ")?;
    let value = &rest[..end];
    let ty = rest[end + "' to value of ".len()..].trim_end_matches(" type");
    let pg = match ty {
        "Int16" => "smallint",
        "Int32" => "integer",
        "Int64" => "bigint",
        "Float32" => "real",
        "Float64" => "double precision",
        "Boolean" => "boolean",
        t if t.starts_with("Decimal") => "numeric",
        t if t.starts_with("Date") => "date",
        t if t.starts_with("Timestamp") => "timestamp",
        _ => return None,
    };
    Some(format!("invalid input syntax for type {pg}: \"{value}\""))
}

fn clean_message(m: &str) -> String {
    let mut s = m;
    for p in [
        "Arrow error: ",
        "Cast error: ",
        "Compute error: ",
        "Parser error: ",
        "Invalid argument error: ",
        "Execution error: ",
        "Error during planning: ",
        "Optimizer rule 'simplify_expressions' failed\ncaused by\n",
    ] {
        while let Some(rest) = s.strip_prefix(p) {
            s = rest;
        }
    }
    s.trim().to_string()
}

fn classify_datafusion(e: DataFusionError) -> Error {
    use datafusion::common::SchemaError;
    // DataFusion wraps errors in Context/Shared/Diagnostic layers; the root
    // carries the real cause.
    let root = e.find_root();
    match root {
        DataFusionError::SQL(pe, _) => return Error::Syntax(strip_parser_prefix(&pe.to_string())),
        DataFusionError::ArrowError(ae, _) => {
            if let Some(err) = classify_arrow(ae) {
                return err;
            }
        }
        DataFusionError::SchemaError(se, _) => match se.as_ref() {
            SchemaError::FieldNotFound { .. } => {
                return Error::UndefinedColumn(clean_schema_message(&se.to_string()))
            }
            SchemaError::AmbiguousReference { .. } => {
                return Error::Plan(clean_schema_message(&se.to_string()))
            }
            _ => return Error::Plan(clean_schema_message(&se.to_string())),
        },
        DataFusionError::NotImplemented(m) => return Error::Unsupported(clean_message(m)),
        DataFusionError::ResourcesExhausted(m) => {
            return Error::Internal(format!("resources exhausted: {m}"))
        }
        DataFusionError::IoError(ioe) => return Error::Internal(ioe.to_string()),
        DataFusionError::External(ext) => {
            // Our own error, raised inside a scan (a Kafka read): keep its
            // class.
            if let Some(ours) = ext.downcast_ref::<Error>() {
                match ours {
                    Error::Connector(m) => return Error::Connector(m.clone()),
                    Error::Decode(m) => return Error::Decode(m.clone()),
                    Error::UndefinedObject(m) => return Error::UndefinedObject(m.clone()),
                    Error::Storage(m) => return Error::Storage(m.clone()),
                    Error::Data { kind, message } => return Error::data(*kind, message.clone()),
                    _ => {}
                }
            }
            if let Some(inner) = ext.downcast_ref::<ArrowError>() {
                if let Some(err) = classify_arrow(inner) {
                    return err;
                }
            }
        }
        _ => {}
    }
    let msg = root.to_string();
    let cleaned = clean_message(&msg);
    if let Some(name) = table_not_found(&cleaned) {
        return Error::UndefinedTable(name);
    }
    if let DataFusionError::Plan(m) = root {
        if m.contains("No field named") {
            return Error::UndefinedColumn(clean_message(m));
        }
        if let Some(kind) = classify_data_message(m) {
            if m.contains("Cannot cast") || m.contains("Overflow") || m.contains("Division") {
                return Error::data(kind, cleaned);
            }
        }
        return Error::Plan(cleaned);
    }
    if let Some(kind) = classify_data_message(&cleaned) {
        return Error::data(kind, cleaned);
    }
    match root {
        DataFusionError::Execution(_) => Error::Plan(cleaned),
        _ => Error::Internal(cleaned),
    }
}

/// DataFusion says `table 'sluice.public.t' not found`; PostgreSQL says
/// `relation "t" does not exist`.
fn table_not_found(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("table '")?;
    let name = rest.strip_suffix("' not found")?;
    let short = name.rsplit('.').next().unwrap_or(name);
    Some(short.to_string())
}

fn clean_schema_message(m: &str) -> String {
    let m = m.strip_prefix("Schema error: ").unwrap_or(m);
    if let Some(rest) = m.strip_prefix("No field named ") {
        let name = rest.split(['.', ' ']).next().unwrap_or(rest);
        let name = name.trim_matches('"');
        return format!("column \"{name}\" does not exist");
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_not_found_maps_to_undefined_table() {
        let e: Error = DataFusionError::Plan("table 'sluice.public.nope' not found".into()).into();
        assert!(
            matches!(e, Error::UndefinedTable(ref t) if t == "nope"),
            "{e:?}"
        );
    }

    #[test]
    fn arrow_divide_by_zero_is_a_data_error() {
        let e: Error = DataFusionError::ArrowError(Box::new(ArrowError::DivideByZero), None).into();
        assert!(matches!(
            e,
            Error::Data {
                kind: DataErrorKind::DivisionByZero,
                ..
            }
        ));
    }

    #[test]
    fn bad_cast_is_invalid_text_representation() {
        let e: Error =
            ArrowError::CastError("Cannot cast string 'abc' to value of Int32 type".into()).into();
        assert!(matches!(
            e,
            Error::Data {
                kind: DataErrorKind::InvalidTextRepresentation,
                ..
            }
        ));
    }
}
