//! `SET`, `SHOW <variable>`, `RESET`: session variables.
//!
//! Sluice keeps the variables clients read and write on connect (JDBC sets
//! `extra_float_digits` and `application_name`, ODBC `DateStyle`, psql asks
//! for `standard_conforming_strings` …). Variables PostgreSQL reports with
//! `ParameterStatus` are reported on change too. Unknown names are an error
//! (42704) as in PostgreSQL, except custom `prefix.name` variables.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast::{self, Ident};

use crate::error::{Error, Result};
use crate::sql::{Outcome, Rows};

/// (canonical name, default, reported to the client on change, description)
const KNOWN: &[(&str, &str, bool, &str)] = &[
    ("application_name", "", true, "Sets the application name"),
    (
        "client_encoding",
        "UTF8",
        true,
        "Client's character set encoding",
    ),
    (
        "client_min_messages",
        "notice",
        false,
        "Message levels sent to the client",
    ),
    (
        "DateStyle",
        "ISO, MDY",
        true,
        "Display format for date and time values",
    ),
    (
        "default_transaction_isolation",
        "serializable",
        false,
        "Default isolation level",
    ),
    (
        "default_transaction_read_only",
        "off",
        false,
        "Default read-only status",
    ),
    (
        "extra_float_digits",
        "1",
        false,
        "Extra digits for floating-point output",
    ),
    (
        "integer_datetimes",
        "on",
        true,
        "Datetimes are integer based",
    ),
    (
        "IntervalStyle",
        "postgres",
        true,
        "Display format for interval values",
    ),
    (
        "is_superuser",
        "on",
        true,
        "Whether the current user is a superuser",
    ),
    ("lc_messages", "C", false, "Language of messages"),
    ("lc_monetary", "C", false, "Locale for monetary amounts"),
    ("lc_numeric", "C", false, "Locale for numbers"),
    ("lc_time", "C", false, "Locale for dates and times"),
    (
        "max_identifier_length",
        "63",
        false,
        "Maximum identifier length",
    ),
    ("search_path", "public", true, "Schema search order"),
    (
        "server_encoding",
        "UTF8",
        true,
        "Server character set encoding",
    ),
    ("server_version", "15.0", true, "Server version"),
    (
        "server_version_num",
        "150000",
        false,
        "Server version as an integer",
    ),
    ("session_authorization", "sluice", true, "Session user name"),
    (
        "standard_conforming_strings",
        "on",
        true,
        "'...' strings treat backslashes literally",
    ),
    (
        "statement_timeout",
        "0",
        false,
        "Maximum statement duration (not enforced)",
    ),
    (
        "TimeZone",
        "UTC",
        true,
        "Time zone for displaying timestamps",
    ),
    (
        "transaction_isolation",
        "serializable",
        false,
        "Current transaction's isolation level",
    ),
    (
        "transaction_read_only",
        "off",
        false,
        "Current transaction's read-only status",
    ),
    (
        "lock_timeout",
        "0",
        false,
        "Maximum wait for a lock (not enforced)",
    ),
    (
        "idle_in_transaction_session_timeout",
        "0",
        false,
        "Idle-in-transaction timeout (not enforced)",
    ),
    ("bytea_output", "hex", false, "Output format for bytea"),
    (
        "join_collapse_limit",
        "8",
        false,
        "Planner setting (ignored)",
    ),
    ("geqo", "on", false, "Planner setting (ignored)"),
    (
        "subscribe_buffer_rows",
        "1000000",
        false,
        "Most changed rows a SUBSCRIBE holds for a slow client before it ends the subscription",
    ),
    ("jit", "off", false, "Planner setting (ignored)"),
];

/// A session's variables.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    values: BTreeMap<String, String>,
}

