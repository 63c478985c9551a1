//! Sink formats: a relation's rows → Kafka message keys and values.
//!
//! - `JSON`: one object per row (`null` for NULL); a key is the object of
//!   the key columns.
//! - `AVRO`: an Avro binary datum of a record per row. The record schema
//!   is derived from the columns, or given by the user (`SCHEMA '…'`) and
//!   then checked against the columns at `CREATE SINK`. With `SCHEMA
//!   REGISTRY` the schemas are registered (subjects `<topic>-value` and
//!   `<topic>-key`) and every datum is framed in the Confluent wire format:
//!   `0x00 · schema id (u32 BE) · datum`. A key is a record of the key
//!   columns (its schema always derived).
//! - `CSV`: one line per row, no header, fields by position (arrow-csv);
//!   NULL is an empty field. A key is the line of the key columns.
//! - `TEXT`: the one non-key column's PostgreSQL text; a key is the one key
//!   column's text.
//!
//! Formats work from the relation's Arrow schema (names, types,
//! nullability); the SQL layer builds it from the catalog's column types,
//! whose Arrow types are what this module maps to Avro.
//!
//! A format is resolved once, at `CREATE SINK` ([`SinkFormat::resolve`]):
//! schemas are derived or checked there, so that encoding a committed change
//! — which happens on the commit path, where an error would fail the user's
//! write — cannot fail on a type mismatch. [`Encoder`] is the compiled form
//! (parsed schemas) the commit path uses.

use apache_avro::schema::UnionSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Decimal, Schema};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Fields, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Schema as ArrowSchema, Time64MicrosecondType, TimeUnit, TimestampMicrosecondType,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::format::Format;
use super::sink::SinkEnvelope;
use crate::error::{Error, Result};

/// How a sink writes rows, resolved at `CREATE SINK` and stored with it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// JSON objects (sinks created before formats existed are JSON).
    #[default]
    Json,
    /// Avro records.
    Avro(AvroFormat),
    /// CSV lines.
    Csv {
        /// Field delimiter.
        delimiter: u8,
    },
    /// One column's text.
    Text {
        /// The value column.
        value: usize,
    },
}

/// An Avro sink's schemas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AvroFormat {
    /// The value schema (JSON): the row record, or for DEBEZIUM the
    /// envelope record around it.
    pub value_schema: String,
    /// The key schema (JSON), when the sink has key columns.
    pub key_schema: Option<String>,
    /// Schema registry URL (`http://host:port`).
    pub registry: Option<String>,
    /// The value schema's registry id (set when it is registered).
    #[serde(default)]
    pub value_id: Option<u32>,
    /// The key schema's registry id.
    #[serde(default)]
    pub key_id: Option<u32>,
    /// The column each field of the row record holds, in field order (the
    /// key record's fields are the key columns in order).
    pub row_columns: Vec<usize>,
}

impl std::fmt::Display for SinkFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkFormat::Json => f.write_str("json"),
            SinkFormat::Avro(AvroFormat {
                registry: Some(r), ..
            }) => write!(f, "avro (registry {r})"),
            SinkFormat::Avro(_) => f.write_str("avro"),
            SinkFormat::Csv { delimiter } => write!(f, "csv (delimiter '{}')", *delimiter as char),
            SinkFormat::Text { .. } => f.write_str("text"),
        }
    }
}

impl SinkFormat {
    /// Resolves a `FORMAT` clause for a sink of relation `name` whose rows
    /// have `arrow_schema`, keyed by the columns at `key`: derives or checks the
    /// Avro schemas, picks the TEXT column, refuses what the format cannot
    /// represent.
    pub fn resolve(
        clause: &Format,
        name: &str,
        arrow_schema: &ArrowSchema,
        key: &[usize],
        envelope: SinkEnvelope,
    ) -> Result<SinkFormat> {
        let columns = arrow_schema.fields();
        if envelope == SinkEnvelope::Debezium
            && !matches!(clause, Format::Json | Format::Avro { .. })
        {
            return Err(Error::unsupported(format!(
                "ENVELOPE DEBEZIUM needs FORMAT JSON or AVRO, not {}",
                clause.to_string().to_uppercase()
            )));
        }
        Ok(match clause {
            Format::Json => SinkFormat::Json,
            Format::Csv { delimiter, .. } => {
                if let Some(c) = columns
                    .iter()
                    .find(|c| matches!(c.data_type(), DataType::List(_) | DataType::LargeList(_)))
                {
                    return Err(Error::unsupported(format!(
                        "FORMAT CSV cannot write the array column \"{}\"",
                        c.name()
                    )));
                }
                SinkFormat::Csv {
                    delimiter: *delimiter,
                }
            }
            Format::Text => {
                let values: Vec<usize> = (0..columns.len()).filter(|i| !key.contains(i)).collect();
                let [value] = values.as_slice() else {
                    return Err(Error::unsupported(format!(
                        "FORMAT TEXT writes exactly one non-key column, and \"{name}\" has {}",
                        values.len()
                    )));
                };
                if key.len() > 1 {
                    return Err(Error::unsupported(
                        "FORMAT TEXT writes a key of exactly one column",
                    ));
                }
                let c = &columns[*value];
                // A NULL has no text, and a null Kafka value would read as a
                // tombstone (a delete).
                if c.is_nullable() {
                    return Err(Error::unsupported(format!(
                        "FORMAT TEXT cannot write NULLs, and column \"{}\" is nullable; sink a view selecting coalesce({0}, …) instead",
                        c.name()
                    )));
                }
                SinkFormat::Text { value: *value }
            }
            Format::Bytes => {
                return Err(Error::unsupported(
                    "sinks write FORMAT JSON, AVRO, CSV or TEXT",
                ))
            }
            Format::Avro { schema, registry } => {
                if let Some(r) = registry {
                    if !r.starts_with("http://") {
                        return Err(Error::unsupported(format!(
                            "schema registry URL '{r}': only http:// is supported"
                        )));
                    }
                }
                let record = avro_name(name);
                let all: Vec<usize> = (0..columns.len()).collect();
                let (row, row_columns) = match schema {
                    Some(text) => {
                        let s = Schema::parse_str(text)
                            .map_err(|e| Error::Plan(format!("invalid Avro schema: {e}")))?;
                        (text.clone(), check_row_schema(&s, columns)?)
                    }
                    None => (derive_record(&record, columns, &all)?.to_string(), all),
                };
                let value_schema = if envelope == SinkEnvelope::Debezium {
                    debezium_schema(&row, &record)?
                } else {
                    row
                };
                let key_schema = if key.is_empty() {
                    None
                } else {
                    Some(derive_record(&format!("{record}_key"), columns, key)?.to_string())
                };
                SinkFormat::Avro(AvroFormat {
                    value_schema,
                    key_schema,
                    registry: registry
                        .as_ref()
                        .map(|r| r.trim_end_matches('/').to_string()),
                    value_id: None,
                    key_id: None,
                    row_columns,
                })
            }
        })
    }
}

