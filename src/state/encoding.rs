//! Order-preserving ("memcomparable") encoding of SQL values.
//!
//! Keys in RocksDB are compared bytewise, so a key encoding must sort the way
//! the values do. Sluice uses one encoding, defined here per [`SqlType`], for
//! both keys and row values; it is self-delimiting, so a row is simply its
//! columns' encodings concatenated. The format is ours and documented, never
//! Arrow's internal row format (which is not promised stable across
//! releases).
//!
//! Each value starts with a tag byte: `0x00` for NULL (so NULLs sort first),
//! `0x01` for a present value, followed by:
//!
//! | type | bytes |
//! |------|-------|
//! | bool | `0x00` / `0x01` |
//! | int2/int4/int8, date, time, timestamp(tz) | big-endian two's complement with the sign bit flipped |
//! | float4/float8 | IEEE bits; positive: sign bit flipped, negative: all bits flipped; NaN canonical |
//! | numeric | the scaled `i128`, big-endian, sign bit flipped (scale is the column's) |
//! | text/varchar/json/bytea | bytes with `0x00` escaped as `0x00 0xFF`, terminated by `0x00 0x00` |
//! | interval | months (i32), days (i32), nanoseconds (i64), each as the integers above |
//! | array | per element `0x01` + element encoding, then `0x00` |
//!
//! A storage key is `table id (u32, big-endian)` followed by the encoded
//! primary-key columns (or a `u64` row id for tables without one), so a table
//! is one contiguous, ordered key range.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, ListArray};
use datafusion::arrow::datatypes::IntervalMonthDayNano;
use datafusion::common::ScalarValue;

use crate::catalog::types::{SqlType, UTC};
use crate::error::{Error, Result};

const NULL: u8 = 0x00;
const PRESENT: u8 = 0x01;

/// Appends the encoding of `v` (which must be of `ty`'s Arrow type) to `buf`.
pub fn encode_value(buf: &mut Vec<u8>, ty: &SqlType, v: &ScalarValue) -> Result<()> {
    if v.is_null() {
        buf.push(NULL);
        return Ok(());
    }
    buf.push(PRESENT);
    match (ty, v) {
        (SqlType::Bool, ScalarValue::Boolean(Some(b))) => buf.push(*b as u8),
        (SqlType::Int2, ScalarValue::Int16(Some(i))) => put_i64_sized(buf, *i as i64, 2),
        (SqlType::Int4, ScalarValue::Int32(Some(i))) => put_i64_sized(buf, *i as i64, 4),
        (SqlType::Int8, ScalarValue::Int64(Some(i))) => put_i64_sized(buf, *i, 8),
        (SqlType::Date, ScalarValue::Date32(Some(i))) => put_i64_sized(buf, *i as i64, 4),
        (SqlType::Time, ScalarValue::Time64Microsecond(Some(i))) => put_i64_sized(buf, *i, 8),
        (
            SqlType::Timestamp | SqlType::TimestampTz,
            ScalarValue::TimestampMicrosecond(Some(i), _),
        ) => put_i64_sized(buf, *i, 8),
        (SqlType::Float4, ScalarValue::Float32(Some(f))) => {
            let f = if f.is_nan() { f32::NAN } else { *f };
            let bits = f.to_bits();
            let bits = if bits & (1 << 31) != 0 {
                !bits
            } else {
                bits ^ (1 << 31)
            };
            buf.extend_from_slice(&bits.to_be_bytes());
        }
        (SqlType::Float8, ScalarValue::Float64(Some(f))) => put_f64(buf, *f),
        (SqlType::Numeric { .. }, ScalarValue::Decimal128(Some(i), _, _)) => put_i128(buf, *i),
        (
            SqlType::Text | SqlType::Varchar(_) | SqlType::Json | SqlType::Jsonb,
            ScalarValue::Utf8(Some(s)),
        ) => put_bytes(buf, s.as_bytes()),
        (SqlType::Bytea, ScalarValue::Binary(Some(b))) => put_bytes(buf, b),
        (SqlType::Interval, ScalarValue::IntervalMonthDayNano(Some(iv))) => {
            put_i64_sized(buf, iv.months as i64, 4);
            put_i64_sized(buf, iv.days as i64, 4);
            put_i64_sized(buf, iv.nanoseconds, 8);
        }
        (SqlType::Array(elem), ScalarValue::List(list)) => {
            let values = list.value(0);
            for i in 0..values.len() {
                buf.push(PRESENT);
                let sv = ScalarValue::try_from_array(values.as_ref(), i)?;
                encode_value(buf, elem, &sv)?;
            }
            buf.push(NULL);
        }
        (ty, v) => {
            return Err(Error::Internal(format!(
                "cannot encode value {v:?} as {}",
                ty.pg_name()
            )))
        }
    }
    Ok(())
}

