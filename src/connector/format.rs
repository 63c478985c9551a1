//! Record formats: Kafka records (key, value, metadata) → Arrow rows.
//!
//! A [`RecordDecoder`] turns a slice of records into one `RecordBatch` with
//! the source's columns, plus one [`BadRecord`] per record it could not
//! decode. Decoding is batched — all values of a poll go to one decoder at
//! once: [`super::flat_json`] for flat JSON objects, arrow-json for any
//! other JSON (and whatever the flat path declines), arrow-csv — and falls
//! back to decoding record by record only when the batch fails, so one
//! malformed record costs one error row, never the batch and never the
//! pipeline.
//!
//! Formats:
//! - `JSON`: one object per record; fields by column name (unknown fields
//!   are ignored, missing ones are NULL); a `json`/`jsonb` column takes the
//!   field's JSON text whatever its shape, so nested objects stay reachable.
//! - `CSV`: one line per record, columns by position.
//! - `TEXT` / `BYTES`: the whole value as the one value column.
//!
//! Metadata columns (`INCLUDE KEY | PARTITION | OFFSET | TIMESTAMP |
//! HEADERS`) follow the value columns.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::ScalarValue;
use serde::{Deserialize, Serialize};

use super::avro;
use super::flat_json::FlatJson;
use crate::error::{Error, Result};

/// How a record's value is encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per record.
    Json,
    /// One CSV line per record.
    Csv {
        /// Field delimiter.
        delimiter: u8,
        /// A record that is the header line (the column names) is skipped,
        /// so producers may repeat it (e.g. at the start of every file).
        #[serde(default)]
        header: bool,
    },
    /// The value as UTF-8 text, one column.
    Text,
    /// The raw value bytes, one column.
    Bytes,
    /// Avro binary: with an inline writer schema, or in the Confluent
    /// schema-registry wire format (magic byte 0, schema id, datum).
    Avro {
        /// Inline schema (JSON), or `None` with a registry.
        schema: Option<String>,
        /// Schema registry URL (`http://host:port`).
        registry: Option<String>,
    },
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Json => f.write_str("json"),
            Format::Csv { delimiter, header } => write!(
                f,
                "csv (delimiter '{}'{})",
                *delimiter as char,
                if *header { ", header" } else { "" }
            ),
            Format::Text => f.write_str("text"),
            Format::Bytes => f.write_str("bytes"),
            Format::Avro {
                registry: Some(r), ..
            } => write!(f, "avro (registry {r})"),
            Format::Avro { .. } => f.write_str("avro"),
        }
    }
}

/// How records map to changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// Every record is a new row (append-only).
    #[default]
    None,
    /// The Kafka key is the primary key: a record replaces the row with its
    /// key, a tombstone (null value) deletes it.
    Upsert,
    /// Debezium change events `{"before": …, "after": …, "op": "c|r|u|d"}`,
    /// keyed by the Kafka key like UPSERT: `after` replaces the row, `d`
    /// (or a tombstone) deletes it.
    Debezium,
}

/// One keyed change of an UPSERT/DEBEZIUM source, in record order.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedOp {
    /// The Kafka key.
    pub key: Vec<u8>,
    /// The row (an index into the decoded batch) that now has this key, or
    /// `None` for a delete.
    pub row: Option<usize>,
}

/// What a [`RecordDecoder`] makes of a slice of records.
#[derive(Debug)]
pub struct Decoded {
    /// Rows of the good records, in record order.
    pub batch: RecordBatch,
    /// Records that failed to decode.
    pub bad: Vec<BadRecord>,
    /// Keyed envelopes: every good record's change, in record order.
    pub ops: Option<Vec<KeyedOp>>,
}

/// A metadata column a source can include.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Meta {
    /// The record key (bytea).
    Key,
    /// The partition (integer).
    Partition,
    /// The offset (bigint).
    Offset,
    /// The record timestamp (timestamp).
    Timestamp,
    /// The headers, as a JSON array of `{"key": …, "value": …}` (json).
    Headers,
}

impl Meta {
    /// Parses `KEY` / `PARTITION` / … (upper case).
    pub fn parse(word: &str) -> Option<Meta> {
        Some(match word {
            "KEY" => Meta::Key,
            "PARTITION" => Meta::Partition,
            "OFFSET" => Meta::Offset,
            "TIMESTAMP" => Meta::Timestamp,
            "HEADERS" => Meta::Headers,
            _ => return None,
        })
    }