/// `name` as an Avro name: `[A-Za-z_][A-Za-z0-9_]*`.
fn avro_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert(0, '_');
    }
    s
}

/// The Avro type of a column's values (without the null of a nullable
/// column). Covers every Arrow type a catalog column type has (`text`,
/// `varchar`, `json` and `jsonb` are all `Utf8`, hence `string`; a
/// `timestamptz` is a UTC instant, so with or without a zone a timestamp is
/// `timestamp-micros`).
fn avro_type(ty: &DataType) -> Result<serde_json::Value> {
    Ok(match ty {
        DataType::Boolean => json!("boolean"),
        DataType::Int16 | DataType::Int32 => json!("int"),
        DataType::Int64 => json!("long"),
        DataType::Float32 => json!("float"),
        DataType::Float64 => json!("double"),
        DataType::Decimal128(precision, scale) if *scale >= 0 => json!({
            "type": "bytes", "logicalType": "decimal",
            "precision": precision, "scale": scale,
        }),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => json!("string"),
        DataType::Binary => json!("bytes"),
        DataType::Date32 => json!({"type": "int", "logicalType": "date"}),
        DataType::Time64(TimeUnit::Microsecond) => {
            json!({"type": "long", "logicalType": "time-micros"})
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            json!({"type": "long", "logicalType": "timestamp-micros"})
        }
        DataType::List(item) => {
            json!({"type": "array", "items": ["null", avro_type(item.data_type())?]})
        }
        DataType::Interval(_) => {
            // Avro's `duration` holds milliseconds: an interval's
            // microseconds would be lost.
            return Err(Error::unsupported(
                "FORMAT AVRO cannot write interval columns; sink a view casting them to text",
            ));
        }
        other => {
            return Err(Error::unsupported(format!(
                "FORMAT AVRO cannot write columns of type {}",
                pg_type_name(other)
            )))
        }
    })
}

/// The name PostgreSQL prints for the column type with values of Arrow
/// type `ty` (`text` for every string: `varchar`, `json` and `jsonb`
/// columns are `Utf8` too), for messages.
fn pg_type_name(ty: &DataType) -> String {
    match ty {
        DataType::Boolean => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Binary => "bytea".into(),
        DataType::Date32 => "date".into(),
        DataType::Time64(_) => "time without time zone".into(),
        DataType::Timestamp(_, None) => "timestamp without time zone".into(),
        DataType::Timestamp(_, Some(_)) => "timestamp with time zone".into(),
        DataType::Interval(_) => "interval".into(),
        DataType::List(item) => format!("{}[]", pg_type_name(item.data_type())),
        other => other.to_string(),
    }
}

/// A record schema of the columns at `indices`.
fn derive_record(name: &str, columns: &Fields, indices: &[usize]) -> Result<serde_json::Value> {
    let mut fields = Vec::with_capacity(indices.len());
    for &i in indices {
        let c = &columns[i];
        if avro_name(c.name()) != *c.name() {
            return Err(Error::unsupported(format!(
                "column \"{}\" is not a valid Avro field name; rename it in a view",
                c.name()
            )));
        }
        let t = avro_type(c.data_type())?;
        fields.push(if c.is_nullable() {
            json!({"name": c.name(), "type": ["null", t], "default": null})
        } else {
            json!({"name": c.name(), "type": t})
        });
    }
    Ok(json!({"type": "record", "name": name, "fields": fields}))
}

/// The DEBEZIUM envelope around a row record: `before` and `after` are
/// the row or null, `op` is `c`, `u` or `d`.
fn debezium_schema(row: &str, record: &str) -> Result<String> {
    let row_json: serde_json::Value =
        serde_json::from_str(row).map_err(|e| Error::Plan(format!("invalid Avro schema: {e}")))?;
    let parsed =
        Schema::parse_str(row).map_err(|e| Error::Plan(format!("invalid Avro schema: {e}")))?;
    // The row type is defined once (in `before`) and named in `after`.
    let full = parsed
        .name()
        .map(|n| n.fullname(None))
        .ok_or_else(|| Error::Plan("the Avro schema must be a record".into()))?;
    let envelope = json!({
        "type": "record",
        "name": format!("{record}_envelope"),
        "fields": [
            {"name": "before", "type": ["null", row_json], "default": null},
            {"name": "after", "type": ["null", full], "default": null},
            {"name": "op", "type": "string"},
        ],
    });
    let text = envelope.to_string();
    Schema::parse_str(&text).map_err(|e| Error::Plan(format!("invalid Avro schema: {e}")))?;
    Ok(text)
}