/// Decodes one value of type `ty` from the front of `buf`, advancing it.
pub fn decode_value(buf: &mut &[u8], ty: &SqlType) -> Result<ScalarValue> {
    let tag = take(buf, 1)?[0];
    if tag == NULL {
        return ScalarValue::try_from(&ty.arrow_type()).map_err(Error::from);
    }
    Ok(match ty {
        SqlType::Bool => ScalarValue::Boolean(Some(take(buf, 1)?[0] != 0)),
        SqlType::Int2 => ScalarValue::Int16(Some(get_i64_sized(buf, 2)? as i16)),
        SqlType::Int4 => ScalarValue::Int32(Some(get_i64_sized(buf, 4)? as i32)),
        SqlType::Int8 => ScalarValue::Int64(Some(get_i64_sized(buf, 8)?)),
        SqlType::Date => ScalarValue::Date32(Some(get_i64_sized(buf, 4)? as i32)),
        SqlType::Time => ScalarValue::Time64Microsecond(Some(get_i64_sized(buf, 8)?)),
        SqlType::Timestamp => ScalarValue::TimestampMicrosecond(Some(get_i64_sized(buf, 8)?), None),
        SqlType::TimestampTz => {
            ScalarValue::TimestampMicrosecond(Some(get_i64_sized(buf, 8)?), Some(Arc::from(UTC)))
        }
        SqlType::Float4 => {
            let bits = u32::from_be_bytes(take(buf, 4)?.try_into().map_err(corrupt)?);
            let bits = if bits & (1 << 31) != 0 {
                bits ^ (1 << 31)
            } else {
                !bits
            };
            ScalarValue::Float32(Some(f32::from_bits(bits)))
        }
        SqlType::Float8 => ScalarValue::Float64(Some(get_f64(buf)?)),
        SqlType::Numeric { precision, scale } => {
            ScalarValue::Decimal128(Some(get_i128(buf)?), *precision, *scale)
        }
        SqlType::Text | SqlType::Varchar(_) | SqlType::Json | SqlType::Jsonb => {
            let bytes = get_bytes(buf)?;
            ScalarValue::Utf8(Some(String::from_utf8(bytes).map_err(corrupt)?))
        }
        SqlType::Bytea => ScalarValue::Binary(Some(get_bytes(buf)?)),
        SqlType::Interval => {
            let months = get_i64_sized(buf, 4)? as i32;
            let days = get_i64_sized(buf, 4)? as i32;
            let nanoseconds = get_i64_sized(buf, 8)?;
            ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano {
                months,
                days,
                nanoseconds,
            }))
        }
        SqlType::Array(elem) => {
            let mut items = Vec::new();
            loop {
                match take(buf, 1)?[0] {
                    NULL => break,
                    _ => items.push(decode_value(buf, elem)?),
                }
            }
            let list: ListArray =
                ScalarValue::new_list_from_iter(items.into_iter(), &elem.arrow_type(), true)
                    .as_ref()
                    .clone();
            ScalarValue::List(Arc::new(list))
        }
    })
}

/// Encodes the values of `row` in `arrays` (one per type in `types`).
pub fn encode_row(
    buf: &mut Vec<u8>,
    types: &[&SqlType],
    arrays: &[&ArrayRef],
    row: usize,
) -> Result<()> {
    for (ty, arr) in types.iter().zip(arrays) {
        encode_cell(buf, ty, arr.as_ref(), row)?;
    }
    Ok(())
}

