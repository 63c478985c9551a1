//! Incremental equi-join: INNER, LEFT, RIGHT and FULL.
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
//! state). Rows with a NULL join key never match, as in SQL. For outer
//! joins, a row without matches is emitted NULL-extended; when a key gains
//! its first (or loses its last) row on one side, the other side's rows
//! with that key swap their NULL-extended version for the joined ones (or
//! back). Deltas are applied one row at a time against the current state of
//! both sides, which is exact for any sequence of changes.

use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;

use super::operator::{evaluate_all, OpCtx};
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

/// An equi-join of two inputs: inner, or outer on either or both sides.
#[derive(Debug)]
pub struct Join {
    left: JoinSide,
    right: JoinSide,
    schema: SchemaRef,
    left_outer: bool,
    right_outer: bool,
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
            left_outer: false,
            right_outer: false,
        }
    }

    /// Keeps unmatched left rows (LEFT/FULL JOIN) and/or unmatched right
    /// rows (RIGHT/FULL JOIN), NULL-extended.
    pub fn with_outer(mut self, left: bool, right: bool) -> Self {
        self.left_outer = left;
        self.right_outer = right;
        self
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
        let kind = match (self.left_outer, self.right_outer) {
            (false, false) => "InnerJoin",
            (true, false) => "LeftJoin",
            (false, true) => "RightJoin",
            (true, true) => "FullJoin",
        };
        format!(
            "{kind}: on=[({}) = ({})] state=({}, {})",
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
        let (me, other, me_outer, other_outer) = match side {
            Side::Left => (&self.left, &self.right, self.left_outer, self.right_outer),
            Side::Right => (&self.right, &self.left, self.right_outer, self.left_outer),
        };
        let glue = |mine: &[ScalarValue], theirs: &[ScalarValue]| -> Vec<ScalarValue> {
            match side {
                Side::Left => mine.iter().chain(theirs).cloned().collect(),
                Side::Right => theirs.iter().chain(mine).cloned().collect(),
            }
        };
        let nulls = |types: &[SqlType]| -> Result<Vec<ScalarValue>> {
            types
                .iter()
                .map(|t| Ok(ScalarValue::try_from(&t.arrow_type())?))
                .collect()
        };
        let (me_nulls, other_nulls) = (nulls(&me.row_types)?, nulls(&other.row_types)?);
        let n = delta.len();
        let keys = evaluate_all(&me.keys, &delta.data)?;
        let row_types: Vec<&SqlType> = me.row_types.iter().collect();
        let columns: Vec<&ArrayRef> = delta.data.columns().iter().collect();
        for r in 0..n {
            let w = delta.weights.value(r);
            let row: Vec<ScalarValue> = columns
                .iter()
                .map(|c| ScalarValue::try_from_array(c.as_ref(), r))
                .collect::<std::result::Result<_, _>>()?;
            let mut key = Vec::new();
            let mut null_key = false;
            for (k, t) in keys.iter().zip(&me.key_types) {
                let v = ScalarValue::try_from_array(k.as_ref(), r)?;
                if v.is_null() {
                    null_key = true;
                    break;
                }
                let v = if v.data_type() == t.arrow_type() {
                    v
                } else {
                    v.cast_to(&t.arrow_type())?
                };
                encode_value(&mut key, t, &v)?;
            }
            if null_key {
                // Never matches; an outer side keeps it, NULL-extended.
                if me_outer {
                    out.push((glue(&row, &other_nulls), w));
                }
                continue;
            }
            // Matches on the other side.
            let mut prefix = table_prefix(other.state_id).to_vec();
            prefix.extend_from_slice(&key);
            let mut matches = Vec::new();
            for (_, v) in ctx.scan_prefix(&prefix)? {
                let (encoded, count) = split_counted(&v)?;
                matches.push((decode_row(encoded, &other.row_types)?, count));
            }
            for (o, c) in &matches {
                out.push((glue(&row, o), w * c));
            }
            if matches.is_empty() && me_outer {
                out.push((glue(&row, &other_nulls), w));
            }
            let mut my_prefix = table_prefix(me.state_id).to_vec();
            my_prefix.extend_from_slice(&key);
            if other_outer && !matches.is_empty() {
                // The other side's rows lose (or regain) their NULL
                // extension when this key gains its first (or loses its
                // last) row on this side.
                let mut before = 0i64;
                for (_, v) in ctx.scan_prefix(&my_prefix)? {
                    before += split_counted(&v)?.1;
                }
                let after = before + w;
                let flip = match (before > 0, after > 0) {
                    (false, true) => -1,
                    (true, false) => 1,
                    _ => 0,
                };
                if flip != 0 {
                    for (o, c) in &matches {
                        out.push((glue(&me_nulls, o), flip * c));
                    }
                }
            }
            // This side's state.
            let mut encoded = Vec::new();
            encode_row(&mut encoded, &row_types, &columns, r)?;
            let mut state_key = my_prefix;
            state_key.extend_from_slice(&encoded);
            ctx.add_count(state_key, encoded, w)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::col;
    use rocksdb::WriteBatch;

    fn side_schema(a: &str, b: &str) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(a, DataType::Int64, true),
            Field::new(b, DataType::Utf8, true),
        ]))
    }

    fn join(left_outer: bool, right_outer: bool) -> Join {
        let (l, r) = (side_schema("k", "x"), side_schema("k2", "y"));
        let side = |id, s: &SchemaRef, key: &str| JoinSide {
            state_id: id,
            keys: vec![col(key, s).unwrap()],
            key_types: vec![SqlType::Int8],
            row_types: vec![SqlType::Int8, SqlType::Text],
        };
        let out = Arc::new(Schema::new(
            l.fields()
                .iter()
                .chain(r.fields().iter())
                .cloned()
                .collect::<Vec<_>>(),
        ));
        Join::new(side(1, &l, "k"), side(2, &r, "k2"), out).with_outer(left_outer, right_outer)
    }

    /// Feeds (left, right) fixture pairs step by step, committing between.
    fn run(j: &mut Join, steps: &[(&str, &str)]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let (l, r) = (side_schema("k", "x"), side_schema("k2", "y"));
        steps
            .iter()
            .map(|(left, right)| {
                let mut batch = WriteBatch::default();
                let out = {
                    let mut ctx = OpCtx::new(&store, &mut batch);
                    let ld = (!left.is_empty())
                        .then(|| ChangeBatch::from_pretty(l.clone(), left).unwrap());
                    let rd = (!right.is_empty())
                        .then(|| ChangeBatch::from_pretty(r.clone(), right).unwrap());
                    j.process(ld, rd, &mut ctx).unwrap().consolidate().unwrap()
                };
                store.write(batch).unwrap();
                out.to_pretty().unwrap()
            })
            .collect()
    }

    #[test]
    fn inner_join_is_bilinear_and_skips_null_keys() {
        let out = run(
            &mut join(false, false),
            &[
                ("+1 | 1 | a\n+1 | NULL | n", "+1 | 1 | p"),
                ("", "+1 | 1 | q\n+1 | NULL | m"),
                ("-1 | 1 | a", ""),
            ],
        );
        assert_eq!(out[0], "+1 | 1 | a | 1 | p");
        assert_eq!(out[1], "+1 | 1 | a | 1 | q");
        assert_eq!(out[2], "-1 | 1 | a | 1 | p\n-1 | 1 | a | 1 | q");
    }

    #[test]
    fn left_join_swaps_null_extension_on_first_and_last_match() {
        let out = run(
            &mut join(true, false),
            &[("+1 | 1 | a", ""), ("", "+1 | 1 | p"), ("", "-1 | 1 | p")],
        );
        assert_eq!(out[0], "+1 | 1 | a | NULL | NULL");
        assert_eq!(out[1], "+1 | 1 | a | 1 | p\n-1 | 1 | a | NULL | NULL");
        assert_eq!(out[2], "+1 | 1 | a | NULL | NULL\n-1 | 1 | a | 1 | p");
    }

    #[test]
    fn full_join_keeps_both_sides() {
        let out = run(&mut join(true, true), &[("+1 | 1 | a", "+1 | 2 | p")]);
        assert_eq!(out[0], "+1 | 1 | a | NULL | NULL\n+1 | NULL | NULL | 2 | p");
    }
}
