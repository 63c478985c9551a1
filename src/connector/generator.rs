//! Built-in generator sources: `COUNTER` and `NEXMARK`.
//!
//! A generator is a pure function from offset to row, so it is its own
//! replay log: [`GeneratorSpec::generate`]`(from, to)` returns rows
//! `from..to`, the same rows every time. The epoch driver asks for the rows
//! that are due by wall-clock time ([`GeneratorSpec::rows_due`]); a bounded
//! `SELECT` on the source and the backfill of a new view regenerate rows
//! `0..committed offset`.
//!
//! Nexmark events come from the `nexmark` crate (RisingWave's port of the
//! reference generator). The three Nexmark tables are three sources over
//! one global event sequence in which every 50 events hold 1 person,
//! 3 auctions and 46 bids; a source generates only its own type, and the
//! ids it produces (a bid's `auction` and `bidder`) refer to the persons and
//! auctions of the same sequence, so joins across the three sources match.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    ArrayRef, Int64Array, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use nexmark::config::NexmarkConfig;
use nexmark::event::{Event, EventType};
use nexmark::EventGenerator;
use serde::{Deserialize, Serialize};

use crate::error::{DataErrorKind, Error, Result};

/// Events per Nexmark cycle, and where each type sits in it.
const CYCLE: u64 = 50;

/// One of the three Nexmark streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NexmarkTable {
    /// New users.
    Person,
    /// New auctions.
    Auction,
    /// Bids on auctions.
    Bid,
}

impl NexmarkTable {
    /// Parses `person` / `auction` / `bid`.
    pub fn parse(s: &str) -> Result<NexmarkTable> {
        match s.to_ascii_lowercase().as_str() {
            "person" => Ok(NexmarkTable::Person),
            "auction" => Ok(NexmarkTable::Auction),
            "bid" => Ok(NexmarkTable::Bid),
            other => Err(Error::data(
                DataErrorKind::InvalidParameterValue,
                format!("NEXMARK TABLE must be 'person', 'auction' or 'bid', not '{other}'"),
            )),
        }
    }

    /// (position in the 50-event cycle, events of this type per cycle).
    fn slot(self) -> (u64, u64) {
        match self {
            NexmarkTable::Person => (0, 1),
            NexmarkTable::Auction => (1, 3),
            NexmarkTable::Bid => (4, 46),
        }
    }

    /// How many events of this type the first `events` events hold.
    pub fn rows_below(self, events: u64) -> u64 {
        let (start, per_cycle) = self.slot();
        let rem = events % CYCLE;
        (events / CYCLE) * per_cycle + rem.saturating_sub(start).min(per_cycle)
    }

    fn event_type(self) -> EventType {
        match self {
            NexmarkTable::Person => EventType::Person,
            NexmarkTable::Auction => EventType::Auction,
            NexmarkTable::Bid => EventType::Bid,
        }
    }
}

/// What a generator source produces; persisted in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeneratorSpec {
    /// One `counter BIGINT` column: 1, 2, 3, …
    Counter {
        /// Rows per second; 0 means as fast as the engine takes them.
        rate: u64,
        /// Stop after this many rows.
        max: Option<u64>,
    },
    /// One of the Nexmark streams.
    Nexmark {
        /// Which stream.
        table: NexmarkTable,
        /// Events per second of the whole person+auction+bid sequence;
        /// 0 means as fast as the engine takes them.
        rate: u64,
        /// Stop after this many events of the whole sequence.
        events: Option<u64>,
        /// Event time of the first event, ms since the Unix epoch; fixed at
        /// creation so regenerated events carry the same timestamps.
        base_time_ms: u64,
    },
}

/// Event-time spacing used when a Nexmark source has no rate limit.
const NEXMARK_NOMINAL_RATE: u64 = 10_000;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, None)
}

impl GeneratorSpec {
    /// The rows' schema.
    pub fn schema(&self) -> SchemaRef {
        let f = |n: &str, t: DataType| Field::new(n, t, false);
        let fields = match self {
            GeneratorSpec::Counter { .. } => vec![f("counter", DataType::Int64)],
            GeneratorSpec::Nexmark { table, .. } => match table {
                NexmarkTable::Person => vec![
                    f("id", DataType::Int64),
                    f("name", DataType::Utf8),
                    f("email_address", DataType::Utf8),
                    f("credit_card", DataType::Utf8),
                    f("city", DataType::Utf8),
                    f("state", DataType::Utf8),
                    f("date_time", ts()),
                    f("extra", DataType::Utf8),
                ],
                NexmarkTable::Auction => vec![
                    f("id", DataType::Int64),
                    f("item_name", DataType::Utf8),
                    f("description", DataType::Utf8),
                    f("initial_bid", DataType::Int64),
                    f("reserve", DataType::Int64),
                    f("date_time", ts()),
                    f("expires", ts()),
                    f("seller", DataType::Int64),
                    f("category", DataType::Int64),
                    f("extra", DataType::Utf8),
                ],
                NexmarkTable::Bid => vec![
                    f("auction", DataType::Int64),
                    f("bidder", DataType::Int64),
                    f("price", DataType::Int64),
                    f("channel", DataType::Utf8),
                    f("url", DataType::Utf8),
                    f("date_time", ts()),
                    f("extra", DataType::Utf8),
                ],
            },
        };
        Arc::new(Schema::new(fields))
    }