fn canonical(name: &str) -> Option<(&'static str, &'static str, bool)> {
    let lower = name.to_ascii_lowercase();
    let lower = match lower.as_str() {
        "time zone" | "timezone" => "timezone",
        "transaction isolation level" => "transaction_isolation",
        "session authorization" => "session_authorization",
        other => other,
    }
    .to_string();
    KNOWN
        .iter()
        .find(|(n, ..)| n.to_ascii_lowercase() == lower)
        .map(|(n, d, r, _)| (*n, *d, *r))
}

impl Vars {
    /// Current value of a variable (default if never set).
    pub fn get(&self, name: &str) -> Result<(String, String)> {
        if let Some((canon, default, _)) = canonical(name) {
            let v = self
                .values
                .get(canon)
                .cloned()
                .unwrap_or_else(|| default.to_string());
            return Ok((canon.to_string(), v));
        }
        let lower = name.to_ascii_lowercase();
        if let Some(v) = self.values.get(&lower) {
            return Ok((lower, v.clone()));
        }
        Err(Error::UndefinedObject(format!(
            "unrecognized configuration parameter \"{name}\""
        )))
    }

    /// Sets a variable; returns its canonical name and whether it is reported.
    pub fn set(&mut self, name: &str, value: String) -> Result<(String, bool)> {
        if let Some((canon, _, reported)) = canonical(name) {
            if matches!(
                canon,
                "server_version"
                    | "server_encoding"
                    | "integer_datetimes"
                    | "is_superuser"
                    | "max_identifier_length"
                    | "server_version_num"
            ) {
                return Err(Error::Plan(format!(
                    "parameter \"{canon}\" cannot be changed"
                )));
            }
            if canon == "client_encoding"
                && !value.eq_ignore_ascii_case("utf8")
                && !value.eq_ignore_ascii_case("utf-8")
                && !value.eq_ignore_ascii_case("unicode")
            {
                return Err(Error::unsupported(format!(
                    "client_encoding \"{value}\" is not supported; only UTF8"
                )));
            }
            self.values.insert(canon.to_string(), value);
            return Ok((canon.to_string(), reported));
        }
        if name.contains('.') {
            let lower = name.to_ascii_lowercase();
            self.values.insert(lower.clone(), value);
            return Ok((lower, false));
        }
        Err(Error::UndefinedObject(format!(
            "unrecognized configuration parameter \"{name}\""
        )))
    }

    /// Resets one variable (or all with `None`).
    pub fn reset(&mut self, name: Option<&str>) -> Result<Option<(String, String, bool)>> {
        match name {
            None => {
                self.values.clear();
                Ok(None)
            }
            Some(n) => {
                let (canon, default, reported) = canonical(n).ok_or_else(|| {
                    Error::UndefinedObject(format!("unrecognized configuration parameter \"{n}\""))
                })?;
                self.values.remove(canon);
                Ok(Some((canon.to_string(), default.to_string(), reported)))
            }
        }
    }
}

fn value_text(e: &ast::Expr) -> Result<String> {
    Ok(match e {
        ast::Expr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => s.clone(),
            ast::Value::Number(n, _) => n.to_string(),
            ast::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
            other => other.to_string(),
        },
        ast::Expr::Identifier(id) => id.value.clone(),
        ast::Expr::UnaryOp {
            op: ast::UnaryOperator::Minus,
            expr,
        } => format!("-{}", value_text(expr)?),
        other => other.to_string(),
    })
}