    /// The column's default name.
    pub fn default_name(self) -> &'static str {
        match self {
            Meta::Key => "key",
            Meta::Partition => "partition",
            Meta::Offset => "offset",
            Meta::Timestamp => "timestamp",
            Meta::Headers => "headers",
        }
    }

    /// The column's Arrow type.
    pub fn data_type(self) -> DataType {
        match self {
            Meta::Key => DataType::Binary,
            Meta::Partition => DataType::Int32,
            Meta::Offset => DataType::Int64,
            Meta::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Meta::Headers => DataType::Utf8,
        }
    }
}

/// A record header: name and value (`None` for a null value).
pub type HeaderRef<'a> = (&'a str, Option<&'a [u8]>);

/// One Kafka record, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Timestamp in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Value; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    /// Headers (name, value).
    pub headers: &'a [HeaderRef<'a>],
}

/// How many bytes of a bad record's value the error table keeps.
pub const RAW_PREFIX: usize = 256;

/// A record that could not be decoded: what the error table stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Why it was rejected.
    pub error: String,
    /// The first [`RAW_PREFIX`] bytes of its value.
    pub raw: Vec<u8>,
    /// Its full value length.
    pub len: usize,
}

impl BadRecord {
    fn new(r: &RecordRef<'_>, error: impl Into<String>) -> BadRecord {
        let raw = r.payload.unwrap_or_default();
        BadRecord {
            topic: r.topic.to_string(),
            partition: r.partition,
            offset: r.offset,
            error: error.into(),
            raw: raw[..raw.len().min(RAW_PREFIX)].to_vec(),
            len: raw.len(),
        }
    }
}

/// Decodes records of one source into its rows.
#[derive(Debug, Clone)]
pub struct RecordDecoder {
    format: Format,
    /// The source's full schema: value columns, then metadata columns.
    schema: SchemaRef,
    /// How many leading columns come from the value.
    value_columns: usize,
    /// What the trailing columns hold.
    include: Vec<Meta>,
    /// Value columns arrow-json/arrow-csv decode (JSON: all but the json
    /// ones).
    decoded_schema: SchemaRef,
    /// JSON: (column index, field name) of json/jsonb columns.
    json_columns: Vec<(usize, String)>,
    /// Largest value accepted, in bytes.
    max_record_bytes: usize,
    envelope: Envelope,
    /// Avro: the inline schema, and registry schemas by id.
    avro: Option<Arc<avro::Schemas>>,
    /// JSON: the fast path for flat records, when every decoded column
    /// has a type it handles (see [`super::flat_json`]).
    flat: Option<Arc<FlatJson>>,
}

/// Values larger than this are rejected into the error table.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

impl RecordDecoder {
    /// A decoder for `schema`: its first `value_columns` columns come from
    /// the value in `format`, the rest are `include`d metadata, in order.
    /// `json_columns` names the value columns declared `json`/`jsonb`.
    pub fn new(
        format: Format,
        schema: SchemaRef,
        value_columns: usize,
        include: Vec<Meta>,
        json_columns: &[usize],
    ) -> Result<RecordDecoder> {
        if value_columns + include.len() != schema.fields().len() {
            return Err(Error::Internal(
                "source schema does not match its columns".into(),
            ));
        }
        let value_fields = &schema.fields()[..value_columns];
        if matches!(format, Format::Text | Format::Bytes) && value_columns != 1 {
            return Err(Error::Plan(format!(
                "FORMAT {} needs exactly one value column, not {value_columns}",
                format.to_string().to_uppercase()
            )));
        }
        match format {
            Format::Text if value_fields[0].data_type() != &DataType::Utf8 => {
                return Err(Error::Plan("FORMAT TEXT needs one text column".into()))
            }
            Format::Bytes if value_fields[0].data_type() != &DataType::Binary => {
                return Err(Error::Plan("FORMAT BYTES needs one bytea column".into()))
            }
            _ => {}
        }
        let json: Vec<(usize, String)> = if matches!(format, Format::Json | Format::Avro { .. }) {
            json_columns
                .iter()
                .map(|&i| (i, value_fields[i].name().clone()))
                .collect()
        } else {
            Vec::new()
        };
        let decoded_schema = Arc::new(Schema::new(
            value_fields
                .iter()
                .enumerate()
                .filter(|(i, _)| !json.iter().any(|(j, _)| j == i))
                .map(|(_, f)| f.as_ref().clone())
                .collect::<Vec<Field>>(),
        ));
        let avro = match &format {
            Format::Avro { schema, registry } => Some(Arc::new(avro::Schemas::new(
                schema.as_deref(),
                registry.as_deref(),
            )?)),
            _ => None,
        };
        let flat = match format {
            Format::Json => FlatJson::new(decoded_schema.clone()),
            _ => None,
        };
        Ok(RecordDecoder {
            avro,
            flat,
            format,
            schema,
            value_columns,
            include,
            decoded_schema,
            json_columns: json,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            envelope: Envelope::None,
        })
    }

