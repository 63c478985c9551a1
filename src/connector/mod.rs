//! Connectors: where streams come from.
//!
//! A source is an **append-only stream addressed by offset**: row `n` of a
//! source is always the same row, so a source's whole position is one
//! `u64`, stored in the same RocksDB `WriteBatch` as the view state it
//! produced (see [`crate::epoch`]). That is what makes recovery exact:
//! after a crash the source resumes at the committed offset, and the
//! events after it are produced again, identically — no gaps, no
//! duplicates.
//!
//! The connectors are the built-in [`generator`]s (a counter and Nexmark),
//! which need no external system, so a fresh Sluice can stream out of the
//! box, and [`kafka`] topics — also offset-addressed logs, one offset per
//! partition — read in batches through [`kafka_batch`] and decoded by
//! [`mod@format`] (flat JSON objects by [`flat_json`]). Sinks ([`sink`])
//! write a relation's changes to Kafka in a [`sink_format`]. The module
//! speaks Arrow and knows nothing of SQL: it imports neither the catalog
//! (which imports connector types) nor any layer above. Sink formats work
//! from a relation's Arrow schema (an Avro schema is derived from, and
//! checked against, its fields' types) and write TEXT with the leaf
//! [`crate::pgtext`], the PostgreSQL text form the wire layer sends too.

pub mod avro;
pub mod flat_json;
pub mod format;
pub mod generator;
pub mod kafka;
pub mod kafka_batch;
pub mod sink;
pub mod sink_format;

pub use format::{BadRecord, Envelope, Format, Meta, RecordDecoder};
pub use generator::{GeneratorSpec, NexmarkTable};
pub use kafka::{KafkaReader, KafkaSpec, Positions};
