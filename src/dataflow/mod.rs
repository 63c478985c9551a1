//! Change batches: the unit of data that flows from writes to consumers.
//!
//! A [`ChangeBatch`] is an Arrow `RecordBatch` plus one `i64` weight per row:
//! `+1` for an inserted row, `-1` for a deleted one (an UPDATE is a `-1` of
//! the old row and a `+1` of the new one). This is the DBSP/Materialize
//! representation: a batch is a multiset delta, batches add up, and every
//! DataFusion `PhysicalExpr` evaluates on the data columns unchanged (a filter
//! applies the same mask to the weights).
//!
//! **Invariant.** For a keyed relation, a `-1` row carries exactly the row
//! that was stored: consumers may rely on it to retract state (a sum, a
//! min/max multiset, a join index) without reading the old value back.
//!
//! Today the table commit path (`Engine::commit`) produces one change batch
//! per table per statement and publishes it on the engine's change feed;
//! incrementally maintained views subscribe to that feed.

use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;

use crate::error::{Error, Result};

/// Rows with multiplicities: the delta of a relation.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    /// The changed rows.
    pub data: RecordBatch,
    /// One weight per row of `data`: +1 insert, -1 delete.
    pub weights: Int64Array,
}

impl ChangeBatch {
    /// A batch of `data` where every row has weight `weight`.
    pub fn uniform(data: RecordBatch, weight: i64) -> Self {
        let weights = Int64Array::from(vec![weight; data.num_rows()]);
        ChangeBatch { data, weights }
    }

    /// Concatenates several change batches of one schema.
    pub fn concat(schema: &SchemaRef, parts: &[ChangeBatch]) -> Result<ChangeBatch> {
        let data = concat_batches(schema, parts.iter().map(|p| &p.data))?;
        let mut w = Vec::with_capacity(data.num_rows());
        for p in parts {
            w.extend(p.weights.values().iter().copied());
        }
        if w.len() != data.num_rows() {
            return Err(Error::Internal(
                "change batch weights do not match rows".into(),
            ));
        }
        Ok(ChangeBatch {
            data,
            weights: Int64Array::from(w),
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.num_rows()
    }

    /// True when no row changed.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
}

/// The change of one table made by one committed statement.
#[derive(Debug, Clone)]
pub struct TableChange {
    /// Table object id.
    pub table_id: u32,
    /// The rows inserted (+1) and deleted (-1).
    pub changes: ChangeBatch,
}
