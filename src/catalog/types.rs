//! SQL column types and their Arrow representation.
//!
//! [`SqlType`] is what the catalog stores for a column: the user's type, not
//! Arrow's. Two SQL types can share an Arrow type (`text`, `varchar`, `json`
//! are all `Utf8`), and the storage encoding (`state::encoding`) is defined
//! per `SqlType`, so the on-disk format never depends on an Arrow release.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, IntervalUnit, TimeUnit};
use datafusion::sql::sqlparser::ast;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Timezone string used for `timestamptz` columns (values are UTC instants).
pub const UTC: &str = "+00:00";

/// A column type as declared in `CREATE TABLE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqlType {
    /// `boolean`
    Bool,
    /// `smallint` / `int2`
    Int2,
    /// `integer` / `int4`
    Int4,
    /// `bigint` / `int8`
    Int8,
    /// `real` / `float4`
    Float4,
    /// `double precision` / `float8`
    Float8,
    /// `numeric(p, s)`; `numeric` alone is `numeric(38, 10)`.
    Numeric {
        /// Total digits (≤ 38).
        precision: u8,
        /// Digits after the point.
        scale: i8,
    },
    /// `text`
    Text,
    /// `varchar(n)` / `char varying(n)`; `None` is unbounded.
    Varchar(Option<u32>),
    /// `bytea`
    Bytea,
    /// `date`
    Date,
    /// `time` (microseconds)
    Time,
    /// `timestamp` (microseconds, no zone)
    Timestamp,
    /// `timestamptz` (microseconds, UTC instant)
    TimestampTz,
    /// `interval`
    Interval,
    /// `json` (stored and sent as text)
    Json,
    /// `jsonb` (stored and sent as text)
    Jsonb,
    /// One-dimensional array of an element type.
    Array(Box<SqlType>),
}