    /// Decodes records of a keyed envelope (UPSERT, DEBEZIUM).
    pub fn with_envelope(mut self, envelope: Envelope) -> Result<Self> {
        if envelope == Envelope::Debezium && self.format != Format::Json {
            return Err(Error::Plan("ENVELOPE DEBEZIUM needs FORMAT JSON".into()));
        }
        if envelope != Envelope::None && !self.include.contains(&Meta::Key) {
            return Err(Error::Internal(
                "a keyed envelope needs the key column".into(),
            ));
        }
        self.envelope = envelope;
        Ok(self)
    }

    /// Whether the source's rows carry the metadata column `m`.
    pub fn includes(&self, m: Meta) -> bool {
        self.include.contains(&m)
    }

    /// Rejects values over `bytes`.
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// The rows of the records it could decode, in order, and the records
    /// it could not; for a keyed envelope also each record's change.
    pub fn decode(&self, records: &[RecordRef<'_>]) -> Result<Decoded> {
        let keyed = self.envelope != Envelope::None;
        // Debezium: the row is the event's `after`; `d` deletes.
        let mut unwrapped: Vec<Option<Vec<u8>>> = Vec::new();
        if self.envelope == Envelope::Debezium {
            unwrapped = records.iter().map(|r| debezium_after(r.payload)).collect();
        }
        let mut bad = Vec::new();
        // (record index, its value to decode); deletes have no value.
        let mut good: Vec<(usize, RecordRef<'_>)> = Vec::with_capacity(records.len());
        let mut deletes: Vec<usize> = Vec::new();
        let header = self.csv_header();
        for (i, r) in records.iter().enumerate() {
            if let (Some(h), Some(p)) = (&header, r.payload) {
                if trim_line(p) == h.as_bytes() {
                    continue;
                }
            }
            if keyed && r.key.is_none() {
                bad.push(BadRecord::new(
                    r,
                    "a keyed (UPSERT/DEBEZIUM) record has no key",
                ));
                continue;
            }
            let mut r = *r;
            if self.envelope == Envelope::Debezium && r.payload.is_some() {
                match &unwrapped[i] {
                    Some(after) => r.payload = Some(after.as_slice()),
                    None => match debezium_op(r.payload) {
                        Ok(DebeziumOp::Delete) => {
                            deletes.push(i);
                            continue;
                        }
                        Ok(DebeziumOp::Other) => {
                            bad.push(BadRecord::new(&r, "Debezium event without \"after\""));
                            continue;
                        }
                        Err(e) => {
                            bad.push(BadRecord::new(&r, e));
                            continue;
                        }
                    },
                }
            }
            match r.payload {
                None if keyed => deletes.push(i),
                None => bad.push(BadRecord::new(&r, "record has no value (a tombstone)")),
                Some(p) if p.len() > self.max_record_bytes => bad.push(BadRecord::new(
                    &r,
                    format!(
                        "record value of {} bytes exceeds the limit of {} bytes",
                        p.len(),
                        self.max_record_bytes
                    ),
                )),
                Some(_) => good.push((i, r)),
            }
        }
        let refs: Vec<RecordRef<'_>> = good.iter().map(|(_, r)| *r).collect();
        let (values, good, refs) = match self.decode_values(&refs) {
            Ok(v) => (v, good, refs),
            Err(_) => {
                // Find the culprits: one record at a time.
                let mut parts = Vec::new();
                let mut kept = Vec::new();
                for (i, r) in &good {
                    match self.decode_values(std::slice::from_ref(r)) {
                        Ok(b) => {
                            parts.push(b);
                            kept.push((*i, *r));
                        }
                        Err(e) => bad.push(BadRecord::new(r, decode_message(&e))),
                    }
                }
                let schema = self.value_schema();
                let refs = kept.iter().map(|(_, r)| *r).collect();
                (concat_batches(&schema, &parts)?, kept, refs)
            }
        };
        let mut columns: Vec<ArrayRef> = values.columns().to_vec();
        for m in &self.include {
            columns.push(meta_column(*m, &refs));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        bad.sort_by_key(|b| (b.partition, b.offset));
        let ops = keyed.then(|| {
            let mut ops: Vec<(usize, KeyedOp)> = good
                .iter()
                .enumerate()
                .map(|(row, (i, r))| {
                    (
                        *i,
                        KeyedOp {
                            key: r.key.unwrap_or_default().to_vec(),
                            row: Some(row),
                        },
                    )
                })
                .chain(deletes.iter().map(|&i| {
                    (
                        i,
                        KeyedOp {
                            key: records[i].key.unwrap_or_default().to_vec(),
                            row: None,
                        },
                    )
                }))
                .collect();
            ops.sort_by_key(|(i, _)| *i);
            ops.into_iter().map(|(_, op)| op).collect()
        });
        Ok(Decoded { batch, bad, ops })
    }

    /// `CSV (HEADER)`: the header line to skip.
    fn csv_header(&self) -> Option<String> {
        match self.format {
            Format::Csv {
                delimiter,
                header: true,
            } => Some(
                self.schema.fields()[..self.value_columns]
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(&(delimiter as char).to_string()),
            ),
            _ => None,
        }
    }

    fn value_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.schema.fields()[..self.value_columns].to_vec(),
        ))
    }