/// Appends the encoding of `arr[row]` — the same bytes as [`encode_value`]
/// of that cell, without building a `ScalarValue` for the common types
/// (this is the per-row hot path of every stateful operator).
pub fn encode_cell(buf: &mut Vec<u8>, ty: &SqlType, arr: &dyn Array, row: usize) -> Result<()> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{
        DataType, Date32Type, Int16Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType,
    };
    if arr.data_type() != &DataType::Null && arr.is_null(row) {
        buf.push(NULL);
        return Ok(());
    }
    match (ty, arr.data_type()) {
        (SqlType::Int8, DataType::Int64) => {
            buf.push(PRESENT);
            put_i64_sized(buf, arr.as_primitive::<Int64Type>().value(row), 8);
        }
        (SqlType::Int4, DataType::Int32) => {
            buf.push(PRESENT);
            put_i64_sized(buf, arr.as_primitive::<Int32Type>().value(row) as i64, 4);
        }
        (SqlType::Int2, DataType::Int16) => {
            buf.push(PRESENT);
            put_i64_sized(buf, arr.as_primitive::<Int16Type>().value(row) as i64, 2);
        }
        (SqlType::Date, DataType::Date32) => {
            buf.push(PRESENT);
            put_i64_sized(buf, arr.as_primitive::<Date32Type>().value(row) as i64, 4);
        }
        (SqlType::Timestamp, DataType::Timestamp(TimeUnit::Microsecond, None)) => {
            buf.push(PRESENT);
            let v = arr.as_primitive::<TimestampMicrosecondType>().value(row);
            put_i64_sized(buf, v, 8);
        }
        (SqlType::Text | SqlType::Varchar(_) | SqlType::Json | SqlType::Jsonb, DataType::Utf8) => {
            buf.push(PRESENT);
            put_bytes(buf, arr.as_string::<i32>().value(row).as_bytes());
        }
        (SqlType::Bool, DataType::Boolean) => {
            buf.push(PRESENT);
            buf.push(arr.as_boolean().value(row) as u8);
        }
        _ => {
            let v = ScalarValue::try_from_array(arr, row)?;
            encode_value(buf, ty, &v)?;
        }
    }
    Ok(())
}

/// Decodes a whole row of `types` from `buf`.
pub fn decode_row(mut buf: &[u8], types: &[SqlType]) -> Result<Vec<ScalarValue>> {
    let mut out = Vec::with_capacity(types.len());
    for ty in types {
        out.push(decode_value(&mut buf, ty)?);
    }
    if !buf.is_empty() {
        return Err(Error::Storage("trailing bytes after an encoded row".into()));
    }
    Ok(out)
}

/// Splits a counted row (a materialized view row stored with its
/// multiplicity: the encoded row, then a `u64` big-endian count).
pub fn split_counted(value: &[u8]) -> Result<(&[u8], i64)> {
    if value.len() < 8 {
        return Err(Error::Storage("counted row without multiplicity".into()));
    }
    let (row, tail) = value.split_at(value.len() - 8);
    let count = u64::from_be_bytes(tail.try_into().map_err(corrupt)?);
    Ok((row, count as i64))
}

