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
//! ROW_NUMBER the whole partition with each row's number) before and after
//! applying it and emits the difference. ROW_NUMBER re-reads the touched
//! partition: O(partition) per change, exact; recognising `rn <= n` to
//! bound it is a later optimisation.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;

use super::operator::{evaluate_all, OpCtx, Operator};
use super::ChangeBatch;
use crate::catalog::types::SqlType;
use crate::error::Result;
use crate::state::encoding::{decode_row, encode_row, encode_value, split_counted, table_prefix};

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
    /// Every row, with its 1-based position appended (`ROW_NUMBER()`).
    RowNumber,
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
}

impl TopN {
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
        }
    }

    /// The current output of the partition whose key prefix is `prefix`.
    fn window(&self, ctx: &OpCtx<'_>, prefix: &[u8]) -> Result<Vec<(Vec<ScalarValue>, i64)>> {
        let (offset, want, numbered) = match self.mode {
            TopNMode::Limit { offset, limit } => (offset, offset + limit, false),
            TopNMode::RowNumber => (0, usize::MAX, true),
        };
        let entries = if numbered {
            ctx.scan_prefix(prefix)?
        } else {
            ctx.scan_prefix_first(prefix, want)?
        };
        let mut out = Vec::new();
        let mut seen = 0usize;
        for (_, v) in entries {
            let (encoded, count) = split_counted(&v)?;
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
            TopNMode::RowNumber => "row_number".to_string(),
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
        let part_arrays = evaluate_all(self.partition.iter().map(|(e, _)| e), &input.data)?;
        // Partition prefix of every row, and each touched partition's
        // output before the delta.
        let mut prefixes = Vec::with_capacity(n);
        let mut touched: Vec<Vec<u8>> = Vec::new();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut diff: Vec<(Vec<ScalarValue>, i64)> = Vec::new();
        for r in 0..n {
            let mut prefix = table_prefix(self.state_id).to_vec();
            for ((_, t), a) in self.partition.iter().zip(&part_arrays) {
                let v = ScalarValue::try_from_array(a.as_ref(), r)?;
                let v = if v.data_type() == t.arrow_type() {
                    v
                } else {
                    v.cast_to(&t.arrow_type())?
                };
                encode_value(&mut prefix, t, &v)?;
            }
            if seen.insert(prefix.clone()) {
                diff.extend(
                    self.window(ctx, &prefix)?
                        .into_iter()
                        .map(|(row, _)| (row, -1)),
                );
                touched.push(prefix.clone());
            }
            prefixes.push(prefix);
        }
        let key_arrays = evaluate_all(self.keys.iter().map(|k| &k.expr), &input.data)?;
        let row_types: Vec<&SqlType> = self.row_types.iter().collect();
        let columns: Vec<&ArrayRef> = input.data.columns().iter().collect();
        for (r, prefix) in prefixes.into_iter().enumerate() {
            let mut key = prefix;
            for (k, a) in self.keys.iter().zip(&key_arrays) {
                let v = ScalarValue::try_from_array(a.as_ref(), r)?;
                if v.is_null() {
                    key.push(if k.nulls_first { 0x00 } else { 0x02 });
                    continue;
                }
                key.push(0x01);
                let v = if v.data_type() == k.ty.arrow_type() {
                    v
                } else {
                    v.cast_to(&k.ty.arrow_type())?
                };
                let mut enc = Vec::new();
                encode_value(&mut enc, &k.ty, &v)?;
                if !k.asc {
                    enc.iter_mut().for_each(|b| *b = !*b);
                }
                key.extend_from_slice(&enc);
            }
            let mut row = Vec::new();
            encode_row(&mut row, &row_types, &columns, r)?;
            key.extend_from_slice(&row);
            ctx.add_count(key, row, input.weights.value(r))?;
        }
        for prefix in &touched {
            diff.extend(self.window(ctx, prefix)?);
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
            TopNMode::RowNumber,
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