    /// The value columns of `records`, or an error if any record fails.
    fn decode_values(&self, records: &[RecordRef<'_>]) -> Result<RecordBatch> {
        let payloads = records.iter().map(|r| r.payload.unwrap_or_default());
        let n = records.len();
        let columns: Vec<ArrayRef> = match &self.format {
            Format::Text => {
                let mut b = StringBuilder::with_capacity(n, 0);
                for p in payloads {
                    b.append_value(
                        std::str::from_utf8(p)
                            .map_err(|e| Error::Decode(format!("value is not valid UTF-8: {e}")))?,
                    );
                }
                vec![Arc::new(b.finish())]
            }
            Format::Bytes => {
                let mut b = BinaryBuilder::with_capacity(n, 0);
                for p in payloads {
                    b.append_value(p);
                }
                vec![Arc::new(b.finish())]
            }
            Format::Json => {
                let decoded = self.decode_json(records)?;
                if self.json_columns.is_empty() {
                    decoded.columns().to_vec()
                } else {
                    self.merge_json_columns(records, decoded)?
                }
            }
            Format::Avro { .. } => {
                let schemas = self
                    .avro
                    .as_ref()
                    .ok_or_else(|| Error::Internal("Avro decoder without schemas".into()))?;
                let fields = &self.schema.fields()[..self.value_columns];
                let json: Vec<bool> = (0..self.value_columns)
                    .map(|i| self.json_columns.iter().any(|(j, _)| *j == i))
                    .collect();
                let mut cols: Vec<Vec<ScalarValue>> = (0..self.value_columns)
                    .map(|_| Vec::with_capacity(n))
                    .collect();
                for p in payloads {
                    let record = schemas.decode(p)?;
                    for (i, f) in fields.iter().enumerate() {
                        let v = record.iter().find(|(k, _)| k == f.name()).map(|(_, v)| v);
                        let v = avro::to_scalar(v, f.data_type(), json[i])?;
                        if v.is_null() && !f.is_nullable() {
                            return Err(Error::Decode(format!(
                                "field \"{}\" is missing or null but the column is NOT NULL",
                                f.name()
                            )));
                        }
                        cols[i].push(v);
                    }
                }
                cols.into_iter()
                    .zip(fields.iter())
                    .map(|(c, f)| {
                        if c.is_empty() {
                            Ok(datafusion::arrow::array::new_empty_array(f.data_type()))
                        } else {
                            Ok(ScalarValue::iter_to_array(c)?)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Format::Csv { delimiter, .. } => {
                let mut d = datafusion::arrow::csv::ReaderBuilder::new(self.decoded_schema.clone())
                    .with_header(false)
                    .with_delimiter(*delimiter)
                    .with_batch_size(n.max(1))
                    .build_decoder();
                for p in payloads {
                    let p = trim_line(p);
                    if p.contains(&b'\n') {
                        return Err(Error::Decode("a CSV record holds one line".into()));
                    }
                    feed(&mut d, p, |d, b| Ok(d.decode(b)?))?;
                    feed(&mut d, b"\n", |d, b| Ok(d.decode(b)?))?;
                }
                let batch = d.flush()?;
                let batch =
                    batch.unwrap_or_else(|| RecordBatch::new_empty(self.decoded_schema.clone()));
                if batch.num_rows() != n {
                    return Err(Error::Decode(format!(
                        "{n} CSV records decoded to {} rows",
                        batch.num_rows()
                    )));
                }
                batch.columns().to_vec()
            }
        };
        Ok(RecordBatch::try_new(self.value_schema(), columns)?)
    }

    fn decode_json(&self, records: &[RecordRef<'_>]) -> Result<RecordBatch> {
        let n = records.len();
        if let Some(flat) = &self.flat {
            let payloads: Vec<&[u8]> = records
                .iter()
                .map(|r| r.payload.unwrap_or_default())
                .collect();
            if let Some(batch) = flat.decode(&payloads) {
                return Ok(batch);
            }
        }
        let mut d = datafusion::arrow::json::ReaderBuilder::new(self.decoded_schema.clone())
            .with_batch_size(n.max(1) + 1)
            .with_coerce_primitive(true)
            .build_decoder()?;
        for r in records {
            let before = d.len();
            feed(&mut d, r.payload.unwrap_or_default(), |d, b| {
                Ok(d.decode(b)?)
            })?;
            // Each record must hold exactly one JSON object.
            if d.len() != before + 1 {
                return Err(Error::Decode(format!(
                    "a JSON record holds one object, not {}",
                    d.len() - before
                )));
            }
        }
        let batch = d
            .flush()?
            .unwrap_or_else(|| RecordBatch::new_empty(self.decoded_schema.clone()));
        if batch.num_rows() != n {
            return Err(Error::Decode(format!(
                "{n} JSON records decoded to {} rows",
                batch.num_rows()
            )));
        }
        Ok(batch)
    }

    /// Puts the json/jsonb columns (the field's JSON text) between the
    /// columns arrow-json decoded.
    fn merge_json_columns(
        &self,
        records: &[RecordRef<'_>],
        decoded: RecordBatch,
    ) -> Result<Vec<ArrayRef>> {
        let mut builders: Vec<StringBuilder> = self
            .json_columns
            .iter()
            .map(|_| StringBuilder::with_capacity(records.len(), 0))
            .collect();
        for r in records {
            let v: serde_json::Value = serde_json::from_slice(r.payload.unwrap_or_default())
                .map_err(|e| Error::Decode(format!("invalid JSON: {e}")))?;
            for ((_, name), b) in self.json_columns.iter().zip(builders.iter_mut()) {
                match v.get(name) {
                    None | Some(serde_json::Value::Null) => b.append_null(),
                    Some(x) => b.append_value(x.to_string()),
                }
            }
        }
        let mut json: Vec<Option<ArrayRef>> = builders
            .into_iter()
            .map(|mut b| Some(Arc::new(b.finish()) as ArrayRef))
            .collect();
        let mut plain = decoded.columns().iter();
        let mut out = Vec::with_capacity(self.value_columns);
        for i in 0..self.value_columns {
            match self.json_columns.iter().position(|(j, _)| *j == i) {
                Some(k) => out.push(
                    json[k]
                        .take()
                        .ok_or_else(|| Error::Internal("json column used twice".into()))?,
                ),
                None => out.push(
                    plain
                        .next()
                        .ok_or_else(|| Error::Internal("decoded column missing".into()))?
                        .clone(),
                ),
            }
        }
        // A non-nullable json column must be present.
        for (k, (i, name)) in self.json_columns.iter().enumerate() {
            let _ = k;
            if !self.schema.field(*i).is_nullable() && out[*i].null_count() > 0 {
                return Err(Error::Decode(format!(
                    "field \"{name}\" is missing or null but the column is NOT NULL"
                )));
            }
        }
        Ok(out)
    }
}

enum DebeziumOp {
    Delete,
    Other,
}

/// A Debezium event's `after`, re-serialized, when it has one.
fn debezium_after(payload: Option<&[u8]>) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
    let after = v.get("after")?;
    if after.is_null() {
        return None;
    }
    serde_json::to_vec(after).ok()
}

fn debezium_op(payload: Option<&[u8]>) -> std::result::Result<DebeziumOp, String> {
    let v: serde_json::Value = serde_json::from_slice(payload.unwrap_or_default())
        .map_err(|e| format!("invalid Debezium event: {e}"))?;
    match v.get("op").and_then(|o| o.as_str()) {
        Some("d") => Ok(DebeziumOp::Delete),
        Some(_) => Ok(DebeziumOp::Other),
        None => Err("Debezium event without \"op\"".into()),
    }
}

/// A CSV record without its line ending.
fn trim_line(p: &[u8]) -> &[u8] {
    let p = p.strip_suffix(b"\n").unwrap_or(p);
    p.strip_suffix(b"\r").unwrap_or(p)
}

/// A decoding failure as the error table shows it: arrow's text without
/// the "internal error:" an unclassified arrow error would carry.
fn decode_message(e: &Error) -> String {
    match e {
        Error::Internal(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Feeds all of `bytes` to a push decoder.
fn feed<D>(
    d: &mut D,
    mut bytes: &[u8],
    mut decode: impl FnMut(&mut D, &[u8]) -> Result<usize>,
) -> Result<()> {
    while !bytes.is_empty() {
        let used = decode(d, bytes)?;
        if used == 0 {
            return Err(Error::Decode("decoder made no progress".into()));
        }
        bytes = &bytes[used..];
    }
    Ok(())
}

fn meta_column(m: Meta, records: &[RecordRef<'_>]) -> ArrayRef {
    let n = records.len();
    match m {
        Meta::Key => {
            let mut b = BinaryBuilder::with_capacity(n, 0);
            for r in records {
                b.append_option(r.key);
            }
            Arc::new(b.finish())
        }
        Meta::Partition => {
            let mut b = Int32Builder::with_capacity(n);
            for r in records {
                b.append_value(r.partition);
            }
            Arc::new(b.finish())
        }
        Meta::Offset => {
            let mut b = Int64Builder::with_capacity(n);
            for r in records {
                b.append_value(r.offset);
            }
            Arc::new(b.finish())
        }
        Meta::Timestamp => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(n);
            for r in records {
                b.append_option(r.timestamp_ms.map(|ms| ms.saturating_mul(1000)));
            }
            Arc::new(b.finish())
        }
        Meta::Headers => {
            let mut b = StringBuilder::with_capacity(n, 0);
            for r in records {
                let hs: Vec<serde_json::Value> = r
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        serde_json::json!({
                            "key": k,
                            "value": v.map(|v| String::from_utf8_lossy(v).into_owned()),
                        })
                    })
                    .collect();
                b.append_value(serde_json::Value::Array(hs).to_string());
            }
            Arc::new(b.finish())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    fn rec(offset: i64, payload: &[u8]) -> RecordRef<'_> {
        RecordRef {
            topic: "t",
            partition: 0,
            offset,
            timestamp_ms: Some(1_700_000_000_000),
            key: Some(b"k"),
            payload: Some(payload),
            headers: &[],
        }
    }

    fn schema(fields: Vec<(&str, DataType)>) -> SchemaRef {
        Arc::new(Schema::new(
            fields
                .into_iter()
                .map(|(n, t)| Field::new(n, t, true))
                .collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn json_bad_records_go_to_errors_and_the_rest_decode() {
        let s = schema(vec![
            ("a", DataType::Int64),
            ("b", DataType::Utf8),
            ("j", DataType::Utf8),
            ("offset", DataType::Int64),
        ]);
        let d = RecordDecoder::new(Format::Json, s, 3, vec![Meta::Offset], &[2]).unwrap();
        let Decoded { batch, bad, ops } = d
            .decode(&[
                rec(0, br#"{"a": 1, "b": "x", "j": {"n": [1, 2]}}"#),
                rec(1, br#"{"a": "#),
                rec(2, br#"{"a": "not a number"}"#),
                rec(3, br#"{"b": 7, "extra": true}"#),
                rec(4, br#"{"a": 1}{"a": 2}"#),
            ])
            .unwrap();
        assert!(ops.is_none());
        let text = pretty_format_batches(&[batch]).unwrap().to_string();
        assert!(
            text.contains(r#"| 1 | x | {"n":[1,2]} | 0      |"#),
            "{text}"
        );
        assert!(text.contains("|   | 7 |             | 3      |"), "{text}");
        assert_eq!(
            bad.iter().map(|b| b.offset).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        assert_eq!(bad[0].raw, br#"{"a": "#.to_vec());
    }

    #[test]
    fn keyed_envelopes_keep_record_order() {
        let s = schema(vec![("a", DataType::Int64), ("key", DataType::Binary)]);
        let d = RecordDecoder::new(Format::Json, s.clone(), 1, vec![Meta::Key], &[])
            .unwrap()
            .with_envelope(Envelope::Upsert)
            .unwrap();
        let mut tomb = rec(1, b"");
        tomb.payload = None;
        let mut keyless = rec(3, br#"{"a": 9}"#);
        keyless.key = None;
        let Decoded { batch, bad, ops } = d
            .decode(&[
                rec(0, br#"{"a": 1}"#),
                tomb,
                rec(2, br#"{"a": 2}"#),
                keyless,
                rec(4, b"{"),
            ])
            .unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(bad.iter().map(|b| b.offset).collect::<Vec<_>>(), vec![3, 4]);
        let rows: Vec<Option<usize>> = ops.unwrap().iter().map(|o| o.row).collect();
        assert_eq!(rows, vec![Some(0), None, Some(1)]);

        let d = RecordDecoder::new(Format::Json, s, 1, vec![Meta::Key], &[])
            .unwrap()
            .with_envelope(Envelope::Debezium)
            .unwrap();
        let Decoded { batch, bad, ops } = d
            .decode(&[
                rec(0, br#"{"before": null, "after": {"a": 1}, "op": "c"}"#),
                rec(1, br#"{"before": {"a": 1}, "after": null, "op": "d"}"#),
                rec(2, br#"{"after": null, "op": "u"}"#),
                rec(3, br#"{"before": {"a": 1}, "after": {"a": 5}, "op": "u"}"#),
            ])
            .unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(bad.len(), 1);
        let rows: Vec<Option<usize>> = ops.unwrap().iter().map(|o| o.row).collect();
        assert_eq!(rows, vec![Some(0), None, Some(1)]);
    }

    #[test]
    fn csv_text_bytes_and_metadata() {
        let s = schema(vec![("a", DataType::Int32), ("b", DataType::Utf8)]);
        let csv = Format::Csv {
            delimiter: b';',
            header: true,
        };
        let d = RecordDecoder::new(csv, s, 2, vec![], &[]).unwrap();
        let Decoded { batch, bad, .. } = d
            .decode(&[
                rec(9, b"a;b\r\n"),
                rec(0, b"1;x\n"),
                rec(1, b"2"),
                rec(2, b"3;y;z"),
                rec(3, b"4;w"),
            ])
            .unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(bad.iter().map(|b| b.offset).collect::<Vec<_>>(), vec![1, 2]);

        let s = schema(vec![
            ("v", DataType::Utf8),
            ("key", DataType::Binary),
            ("ts", Meta::Timestamp.data_type()),
        ]);
        let d =
            RecordDecoder::new(Format::Text, s, 1, vec![Meta::Key, Meta::Timestamp], &[]).unwrap();
        let mut tomb = rec(1, b"");
        tomb.payload = None;
        let Decoded { batch, bad, .. } = d
            .decode(&[rec(0, b"hello"), tomb, rec(2, b"\xff")])
            .unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(bad.len(), 2);
        let text = pretty_format_batches(&[batch]).unwrap().to_string();
        assert!(
            text.contains("| hello | 6b  | 2023-11-14T22:13:20 |"),
            "{text}"
        );

        let d = RecordDecoder::new(
            Format::Bytes,
            schema(vec![("v", DataType::Binary)]),
            1,
            vec![],
            &[],
        )
        .unwrap()
        .with_max_record_bytes(3);
        let Decoded { batch, bad, .. } = d.decode(&[rec(0, b"abc"), rec(1, b"abcd")]).unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert!(bad[0].error.contains("exceeds"), "{:?}", bad);
    }
}