/// Key prefix of a table: its id, big-endian.
pub fn table_prefix(table_id: u32) -> [u8; 4] {
    table_id.to_be_bytes()
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("corrupt encoded value: {e}"))
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if buf.len() < n {
        return Err(Error::Storage("truncated encoded value".into()));
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

/// [`encode_value`] of a non-NULL `int8`, `float8` or `numeric` given as
/// the native value (`i128` for numeric): the same bytes without building a
/// `ScalarValue`. Aggregate states are sequences of these, encoded and
/// decoded for every group an epoch touches.
pub fn encode_i64(buf: &mut Vec<u8>, v: i64) {
    buf.push(PRESENT);
    put_i64_sized(buf, v, 8);
}

/// See [`encode_i64`].
pub fn encode_f64(buf: &mut Vec<u8>, v: f64) {
    buf.push(PRESENT);
    put_f64(buf, v);
}

/// See [`encode_i64`].
pub fn encode_i128(buf: &mut Vec<u8>, v: i128) {
    buf.push(PRESENT);
    put_i128(buf, v);
}

/// [`decode_value`] of an `int8` as the native value (`None` for NULL).
pub fn decode_i64(buf: &mut &[u8]) -> Result<Option<i64>> {
    unless_null(buf, |b| get_i64_sized(b, 8))
}

/// [`decode_value`] of a `float8` as the native value (`None` for NULL).
pub fn decode_f64(buf: &mut &[u8]) -> Result<Option<f64>> {
    unless_null(buf, get_f64)
}

/// [`decode_value`] of a `numeric` as its unscaled `i128` (`None` for NULL).
pub fn decode_i128(buf: &mut &[u8]) -> Result<Option<i128>> {
    unless_null(buf, get_i128)
}

/// Reads a value's NULL/present tag and, when present, the value with
/// `read`.
fn unless_null<T>(
    buf: &mut &[u8],
    read: impl FnOnce(&mut &[u8]) -> Result<T>,
) -> Result<Option<T>> {
    match take(buf, 1)?[0] {
        NULL => Ok(None),
        _ => read(buf).map(Some),
    }
}

fn put_f64(buf: &mut Vec<u8>, f: f64) {
    let f = if f.is_nan() { f64::NAN } else { f };
    let bits = f.to_bits();
    let bits = if bits & (1 << 63) != 0 {
        !bits
    } else {
        bits ^ (1 << 63)
    };
    buf.extend_from_slice(&bits.to_be_bytes());
}

fn get_f64(buf: &mut &[u8]) -> Result<f64> {
    let bits = u64::from_be_bytes(take(buf, 8)?.try_into().map_err(corrupt)?);
    let bits = if bits & (1 << 63) != 0 {
        bits ^ (1 << 63)
    } else {
        !bits
    };
    Ok(f64::from_bits(bits))
}

fn put_i128(buf: &mut Vec<u8>, i: i128) {
    buf.extend_from_slice(&((i as u128) ^ (1u128 << 127)).to_be_bytes());
}

fn get_i128(buf: &mut &[u8]) -> Result<i128> {
    let raw = u128::from_be_bytes(take(buf, 16)?.try_into().map_err(corrupt)?);
    Ok((raw ^ (1u128 << 127)) as i128)
}

fn put_i64_sized(buf: &mut Vec<u8>, v: i64, size: usize) {
    // In place: this runs for every integer cell of every key encoded.
    let start = buf.len();
    buf.extend_from_slice(&v.to_be_bytes()[8 - size..]);
    buf[start] ^= 0x80;
}

fn get_i64_sized(buf: &mut &[u8], size: usize) -> Result<i64> {
    let part = take(buf, size)?;
    let negative = part[0] & 0x80 == 0; // sign bit was flipped on encode
    let mut bytes = if negative { [0xFFu8; 8] } else { [0u8; 8] };
    bytes[8 - size..].copy_from_slice(part);
    bytes[8 - size] ^= 0x80;
    Ok(i64::from_be_bytes(bytes))
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        buf.push(b);
        if b == 0 {
            buf.push(0xFF);
        }
    }
    buf.extend_from_slice(&[0x00, 0x00]);
}

