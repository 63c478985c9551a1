//! Incremental top-N, `ORDER BY … LIMIT n [OFFSET m]`, and
//! `ROW_NUMBER() OVER (PARTITION BY … ORDER BY …)` (hence per-group top-N
//! and dedup: `WHERE rn <= n` is a filter above it).
//!
//! Every input row is kept in RocksDB under `state id · partition key ·
//! sort key · row` with its multiplicity. The sort key is memcomparable and honours the
//! direction and NULL placement of each ORDER BY term (a NULL-order byte,
//! then the value's encoding, bit-inverted for DESC), so the first rows of
//! a partition's key range are the result. For each partition a delta
//! touches, the operator reads the window (offset + limit rows, or for
//! ROW_NUMBER the partition with each row's number) before and after
//! applying it and emits the difference. When the planner sees a filter
//! `rn <= n` (or `rn < n + 1`, `rn = n`) right above, ROW_NUMBER reads only
//! the first n rows of a partition; otherwise it re-reads the whole touched
//! partition (O(partition) per change, exact).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;
use foldhash::HashMap as FastMap;

use super::operator::{cast_to_types, evaluate_all, row_id_key, OpCtx, Operator};
use super::ChangeBatch;
use crate::catalog::types::SqlType;
use crate::error::{Error, Result};
use crate::state::encoding::{decode_row, encode_cell, encode_row, split_counted, table_prefix};

/// Stored (key, value) entries of a partition, in key order.
type Entries = super::operator::KeyValues;

/// A partition's entry while a delta merges in: key, value, and whether
/// this delta added it (not stored yet).
type MergeEntry = (Vec<u8>, Vec<u8>, bool);

/// One ORDER BY term.
#[derive(Debug)]
pub struct SortKey {
    /// The expression.
    pub expr: Arc<dyn PhysicalExpr>,
    /// Its type.
    pub ty: SqlType,
    /// Ascending?
    pub asc: bool,
    /// NULLs before other values?
    pub nulls_first: bool,
}

/// What the operator outputs of each ordered partition.
#[derive(Debug, Clone, Copy)]
pub enum TopNMode {
    /// Rows `offset .. offset + limit`.
    Limit {
        /// Rows skipped.
        offset: usize,
        /// Rows kept.
        limit: usize,
    },
    /// Rows with their 1-based position appended (`ROW_NUMBER()`): all of
    /// them, or — when a filter above keeps only `rn <= limit` — the first
    /// `limit`, which bounds the work per change by `limit`, not by the
    /// partition's size.
    RowNumber {
        /// Positions kept.
        limit: Option<usize>,
    },
}

/// The top-N / row-number operator.
#[derive(Debug)]
pub struct TopN {
    state_id: u32,
    partition: Vec<(Arc<dyn PhysicalExpr>, SqlType)>,
    keys: Vec<SortKey>,
    row_types: Vec<SqlType>,
    mode: TopNMode,
    schema: SchemaRef,
    /// The input never retracts: rows are stored under `sort key · row id`
    /// with multiplicity 1 (a write without a read). Ties then keep
    /// arrival order, which SQL leaves unspecified anyway.
    append_only: bool,
    /// Next row id (append-only), once read from the store.
    next_row_id: Option<u64>,
}

impl TopN {
    /// Marks the input as insert-only (see the `append_only` field).
    pub fn with_append_only(mut self, append_only: bool) -> Self {
        self.append_only = append_only;
        self
    }

    /// Input rows ordered by `keys` within each `partition`, output per
    /// `mode`, producing `schema`.
    pub fn new(
        state_id: u32,
        partition: Vec<(Arc<dyn PhysicalExpr>, SqlType)>,
        keys: Vec<SortKey>,
        row_types: Vec<SqlType>,
        mode: TopNMode,
        schema: SchemaRef,
    ) -> Self {
        TopN {
            state_id,
            partition,
            keys,
            row_types,
            mode,
            schema,
            append_only: false,
            next_row_id: None,
        }
    }

