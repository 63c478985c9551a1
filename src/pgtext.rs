//! The PostgreSQL text form of Arrow values, shared by the wire layer and
//! the connectors.
//!
//! pgwire's generic text encoders differ from PostgreSQL in details users
//! see in `psql` (`90.0` for the float 90, `13:45:30.500000` for a time,
//! `inf`), so result sets sent entirely in text format are encoded here, the
//! way PostgreSQL's `*out` functions print them (binary format goes through
//! `arrow-pg`, whose binary encodings are exact). Kafka sinks write `FORMAT
//! TEXT` with the same function, so a value reads the same in `psql` and in
//! a topic.
//!
//! A leaf module: it knows Arrow and nothing of Sluice, so every layer may
//! use it.

use std::fmt::Write;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Int8Type, IntervalUnit, Time64MicrosecondType, TimeUnit, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};

/// Appends the text of `array[row]` to `out`; returns false for NULL.
/// `None` when the type has no PostgreSQL text form here (caller falls back).
pub fn write_value(array: &ArrayRef, row: usize, out: &mut String) -> Option<bool> {
    if array.is_null(row) {
        return Some(false);
    }
    match array.data_type() {
        DataType::Boolean => out.push(if array.as_boolean().value(row) {
            't'
        } else {
            'f'
        }),
        DataType::Int8 => write!(out, "{}", array.as_primitive::<Int8Type>().value(row)).ok()?,
        DataType::Int16 => write!(out, "{}", array.as_primitive::<Int16Type>().value(row)).ok()?,
        DataType::Int32 => write!(out, "{}", array.as_primitive::<Int32Type>().value(row)).ok()?,
        DataType::Int64 => write!(out, "{}", array.as_primitive::<Int64Type>().value(row)).ok()?,
        DataType::UInt8 => write!(out, "{}", array.as_primitive::<UInt8Type>().value(row)).ok()?,
        DataType::UInt16 => {
            write!(out, "{}", array.as_primitive::<UInt16Type>().value(row)).ok()?
        }
        DataType::UInt32 => {
            write!(out, "{}", array.as_primitive::<UInt32Type>().value(row)).ok()?
        }
        DataType::UInt64 => {
            write!(out, "{}", array.as_primitive::<UInt64Type>().value(row)).ok()?
        }
        DataType::Float32 => float(
            out,
            array.as_primitive::<Float32Type>().value(row) as f64,
            true,
        ),
        DataType::Float64 => float(out, array.as_primitive::<Float64Type>().value(row), false),
        DataType::Decimal128(_, scale) => {
            let v = array.as_primitive::<Decimal128Type>().value(row);
            decimal(out, v, *scale);
        }
        DataType::Utf8 => out.push_str(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => out.push_str(array.as_string::<i64>().value(row)),
        DataType::Utf8View => out.push_str(array.as_string_view().value(row)),
        DataType::Binary => bytea(out, array.as_binary::<i32>().value(row)),
        DataType::LargeBinary => bytea(out, array.as_binary::<i64>().value(row)),
        DataType::BinaryView => bytea(out, array.as_binary_view().value(row)),
        DataType::Date32 => {
            let d = array.as_primitive::<Date32Type>().value_as_date(row)?;
            write!(out, "{}", d.format("%Y-%m-%d")).ok()?;
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            let us = array.as_primitive::<Time64MicrosecondType>().value(row);
            time_of_day(out, us);
        }
        DataType::Timestamp(unit, tz) => {
            let raw = timestamp_micros(array, row, unit)?;
            let secs = raw.div_euclid(1_000_000);
            let micros = raw.rem_euclid(1_000_000);
            let dt = chrono::DateTime::from_timestamp(secs, 0)?.naive_utc();
            write!(out, "{}", dt.format("%Y-%m-%d %H:%M:%S")).ok()?;
            fraction(out, micros);
            if tz.is_some() {
                out.push_str("+00");
            }
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let iv = array
                .as_primitive::<datafusion::arrow::datatypes::IntervalMonthDayNanoType>()
                .value(row);
            interval(out, iv.months, iv.days, iv.nanoseconds / 1000);
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let values = list.value(row);
            out.push('{');
            for i in 0..values.len() {
                if i > 0 {
                    out.push(',');
                }
                let mut item = String::new();
                match write_value(&values, i, &mut item)? {
                    false => out.push_str("NULL"),
                    true => array_item(out, &item, values.data_type()),
                }
            }
            out.push('}');
        }
        _ => return None,
    }
    Some(true)
}

fn timestamp_micros(array: &ArrayRef, row: usize, unit: &TimeUnit) -> Option<i64> {
    use datafusion::arrow::datatypes::{
        TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
        TimestampSecondType,
    };
    Some(match unit {
        TimeUnit::Second => array
            .as_primitive::<TimestampSecondType>()
            .value(row)
            .checked_mul(1_000_000)?,
        TimeUnit::Millisecond => array
            .as_primitive::<TimestampMillisecondType>()
            .value(row)
            .checked_mul(1000)?,
        TimeUnit::Microsecond => array.as_primitive::<TimestampMicrosecondType>().value(row),
        TimeUnit::Nanosecond => array
            .as_primitive::<TimestampNanosecondType>()
            .value(row)
            .div_euclid(1000),
    })
}

/// PostgreSQL's shortest-exact float output (extra_float_digits ≥ 1):
/// fixed notation for decimal exponents in [-4, 15), otherwise `1e+20`.
fn float(out: &mut String, v: f64, single: bool) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    if v == 0.0 {
        out.push_str(if v.is_sign_negative() { "-0" } else { "0" });
        return;
    }
    // Shortest round-trip digits via Rust's `{:e}` (shortest repr).
    let sci = if single {
        format!("{:e}", v as f32)
    } else {
        format!("{v:e}")
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let max_fixed = if single { 6 } else { 15 };
    if negative {
        out.push('-');
    }
    if (-4..max_fixed).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            for _ in 0..(-exp - 1) {
                out.push('0');
            }
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                for _ in digits.len()..int_len {
                    out.push('0');
                }
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
}

fn decimal(out: &mut String, v: i128, scale: i8) {
    if scale <= 0 {
        let _ = write!(out, "{}", v * 10i128.pow((-scale) as u32));
        return;
    }
    let scale = scale as u32;
    let neg = v < 0;
    let abs = v.unsigned_abs();
    let p = 10u128.pow(scale);
    if neg {
        out.push('-');
    }
    let _ = write!(
        out,
        "{}.{:0width$}",
        abs / p,
        abs % p,
        width = scale as usize
    );
}

fn bytea(out: &mut String, b: &[u8]) {
    out.push_str("\\x");
    for byte in b {
        let _ = write!(out, "{byte:02x}");
    }
}

/// `.ffffff` with trailing zeros removed, nothing when zero.
fn fraction(out: &mut String, micros: i64) {
    if micros == 0 {
        return;
    }
    let s = format!("{micros:06}");
    out.push('.');
    out.push_str(s.trim_end_matches('0'));
}

fn time_of_day(out: &mut String, us: i64) {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    fraction(out, frac);
}

/// PostgreSQL's `IntervalStyle = postgres` output.
fn interval(out: &mut String, months: i32, days: i32, micros: i64) {
    let mut parts: Vec<String> = Vec::new();
    let years = months / 12;
    let mons = months % 12;
    if years != 0 {
        parts.push(format!("{years} year{}", if years == 1 { "" } else { "s" }));
    }
    if mons != 0 {
        parts.push(format!("{mons} mon{}", if mons == 1 { "" } else { "s" }));
    }
    if days != 0 {
        parts.push(format!("{days} day{}", if days == 1 { "" } else { "s" }));
    }
    if micros != 0 || parts.is_empty() {
        let mut t = String::new();
        if micros < 0 {
            t.push('-');
        }
        time_of_day(&mut t, micros.abs());
        parts.push(t);
    }
    out.push_str(&parts.join(" "));
}

/// Array elements are quoted when PostgreSQL would quote them.
fn array_item(out: &mut String, item: &str, elem_type: &DataType) {
    let textual = matches!(
        elem_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    let needs_quotes = item.is_empty()
        || item.eq_ignore_ascii_case("null")
        || item
            .chars()
            .any(|c| matches!(c, '{' | '}' | ',' | '"' | '\\') || c.is_whitespace())
        || (!textual && item.contains(' '));
    if !needs_quotes {
        out.push_str(item);
        return;
    }
    out.push('"');
    for c in item.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Appends the text of `array[row]`: PostgreSQL's form, or Arrow's
/// display for types without one here. False for NULL (and for a value
/// Arrow cannot display).
pub fn write_text(array: &ArrayRef, row: usize, out: &mut String) -> bool {
    match write_value(array, row, out) {
        Some(present) => present,
        None => match datafusion::arrow::util::display::array_value_to_string(array, row) {
            Ok(s) => {
                out.push_str(&s);
                true
            }
            Err(_) => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: f64) -> String {
        let mut s = String::new();
        float(&mut s, v, false);
        s
    }

    #[test]
    fn floats_print_like_postgres() {
        assert_eq!(f(90.0), "90");
        assert_eq!(f(1.5), "1.5");
        assert_eq!(f(-2.25), "-2.25");
        assert_eq!(f(0.1), "0.1");
        assert_eq!(f(1e20), "1e+20");
        assert_eq!(f(1e-5), "1e-05");
        assert_eq!(f(0.0001), "0.0001");
        assert_eq!(f(123456789012345.0), "123456789012345");
        assert_eq!(f(1234567890123456.0), "1.234567890123456e+15");
        assert_eq!(f(f64::INFINITY), "Infinity");
        let mut s = String::new();
        float(&mut s, 0.1f32 as f64, true);
        assert_eq!(s, "0.1");
    }

    #[test]
    fn intervals_print_like_postgres() {
        let mut s = String::new();
        interval(&mut s, 14, 3, 4 * 3600 * 1_000_000 + 500_000);
        assert_eq!(s, "1 year 2 mons 3 days 04:00:00.5");
        let mut s = String::new();
        interval(&mut s, 0, 0, 0);
        assert_eq!(s, "00:00:00");
        let mut s = String::new();
        interval(&mut s, 0, -1, 0);
        assert_eq!(s, "-1 days");
    }

    #[test]
    fn decimals_keep_scale() {
        let mut s = String::new();
        decimal(&mut s, -12345, 2);
        assert_eq!(s, "-123.45");
        let mut s = String::new();
        decimal(&mut s, 5, 3);
        assert_eq!(s, "0.005");
    }
}