impl SqlType {
    /// Converts a parsed SQL type.
    pub fn from_ast(t: &ast::DataType) -> Result<SqlType> {
        use ast::DataType as D;
        Ok(match t {
            D::Bool | D::Boolean => SqlType::Bool,
            D::SmallInt(_) | D::Int2(_) => SqlType::Int2,
            D::Int(_) | D::Integer(_) | D::Int4(_) => SqlType::Int4,
            D::BigInt(_) | D::Int8(_) => SqlType::Int8,
            D::Real | D::Float4 => SqlType::Float4,
            D::Float(info) => match info {
                ast::ExactNumberInfo::Precision(p)
                | ast::ExactNumberInfo::PrecisionAndScale(p, _)
                    if *p <= 24 =>
                {
                    SqlType::Float4
                }
                _ => SqlType::Float8,
            },
            D::Double(_) | D::DoublePrecision | D::Float8 | D::Float64 => SqlType::Float8,
            D::Numeric(info) | D::Decimal(info) | D::Dec(info) => {
                let (precision, scale) = match info {
                    ast::ExactNumberInfo::None => (38, 10),
                    ast::ExactNumberInfo::Precision(p) => (*p, 0),
                    ast::ExactNumberInfo::PrecisionAndScale(p, s) => (*p, *s),
                };
                if precision == 0 || precision > 38 {
                    return Err(Error::unsupported(format!(
                        "NUMERIC precision {precision} must be between 1 and 38"
                    )));
                }
                let scale = i8::try_from(scale).map_err(|_| {
                    Error::unsupported(format!("NUMERIC scale {scale} is out of range"))
                })?;
                if scale < 0 || scale as u64 > precision {
                    return Err(Error::unsupported(format!(
                        "NUMERIC scale {scale} must be between 0 and precision {precision}"
                    )));
                }
                SqlType::Numeric {
                    precision: precision as u8,
                    scale,
                }
            }
            D::Text | D::String(_) => SqlType::Text,
            D::Varchar(len) | D::CharacterVarying(len) | D::CharVarying(len) => {
                SqlType::Varchar(char_len(len))
            }
            D::Char(_) | D::Character(_) => SqlType::Text,
            D::Bytea => SqlType::Bytea,
            D::Date => SqlType::Date,
            D::Time(_, tz) => {
                if matches!(tz, ast::TimezoneInfo::WithTimeZone | ast::TimezoneInfo::Tz) {
                    return Err(Error::unsupported(
                        "type \"time with time zone\" is not supported",
                    ));
                }
                SqlType::Time
            }
            D::Timestamp(_, tz) => match tz {
                ast::TimezoneInfo::WithTimeZone | ast::TimezoneInfo::Tz => SqlType::TimestampTz,
                _ => SqlType::Timestamp,
            },
            D::TimestampNtz(_) => SqlType::Timestamp,
            D::Interval { .. } => SqlType::Interval,
            D::JSON => SqlType::Json,
            D::JSONB => SqlType::Jsonb,
            D::Array(def) => match def {
                ast::ArrayElemTypeDef::SquareBracket(inner, _)
                | ast::ArrayElemTypeDef::AngleBracket(inner)
                | ast::ArrayElemTypeDef::Parenthesis(inner) => {
                    let inner = SqlType::from_ast(inner)?;
                    if matches!(inner, SqlType::Array(_)) {
                        return Err(Error::unsupported(
                            "multi-dimensional arrays are not supported",
                        ));
                    }
                    SqlType::Array(Box::new(inner))
                }
                ast::ArrayElemTypeDef::None => {
                    return Err(Error::unsupported("ARRAY without an element type"))
                }
            },
            D::Custom(name, _) => {
                let n = name.to_string().to_ascii_lowercase();
                match n.as_str() {
                    "int2" => SqlType::Int2,
                    "int4" | "int" => SqlType::Int4,
                    "int8" => SqlType::Int8,
                    "float4" => SqlType::Float4,
                    "float8" => SqlType::Float8,
                    "timestamptz" => SqlType::TimestampTz,
                    "bool" => SqlType::Bool,
                    "serial" | "serial4" | "bigserial" | "serial8" => {
                        return Err(Error::unsupported(format!("type \"{n}\" is not supported")))
                    }
                    _ => {
                        return Err(Error::UndefinedObject(format!(
                            "type \"{n}\" does not exist"
                        )))
                    }
                }
            }
            other => {
                return Err(Error::unsupported(format!(
                    "type \"{other}\" is not supported"
                )))
            }
        })
    }