    /// (offset, rows wanted from the start, whether rows are numbered).
    fn bounds(&self) -> (usize, usize, bool) {
        match self.mode {
            TopNMode::Limit { offset, limit } => (offset, offset + limit, false),
            TopNMode::RowNumber { limit } => (0, limit.unwrap_or(usize::MAX), true),
        }
    }

    /// The first stored entries (key, value) of each partition: as many as
    /// the output can need; one store iterator for all partitions.
    fn entries_many(&self, ctx: &OpCtx<'_>, prefixes: &[Vec<u8>]) -> Result<Vec<Entries>> {
        let (_, want, _) = self.bounds();
        ctx.scan_prefixes_first(prefixes, want)
    }

    /// The output rows of a partition whose entries, in key order, start
    /// with `entries`.
    fn number<'v>(
        &self,
        values: impl Iterator<Item = &'v [u8]>,
    ) -> Result<Vec<(Vec<ScalarValue>, i64)>> {
        let (offset, want, numbered) = self.bounds();
        let mut out = Vec::new();
        let mut seen = 0usize;
        for v in values {
            let (encoded, count) = split_counted(v)?;
            let row = decode_row(encoded, &self.row_types)?;
            for _ in 0..count {
                if seen >= offset && seen < want {
                    let mut r = row.clone();
                    if numbered {
                        r.push(ScalarValue::UInt64(Some(seen as u64 + 1)));
                    }
                    out.push((r, 1));
                }
                seen += 1;
            }
            if seen >= want {
                break;
            }
        }
        Ok(out)
    }
}

