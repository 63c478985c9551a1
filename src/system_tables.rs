//! System tables about sources, answered from live engine state.
//!
//! - `sluice_source_errors`: every record a Kafka source could not decode
//!   (source, topic, partition, offset, error, the first bytes of the
//!   value, its length, when it was read). Stored in RocksDB with the epoch
//!   that read the record, so it is exactly as durable as the views.
//! - `sluice_source_partitions`: one row per partition of every Kafka
//!   source: committed offset, high watermark, lag, records and bytes read,
//!   records per second, bad records, state.
//! - `sluice_sinks`: one row per Kafka sink: the relation it reads, its
//!   topic, state (`running`, `retrying: …`, `failed: …`), messages Kafka
//!   acknowledged since start, and its lag — commits staged in its outbox
//!   that Kafka has not acknowledged yet.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, Float64Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use crate::catalog::{source_errors_prefix, SourceConnector, StoredBadRecord};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::query::SystemTables;

/// Name of the bad-record table.
pub const SOURCE_ERRORS: &str = "sluice_source_errors";
/// Name of the partition table.
pub const SOURCE_PARTITIONS: &str = "sluice_source_partitions";
/// Name of the sink table.
pub const SINKS: &str = "sluice_sinks";

impl SystemTables for Engine {
    fn names(&self) -> Vec<String> {
        vec![SOURCE_ERRORS.into(), SOURCE_PARTITIONS.into(), SINKS.into()]
    }

    fn table(&self, name: &str) -> Option<Result<RecordBatch>> {
        match name {
            SOURCE_ERRORS => Some(source_errors(self)),
            SOURCE_PARTITIONS => Some(source_partitions(self)),
            SINKS => Some(sinks(self)),
            _ => None,
        }
    }
}

/// Outbox entries (commits) of sink `id` not yet acknowledged by Kafka.
pub fn sink_pending(engine: &Engine, id: u32) -> Result<u64> {
    let mut n = 0u64;
    engine
        .store
        .scan_prefix(&crate::connector::sink::outbox_prefix(id), |_, _| {
            n += 1;
            Ok(true)
        })?;
    Ok(n)
}

fn sinks(engine: &Engine) -> Result<RecordBatch> {
    let status = engine.sink_status();
    let mut name = StringBuilder::new();
    let mut from = StringBuilder::new();
    let mut topic = StringBuilder::new();
    let mut state = StringBuilder::new();
    let mut sent = Int64Builder::new();
    let mut pending = Int64Builder::new();
    for s in engine.catalog.sinks() {
        let st = status.iter().find(|(i, _)| *i == s.id).map(|(_, st)| st);
        name.append_value(&s.name);
        from.append_value(&s.from);
        topic.append_value(&s.spec.topic);
        state.append_value(st.map_or("stopped", |st| st.state.as_str()));
        sent.append_value(st.map_or(0, |st| st.sent) as i64);
        pending.append_value(sink_pending(engine, s.id)? as i64);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("sink", DataType::Utf8, false),
        Field::new("from", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("sent", DataType::Int64, false),
        Field::new("pending_commits", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(name.finish()),
        Arc::new(from.finish()),
        Arc::new(topic.finish()),
        Arc::new(state.finish()),
        Arc::new(sent.finish()),
        Arc::new(pending.finish()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn source_errors(engine: &Engine) -> Result<RecordBatch> {
    let mut source = StringBuilder::new();
    let mut topic = StringBuilder::new();
    let mut partition = Int32Builder::new();
    let mut offset = Int64Builder::new();
    let mut error = StringBuilder::new();
    let mut raw = BinaryBuilder::new();
    let mut len = Int64Builder::new();
    let mut time = TimestampMicrosecondBuilder::new();
    for s in engine.catalog.sources() {
        if !matches!(s.def.connector, SourceConnector::Kafka(_)) {
            continue;
        }
        engine
            .store
            .scan_prefix(&source_errors_prefix(s.def.id), |_, v| {
                let r: StoredBadRecord = serde_json::from_slice(v)
                    .map_err(|e| Error::Storage(format!("corrupt bad record: {e}")))?;
                source.append_value(&s.def.name);
                topic.append_value(&r.record.topic);
                partition.append_value(r.record.partition);
                offset.append_value(r.record.offset);
                error.append_value(&r.record.error);
                raw.append_value(&r.record.raw);
                len.append_value(r.record.len as i64);
                time.append_value(r.time_ms.saturating_mul(1000));
                Ok(true)
            })?;
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("raw", DataType::Binary, false),
        Field::new("raw_length", DataType::Int64, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(source.finish()),
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(error.finish()),
        Arc::new(raw.finish()),
        Arc::new(len.finish()),
        Arc::new(time.finish()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn source_partitions(engine: &Engine) -> Result<RecordBatch> {
    let parts = engine.driver.partitions();
    let mut source = StringBuilder::new();
    let mut topic = StringBuilder::new();
    let mut partition = Int32Builder::new();
    let mut offset = Int64Builder::new();
    let mut high = Int64Builder::new();
    let mut lag = Int64Builder::new();
    let mut records = Int64Builder::new();
    let mut bytes = Int64Builder::new();
    let mut rate = Float64Builder::new();
    let mut errors = Int64Builder::new();
    let mut state = StringBuilder::new();
    for p in parts {
        source.append_value(&p.source);
        topic.append_value(&p.topic);
        partition.append_value(p.partition);
        offset.append_value(p.offset);
        high.append_option(p.stats.high_watermark);
        lag.append_option(p.stats.high_watermark.map(|h| (h - p.offset).max(0)));
        records.append_value(p.stats.records as i64);
        bytes.append_value(p.stats.bytes as i64);
        rate.append_value(p.stats.rate);
        errors.append_value(p.stats.errors as i64);
        state.append_value(&p.state);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("high_watermark", DataType::Int64, true),
        Field::new("lag", DataType::Int64, true),
        Field::new("records", DataType::Int64, false),
        Field::new("bytes", DataType::Int64, false),
        Field::new("records_per_second", DataType::Float64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("state", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(source.finish()),
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(high.finish()),
        Arc::new(lag.finish()),
        Arc::new(records.finish()),
        Arc::new(bytes.finish()),
        Arc::new(rate.finish()),
        Arc::new(errors.finish()),
        Arc::new(state.finish()),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}
