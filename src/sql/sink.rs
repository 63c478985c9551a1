//! `CREATE SINK … INTO KAFKA`, `DROP SINK`, `SHOW SINKS` (parsed with the
//! source statements in [`super::source`]).
//!
//! A sink is created under the writer lock: the relation's current rows
//! (the snapshot) go into the sink's outbox in the same atomic write as its
//! catalog entry, and the sink starts receiving changes from the next
//! commit on — so nothing is missed and nothing is sent twice between the
//! snapshot and the changes. See [`crate::connector::sink`] for the outbox.

use std::sync::Arc;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::catalog::{MvOwner, Relation, SinkDef};
use crate::connector::sink::{
    encode, encode_entry, outbox_key, ExactlyOnce, SinkEnvelope, SinkSpec,
};
use crate::connector::sink_format::SinkFormat;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::query::StoredTable;
use crate::sql::{Outcome, Rows};

/// What `CREATE SINK` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSink {
    /// Sink name.
    pub name: String,
    /// `IF NOT EXISTS`.
    pub if_not_exists: bool,
    /// The relation it reads (empty with `query`).
    pub from: String,
    /// `AS SELECT …` (or `FROM (SELECT …)`): the query's text.
    pub query: Option<String>,
    /// `BROKERS`, or empty with a connection.
    pub brokers: String,
    /// `CONNECTION`.
    pub connection: Option<String>,
    /// `TOPIC`.
    pub topic: String,
    /// `PARTITIONS` of a topic Sluice creates.
    pub partitions: Option<i32>,
    /// librdkafka properties.
    pub properties: Vec<(String, String)>,
    /// `ENVELOPE`, if given.
    pub envelope: Option<SinkEnvelope>,
    /// `KEY (…)` column names.
    pub key: Vec<String>,
    /// `FORMAT`, if given (default JSON).
    pub format: Option<crate::connector::Format>,
    /// `EXACTLY ONCE`.
    pub exactly_once: bool,
}

/// Runs `CREATE SINK`.
pub async fn create(engine: &Engine, c: &CreateSink) -> Result<Outcome> {
    let done = Outcome::Command {
        tag: "CREATE SINK",
        rows: None,
    };
    let _writer = engine.writer().await;
    if engine.catalog.get(&c.name).is_some() || engine.catalog.sink(&c.name).is_some() {
        if c.if_not_exists {
            return Ok(done);
        }
        return Err(Error::DuplicateObject(c.name.clone()));
    }
    let Some(query) = &c.query else {
        create_locked(engine, c, &c.from).await?;
        return Ok(done);
    };
    // `AS SELECT`: the query runs as a materialized view the sink owns
    // (unlisted, dropped with the sink).
    let view = owned_view_name(&c.name);
    if engine.catalog.get(&view).is_some() {
        return Err(Error::DuplicateObject(view));
    }
    let q = crate::sql::parse_query(query, "CREATE SINK … AS takes one SELECT")?;
    crate::sql::create_mv::create_locked(engine, view.clone(), &q, MvOwner::Sink).await?;
    if let Err(e) = create_locked(engine, c, &view).await {
        let _ = engine.drop_objects(std::slice::from_ref(&view));
        return Err(e);
    }
    Ok(done)
}

/// Most messages in one outbox entry of a sink's snapshot.
const SNAPSHOT_ENTRY_MESSAGES: usize = 10_000;

/// The name of the materialized view that `CREATE SINK name … AS SELECT`
/// runs its query in.
pub fn owned_view_name(sink: &str) -> String {
    format!("sluice_sink_{sink}")
}

