//! PostgreSQL compatibility functions and plan rewrites.
//!
//! Text input of two types differs between PostgreSQL and DataFusion:
//!
//! * `bytea`: PostgreSQL reads `'\x00ff'` (hex) or `'a\000b'` (escape);
//!   DataFusion's cast would store the string's own bytes.
//! * `interval`: PostgreSQL reads its own output (`1 day 02:00:00`, `1:30`);
//!   DataFusion's parser does not.
//!
//! [`PgTextInput`] is an analyzer rule, run after DataFusion's type
//! coercion, that replaces every `CAST(<text> AS bytea)` with
//! `pg_bytea_in(<text>)` and every `CAST(<text> AS interval)` with
//! `pg_interval_in(<text>)`, which parse PostgreSQL's formats.
//!
//! [`pg_sleep_udf`] is PostgreSQL's `pg_sleep(seconds)`, which clients and
//! scripts use to wait (and tests of query cancellation, to have a query
//! that runs for a while).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::datatypes::{DataType, IntervalUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, Expr, ExprSchemable, LogicalPlan, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// Name of the bytea input function.
pub const BYTEA_IN: &str = "pg_bytea_in";

/// Parses PostgreSQL's bytea text input (hex `\x…` or escape format).
pub fn parse_bytea(s: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("invalid input syntax for type bytea: \"{s}\"");
    if let Some(hex) = s.strip_prefix("\\x").or_else(|| s.strip_prefix("\\X")) {
        let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !digits.len().is_multiple_of(2) {
            return Err(bad());
        }
        return digits
            .chunks(2)
            .map(|p| {
                let h = (p[0] as char).to_digit(16).ok_or_else(bad)?;
                let l = (p[1] as char).to_digit(16).ok_or_else(bad)?;
                Ok((h * 16 + l) as u8)
            })
            .collect();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else if i + 3 < b.len() && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(u8::try_from(v).map_err(|_| bad())?);
            i += 4;
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

/// Builds a `text → out` function from a parser of one value. NULL maps to
/// NULL; a parse error becomes a cast error (SQLSTATE 22P02).
fn text_input_udf(
    name: &str,
    out: DataType,
    parse: impl Fn(&str) -> Result<ScalarValue, String> + Send + Sync + 'static,
) -> ScalarUDF {
    let out_type = out.clone();
    create_udf(
        name,
        vec![DataType::Utf8],
        out,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arr: ArrayRef = match &args[0] {
                ColumnarValue::Array(a) => a.clone(),
                ColumnarValue::Scalar(s) => s.to_array()?,
            };
            let arr = datafusion::arrow::compute::cast(&arr, &DataType::Utf8)?;
            let values = arr
                .as_string::<i32>()
                .iter()
                .map(|v| match v {
                    None => Ok(ScalarValue::try_from(&out_type)?),
                    Some(s) => parse(s).map_err(|m| {
                        DataFusionError::ArrowError(
                            Box::new(datafusion::arrow::error::ArrowError::CastError(m)),
                            None,
                        )
                    }),
                })
                .collect::<DfResult<Vec<_>>>()?;
            let result: ArrayRef = if values.is_empty() {
                datafusion::arrow::array::new_empty_array(&out_type)
            } else {
                ScalarValue::iter_to_array(values)?
            };
            Ok(match &args[0] {
                ColumnarValue::Scalar(_) => {
                    ColumnarValue::Scalar(ScalarValue::try_from_array(&result, 0)?)
                }
                ColumnarValue::Array(_) => ColumnarValue::Array(result),
            })
        }),
    )
}

/// `pg_sleep(seconds double precision)`: waits that long (the sum over the
/// rows it is called for, as PostgreSQL does row by row; negative, NULL and
/// NaN count as zero), then returns NULL — PostgreSQL's `void`. It is an
/// async function: the wait is a tokio timer, so it holds no thread and a
/// cancelled query (cancel request, closed connection) stops waiting. It is
/// volatile, so materialized views refuse it.
pub fn pg_sleep_udf() -> ScalarUDF {
    AsyncScalarUDF::new(Arc::new(PgSleep {
        signature: Signature::uniform(1, vec![DataType::Float64], Volatility::Volatile),
    }))
    .into_scalar_udf()
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PgSleep {
    signature: Signature,
}

impl ScalarUDFImpl for PgSleep {
    fn name(&self) -> &str {
        "pg_sleep"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Null)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        // DataFusion's planner runs async functions through
        // `invoke_async_with_args`; this is never reached.
        Err(DataFusionError::Internal(
            "pg_sleep must be invoked asynchronously".into(),
        ))
    }
}