/// Checks a user's row schema against the columns: a record with exactly
/// one field per column, by name, each of a type that holds the column's
/// values exactly (and a union with null for a nullable column). Returns
/// the column of each field.
fn check_row_schema(s: &Schema, columns: &Fields) -> Result<Vec<usize>> {
    let Schema::Record(r) = s else {
        return Err(Error::Plan("the Avro schema must be a record".into()));
    };
    let mut mapping = Vec::with_capacity(r.fields.len());
    for f in &r.fields {
        let Some(i) = columns.iter().position(|c| *c.name() == f.name) else {
            return Err(Error::Plan(format!(
                "Avro field \"{}\" is not a column of the relation",
                f.name
            )));
        };
        mapping.push(i);
        let c = &columns[i];
        if !fits_field(c.data_type(), c.is_nullable(), &f.schema) {
            return Err(Error::Plan(format!(
                "Avro field \"{}\" of type {} does not hold column \"{}\" of type {}{}",
                f.name,
                serde_json::to_string(&f.schema).unwrap_or_default(),
                c.name(),
                pg_type_name(c.data_type()),
                if c.is_nullable() {
                    " (nullable: the field needs a union with \"null\")"
                } else {
                    ""
                }
            )));
        }
    }
    if let Some(c) = columns
        .iter()
        .find(|c| !r.fields.iter().any(|f| f.name == *c.name()))
    {
        return Err(Error::Plan(format!(
            "column \"{}\" has no field in the Avro schema",
            c.name()
        )));
    }
    Ok(mapping)
}

/// The one non-null branch of a union and whether it has a null branch;
/// `None` for a union of several non-null types.
fn nullable_branch(u: &UnionSchema) -> Option<(usize, &Schema, bool)> {
    let vs = u.variants();
    let mut non_null = vs
        .iter()
        .enumerate()
        .filter(|(_, v)| !matches!(v, Schema::Null));
    let (i, s) = non_null.next()?;
    if non_null.next().is_some() {
        return None;
    }
    Some((i, s, vs.iter().any(|v| matches!(v, Schema::Null))))
}

fn fits_field(ty: &DataType, nullable: bool, s: &Schema) -> bool {
    match s {
        Schema::Union(u) => match nullable_branch(u) {
            Some((_, inner, has_null)) => (has_null || !nullable) && fits(ty, inner),
            None => false,
        },
        s => !nullable && fits(ty, s),
    }
}

fn fits(ty: &DataType, s: &Schema) -> bool {
    use DataType as T;
    match (ty, s) {
        (T::Boolean, Schema::Boolean) => true,
        (T::Int16 | T::Int32, Schema::Int | Schema::Long) => true,
        (T::Int64, Schema::Long) => true,
        (T::Float32, Schema::Float | Schema::Double) => true,
        (T::Float64, Schema::Double) => true,
        (T::Decimal128(precision, scale), Schema::Decimal(d)) => {
            *scale >= 0 && d.scale == *scale as usize && d.precision >= *precision as usize
        }
        (T::Utf8 | T::LargeUtf8 | T::Utf8View, Schema::String) => true,
        (T::Binary, Schema::Bytes) => true,
        (T::Date32, Schema::Date) => true,
        (T::Time64(TimeUnit::Microsecond), Schema::TimeMicros) => true,
        (
            T::Timestamp(TimeUnit::Microsecond, _),
            Schema::TimestampMicros | Schema::LocalTimestampMicros,
        ) => true,
        // Array elements can be NULL.
        (T::List(item), Schema::Array(a)) => fits_field(item.data_type(), true, &a.items),
        _ => false,
    }
}

/// A sink format ready to encode: schemas parsed.
#[derive(Debug)]
pub enum Encoder {
    /// JSON.
    Json,
    /// Avro.
    Avro(Box<AvroEncoder>),
    /// CSV with this delimiter.
    Csv(u8),
    /// TEXT of this column.
    Text(usize),
}

/// Parsed Avro schemas and how record fields map to columns.
#[derive(Debug)]
pub struct AvroEncoder {
    value: Schema,
    key: Option<Schema>,
    /// The row record's fields: (name, column index, field schema).
    row_fields: Vec<(String, usize, Schema)>,
    /// The key record's fields.
    key_fields: Vec<(String, usize, Schema)>,
    value_id: Option<u32>,
    key_id: Option<u32>,
    debezium: bool,
}

/// The record fields of `s`, holding `columns` in field order.
fn record_fields(s: &Schema, columns: &[usize]) -> Result<Vec<(String, usize, Schema)>> {
    let Schema::Record(r) = s else {
        return Err(Error::Internal("sink Avro schema is not a record".into()));
    };
    if r.fields.len() != columns.len() {
        return Err(Error::Internal(
            "sink Avro schema does not match its columns".into(),
        ));
    }
    Ok(r.fields
        .iter()
        .zip(columns)
        .map(|(f, i)| (f.name.clone(), *i, f.schema.clone()))
        .collect())
}