/// Executes `SET`.
pub fn set(vars: &mut Vars, s: &ast::Set) -> Result<Outcome> {
    let (name, value) = match s {
        ast::Set::SingleAssignment {
            variable, values, ..
        } => {
            let texts = values.iter().map(value_text).collect::<Result<Vec<_>>>()?;
            (variable.to_string(), texts.join(", "))
        }
        ast::Set::SetTimeZone { value, .. } => ("TimeZone".to_string(), value_text(value)?),
        ast::Set::SetNames { charset_name, .. } => {
            ("client_encoding".to_string(), charset_name.value.clone())
        }
        ast::Set::SetTransaction { .. } => {
            return Ok(Outcome::Command {
                tag: "SET",
                rows: None,
            });
        }
        ast::Set::SetSessionAuthorization(_) | ast::Set::SetRole { .. } => {
            return Ok(Outcome::Command {
                tag: "SET",
                rows: None,
            });
        }
        other => return Err(Error::unsupported(format!("{other} is not supported"))),
    };
    if value.eq_ignore_ascii_case("default") {
        return reset_one(vars, &name);
    }
    let (canon, reported) = vars.set(&name, value.clone())?;
    if reported {
        Ok(Outcome::SetReported { name: canon, value })
    } else {
        Ok(Outcome::Command {
            tag: "SET",
            rows: None,
        })
    }
}

fn reset_one(vars: &mut Vars, name: &str) -> Result<Outcome> {
    match vars.reset(Some(name))? {
        Some((canon, value, true)) => Ok(Outcome::SetReported { name: canon, value }),
        _ => Ok(Outcome::Command {
            tag: "SET",
            rows: None,
        }),
    }
}

/// Executes `RESET name` / `RESET ALL`.
pub fn reset(vars: &mut Vars, r: &ast::ResetStatement) -> Result<Outcome> {
    match &r.reset {
        ast::Reset::ALL => {
            vars.reset(None)?;
        }
        ast::Reset::ConfigurationParameter(name) => {
            vars.reset(Some(&name.to_string()))?;
        }
    }
    Ok(Outcome::Command {
        tag: "RESET",
        rows: None,
    })
}

/// Schema of `SHOW name` (one column named after the variable) or `SHOW ALL`.
pub fn show_schema(variable: &[Ident]) -> SchemaRef {
    let name = variable_name(variable);
    if name.eq_ignore_ascii_case("all") {
        return Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("setting", DataType::Utf8, false),
            Field::new("description", DataType::Utf8, false),
        ]));
    }
    let col = canonical(&name)
        .map(|(c, ..)| c.to_string())
        .unwrap_or(name);
    Arc::new(Schema::new(vec![Field::new(col, DataType::Utf8, false)]))
}

fn variable_name(variable: &[Ident]) -> String {
    variable
        .iter()
        .map(|i| i.value.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Executes `SHOW name` / `SHOW ALL`.
pub fn show(vars: &Vars, variable: &[Ident]) -> Result<Outcome> {
    let name = variable_name(variable);
    let schema = show_schema(variable);
    let columns: Vec<Arc<dyn datafusion::arrow::array::Array>> = if name.eq_ignore_ascii_case("all")
    {
        let mut names = vec![];
        let mut settings = vec![];
        let mut descs = vec![];
        for (n, _, _, d) in KNOWN {
            names.push(n.to_string());
            settings.push(vars.get(n)?.1);
            descs.push(d.to_string());
        }
        vec![
            Arc::new(StringArray::from(names)),
            Arc::new(StringArray::from(settings)),
            Arc::new(StringArray::from(descs)),
        ]
    } else {
        let (_, value) = vars.get(&name)?;
        vec![Arc::new(StringArray::from(vec![value]))]
    };
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    Ok(Outcome::Rows(Rows {
        schema,
        batches: vec![batch],
        names: None,
        tag: "SHOW",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_show_reset() {
        let mut v = Vars::default();
        assert_eq!(v.get("timezone").unwrap().1, "UTC");
        v.set("TimeZone", "Europe/Paris".into()).unwrap();
        assert_eq!(
            v.get("TIMEZONE").unwrap(),
            ("TimeZone".into(), "Europe/Paris".into())
        );
        v.reset(Some("timezone")).unwrap();
        assert_eq!(v.get("timezone").unwrap().1, "UTC");
        assert!(v.set("no_such_thing", "1".into()).is_err());
        assert!(v.set("my.custom", "1".into()).is_ok());
    }
}