#[async_trait::async_trait]
impl AsyncScalarUDFImpl for PgSleep {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arg = args
            .args
            .first()
            .ok_or_else(|| DataFusionError::Internal("pg_sleep takes one argument".into()))?;
        // Called once per batch: a constant argument still waits once per
        // row, as in PostgreSQL.
        let rows = args.number_rows;
        let seconds = datafusion::arrow::compute::cast(&arg.to_array(rows)?, &DataType::Float64)?;
        let total: f64 = seconds
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
            .iter()
            .flatten()
            .filter(|s| *s > 0.0)
            .sum();
        // A wait past what a Duration holds (or infinity) is "forever" in
        // any practical sense; a day at a time keeps it cancellable.
        if let Ok(wait) = std::time::Duration::try_from_secs_f64(total) {
            tokio::time::sleep(wait).await;
        } else if total > 0.0 {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(86_400)).await;
            }
        }
        Ok(ColumnarValue::Array(
            datafusion::arrow::array::new_null_array(&DataType::Null, rows),
        ))
    }
}

/// The `pg_bytea_in(text) → bytea` function.
pub fn bytea_in_udf() -> ScalarUDF {
    text_input_udf(BYTEA_IN, DataType::Binary, |s| {
        parse_bytea(s).map(|b| ScalarValue::Binary(Some(b)))
    })
}

/// Name of the interval input function.
pub const INTERVAL_IN: &str = "pg_interval_in";

/// Parses PostgreSQL's interval input: `1 day 02:00:00`, `-1 days`, `1:30`,
/// `2 hours 30 mins`, `1.5 days`, `@ 3 days ago`. Returns (months, days,
/// microseconds); `None` when the text is not in this form (the caller then
/// tries Arrow's parser).
pub fn parse_interval(s: &str) -> Option<(i32, i32, i64)> {
    let mut text = s.trim().to_ascii_lowercase();
    if let Some(rest) = text.strip_prefix('@') {
        text = rest.trim().to_string();
    }
    let mut negate_all = false;
    if let Some(rest) = text.strip_suffix("ago") {
        text = rest.trim().to_string();
        negate_all = true;
    }
    let tokens: Vec<&str> = text.split_whitespace().collect();
    if tokens.is_empty() {
        return None;
    }
    let (mut months, mut days, mut micros) = (0f64, 0f64, 0f64);
    let mut i = 0;
    while i < tokens.len() {
        let tok = tokens[i];
        if tok.contains(':') {
            let (neg, body) = match tok.strip_prefix('-') {
                Some(b) => (true, b),
                None => (false, tok.strip_prefix('+').unwrap_or(tok)),
            };
            let parts: Vec<&str> = body.split(':').collect();
            if parts.len() > 3 {
                return None;
            }
            let h: f64 = parts[0].parse().ok()?;
            let m: f64 = parts
                .get(1)
                .map(|p| p.parse())
                .transpose()
                .ok()?
                .unwrap_or(0.0);
            let sec: f64 = parts
                .get(2)
                .map(|p| p.parse())
                .transpose()
                .ok()?
                .unwrap_or(0.0);
            let us = ((h * 3600.0 + m * 60.0 + sec) * 1e6).round();
            micros += if neg { -us } else { us };
            i += 1;
            continue;
        }
        // A number, with its unit in the same token (`2h`) or the next.
        let split = tok
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(tok.len());
        let value: f64 = tok[..split].parse().ok()?;
        let unit = if split < tok.len() {
            &tok[split..]
        } else if i + 1 < tokens.len()
            && tokens[i + 1].starts_with(|c: char| c.is_ascii_alphabetic())
        {
            i += 1;
            tokens[i]
        } else {
            "second"
        };
        let unit = unit.trim_end_matches(',');
        match unit {
            "microsecond" | "microseconds" | "us" | "usec" | "usecs" => micros += value,
            "millisecond" | "milliseconds" | "ms" | "msec" | "msecs" => micros += value * 1e3,
            "second" | "seconds" | "s" | "sec" | "secs" => micros += value * 1e6,
            "minute" | "minutes" | "m" | "min" | "mins" => micros += value * 60e6,
            "hour" | "hours" | "h" | "hr" | "hrs" => micros += value * 3600e6,
            "day" | "days" | "d" => days += value,
            "week" | "weeks" | "w" => days += value * 7.0,
            "month" | "months" | "mon" | "mons" => months += value,
            "year" | "years" | "y" | "yr" | "yrs" => months += value * 12.0,
            "decade" | "decades" => months += value * 120.0,
            "century" | "centuries" => months += value * 1200.0,
            "millennium" | "millennia" | "millenniums" => months += value * 12000.0,
            _ => return None,
        }
        i += 1;
    }
    // Fractions cascade down as in PostgreSQL: a month is 30 days, a day 24 h.
    let whole_months = months.trunc();
    days += (months - whole_months) * 30.0;
    let whole_days = days.trunc();
    micros += (days - whole_days) * 86_400e6;
    let sign = if negate_all { -1.0 } else { 1.0 };
    let m = sign * whole_months;
    let d = sign * whole_days;
    let us = (sign * micros).round();
    if m.abs() > i32::MAX as f64 || d.abs() > i32::MAX as f64 || us.abs() > i64::MAX as f64 {
        return None;
    }
    Some((m as i32, d as i32, us as i64))
}