/// Creates sink `c` reading relation `from`; callers hold the writer lock.
async fn create_locked(engine: &Engine, c: &CreateSink, from: &str) -> Result<()> {
    // (id, columns, Arrow schema, stored rows, can delete)
    let (from_id, columns, schema, table, deletes) = match engine.catalog.get(from) {
        Some(Relation::Table(t)) => (
            t.def.id,
            t.def.columns.clone(),
            t.schema.clone(),
            Some(t.clone()),
            true,
        ),
        Some(Relation::MaterializedView(m)) => (
            m.def.id,
            m.def.columns.clone(),
            m.table.schema.clone(),
            Some(m.table.clone()),
            !m.def.append_only,
        ),
        Some(Relation::Source(s)) => match &s.table {
            Some(t) => (
                s.def.id,
                t.def.columns.clone(),
                t.schema.clone(),
                Some(t.clone()),
                true,
            ),
            // An append-only source keeps no rows: no snapshot, every
            // record from the next epoch on.
            None => (
                s.def.id,
                s.def.columns.clone(),
                s.def.schema(),
                None,
                false,
            ),
        },
        Some(Relation::View(_)) => {
            return Err(Error::unsupported(format!(
                "\"{from}\" is a view; sink a materialized view, or use CREATE SINK … AS SELECT * FROM {from}"
            )))
        }
        None => return Err(Error::UndefinedTable(from.to_string())),
    };
    let key = c
        .key
        .iter()
        .map(|k| {
            columns
                .iter()
                .position(|col| &col.name == k)
                .ok_or_else(|| {
                    Error::UndefinedColumn(format!(
                        "column \"{k}\" of KEY does not exist in \"{}\"",
                        from
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let envelope = match (c.envelope, key.is_empty(), deletes) {
        (Some(e), _, _) => e,
        (None, false, _) => SinkEnvelope::Upsert,
        (None, true, false) => SinkEnvelope::Append,
        (None, true, true) => {
            return Err(Error::Syntax(format!(
                "\"{}\" can delete rows: give ENVELOPE UPSERT KEY (…) or ENVELOPE DEBEZIUM KEY (…)",
                from
            )))
        }
    };
    if envelope == SinkEnvelope::Append && deletes {
        return Err(Error::unsupported(format!(
            "ENVELOPE APPEND needs an insert-only input, and \"{}\" can delete rows; use ENVELOPE UPSERT KEY (…) or DEBEZIUM KEY (…)",
            from
        )));
    }
    if envelope != SinkEnvelope::Append && key.is_empty() {
        return Err(Error::Syntax(
            "ENVELOPE UPSERT and DEBEZIUM need KEY (columns)".into(),
        ));
    }
    let (mut brokers, mut properties) = (c.brokers.clone(), Vec::new());
    if let Some(conn) = &c.connection {
        let def = engine.catalog.connection(conn).ok_or_else(|| {
            Error::UndefinedObject(format!("connection \"{conn}\" does not exist"))
        })?;
        brokers = def.brokers;
        properties = def.properties;
    }
    properties.extend(c.properties.iter().cloned());
    // The transactional id is the writer's to set (and only with EXACTLY
    // ONCE: a transactional producer cannot send outside transactions).
    let transactional_id = properties
        .iter()
        .position(|(k, _)| k == "transactional.id")
        .map(|i| properties.remove(i).1);
    let exactly_once =
        match (c.exactly_once, transactional_id) {
            (true, transactional_id) => Some(ExactlyOnce {
                transactional_id,
                token: new_token(),
            }),
            (false, None) => None,
            (false, Some(_)) => return Err(Error::Syntax(
                "'transactional.id' is for EXACTLY ONCE sinks: add EXACTLY ONCE to INTO KAFKA (…)"
                    .into(),
            )),
        };
    let format = SinkFormat::resolve(
        c.format.as_ref().unwrap_or(&crate::connector::Format::Json),
        from,
        &schema,
        &key,
        envelope,
    )?;
    let spec = SinkSpec {
        brokers,
        topic: c.topic.clone(),
        properties,
        connection: c.connection.clone(),
        envelope,
        key,
        partitions: c.partitions,
        format,
        exactly_once,
        encoder: Default::default(),
    };
    // librdkafka blocks while it contacts the brokers (and registers the
    // Avro schemas).
    let mut check = spec;
    let spec = tokio::task::spawn_blocking(move || check.prepare().map(|()| check))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    // The snapshot: the relation's rows now, as insertions.
    let mut msgs = Vec::new();
    if let Some(table) = table {
        for b in StoredTable::new(table, engine.store.clone()).read(&[], None)? {
            let ones = Int64Array::from(vec![1i64; b.num_rows()]);
            msgs.extend(encode(&spec, &b, &ones)?);
        }
    }
    let def = engine.catalog.create_sink(
        SinkDef {
            id: 0,
            name: c.name.clone(),
            from: from.to_string(),
            from_id,
            columns,
            spec,
        },
        |id, batch| {
            // The snapshot as entries 0, 1, … of bounded size: the writer
            // holds at most a round of entries in memory, however big the
            // relation.
            for (seq, part) in msgs.chunks(SNAPSHOT_ENTRY_MESSAGES).enumerate() {
                batch.put(outbox_key(id, seq as u64), encode_entry(part));
            }
            Ok(())
        },
    )?;
    if let Err(e) = engine.start_sink(&def) {
        let _ = engine
            .catalog
            .drop_relations(std::slice::from_ref(&def.name));
        return Err(e);
    }
    Ok(())
}

/// A token unique to this sink's creation: the creation time and the
/// process (see [`ExactlyOnce::token`]).
fn new_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{:x}", std::process::id())
}

/// Runs `DROP SINK`.
pub async fn drop(engine: &Engine, if_exists: bool, name: &str) -> Result<Outcome> {
    let _writer = engine.writer().await;
    if engine.catalog.sink(name).is_none() {
        if !if_exists {
            return Err(Error::UndefinedObject(format!(
                "sink \"{name}\" does not exist"
            )));
        }
    } else {
        let mut names = vec![name.to_string()];
        // The view of a `CREATE SINK … AS SELECT` goes with its sink.
        let view = owned_view_name(name);
        if let Some(Relation::MaterializedView(m)) = engine.catalog.get(&view) {
            if m.def.owner == MvOwner::Sink && engine.catalog.dependents(&view) == names {
                names.push(view);
            }
        }
        crate::sql::drop::drop_collected(engine, &names)?;
    }
    Ok(Outcome::Command {
        tag: "DROP SINK",
        rows: None,
    })
}

fn show_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("from", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("envelope", DataType::Utf8, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("sent", DataType::UInt64, false),
        Field::new("pending", DataType::UInt64, false),
    ]))
}

/// Runs `SHOW SINKS`: format (and delivery), state, messages sent since start, outbox entries
/// (commits) not yet acknowledged by Kafka.
pub fn show(engine: &Engine) -> Result<Outcome> {
    let sinks = engine.catalog.sinks();
    let status = engine.sink_status();
    let pending = sinks
        .iter()
        .map(|s| crate::system_tables::sink_pending(engine, s.id))
        .collect::<Result<Vec<_>>>()?;
    let st = |id: u32| {
        status
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, s)| s.clone())
    };
    let schema = show_schema();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                sinks.iter().map(|s| s.name.clone()),
            )),
            Arc::new(StringArray::from_iter_values(
                sinks.iter().map(|s| s.from.clone()),
            )),
            Arc::new(StringArray::from_iter_values(
                sinks.iter().map(|s| s.spec.topic.clone()),
            )),
            Arc::new(StringArray::from_iter_values(sinks.iter().map(|s| {
                match s.spec.envelope {
                    SinkEnvelope::Append => "append",
                    SinkEnvelope::Upsert => "upsert",
                    SinkEnvelope::Debezium => "debezium",
                }
                .to_string()
            }))),
            Arc::new(StringArray::from_iter_values(sinks.iter().map(|s| {
                let f = s.spec.format.to_string();
                if s.spec.exactly_once.is_some() {
                    format!("{f}, exactly once")
                } else {
                    f
                }
            }))),
            Arc::new(StringArray::from_iter_values(sinks.iter().map(|s| {
                st(s.id)
                    .map(|x| x.state)
                    .unwrap_or_else(|| "stopped".into())
            }))),
            Arc::new(UInt64Array::from_iter_values(
                sinks.iter().map(|s| st(s.id).map(|x| x.sent).unwrap_or(0)),
            )),
            Arc::new(UInt64Array::from(pending)),
        ],
    )?;
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
    use crate::catalog::types::SqlType;
    use crate::connector::Format;

    /// Sink formats see a relation's Arrow schema: every column type maps to
    /// an Arrow type they write — except an interval in Avro (its
    /// microseconds do not fit Avro's `duration`) and an array in CSV — and
    /// a derived Avro schema passes the check of a user's schema.
    #[test]
    fn sink_formats_write_every_column_type() {
        use SqlType as T;
        let scalars = [
            T::Bool,
            T::Int2,
            T::Int4,
            T::Int8,
            T::Float4,
            T::Float8,
            T::Numeric {
                precision: 12,
                scale: 3,
            },
            T::Text,
            T::Varchar(None),
            T::Varchar(Some(5)),
            T::Bytea,
            T::Date,
            T::Time,
            T::Timestamp,
            T::TimestampTz,
            T::Interval,
            T::Json,
            T::Jsonb,
        ];
        let types = scalars
            .iter()
            .flat_map(|t| [t.clone(), T::Array(Box::new(t.clone()))]);
        for ty in types {
            let interval = matches!(&ty, T::Interval)
                || matches!(&ty, T::Array(inner) if **inner == T::Interval);
            let array = matches!(ty, T::Array(_));
            let schema = Schema::new(vec![
                Field::new("k", SqlType::Int4.arrow_type(), false),
                Field::new("v", ty.arrow_type(), false),
            ]);
            let avro = Format::Avro {
                schema: None,
                registry: None,
            };
            let csv = Format::Csv {
                delimiter: b',',
                header: false,
            };
            for (format, refused) in [
                (Format::Json, false),
                (avro, interval),
                (csv, array),
                (Format::Text, false),
            ] {
                let r = SinkFormat::resolve(&format, "t", &schema, &[0], SinkEnvelope::Upsert);
                assert_eq!(r.is_err(), refused, "{ty:?} as {format}: {r:?}");
                if let Ok(SinkFormat::Avro(a)) = r {
                    let given = Format::Avro {
                        schema: Some(a.value_schema),
                        registry: None,
                    };
                    SinkFormat::resolve(&given, "t", &schema, &[0], SinkEnvelope::Upsert)
                        .unwrap_or_else(|e| panic!("{ty:?}: {e}"));
                }
            }
        }
    }
}