impl Encoder {
    /// Compiles a resolved format for a sink keyed by the columns at `key`.
    pub fn new(format: &SinkFormat, key: &[usize], envelope: SinkEnvelope) -> Result<Encoder> {
        Ok(match format {
            SinkFormat::Json => Encoder::Json,
            SinkFormat::Csv { delimiter } => Encoder::Csv(*delimiter),
            SinkFormat::Text { value } => Encoder::Text(*value),
            SinkFormat::Avro(a) => {
                let parse = |t: &str| {
                    Schema::parse_str(t)
                        .map_err(|e| Error::Internal(format!("stored sink Avro schema: {e}")))
                };
                let value = parse(&a.value_schema)?;
                let debezium = envelope == SinkEnvelope::Debezium;
                let row = if debezium {
                    // The row record is `before`'s non-null branch.
                    match &value {
                        Schema::Record(r) => match r.fields.first().map(|f| &f.schema) {
                            Some(Schema::Union(u)) => nullable_branch(u).map(|(_, s, _)| s.clone()),
                            _ => None,
                        },
                        _ => None,
                    }
                    .ok_or_else(|| Error::Internal("sink Debezium Avro schema".into()))?
                } else {
                    value.clone()
                };
                let key_schema = a.key_schema.as_deref().map(parse).transpose()?;
                Encoder::Avro(Box::new(AvroEncoder {
                    row_fields: record_fields(&row, &a.row_columns)?,
                    key_fields: match &key_schema {
                        Some(k) => record_fields(k, key)?,
                        None => Vec::new(),
                    },
                    value,
                    key: key_schema,
                    value_id: a.value_id,
                    key_id: a.key_id,
                    debezium,
                }))
            }
        })
    }

    /// Every row's value.
    pub fn values(&self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        match self {
            Encoder::Json => json_rows(batch),
            Encoder::Csv(d) => csv_rows(batch, *d),
            Encoder::Text(i) => Ok((0..batch.num_rows())
                .map(|r| text(batch.column(*i), r).unwrap_or_default())
                .collect()),
            Encoder::Avro(a) => {
                let records = a.records(batch, &a.row_fields)?;
                a.write_all(&a.value, a.value_id, records)
            }
        }
    }

    /// Every row's key: the columns at `key` (non-empty).
    pub fn keys(&self, batch: &RecordBatch, key: &[usize]) -> Result<Vec<Option<Vec<u8>>>> {
        let some = |v: Vec<Vec<u8>>| v.into_iter().map(Some).collect();
        match self {
            Encoder::Json => Ok(some(json_rows(&batch.project(key)?)?)),
            Encoder::Csv(d) => Ok(some(csv_rows(&batch.project(key)?, *d)?)),
            // A NULL key column is a message without a key.
            Encoder::Text(_) => Ok((0..batch.num_rows())
                .map(|r| text(batch.column(key[0]), r))
                .collect()),
            Encoder::Avro(a) => {
                let k = a
                    .key
                    .as_ref()
                    .ok_or_else(|| Error::Internal("Avro sink without a key schema".into()))?;
                let records = a.records(batch, &a.key_fields)?;
                Ok(some(a.write_all(k, a.key_id, records)?))
            }
        }
    }

    /// DEBEZIUM events: per `(before row, after row, op)`, the value.
    pub fn debezium(
        &self,
        batch: &RecordBatch,
        events: &[(Option<usize>, Option<usize>, &str)],
    ) -> Result<Vec<Vec<u8>>> {
        match self {
            Encoder::Json => {
                let rows = json_rows(batch)?;
                let part = |i: Option<usize>| -> Result<serde_json::Value> {
                    match i {
                        None => Ok(serde_json::Value::Null),
                        Some(i) => serde_json::from_slice(&rows[i])
                            .map_err(|e| Error::Internal(e.to_string())),
                    }
                };
                events
                    .iter()
                    .map(|(b, a, op)| {
                        let ev = json!({"before": part(*b)?, "after": part(*a)?, "op": op});
                        Ok(ev.to_string().into_bytes())
                    })
                    .collect()
            }
            Encoder::Avro(a) if a.debezium => {
                let records = a.records(batch, &a.row_fields)?;
                let part = |i: Option<usize>| match i {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(i) => Value::Union(1, Box::new(records[i].clone())),
                };
                let envelopes = events
                    .iter()
                    .map(|(b, af, op)| {
                        Value::Record(vec![
                            ("before".into(), part(*b)),
                            ("after".into(), part(*af)),
                            ("op".into(), Value::String(op.to_string())),
                        ])
                    })
                    .collect();
                a.write_all(&a.value, a.value_id, envelopes)
            }
            _ => Err(Error::Internal(
                "ENVELOPE DEBEZIUM with a format that cannot write it".into(),
            )),
        }
    }
}

impl AvroEncoder {
    /// One record per row of the fields' columns.
    fn records(
        &self,
        batch: &RecordBatch,
        fields: &[(String, usize, Schema)],
    ) -> Result<Vec<Value>> {
        (0..batch.num_rows())
            .map(|r| {
                Ok(Value::Record(
                    fields
                        .iter()
                        .map(|(name, i, s)| Ok((name.clone(), to_avro(batch.column(*i), r, s)?)))
                        .collect::<Result<Vec<_>>>()?,
                ))
            })
            .collect()
    }

    /// The datums of `values`, each framed with the registry id if any.
    fn write_all(
        &self,
        schema: &Schema,
        id: Option<u32>,
        values: Vec<Value>,
    ) -> Result<Vec<Vec<u8>>> {
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|e| Error::Internal(format!("Avro writer: {e}")))?;
        values
            .into_iter()
            .map(|v| {
                let mut buf = Vec::new();
                if let Some(id) = id {
                    buf.push(0);
                    buf.extend_from_slice(&id.to_be_bytes());
                }
                writer
                    .write_value(&mut buf, v)
                    .map_err(|e| Error::Internal(format!("Avro encoding: {e}")))?;
                Ok(buf)
            })
            .collect()
    }
}