/// The `pg_interval_in(text) → interval` function.
pub fn interval_in_udf() -> ScalarUDF {
    use datafusion::arrow::datatypes::{IntervalMonthDayNano, IntervalMonthDayNanoType};
    let out = DataType::Interval(IntervalUnit::MonthDayNano);
    let fallback_type = out.clone();
    text_input_udf(INTERVAL_IN, out, move |s| {
        let bad = || format!("invalid input syntax for type interval: \"{s}\"");
        let iv = match parse_interval(s) {
            Some((m, d, us)) => {
                IntervalMonthDayNano::new(m, d, us.checked_mul(1000).ok_or_else(bad)?)
            }
            None => {
                // Arrow's parser knows a few more forms; it yields NULL on failure.
                let one = datafusion::arrow::array::StringArray::from(vec![s]);
                let parsed =
                    datafusion::arrow::compute::cast(&one, &fallback_type).map_err(|_| bad())?;
                if parsed.is_null(0) {
                    return Err(bad());
                }
                parsed.as_primitive::<IntervalMonthDayNanoType>().value(0)
            }
        };
        Ok(ScalarValue::IntervalMonthDayNano(Some(iv)))
    })
}

/// Rewrites text → bytea casts to [`BYTEA_IN`] and text → interval casts
/// to [`INTERVAL_IN`].
#[derive(Debug)]
pub struct PgTextInput {
    bytea: Arc<ScalarUDF>,
    interval: Arc<ScalarUDF>,
}

impl Default for PgTextInput {
    fn default() -> Self {
        PgTextInput {
            bytea: Arc::new(bytea_in_udf()),
            interval: Arc::new(interval_in_udf()),
        }
    }
}

impl AnalyzerRule for PgTextInput {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> DfResult<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            let inputs = node.inputs();
            let schema: DFSchema = if inputs.len() == 1 {
                inputs[0].schema().as_ref().clone()
            } else {
                node.schema().as_ref().clone()
            };
            // Keep output names stable: the rewrite must not rename columns.
            let names = datafusion::logical_expr::expr_rewriter::NamePreserver::new(&node);
            node.map_expressions(|e| {
                let saved = names.save(&e);
                e.transform_up(|e| {
                    let Expr::Cast(c) = &e else {
                        return Ok(Transformed::no(e));
                    };
                    let udf = match c.field.data_type() {
                        DataType::Binary => &self.bytea,
                        DataType::Interval(IntervalUnit::MonthDayNano) => &self.interval,
                        _ => return Ok(Transformed::no(e)),
                    };
                    if !matches!(
                        c.expr.get_type(&schema),
                        Ok(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
                    ) {
                        return Ok(Transformed::no(e));
                    }
                    let arg = Expr::Cast(datafusion::logical_expr::Cast::new(
                        c.expr.clone(),
                        DataType::Utf8,
                    ));
                    Ok(Transformed::yes(udf.call(vec![arg])))
                })
                .map(|t| t.update_data(|new| saved.restore(new)))
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "sluice_pg_text_input"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_intervals() {
        let h = 3_600_000_000i64;
        assert_eq!(parse_interval("1 day 02:00:00"), Some((0, 1, 2 * h)));
        assert_eq!(parse_interval("-1 days"), Some((0, -1, 0)));
        assert_eq!(parse_interval("1:30"), Some((0, 0, h + h / 2)));
        assert_eq!(
            parse_interval("1 year 2 mons 3 days 04:05:06.5"),
            Some((14, 3, 4 * h + 5 * 60_000_000 + 6_500_000))
        );
        assert_eq!(parse_interval("1.5 days"), Some((0, 1, 12 * h)));
        assert_eq!(parse_interval("@ 2 hours ago"), Some((0, 0, -2 * h)));
        assert_eq!(parse_interval("2h 30m"), Some((0, 0, 2 * h + h / 2)));
        assert_eq!(parse_interval("10"), Some((0, 0, 10_000_000)));
        assert_eq!(parse_interval("P1D"), None);
        assert_eq!(parse_interval("1 fortnight"), None);
    }

    #[test]
    fn parses_hex_and_escape() {
        assert_eq!(parse_bytea("\\x00ff10").unwrap(), vec![0, 255, 16]);
        assert_eq!(
            parse_bytea("ab\\000c\\\\").unwrap(),
            vec![b'a', b'b', 0, b'c', b'\\']
        );
        assert!(parse_bytea("\\x0").is_err());
        assert!(parse_bytea("\\q").is_err());
    }
}