    /// The total number of rows the source will ever produce, if bounded.
    pub fn limit(&self) -> Option<u64> {
        match self {
            GeneratorSpec::Counter { max, .. } => *max,
            GeneratorSpec::Nexmark { table, events, .. } => events.map(|e| table.rows_below(e)),
        }
    }

    /// The offset the source should have reached `elapsed` after it
    /// (re)started at offset `start`, at its rate, capped by its limit.
    /// `u64::MAX` (capped) when the rate is unlimited.
    pub fn rows_due(&self, start: u64, elapsed: Duration) -> u64 {
        let per_second = match self {
            GeneratorSpec::Counter { rate, .. } => *rate as f64,
            GeneratorSpec::Nexmark { table, rate, .. } => {
                let (_, per_cycle) = table.slot();
                *rate as f64 * per_cycle as f64 / CYCLE as f64
            }
        };
        let due = if per_second == 0.0 {
            u64::MAX
        } else {
            start.saturating_add((per_second * elapsed.as_secs_f64()) as u64)
        };
        match self.limit() {
            Some(limit) => due.min(limit),
            None => due,
        }
    }

    /// Rows `from..to`.
    pub fn generate(&self, from: u64, to: u64) -> Result<RecordBatch> {
        let n = to.saturating_sub(from);
        let schema = self.schema();
        let columns: Vec<ArrayRef> = match self {
            GeneratorSpec::Counter { .. } => {
                let values: Int64Array = (from..to).map(|i| i as i64 + 1).collect();
                vec![Arc::new(values)]
            }
            GeneratorSpec::Nexmark {
                table,
                rate,
                base_time_ms,
                ..
            } => {
                let rate = if *rate == 0 {
                    NEXMARK_NOMINAL_RATE
                } else {
                    *rate
                } as usize;
                let config = NexmarkConfig {
                    base_time: *base_time_ms,
                    first_rate: rate,
                    next_rate: rate,
                    ..NexmarkConfig::default()
                };
                let events = EventGenerator::new(config)
                    .with_type_filter(table.event_type())
                    .with_offset(from)
                    .take(n as usize);
                nexmark_columns(*table, events, n as usize)?
            }
        };
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Internal(format!("nexmark value {v} overflows BIGINT")))
}

fn micros(ms: u64) -> Result<i64> {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| ms.checked_mul(1000))
        .ok_or_else(|| Error::Internal(format!("nexmark time {ms} overflows TIMESTAMP")))
}

/// Column builders for one Nexmark table.
fn nexmark_columns(
    table: NexmarkTable,
    events: impl Iterator<Item = Event>,
    n: usize,
) -> Result<Vec<ArrayRef>> {
    let ints = |k: usize| -> Vec<Int64Builder> {
        (0..k).map(|_| Int64Builder::with_capacity(n)).collect()
    };
    let strs = |k: usize| -> Vec<StringBuilder> {
        (0..k)
            .map(|_| StringBuilder::with_capacity(n, n * 16))
            .collect()
    };
    let times = |k: usize| -> Vec<TimestampMicrosecondBuilder> {
        (0..k)
            .map(|_| TimestampMicrosecondBuilder::with_capacity(n))
            .collect()
    };
    let unexpected = || Error::Internal("nexmark generator returned another event type".into());
    match table {
        NexmarkTable::Person => {
            let (mut i, mut s, mut t) = (ints(1), strs(6), times(1));
            for e in events {
                let Event::Person(p) = e else {
                    return Err(unexpected());
                };
                i[0].append_value(int(p.id)?);
                for (b, v) in
                    s.iter_mut()
                        .zip([&p.name, &p.email_address, &p.credit_card, &p.city, &p.state])
                {
                    b.append_value(v);
                }
                t[0].append_value(micros(p.date_time)?);
                s[5].append_value(&p.extra);
            }
            let [s0, s1, s2, s3, s4, s5] = finish_strs(s)?;
            Ok(vec![
                finish_int(&mut i[0]),
                s0,
                s1,
                s2,
                s3,
                s4,
                finish_ts(&mut t[0]),
                s5,
            ])
        }
        NexmarkTable::Auction => {
            let (mut i, mut s, mut t) = (ints(5), strs(3), times(2));
            for e in events {
                let Event::Auction(a) = e else {
                    return Err(unexpected());
                };
                i[0].append_value(int(a.id)?);
                i[1].append_value(int(a.initial_bid)?);
                i[2].append_value(int(a.reserve)?);
                i[3].append_value(int(a.seller)?);
                i[4].append_value(int(a.category)?);
                s[0].append_value(&a.item_name);
                s[1].append_value(&a.description);
                s[2].append_value(&a.extra);
                t[0].append_value(micros(a.date_time)?);
                t[1].append_value(micros(a.expires)?);
            }
            let [item_name, description, extra] = finish_strs(s)?;
            Ok(vec![
                finish_int(&mut i[0]),
                item_name,
                description,
                finish_int(&mut i[1]),
                finish_int(&mut i[2]),
                finish_ts(&mut t[0]),
                finish_ts(&mut t[1]),
                finish_int(&mut i[3]),
                finish_int(&mut i[4]),
                extra,
            ])
        }
        NexmarkTable::Bid => {
            let (mut i, mut s, mut t) = (ints(3), strs(3), times(1));
            for e in events {
                let Event::Bid(b) = e else {
                    return Err(unexpected());
                };
                i[0].append_value(int(b.auction)?);
                i[1].append_value(int(b.bidder)?);
                i[2].append_value(int(b.price)?);
                s[0].append_value(&b.channel);
                s[1].append_value(&b.url);
                s[2].append_value(&b.extra);
                t[0].append_value(micros(b.date_time)?);
            }
            let [channel, url, extra] = finish_strs(s)?;
            Ok(vec![
                finish_int(&mut i[0]),
                finish_int(&mut i[1]),
                finish_int(&mut i[2]),
                channel,
                url,
                finish_ts(&mut t[0]),
                extra,
            ])
        }
    }
}

