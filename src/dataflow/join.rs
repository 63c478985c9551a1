//! Incremental inner equi-join.
//!
//! Each side's rows are kept in RocksDB, keyed by `state id · join key ·
//! row` with the row's multiplicity, so the rows matching a key are one
//! prefix scan. A delta is joined bilinearly, which is exact for any mix
//! of inserts and deletes, and for self-joins:
//!
//! Δ(L ⋈ R) = ΔL ⋈ R_old  +  L_new ⋈ ΔR
//!
//! (the left delta is joined with the right side's old state and applied
//! to the left state; then the right delta is joined with the new left
//! state). Rows with a NULL join key never match, as in SQL.

use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;

use super::operator::OpCtx;
use super::ChangeBatch;
use crate::catalog::types::SqlType;
use crate::error::Result;
use crate::state::encoding::{decode_row, encode_row, encode_value, split_counted, table_prefix};

/// One side of a join.
#[derive(Debug)]
pub struct JoinSide {
    /// State id of this side's rows.
    pub state_id: u32,
    /// Join key expressions over this side's rows.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Types of the key values.
    pub key_types: Vec<SqlType>,
    /// Types of this side's columns.
    pub row_types: Vec<SqlType>,
}

/// An inner equi-join of two inputs.
#[derive(Debug)]
pub struct Join {
    left: JoinSide,
    right: JoinSide,
    schema: SchemaRef,
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Left,
    Right,
}

impl Join {
    /// A join producing `schema` (left columns, then right columns).
    pub fn new(left: JoinSide, right: JoinSide, schema: SchemaRef) -> Self {
        Join {
            left,
            right,
            schema,
        }
    }

    /// One line for EXPLAIN.
    pub fn describe(&self) -> String {
        let keys = |s: &JoinSide| {
            s.keys
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "InnerJoin: on=[({}) = ({})] state=({}, {})",
            keys(&self.left),
            keys(&self.right),
            self.left.state_id,
            self.right.state_id
        )
    }

    /// Joins the deltas of either side (bilinearly, left first).
    pub fn process(
        &mut self,
        left: Option<ChangeBatch>,
        right: Option<ChangeBatch>,
        ctx: &mut OpCtx<'_>,
    ) -> Result<ChangeBatch> {
        let mut out = Vec::new();
        if let Some(d) = left {
            self.apply(Side::Left, &d, ctx, &mut out)?;
        }
        if let Some(d) = right {
            self.apply(Side::Right, &d, ctx, &mut out)?;
        }
        ChangeBatch::from_rows(&self.schema, out)
    }

    fn apply(
        &self,
        side: Side,
        delta: &ChangeBatch,
        ctx: &mut OpCtx<'_>,
        out: &mut Vec<(Vec<ScalarValue>, i64)>,
    ) -> Result<()> {
        let (me, other) = match side {
            Side::Left => (&self.left, &self.right),
            Side::Right => (&self.right, &self.left),
        };
        let n = delta.len();
        let keys = me
            .keys
            .iter()
            .map(|k| Ok(k.evaluate(&delta.data)?.into_array(n)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let row_types: Vec<&SqlType> = me.row_types.iter().collect();
        let columns: Vec<&ArrayRef> = delta.data.columns().iter().collect();
        'rows: for r in 0..n {
            let w = delta.weights.value(r);
            let mut key = Vec::new();
            for (k, t) in keys.iter().zip(&me.key_types) {
                let v = ScalarValue::try_from_array(k.as_ref(), r)?;
                if v.is_null() {
                    continue 'rows;
                }
                let v = if v.data_type() == t.arrow_type() {
                    v
                } else {
                    v.cast_to(&t.arrow_type())?
                };
                encode_value(&mut key, t, &v)?;
            }
            let row: Vec<ScalarValue> = columns
                .iter()
                .map(|c| ScalarValue::try_from_array(c.as_ref(), r))
                .collect::<std::result::Result<_, _>>()?;
            // Matches on the other side.
            let mut prefix = table_prefix(other.state_id).to_vec();
            prefix.extend_from_slice(&key);
            for (_, v) in ctx.scan_prefix(&prefix)? {
                let (encoded, count) = split_counted(&v)?;
                let other_row = decode_row(encoded, &other.row_types)?;
                let joined = match side {
                    Side::Left => row.iter().cloned().chain(other_row).collect(),
                    Side::Right => other_row.into_iter().chain(row.iter().cloned()).collect(),
                };
                out.push((joined, w * count));
            }
            // This side's state.
            let mut state_key = table_prefix(me.state_id).to_vec();
            state_key.extend_from_slice(&key);
            let mut encoded = Vec::new();
            encode_row(&mut encoded, &row_types, &columns, r)?;
            state_key.extend_from_slice(&encoded);
            ctx.add_count(state_key, encoded, w)?;
        }
        Ok(())
    }
}
