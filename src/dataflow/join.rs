//! Incremental equi-join: INNER, LEFT, RIGHT and FULL.
//!
//! Each side's rows are kept in RocksDB, keyed by `state id · join key ·
//! row` with the row's multiplicity, so the rows matching a key are one
//! prefix scan. A side whose input never retracts (a source) is keyed by
//! `state id · join key · row id` instead, with multiplicity 1: storing a
//! row is then a write without a read. A delta is joined bilinearly, which is exact for any mix
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
//! back). An outer join's non-equality `ON` condition is part of matching:
//! a pair matches only when it holds, and "first match" is counted per
//! other-side row. Deltas are applied one row at a time against the current
//! state of both sides, which is exact for any sequence of changes.

use foldhash::HashMap as FastMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;

use super::operator::{cast_to_types, evaluate_all, row_id_key, OpCtx};
use super::ChangeBatch;
use crate::catalog::types::SqlType;
use crate::error::{Error, Result};
use crate::state::encoding::{decode_row, encode_cell, encode_row, split_counted, table_prefix};

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
    /// The side's input never retracts (a source through filters and
    /// projections): each row is stored under a fresh row id with count 1,
    /// a blind write instead of a read-modify-write of its multiplicity.
    pub append_only: bool,
}

/// An equi-join of two inputs: inner, or outer on either or both sides.
#[derive(Debug)]
pub struct Join {
    left: JoinSide,
    right: JoinSide,
    schema: SchemaRef,
    left_outer: bool,
    right_outer: bool,
    /// Non-equality `ON` condition of an outer join.
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// Next row id of each append-only side (left, right), once read.
    next_ids: [AtomicU64; 2],
}

/// `next_ids` value before the counter has been read from the store.
const UNREAD: u64 = u64::MAX;

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Left = 0,
    Right = 1,
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
            filter: None,
            next_ids: [AtomicU64::new(UNREAD), AtomicU64::new(UNREAD)],
        }
    }

    /// Whether this is an inner join (insert-only inputs then give
    /// insert-only output).
    pub fn is_inner(&self) -> bool {
        !self.left_outer && !self.right_outer
    }

    /// Adds the non-equality part of an outer join's `ON` condition, over
    /// the output schema: a pair only matches when it holds. (An inner
    /// join's is a plain filter above the join instead.)
    pub fn with_filter(mut self, filter: Arc<dyn PhysicalExpr>) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Keeps the rows of `glued` (joined pairs) for which the filter holds
    /// (all of them without a filter).
    fn passing(&self, glued: Vec<(Vec<ScalarValue>, i64)>) -> Result<Vec<(Vec<ScalarValue>, i64)>> {
        let Some(filter) = &self.filter else {
            return Ok(glued);
        };
        if glued.is_empty() {
            return Ok(glued);
        }
        let columns = (0..self.schema.fields().len())
            .map(|j| ScalarValue::iter_to_array(glued.iter().map(|(row, _)| row[j].clone())))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(glued.len())),
        )?;
        let mask = filter.evaluate(&batch)?.into_array(glued.len())?;
        let mask = mask.as_boolean();
        Ok(glued
            .into_iter()
            .enumerate()
            .filter(|(i, _)| mask.is_valid(*i) && mask.value(*i))
            .map(|(_, g)| g)
            .collect())
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
        let filter = match &self.filter {
            Some(f) => format!(" filter={f}"),
            None => String::new(),
        };
        format!(
            "{kind}: on=[({}) = ({})]{filter} state=({}, {})",
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
        let (counter, mut next_id) = match self.next_ids[side as usize].load(Ordering::Relaxed) {
            UNREAD if me.append_only => ctx.row_id_counter(me.state_id)?,
            n => (row_id_key(me.state_id), n),
        };
        // Key arrays in the key types, cast once per delta.
        let keys = cast_to_types(evaluate_all(&me.keys, &delta.data)?, &me.key_types)?;
        let mut other_rows: FastMap<Vec<u8>, Vec<(Vec<ScalarValue>, i64)>> = FastMap::default();
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
                if k.data_type() == &DataType::Null || k.is_null(r) {
                    null_key = true;
                    break;
                }
                encode_cell(&mut key, t, k.as_ref(), r)?;
            }
            if null_key {
                // Never matches; an outer side keeps it, NULL-extended.
                if me_outer {
                    out.push((glue(&row, &other_nulls), w));
                }
                continue;
            }
            // Matches on the other side (pairs passing the ON filter).
            // This delta only changes this side's state, so the other
            // side's rows for a key are read once per delta, not per row.
            if !other_rows.contains_key(&key) {
                let mut prefix = table_prefix(other.state_id).to_vec();
                prefix.extend_from_slice(&key);
                let mut found = Vec::new();
                for (_, v) in ctx.scan_prefix(&prefix)? {
                    let (encoded, count) = split_counted(&v)?;
                    found.push((decode_row(encoded, &other.row_types)?, count));
                }
                other_rows.insert(key.clone(), found);
            }
            let candidates: Vec<(Vec<ScalarValue>, i64)> = other_rows
                .get(&key)
                .map(|rows| rows.iter().map(|(o, c)| (glue(&row, o), *c)).collect())
                .unwrap_or_default();
            let matches = self.passing(candidates)?;
            let split = |glued: &[ScalarValue]| -> Vec<ScalarValue> {
                let mine = me.row_types.len();
                match side {
                    Side::Left => glued[mine..].to_vec(),
                    Side::Right => glued[..glued.len() - mine].to_vec(),
                }
            };
            for (g, c) in &matches {
                out.push((g.clone(), w * c));
            }
            if matches.is_empty() && me_outer {
                out.push((glue(&row, &other_nulls), w));
            }
            let mut my_prefix = table_prefix(me.state_id).to_vec();
            my_prefix.extend_from_slice(&key);
            if other_outer && !matches.is_empty() {
                // An other-side row loses (or regains) its NULL extension
                // when it gains its first (or loses its last) match on this
                // side.
                let mut mine = Vec::new();
                for (_, v) in ctx.scan_prefix(&my_prefix)? {
                    let (encoded, count) = split_counted(&v)?;
                    mine.push((decode_row(encoded, &me.row_types)?, count));
                }
                for (g, c) in &matches {
                    let o = split(g);
                    let before: i64 = self
                        .passing(mine.iter().map(|(y, n)| (glue(y, &o), *n)).collect())?
                        .iter()
                        .map(|(_, n)| n)
                        .sum();
                    let after = before + w;
                    let flip = match (before > 0, after > 0) {
                        (false, true) => -1,
                        (true, false) => 1,
                        _ => 0,
                    };
                    if flip != 0 {
                        out.push((glue(&me_nulls, &o), flip * c));
                    }
                }
            }
            // This side's state.
            let mut encoded = Vec::new();
            encode_row(&mut encoded, &row_types, &columns, r)?;
            let mut state_key = my_prefix;
            if me.append_only {
                if w < 0 {
                    return Err(Error::Internal(format!(
                        "append-only join input {} retracted a row",
                        me.state_id
                    )));
                }
                state_key.extend_from_slice(&next_id.to_be_bytes());
                next_id += 1;
                encoded.extend_from_slice(&(w as u64).to_be_bytes());
                ctx.put(state_key, encoded);
            } else {
                state_key.extend_from_slice(&encoded);
                ctx.add_count(state_key, encoded, w)?;
            }
        }
        if me.append_only {
            ctx.put(counter, next_id.to_be_bytes().to_vec());
            // An abandoned commit skips these ids; it never reuses them.
            self.next_ids[side as usize].store(next_id, Ordering::Relaxed);
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
            append_only: false,
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