fn finish_int(b: &mut Int64Builder) -> ArrayRef {
    Arc::new(b.finish())
}

fn finish_ts(b: &mut TimestampMicrosecondBuilder) -> ArrayRef {
    Arc::new(b.finish())
}

fn finish_strs<const K: usize>(builders: Vec<StringBuilder>) -> Result<[ArrayRef; K]> {
    let arrays: Vec<ArrayRef> = builders
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    arrays
        .try_into()
        .map_err(|_| Error::Internal("nexmark column count mismatch".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;

    fn nexmark(table: NexmarkTable) -> GeneratorSpec {
        GeneratorSpec::Nexmark {
            table,
            rate: 1000,
            events: Some(1000),
            base_time_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn counter_rows_are_a_function_of_offset() {
        let spec = GeneratorSpec::Counter {
            rate: 10,
            max: Some(5),
        };
        let all = spec.generate(0, 5).unwrap();
        let tail = spec.generate(3, 5).unwrap();
        let col = all.column(0).as_primitive::<Int64Type>();
        assert_eq!(col.values().to_vec(), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            tail.column(0).as_primitive::<Int64Type>().values().to_vec(),
            vec![4, 5]
        );
        assert_eq!(spec.rows_due(0, Duration::from_millis(200)), 2);
        assert_eq!(spec.rows_due(0, Duration::from_secs(60)), 5);
    }

    #[test]
    fn nexmark_proportions_are_1_3_46() {
        let rows: Vec<u64> = [
            NexmarkTable::Person,
            NexmarkTable::Auction,
            NexmarkTable::Bid,
        ]
        .iter()
        .map(|t| t.rows_below(1000))
        .collect();
        assert_eq!(rows, vec![20, 60, 920]);
        // Partial cycles: event 0 is a person, 1..4 auctions, 4..50 bids.
        assert_eq!(NexmarkTable::Person.rows_below(1), 1);
        assert_eq!(NexmarkTable::Auction.rows_below(3), 2);
        assert_eq!(NexmarkTable::Bid.rows_below(5), 1);
        for t in [
            NexmarkTable::Person,
            NexmarkTable::Auction,
            NexmarkTable::Bid,
        ] {
            let spec = nexmark(t);
            let n = spec.limit().unwrap();
            let b = spec.generate(0, n).unwrap();
            assert_eq!(b.num_rows() as u64, n);
        }
    }

    #[test]
    fn nexmark_regenerates_identically_and_bids_reference_earlier_ids() {
        let bid = nexmark(NexmarkTable::Bid);
        let whole = bid.generate(0, 100).unwrap();
        let part = bid.generate(40, 100).unwrap();
        assert_eq!(whole.slice(40, 60), part);
        let people = nexmark(NexmarkTable::Person).generate(0, 20).unwrap();
        let max_person = people
            .column(0)
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .max()
            .copied()
            .unwrap();
        let bidders = whole.column(1).as_primitive::<Int64Type>();
        assert!(bidders.values().iter().all(|b| *b <= max_person));
    }
}