/// `col[row]` as an Avro value of schema `s` (checked at `CREATE SINK` to
/// hold the column's type).
fn to_avro(col: &ArrayRef, row: usize, s: &Schema) -> Result<Value> {
    if let Schema::Union(u) = s {
        let (i, inner, _) = nullable_branch(u)
            .ok_or_else(|| Error::Internal("sink Avro union of several types".into()))?;
        if col.is_null(row) {
            let n = u
                .variants()
                .iter()
                .position(|v| matches!(v, Schema::Null))
                .ok_or_else(|| Error::Internal("NULL for a non-nullable Avro field".into()))?;
            return Ok(Value::Union(n as u32, Box::new(Value::Null)));
        }
        return Ok(Value::Union(i as u32, Box::new(to_avro(col, row, inner)?)));
    }
    if col.is_null(row) {
        return Err(Error::Internal("NULL for a non-nullable Avro field".into()));
    }
    Ok(match (s, col.data_type()) {
        (Schema::Boolean, DataType::Boolean) => Value::Boolean(col.as_boolean().value(row)),
        (Schema::Int, DataType::Int16) => {
            Value::Int(col.as_primitive::<Int16Type>().value(row) as i32)
        }
        (Schema::Int, DataType::Int32) => Value::Int(col.as_primitive::<Int32Type>().value(row)),
        (Schema::Long, DataType::Int16) => {
            Value::Long(col.as_primitive::<Int16Type>().value(row) as i64)
        }
        (Schema::Long, DataType::Int32) => {
            Value::Long(col.as_primitive::<Int32Type>().value(row) as i64)
        }
        (Schema::Long, DataType::Int64) => Value::Long(col.as_primitive::<Int64Type>().value(row)),
        (Schema::Float, DataType::Float32) => {
            Value::Float(col.as_primitive::<Float32Type>().value(row))
        }
        (Schema::Double, DataType::Float32) => {
            Value::Double(col.as_primitive::<Float32Type>().value(row) as f64)
        }
        (Schema::Double, DataType::Float64) => {
            Value::Double(col.as_primitive::<Float64Type>().value(row))
        }
        (Schema::String, DataType::Utf8) => {
            Value::String(col.as_string::<i32>().value(row).to_string())
        }
        (Schema::String, DataType::LargeUtf8) => {
            Value::String(col.as_string::<i64>().value(row).to_string())
        }
        (Schema::String, DataType::Utf8View) => {
            Value::String(col.as_string_view().value(row).to_string())
        }
        (Schema::Bytes, DataType::Binary) => {
            Value::Bytes(col.as_binary::<i32>().value(row).to_vec())
        }
        (Schema::Decimal(_), DataType::Decimal128(_, _)) => Value::Decimal(Decimal::from(
            unscaled_bytes(col.as_primitive::<Decimal128Type>().value(row)),
        )),
        (Schema::Date, DataType::Date32) => {
            Value::Date(col.as_primitive::<Date32Type>().value(row))
        }
        (Schema::TimeMicros, DataType::Time64(TimeUnit::Microsecond)) => {
            Value::TimeMicros(col.as_primitive::<Time64MicrosecondType>().value(row))
        }
        (Schema::TimestampMicros, DataType::Timestamp(TimeUnit::Microsecond, _)) => {
            Value::TimestampMicros(col.as_primitive::<TimestampMicrosecondType>().value(row))
        }
        (Schema::LocalTimestampMicros, DataType::Timestamp(TimeUnit::Microsecond, _)) => {
            Value::LocalTimestampMicros(col.as_primitive::<TimestampMicrosecondType>().value(row))
        }
        (Schema::Array(a), DataType::List(_)) => {
            let items = col.as_list::<i32>().value(row);
            Value::Array(
                (0..items.len())
                    .map(|i| to_avro(&items, i, &a.items))
                    .collect::<Result<Vec<_>>>()?,
            )
        }
        (s, dt) => {
            return Err(Error::Internal(format!(
                "a {dt} column does not fit Avro {}",
                serde_json::to_string(s).unwrap_or_default()
            )))
        }
    })
}

/// An unscaled decimal as Avro wants it: big-endian two's complement,
/// shortest form (the sign bytes a shorter form implies are dropped).
fn unscaled_bytes(v: i128) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (x, next) = (b[start], b[start + 1]);
        let redundant = (x == 0 && next & 0x80 == 0) || (x == 0xFF && next & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    b[start..].to_vec()
}

/// The text of `col[row]` (PostgreSQL's text output); `None` for NULL.
fn text(col: &ArrayRef, row: usize) -> Option<Vec<u8>> {
    let mut s = String::new();
    crate::pgtext::write_text(col, row, &mut s).then(|| s.into_bytes())
}

/// JSON objects of `batch`, one per row.
fn json_rows(batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, datafusion::arrow::json::writer::LineDelimited>(&mut buf);
        w.write(batch)?;
        w.finish()?;
    }
    Ok(buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.to_vec())
        .collect())
}