    /// The Arrow type values of this SQL type have inside the engine.
    pub fn arrow_type(&self) -> DataType {
        match self {
            SqlType::Bool => DataType::Boolean,
            SqlType::Int2 => DataType::Int16,
            SqlType::Int4 => DataType::Int32,
            SqlType::Int8 => DataType::Int64,
            SqlType::Float4 => DataType::Float32,
            SqlType::Float8 => DataType::Float64,
            SqlType::Numeric { precision, scale } => DataType::Decimal128(*precision, *scale),
            SqlType::Text | SqlType::Varchar(_) | SqlType::Json | SqlType::Jsonb => DataType::Utf8,
            SqlType::Bytea => DataType::Binary,
            SqlType::Date => DataType::Date32,
            SqlType::Time => DataType::Time64(TimeUnit::Microsecond),
            SqlType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            SqlType::TimestampTz => {
                DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC)))
            }
            SqlType::Interval => DataType::Interval(IntervalUnit::MonthDayNano),
            SqlType::Array(inner) => {
                DataType::List(Arc::new(Field::new_list_field(inner.arrow_type(), true)))
            }
        }
    }

    /// The SQL type that stores values of an Arrow type (for the columns of
    /// a materialized view); values are cast to [`SqlType::arrow_type`].
    pub fn from_arrow(dt: &DataType) -> Result<SqlType> {
        Ok(match dt {
            DataType::Boolean => SqlType::Bool,
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => SqlType::Int2,
            DataType::Int32 | DataType::UInt16 => SqlType::Int4,
            DataType::Int64 | DataType::UInt32 => SqlType::Int8,
            DataType::UInt64 => SqlType::Numeric {
                precision: 20,
                scale: 0,
            },
            DataType::Float16 | DataType::Float32 => SqlType::Float4,
            DataType::Float64 => SqlType::Float8,
            DataType::Decimal128(p, s) if *s >= 0 => SqlType::Numeric {
                precision: *p,
                scale: *s,
            },
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => SqlType::Text,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => SqlType::Bytea,
            DataType::Date32 | DataType::Date64 => SqlType::Date,
            DataType::Time32(_) | DataType::Time64(_) => SqlType::Time,
            DataType::Timestamp(_, None) => SqlType::Timestamp,
            DataType::Timestamp(_, Some(_)) => SqlType::TimestampTz,
            DataType::Interval(_) => SqlType::Interval,
            DataType::List(f) | DataType::LargeList(f) => {
                SqlType::Array(Box::new(SqlType::from_arrow(f.data_type())?))
            }
            other => {
                return Err(Error::unsupported(format!(
                    "a materialized view column of type {other} is not supported"
                )))
            }
        })
    }

    /// The name PostgreSQL prints for this type.
    pub fn pg_name(&self) -> String {
        match self {
            SqlType::Bool => "boolean".into(),
            SqlType::Int2 => "smallint".into(),
            SqlType::Int4 => "integer".into(),
            SqlType::Int8 => "bigint".into(),
            SqlType::Float4 => "real".into(),
            SqlType::Float8 => "double precision".into(),
            SqlType::Numeric { precision, scale } => format!("numeric({precision},{scale})"),
            SqlType::Text => "text".into(),
            SqlType::Varchar(None) => "character varying".into(),
            SqlType::Varchar(Some(n)) => format!("character varying({n})"),
            SqlType::Bytea => "bytea".into(),
            SqlType::Date => "date".into(),
            SqlType::Time => "time without time zone".into(),
            SqlType::Timestamp => "timestamp without time zone".into(),
            SqlType::TimestampTz => "timestamp with time zone".into(),
            SqlType::Interval => "interval".into(),
            SqlType::Json => "json".into(),
            SqlType::Jsonb => "jsonb".into(),
            SqlType::Array(inner) => format!("{}[]", inner.pg_name()),
        }
    }
}

fn char_len(len: &Option<ast::CharacterLength>) -> Option<u32> {
    match len {
        Some(ast::CharacterLength::IntegerLength { length, .. }) => u32::try_from(*length).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::{dialect::PostgreSqlDialect, parser::Parser};

    fn parse_type(s: &str) -> Result<SqlType> {
        let sql = format!("CREATE TABLE t (c {s})");
        let stmt = Parser::parse_sql(&PostgreSqlDialect {}, &sql).map_err(Error::from)?;
        match &stmt[0] {
            ast::Statement::CreateTable(ct) => SqlType::from_ast(&ct.columns[0].data_type),
            _ => unreachable!(),
        }
    }

    #[test]
    fn parses_the_supported_types() {
        assert_eq!(parse_type("int").unwrap(), SqlType::Int4);
        assert_eq!(parse_type("bigint").unwrap(), SqlType::Int8);
        assert_eq!(parse_type("double precision").unwrap(), SqlType::Float8);
        assert_eq!(
            parse_type("numeric(10,2)").unwrap(),
            SqlType::Numeric {
                precision: 10,
                scale: 2
            }
        );
        assert_eq!(parse_type("varchar(5)").unwrap(), SqlType::Varchar(Some(5)));
        assert_eq!(parse_type("timestamptz").unwrap(), SqlType::TimestampTz);
        assert_eq!(
            parse_type("timestamp with time zone").unwrap(),
            SqlType::TimestampTz
        );
        assert_eq!(parse_type("jsonb").unwrap(), SqlType::Jsonb);
        assert_eq!(
            parse_type("int[]").unwrap(),
            SqlType::Array(Box::new(SqlType::Int4))
        );
        assert!(parse_type("numeric(50)").is_err());
        assert!(parse_type("nosuchtype").is_err());
    }
}