fn get_bytes(buf: &mut &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let b = take(buf, 1)?[0];
        if b != 0 {
            out.push(b);
            continue;
        }
        match take(buf, 1)?[0] {
            0x00 => return Ok(out),
            0xFF => out.push(0),
            _ => return Err(Error::Storage("bad escape in encoded bytes".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ty: &SqlType, v: ScalarValue) -> Vec<u8> {
        let mut b = Vec::new();
        encode_value(&mut b, ty, &v).unwrap();
        b
    }

    fn roundtrip(ty: SqlType, v: ScalarValue) {
        let b = enc(&ty, v.clone());
        let mut s = b.as_slice();
        let back = decode_value(&mut s, &ty).unwrap();
        assert!(s.is_empty());
        assert_eq!(back, v, "{ty:?}");
    }

    /// The native encoders write exactly what `encode_value` writes (so
    /// stored aggregate states read the same either way) and read it back.
    #[test]
    fn native_encoders_match_encode_value() {
        let numeric = SqlType::Numeric {
            precision: 38,
            scale: 0,
        };
        for i in [0, 1, -1, 42, i64::MIN, i64::MAX, -123_456_789] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            encode_i64(&mut a, i);
            encode_value(&mut b, &SqlType::Int8, &ScalarValue::Int64(Some(i))).unwrap();
            assert_eq!(a, b);
            assert_eq!(decode_i64(&mut a.as_slice()).unwrap(), Some(i));
        }
        for i in [
            0,
            1,
            -1,
            i128::MIN,
            i128::MAX,
            10i128.pow(30),
            -(10i128.pow(30)),
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            encode_i128(&mut a, i);
            encode_value(&mut b, &numeric, &ScalarValue::Decimal128(Some(i), 38, 0)).unwrap();
            assert_eq!(a, b);
            assert_eq!(decode_i128(&mut a.as_slice()).unwrap(), Some(i));
        }
        for f in [
            0.0,
            -0.0,
            1.5,
            -1.5,
            f64::MAX,
            f64::MIN,
            f64::INFINITY,
            f64::NAN,
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            encode_f64(&mut a, f);
            encode_value(&mut b, &SqlType::Float8, &ScalarValue::Float64(Some(f))).unwrap();
            assert_eq!(a, b);
            let back = decode_f64(&mut a.as_slice()).unwrap().unwrap();
            assert_eq!(
                back.to_bits(),
                if f.is_nan() {
                    f64::NAN.to_bits()
                } else {
                    f.to_bits()
                }
            );
        }
        let mut null = Vec::new();
        encode_value(&mut null, &SqlType::Int8, &ScalarValue::Int64(None)).unwrap();
        assert_eq!(decode_i64(&mut null.as_slice()).unwrap(), None);
        assert!(decode_i64(&mut &[1u8, 2][..]).is_err(), "truncated");
    }

    #[test]
    fn values_roundtrip() {
        roundtrip(SqlType::Int2, ScalarValue::Int16(Some(-3)));
        roundtrip(SqlType::Int4, ScalarValue::Int32(Some(i32::MIN)));
        roundtrip(SqlType::Int8, ScalarValue::Int64(Some(i64::MAX)));
        roundtrip(SqlType::Int8, ScalarValue::Int64(None));
        roundtrip(SqlType::Float8, ScalarValue::Float64(Some(-1.5)));
        roundtrip(SqlType::Float4, ScalarValue::Float32(Some(2.25)));
        roundtrip(SqlType::Text, ScalarValue::Utf8(Some("a\0b".into())));
        roundtrip(
            SqlType::Bytea,
            ScalarValue::Binary(Some(vec![0, 1, 0, 255])),
        );
        roundtrip(
            SqlType::Numeric {
                precision: 10,
                scale: 2,
            },
            ScalarValue::Decimal128(Some(-12345), 10, 2),
        );
        roundtrip(
            SqlType::TimestampTz,
            ScalarValue::TimestampMicrosecond(Some(1), Some(Arc::from(UTC))),
        );
        roundtrip(
            SqlType::Interval,
            ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano::new(1, -2, 3))),
        );
        let list = ScalarValue::new_list_from_iter(
            vec![ScalarValue::Int32(Some(1)), ScalarValue::Int32(None)].into_iter(),
            &SqlType::Int4.arrow_type(),
            true,
        );
        roundtrip(
            SqlType::Array(Box::new(SqlType::Int4)),
            ScalarValue::List(list),
        );
    }

    #[test]
    fn encoding_preserves_order() {
        let ints = [i64::MIN, -1000, -1, 0, 1, 255, 256, i64::MAX];
        let encoded: Vec<_> = ints
            .iter()
            .map(|i| enc(&SqlType::Int8, ScalarValue::Int64(Some(*i))))
            .collect();
        assert!(encoded.windows(2).all(|w| w[0] < w[1]));

        let floats = [f64::NEG_INFINITY, -2.5, -0.0, 0.0, 1e-9, 3.0, f64::INFINITY];
        let encoded: Vec<_> = floats
            .iter()
            .map(|f| enc(&SqlType::Float8, ScalarValue::Float64(Some(*f))))
            .collect();
        assert!(encoded.windows(2).all(|w| w[0] <= w[1]));

        let strs = ["", "a", "a\0", "a\0b", "ab", "b"];
        let encoded: Vec<_> = strs
            .iter()
            .map(|s| enc(&SqlType::Text, ScalarValue::Utf8(Some(s.to_string()))))
            .collect();
        assert!(encoded.windows(2).all(|w| w[0] < w[1]), "{encoded:?}");

        let null = enc(&SqlType::Int4, ScalarValue::Int32(None));
        let min = enc(&SqlType::Int4, ScalarValue::Int32(Some(i32::MIN)));
        assert!(null < min);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let b = enc(&SqlType::Int8, ScalarValue::Int64(Some(7)));
        let mut s = &b[..3];
        assert!(decode_value(&mut s, &SqlType::Int8).is_err());
    }
}