/// CSV lines of `batch`, one per row, without line endings.
fn csv_rows(batch: &RecordBatch, delimiter: u8) -> Result<Vec<Vec<u8>>> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::csv::WriterBuilder::new()
            .with_header(false)
            .with_delimiter(delimiter)
            .build(&mut buf);
        w.write(batch)?;
    }
    // Rows end at a newline outside quotes (a quoted field may hold one;
    // a quote inside a quoted field is doubled, so toggling stays right).
    let mut rows = Vec::with_capacity(batch.num_rows());
    let (mut start, mut quoted) = (0, false);
    for (i, b) in buf.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => {
                let line = &buf[start..i];
                rows.push(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
                start = i + 1;
            }
            _ => {}
        }
    }
    if rows.len() != batch.num_rows() {
        return Err(Error::Internal(format!(
            "{} rows became {} CSV lines",
            batch.num_rows(),
            rows.len()
        )));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array,
        Int16Array, Int32Array, Int64Array, ListArray, StringArray, Time64MicrosecondArray,
        TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::{Field, IntervalUnit, Schema as ArrowSchema, SchemaRef};

    use super::*;
    use crate::connector::format::{Decoded, RecordDecoder, RecordRef};

    fn col(name: &str, ty: DataType, nullable: bool) -> Field {
        Field::new(name, ty, nullable)
    }

    fn list(item: DataType) -> DataType {
        DataType::List(Arc::new(Field::new_list_field(item, true)))
    }

    /// Every type a sink writes (the Arrow types of the catalog's column
    /// types), two rows: values, then NULLs where allowed.
    fn table() -> (SchemaRef, RecordBatch) {
        let columns = Arc::new(ArrowSchema::new(vec![
            col("id", DataType::Int32, false),
            col("flag", DataType::Boolean, true),
            col("small", DataType::Int16, true),
            col("big", DataType::Int64, true),
            col("r", DataType::Float32, true),
            col("d", DataType::Float64, true),
            col("price", DataType::Decimal128(10, 2), true),
            col("name", DataType::Utf8, true),
            col("raw", DataType::Binary, true),
            col("day", DataType::Date32, true),
            col("at_time", DataType::Time64(TimeUnit::Microsecond), true),
            col("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            col(
                "tstz",
                DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
                true,
            ),
        ]));
        let batch = RecordBatch::try_new(
            columns.clone(),
            vec![
                Arc::new(Int32Array::from(vec![1, 2])),
                Arc::new(BooleanArray::from(vec![Some(true), None])),
                Arc::new(Int16Array::from(vec![Some(-7), None])),
                Arc::new(Int64Array::from(vec![Some(1 << 40), None])),
                Arc::new(Float32Array::from(vec![Some(1.5), None])),
                Arc::new(Float64Array::from(vec![Some(-0.25), None])),
                Arc::new(
                    Decimal128Array::from(vec![Some(-12345), None])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
                Arc::new(StringArray::from(vec![Some("a, \"b\"; c"), None])),
                Arc::new(BinaryArray::from(vec![Some(&b"\x00\xff"[..]), None])),
                Arc::new(Date32Array::from(vec![Some(19_000), None])),
                Arc::new(Time64MicrosecondArray::from(vec![
                    Some(45_296_000_001),
                    None,
                ])),
                Arc::new(TimestampMicrosecondArray::from(vec![
                    Some(1_700_000_000_123_456),
                    None,
                ])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![Some(-1_000_001), None])
                        .with_timezone("+00:00"),
                ),
            ],
        )
        .unwrap();
        (columns, batch)
    }

    fn avro_clause(schema: Option<&str>) -> Format {
        Format::Avro {
            schema: schema.map(str::to_string),
            registry: None,
        }
    }

    #[allow(deprecated)]
    fn read(schema: &str, mut datum: &[u8]) -> Value {
        let s = Schema::parse_str(schema).unwrap();
        let v = apache_avro::from_avro_datum(&s, &mut datum, None).unwrap();
        assert!(datum.is_empty());
        v
    }

    fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
        let Value::Record(fields) = v else {
            panic!("not a record: {v:?}")
        };
        let v = &fields.iter().find(|(n, _)| n == name).unwrap().1;
        match v {
            Value::Union(_, inner) => inner,
            v => v,
        }
    }

    #[test]
    fn avro_derived_schema_writes_every_type_faithfully() {
        let (columns, batch) = table();
        let f = SinkFormat::resolve(
            &avro_clause(None),
            "my view",
            &columns,
            &[0],
            SinkEnvelope::Upsert,
        )
        .unwrap();
        let SinkFormat::Avro(a) = &f else { panic!() };
        let schema: serde_json::Value = serde_json::from_str(&a.value_schema).unwrap();
        assert_eq!(schema["name"], "my_view");
        assert_eq!(schema["fields"][0], json!({"name": "id", "type": "int"}));
        assert_eq!(
            schema["fields"][6]["type"],
            json!(["null", {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}])
        );
        assert_eq!(
            schema["fields"][11]["type"][1]["logicalType"],
            "timestamp-micros"
        );
        let enc = Encoder::new(&f, &[0], SinkEnvelope::Upsert).unwrap();
        let values = enc.values(&batch).unwrap();
        let v = read(&a.value_schema, &values[0]);
        assert_eq!(field(&v, "id"), &Value::Int(1));
        assert_eq!(field(&v, "flag"), &Value::Boolean(true));
        assert_eq!(field(&v, "small"), &Value::Int(-7));
        assert_eq!(field(&v, "big"), &Value::Long(1 << 40));
        assert_eq!(field(&v, "r"), &Value::Float(1.5));
        assert_eq!(field(&v, "d"), &Value::Double(-0.25));
        assert_eq!(
            field(&v, "price"),
            &Value::Decimal(Decimal::from(unscaled_bytes(-12345)))
        );
        assert_eq!(field(&v, "name"), &Value::String("a, \"b\"; c".into()));
        assert_eq!(field(&v, "raw"), &Value::Bytes(vec![0, 0xff]));
        assert_eq!(field(&v, "day"), &Value::Date(19_000));
        assert_eq!(field(&v, "at_time"), &Value::TimeMicros(45_296_000_001));
        assert_eq!(
            field(&v, "ts"),
            &Value::TimestampMicros(1_700_000_000_123_456)
        );
        assert_eq!(field(&v, "tstz"), &Value::TimestampMicros(-1_000_001));
        // NULLs are the union's null branch.
        let v = read(&a.value_schema, &values[1]);
        assert_eq!(field(&v, "id"), &Value::Int(2));
        for name in ["flag", "price", "ts", "raw"] {
            assert_eq!(field(&v, name), &Value::Null, "{name}");
        }
        // The key: a record of the key columns.
        let keys = enc.keys(&batch, &[0]).unwrap();
        let k = read(
            a.key_schema.as_deref().unwrap(),
            keys[1].as_deref().unwrap(),
        );
        assert_eq!(k, Value::Record(vec![("id".into(), Value::Int(2))]));

        // What a Sluice source reads back: the same values.
        let decoded = crate::connector::avro::Schemas::new(Some(&a.value_schema), None)
            .unwrap()
            .decode(&values[0])
            .unwrap();
        let price = &decoded.iter().find(|(n, _)| n == "price").unwrap().1;
        assert_eq!(
            crate::connector::avro::to_scalar(Some(price), &DataType::Decimal128(10, 2), false)
                .unwrap(),
            datafusion::common::ScalarValue::Decimal128(Some(-12345), 10, 2)
        );
    }

    #[test]
    fn unscaled_decimals_are_shortest_twos_complement() {
        assert_eq!(unscaled_bytes(0), vec![0]);
        assert_eq!(unscaled_bytes(127), vec![0x7f]);
        assert_eq!(unscaled_bytes(128), vec![0x00, 0x80]);
        assert_eq!(unscaled_bytes(-1), vec![0xff]);
        assert_eq!(unscaled_bytes(-129), vec![0xff, 0x7f]);
        assert_eq!(unscaled_bytes(i128::MIN).len(), 16);
    }

    #[test]
    fn avro_user_schemas_are_checked_against_the_columns() {
        let columns = ArrowSchema::new(vec![
            col("k", DataType::Int64, false),
            col("v", DataType::Utf8, true),
        ]);
        let resolve = |s: &str| {
            SinkFormat::resolve(
                &avro_clause(Some(s)),
                "t",
                &columns,
                &[],
                SinkEnvelope::Append,
            )
        };
        let ok = r#"{"type": "record", "name": "r", "fields": [
            {"name": "v", "type": ["string", "null"]}, {"name": "k", "type": "long"}]}"#;
        let SinkFormat::Avro(a) = resolve(ok).unwrap() else {
            panic!()
        };
        // Fields map to columns by name, in the schema's order.
        assert_eq!(a.row_columns, vec![1, 0]);
        let batch = RecordBatch::try_new(
            Arc::new(columns.clone()),
            vec![
                Arc::new(Int64Array::from(vec![5])),
                Arc::new(StringArray::from(vec![None::<&str>])),
            ],
        )
        .unwrap();
        let enc = Encoder::new(&SinkFormat::Avro(a.clone()), &[], SinkEnvelope::Append).unwrap();
        let v = read(ok, &enc.values(&batch).unwrap()[0]);
        assert_eq!(
            v,
            Value::Record(vec![
                ("v".into(), Value::Union(1, Box::new(Value::Null))),
                ("k".into(), Value::Long(5)),
            ])
        );

        for (schema, want) in [
            (
                r#"{"type": "record", "name": "r", "fields": [
                    {"name": "k", "type": "int"}, {"name": "v", "type": ["null", "string"]}]}"#,
                "Avro field \"k\" of type \"int\" does not hold column \"k\" of type bigint",
            ),
            (
                r#"{"type": "record", "name": "r", "fields": [
                    {"name": "k", "type": "long"}, {"name": "v", "type": "string"}]}"#,
                "(nullable: the field needs a union with \"null\")",
            ),
            (
                r#"{"type": "record", "name": "r", "fields": [{"name": "k", "type": "long"}]}"#,
                "column \"v\" has no field in the Avro schema",
            ),
            (
                r#"{"type": "record", "name": "r", "fields": [
                    {"name": "k", "type": "long"}, {"name": "v", "type": ["null", "string"]},
                    {"name": "x", "type": "long"}]}"#,
                "Avro field \"x\" is not a column",
            ),
            (r#""long""#, "the Avro schema must be a record"),
            ("{", "invalid Avro schema"),
        ] {
            let e = resolve(schema).unwrap_err();
            assert!(matches!(e, Error::Plan(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e}");
        }
        // Types Avro cannot hold exactly, names it cannot spell.
        let e = SinkFormat::resolve(
            &avro_clause(None),
            "t",
            &ArrowSchema::new(vec![col(
                "i",
                DataType::Interval(IntervalUnit::MonthDayNano),
                true,
            )]),
            &[],
            SinkEnvelope::Append,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        let e = SinkFormat::resolve(
            &avro_clause(None),
            "t",
            &ArrowSchema::new(vec![col("a b", DataType::Int32, true)]),
            &[],
            SinkEnvelope::Append,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a valid Avro field name"), "{e}");
    }

    #[test]
    fn avro_debezium_and_registry_framing() {
        let columns = ArrowSchema::new(vec![
            col("k", DataType::Int32, false),
            col("tags", list(DataType::Utf8), true),
        ]);
        let f = SinkFormat::resolve(
            &avro_clause(None),
            "t",
            &columns,
            &[0],
            SinkEnvelope::Debezium,
        )
        .unwrap();
        let SinkFormat::Avro(mut a) = f else { panic!() };
        a.value_id = Some(7);
        a.key_id = Some(8);
        let mut items = datafusion::arrow::array::ListBuilder::new(
            datafusion::arrow::array::StringBuilder::new(),
        );
        items.append_value([Some("x"), None]);
        items.append_value([Some("y")]);
        let tags: ListArray = items.finish();
        let batch = RecordBatch::try_new(
            Arc::new(ArrowSchema::new(vec![
                Field::new("k", DataType::Int32, false),
                Field::new("tags", tags.data_type().clone(), true),
            ])),
            vec![Arc::new(Int32Array::from(vec![1, 1])), Arc::new(tags)],
        )
        .unwrap();
        let enc = Encoder::new(&SinkFormat::Avro(a.clone()), &[0], SinkEnvelope::Debezium).unwrap();
        let events = enc.debezium(&batch, &[(Some(0), Some(1), "u")]).unwrap();
        assert_eq!(&events[0][..5], &[0, 0, 0, 0, 7]);
        let v = read(&a.value_schema, &events[0][5..]);
        assert_eq!(field(&v, "op"), &Value::String("u".into()));
        assert_eq!(
            field(field(&v, "before"), "tags"),
            &Value::Array(vec![
                Value::Union(1, Box::new(Value::String("x".into()))),
                Value::Union(0, Box::new(Value::Null)),
            ])
        );
        assert_eq!(field(field(&v, "after"), "k"), &Value::Int(1));
        let keys = enc.keys(&batch, &[0]).unwrap();
        assert_eq!(&keys[0].as_deref().unwrap()[..5], &[0, 0, 0, 0, 8]);
        // Through the envelope logic: an insert has no `before`.
        let spec = crate::connector::sink::SinkSpec {
            brokers: String::new(),
            topic: "t".into(),
            properties: vec![],
            connection: None,
            envelope: SinkEnvelope::Debezium,
            key: vec![0],
            partitions: None,
            format: SinkFormat::Avro(a.clone()),
            exactly_once: None,
            encoder: Default::default(),
        };
        let msgs =
            crate::connector::sink::encode(&spec, &batch.slice(1, 1), &Int64Array::from(vec![1]))
                .unwrap();
        let v = read(&a.value_schema, &msgs[0].value.as_ref().unwrap()[5..]);
        assert_eq!(field(&v, "before"), &Value::Null);
        assert_eq!(field(&v, "op"), &Value::String("c".into()));
    }

    #[test]
    fn csv_lines_read_back_through_the_csv_source_decoder() {
        let (columns, batch) = table();
        // arrow-csv's reader has no binary or time columns: those are
        // checked as text below.
        let keep: Vec<usize> = (0..columns.fields().len())
            .filter(|&i| {
                !matches!(
                    columns.field(i).data_type(),
                    DataType::Binary | DataType::Time64(_)
                )
            })
            .collect();
        let batch = batch.project(&keep).unwrap();
        let f = SinkFormat::resolve(
            &Format::Csv {
                delimiter: b';',
                header: false,
            },
            "t",
            &columns,
            &[0],
            SinkEnvelope::Upsert,
        )
        .unwrap();
        let enc = Encoder::new(&f, &[0], SinkEnvelope::Upsert).unwrap();
        let lines = enc.values(&batch).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&lines[1]),
            "2;;;;;;;;;;",
            "NULL is an empty field"
        );
        assert_eq!(
            enc.keys(&batch, &[0]).unwrap()[0].as_deref(),
            Some(&b"1"[..])
        );
        let records: Vec<RecordRef<'_>> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| RecordRef {
                topic: "t",
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
                key: None,
                payload: Some(l),
                headers: &[],
            })
            .collect();
        let d = RecordDecoder::new(
            Format::Csv {
                delimiter: b';',
                header: false,
            },
            batch.schema(),
            batch.num_columns(),
            vec![],
            &[],
        )
        .unwrap();
        let Decoded {
            batch: back, bad, ..
        } = d.decode(&records).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(back, batch);

        // A quoted field keeps its line break inside one message.
        let b = RecordBatch::try_new(
            Arc::new(ArrowSchema::new(vec![Field::new(
                "s",
                DataType::Utf8,
                true,
            )])),
            vec![Arc::new(StringArray::from(vec!["two\nlines", "x"]))],
        )
        .unwrap();
        assert_eq!(
            csv_rows(&b, b',').unwrap(),
            vec![b"\"two\nlines\"".to_vec(), b"x".to_vec()]
        );
        // Arrays have no CSV form.
        assert!(SinkFormat::resolve(
            &Format::Csv {
                delimiter: b',',
                header: false
            },
            "t",
            &ArrowSchema::new(vec![col("a", list(DataType::Int32), true)]),
            &[],
            SinkEnvelope::Append,
        )
        .is_err());
    }

    #[test]
    fn text_writes_one_column_and_refuses_more() {
        let (columns, batch) = table();
        let cols = ArrowSchema::new(vec![
            columns.field(0).clone(),
            col("name", DataType::Utf8, false),
        ]);
        let b = RecordBatch::try_new(
            Arc::new(ArrowSchema::new(vec![
                Field::new("id", DataType::Int32, false),
                Field::new("name", DataType::Utf8, false),
            ])),
            vec![
                batch.column(0).clone(),
                Arc::new(StringArray::from(vec!["é", ""])),
            ],
        )
        .unwrap();
        let f = SinkFormat::resolve(&Format::Text, "t", &cols, &[0], SinkEnvelope::Upsert).unwrap();
        assert_eq!(f, SinkFormat::Text { value: 1 });
        let enc = Encoder::new(&f, &[0], SinkEnvelope::Upsert).unwrap();
        assert_eq!(
            enc.values(&b).unwrap(),
            vec!["é".as_bytes().to_vec(), Vec::new()]
        );
        assert_eq!(
            enc.keys(&b, &[0]).unwrap(),
            vec![Some(b"1".to_vec()), Some(b"2".to_vec())]
        );
        // PostgreSQL's text: timestamps, booleans, decimals.
        let ts = Encoder::Text(11).values(&batch).unwrap();
        assert_eq!(ts[0], b"2023-11-14 22:13:20.123456".to_vec());
        assert_eq!(Encoder::Text(1).values(&batch).unwrap()[0], b"t".to_vec());
        assert_eq!(
            Encoder::Text(6).values(&batch).unwrap()[0],
            b"-123.45".to_vec()
        );
        for (cols, key, want) in [
            (cols.clone(), vec![], "exactly one non-key column"),
            (
                ArrowSchema::new(vec![columns.field(0).clone(), columns.field(7).clone()]),
                vec![0],
                "cannot write NULLs",
            ),
        ] {
            let e = SinkFormat::resolve(&Format::Text, "t", &cols, &key, SinkEnvelope::Append)
                .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        assert!(
            SinkFormat::resolve(&Format::Text, "t", &cols, &[0], SinkEnvelope::Debezium).is_err()
        );
    }
}
