//! Incremental top-N: `ORDER BY … LIMIT n [OFFSET m]`.
//!
//! Every input row is kept in RocksDB under `state id · sort key · row`
//! with its multiplicity. The sort key is memcomparable and honours the
//! direction and NULL placement of each ORDER BY term (a NULL-order byte,
//! then the value's encoding, bit-inverted for DESC), so the first rows of
//! the state's key range are the result. For a delta the operator reads the
//! window (offset + limit rows) before and after applying it and emits the
//! difference.

use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;

use super::operator::{OpCtx, Operator};
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

/// The top-N operator.
#[derive(Debug)]
pub struct TopN {
    state_id: u32,
    keys: Vec<SortKey>,
    row_types: Vec<SqlType>,
    offset: usize,
    limit: usize,
    schema: SchemaRef,
}

impl TopN {
    /// Rows `offset .. offset + limit` of the input ordered by `keys`.
    pub fn new(
        state_id: u32,
        keys: Vec<SortKey>,
        row_types: Vec<SqlType>,
        offset: usize,
        limit: usize,
        schema: SchemaRef,
    ) -> Self {
        TopN {
            state_id,
            keys,
            row_types,
            offset,
            limit,
            schema,
        }
    }

    /// The current window: (row, count) in order, `offset` rows skipped.
    fn window(&self, ctx: &OpCtx<'_>) -> Result<Vec<(Vec<ScalarValue>, i64)>> {
        let want = self.offset + self.limit;
        let entries = ctx.scan_prefix_first(&table_prefix(self.state_id), want)?;
        let mut out = Vec::new();
        let mut seen = 0usize;
        for (_, v) in entries {
            let (encoded, count) = split_counted(&v)?;
            let row = decode_row(encoded, &self.row_types)?;
            for _ in 0..count {
                if seen >= self.offset && seen < want {
                    out.push((row.clone(), 1));
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
        format!(
            "TopN: state={} order=[{}] offset={} limit={}",
            self.state_id,
            keys.join(", "),
            self.offset,
            self.limit
        )
    }

    fn process(&mut self, input: ChangeBatch, ctx: &mut OpCtx<'_>) -> Result<ChangeBatch> {
        let before = self.window(ctx)?;
        let n = input.len();
        let key_arrays = self
            .keys
            .iter()
            .map(|k| Ok(k.expr.evaluate(&input.data)?.into_array(n)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let row_types: Vec<&SqlType> = self.row_types.iter().collect();
        let columns: Vec<&ArrayRef> = input.data.columns().iter().collect();
        for r in 0..n {
            let mut key = table_prefix(self.state_id).to_vec();
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
        let after = self.window(ctx)?;
        let mut diff: Vec<(Vec<ScalarValue>, i64)> =
            before.into_iter().map(|(r, _)| (r, -1)).collect();
        diff.extend(after);
        ChangeBatch::from_rows(&self.schema, diff)?.consolidate()
    }
}