impl Operator for TopN {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn describe(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| {
                format!(
                    "{} {} NULLS {}",
                    k.expr,
                    if k.asc { "ASC" } else { "DESC" },
                    if k.nulls_first { "FIRST" } else { "LAST" }
                )
            })
            .collect();
        let parts: Vec<String> = self.partition.iter().map(|(e, _)| e.to_string()).collect();
        let mode = match self.mode {
            TopNMode::Limit { offset, limit } => format!("offset={offset} limit={limit}"),
            TopNMode::RowNumber { limit: None } => "row_number".to_string(),
            TopNMode::RowNumber { limit: Some(n) } => format!("row_number <= {n}"),
        };
        format!(
            "TopN: state={} partition=[{}] order=[{}] {mode}",
            self.state_id,
            parts.join(", "),
            keys.join(", "),
        )
    }

    fn process(&mut self, input: ChangeBatch, ctx: &mut OpCtx<'_>) -> Result<ChangeBatch> {
        let n = input.len();
        // Partition and sort-key arrays in their stored types, cast once.
        let part_arrays = cast_to_types(
            evaluate_all(self.partition.iter().map(|(e, _)| e), &input.data)?,
            self.partition.iter().map(|(_, t)| t),
        )?;
        // Partition prefix of every row, and each touched partition's
        // output before the delta.
        // Each touched partition once, in first-seen order, and the
        // partition of every row (one hash lookup per row).
        let mut index: FastMap<Vec<u8>, usize> = FastMap::default();
        let mut touched: Vec<Vec<u8>> = Vec::new();
        let mut part_of: Vec<usize> = Vec::with_capacity(n);
        let mut prefix = Vec::new();
        for r in 0..n {
            prefix.clear();
            prefix.extend_from_slice(&table_prefix(self.state_id));
            for ((_, t), a) in self.partition.iter().zip(&part_arrays) {
                encode_cell(&mut prefix, t, a.as_ref(), r)?;
            }
            let p = match index.get(prefix.as_slice()) {
                Some(&p) => p,
                None => {
                    index.insert(prefix.clone(), touched.len());
                    touched.push(prefix.clone());
                    touched.len() - 1
                }
            };
            part_of.push(p);
        }
        drop(index);
        let mut diff: Vec<(Vec<ScalarValue>, i64)> = Vec::new();
        // Append-only input: each partition's first entries before the
        // delta (key, value, added by this delta), to which its new rows
        // are added (nothing else can change).
        let mut parts: Vec<Vec<MergeEntry>> = Vec::new();
        for entries in self.entries_many(ctx, &touched)? {
            let old = self.number(entries.iter().map(|(_, v)| v.as_slice()))?;
            diff.extend(old.into_iter().map(|(row, _)| (row, -1)));
            if self.append_only {
                parts.push(entries.into_iter().map(|(k, v)| (k, v, false)).collect());
            }
        }
        let (counter, mut next_id) = match self.next_row_id {
            Some(n) => (row_id_key(self.state_id), n),
            None if self.append_only => ctx.row_id_counter(self.state_id)?,
            None => (row_id_key(self.state_id), 0),
        };
        let key_arrays = cast_to_types(
            evaluate_all(self.keys.iter().map(|k| &k.expr), &input.data)?,
            self.keys.iter().map(|k| &k.ty),
        )?;
        let row_types: Vec<&SqlType> = self.row_types.iter().collect();
        let columns: Vec<&ArrayRef> = input.data.columns().iter().collect();
        for (r, &p) in part_of.iter().enumerate() {
            let mut key = touched[p].clone();
            for (k, a) in self.keys.iter().zip(&key_arrays) {
                if a.data_type() == &DataType::Null || a.is_null(r) {
                    key.push(if k.nulls_first { 0x00 } else { 0x02 });
                    continue;
                }
                key.push(0x01);
                let from = key.len();
                encode_cell(&mut key, &k.ty, a.as_ref(), r)?;
                if !k.asc {
                    key[from..].iter_mut().for_each(|b| *b = !*b);
                }
            }
            let mut row = Vec::new();
            encode_row(&mut row, &row_types, &columns, r)?;
            let w = input.weights.value(r);
            if self.append_only {
                if w < 0 {
                    return Err(Error::Internal(format!(
                        "append-only top-N input {} retracted a row",
                        self.state_id
                    )));
                }
                key.extend_from_slice(&next_id.to_be_bytes());
                next_id += 1;
                row.extend_from_slice(&(w as u64).to_be_bytes());
                // Stored below, only if it ranks among the first rows.
                parts[p].push((key, row, true));
            } else {
                key.extend_from_slice(&row);
                ctx.add_count(key, row, w)?;
            }
        }
        if self.append_only {
            ctx.put(counter, next_id.to_be_bytes().to_vec());
            // An abandoned commit skips these ids; it never reuses them.
            self.next_row_id = Some(next_id);
            // The new first rows are the first of the old first rows and
            // the delta's rows: every other stored row already ranked
            // beyond them and only moves further back. A row that ranks
            // beyond the rows the output can need never comes back (the
            // input only inserts), so it is not kept: the state of a
            // partition stays at most its first rows (q18's "last bid per
            // bidder and auction" keeps one row per pair, not every bid).
            let (_, want, _) = self.bounds();
            for mut entries in parts {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                diff.extend(self.number(entries.iter().map(|(_, v, _)| v.as_slice()))?);
                let mut ranked = 0usize;
                for (key, row, new) in entries {
                    let keep = ranked < want;
                    ranked = ranked.saturating_add(split_counted(&row)?.1.max(0) as usize);
                    match (keep, new) {
                        (true, true) => ctx.put(key, row),
                        (false, false) => ctx.delete(key),
                        _ => {}
                    }
                }
            }
        } else {
            for entries in self.entries_many(ctx, &touched)? {
                diff.extend(self.number(entries.iter().map(|(_, v)| v.as_slice()))?);
            }
        }
        ChangeBatch::from_rows(&self.schema, diff)?.consolidate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::col;
    use rocksdb::WriteBatch;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("pts", DataType::Int64, true),
        ]))
    }

    fn run(op: &mut TopN, steps: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        steps
            .iter()
            .map(|text| {
                let mut batch = WriteBatch::default();
                let out = {
                    let mut ctx = OpCtx::new(&store, &mut batch);
                    op.process(ChangeBatch::from_pretty(schema(), text).unwrap(), &mut ctx)
                        .unwrap()
                };
                store.write(batch).unwrap();
                out.to_pretty().unwrap()
            })
            .collect()
    }

    fn key(desc: bool) -> SortKey {
        SortKey {
            expr: col("pts", &schema()).unwrap(),
            ty: SqlType::Int8,
            asc: !desc,
            nulls_first: desc,
        }
    }

    #[test]
    fn top_two_descending_with_nulls_first() {
        let mut op = TopN::new(
            5,
            vec![],
            vec![key(true)],
            vec![SqlType::Text, SqlType::Int8],
            TopNMode::Limit {
                offset: 0,
                limit: 2,
            },
            schema(),
        );
        let out = run(
            &mut op,
            &[
                "+1 | a | 10\n+1 | b | 30\n+1 | c | 20",
                "-1 | b | 30",
                "+1 | n | NULL",
            ],
        );
        assert_eq!(out[0], "+1 | b | 30\n+1 | c | 20");
        assert_eq!(out[1], "+1 | a | 10\n-1 | b | 30");
        // DESC puts NULLs first, as in PostgreSQL.
        assert_eq!(out[2], "+1 | n | NULL\n-1 | a | 10");
    }

    /// Over an insert-only input, the append-only operator answers like the
    /// general one (seeded random deltas, ties and duplicates included) and
    /// keeps at most the first `limit` rows of each partition.
    #[test]
    fn append_only_top_n_matches_the_general_one_and_keeps_only_first_rows() {
        let s = schema();
        let out_schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("pts", DataType::Int64, true),
            Field::new("rn", DataType::UInt64, true),
        ]));
        let make = |id, append_only| {
            TopN::new(
                id,
                vec![(col("g", &s).unwrap(), SqlType::Text)],
                vec![key(true)],
                vec![SqlType::Text, SqlType::Int8],
                TopNMode::RowNumber { limit: Some(2) },
                out_schema.clone(),
            )
            .with_append_only(append_only)
        };
        let (mut general, mut append) = (make(6, false), make(7, true));
        let mut seed = 42u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let steps: Vec<String> = (0..40)
            .map(|_| {
                (0..1 + next(4))
                    .map(|_| {
                        let w = 1 + next(2);
                        format!("+{w} | {} | {}", ["a", "b", "c"][next(3) as usize], next(8))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        for text in &steps {
            let mut outs = Vec::new();
            for op in [&mut general, &mut append] {
                let mut batch = WriteBatch::default();
                let mut ctx = OpCtx::new(&store, &mut batch);
                let out = op
                    .process(ChangeBatch::from_pretty(s.clone(), text).unwrap(), &mut ctx)
                    .unwrap();
                store.write(batch).unwrap();
                outs.push(out.to_pretty().unwrap());
            }
            assert_eq!(outs[0], outs[1], "after {text}");
        }
        // Three partitions, at most two stored rows each (a row stored with
        // weight 2 fills both places).
        let mut stored = 0;
        store
            .scan_prefix(&table_prefix(7), |_, _| {
                stored += 1;
                Ok(true)
            })
            .unwrap();
        assert!((3..=6).contains(&stored), "{stored} rows kept");
    }

    #[test]
    fn row_number_renumbers_the_touched_partition_only() {
        let s = schema();
        let out_schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("pts", DataType::Int64, true),
            Field::new("rn", DataType::UInt64, true),
        ]));
        let mut op = TopN::new(
            6,
            vec![(col("g", &s).unwrap(), SqlType::Text)],
            vec![key(false)],
            vec![SqlType::Text, SqlType::Int8],
            TopNMode::RowNumber { limit: None },
            out_schema,
        );
        let out = run(
            &mut op,
            &["+1 | a | 2\n+1 | a | 5\n+1 | b | 1", "+1 | a | 1"],
        );
        assert_eq!(out[0], "+1 | a | 2 | 1\n+1 | a | 5 | 2\n+1 | b | 1 | 1");
        assert_eq!(
            out[1],
            "+1 | a | 1 | 1\n+1 | a | 2 | 2\n+1 | a | 5 | 3\n-1 | a | 2 | 1\n-1 | a | 5 | 2"
        );
    }
}
