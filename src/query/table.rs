//! [`StoredTable`]: a DataFusion `TableProvider` over a table's rows in RocksDB.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;

use crate::catalog::types::SqlType;
use crate::catalog::Table;
use crate::error::{Error, Result};
use crate::state::chunk::ChunkCodec;
use crate::state::encoding::{decode_row, encode_value, split_counted, table_prefix};
use crate::state::Store;

/// Rows per Arrow batch produced by a scan.
const SCAN_BATCH_ROWS: usize = 8192;
/// Above this many key combinations a lookup falls back to a scan.
const MAX_POINT_KEYS: usize = 4096;

/// A durable table as DataFusion sees it.
#[derive(Debug)]
pub struct StoredTable {
    table: Arc<Table>,
    store: Arc<Store>,
}

impl StoredTable {
    /// Wraps a catalog table.
    pub fn new(table: Arc<Table>, store: Arc<Store>) -> Self {
        StoredTable { table, store }
    }

    /// The primary keys selected by `filters`, if they pin down every
    /// primary-key column to a finite set of literals.
    fn point_keys(&self, filters: &[Expr]) -> Option<Vec<Vec<u8>>> {
        let pk = &self.table.def.primary_key;
        if pk.is_empty() {
            return None;
        }
        let mut pinned: HashMap<usize, Vec<ScalarValue>> = HashMap::new();
        for f in filters {
            for conj in split_conjunction(f) {
                if let Some(((col, casted), values)) = equality_values(conj) {
                    if let Some(idx) = self.column_index(&col) {
                        let int_column = matches!(
                            self.table.def.columns[idx].ty,
                            SqlType::Int2 | SqlType::Int4 | SqlType::Int8
                        );
                        if pk.contains(&idx) && (!casted || int_column) {
                            // Two predicates on one column: intersect.
                            let entry = pinned.entry(idx).or_insert_with(|| values.clone());
                            entry.retain(|v| values.contains(v));
                        }
                    }
                }
            }
        }
        let mut keys: Vec<Vec<u8>> = vec![table_prefix(self.table.def.id).to_vec()];
        for &idx in pk {
            let values = pinned.get(&idx)?;
            let col = &self.table.def.columns[idx];
            let target = col.ty.arrow_type();
            let mut next = Vec::new();
            for k in &keys {
                for v in values {
                    // A literal that does not fit the column type matches no row.
                    let Ok(v) = v.cast_to(&target) else { continue };
                    if v.is_null() {
                        continue;
                    }
                    let mut key = k.clone();
                    encode_value(&mut key, &col.ty, &v).ok()?;
                    next.push(key);
                }
            }
            if next.len() > MAX_POINT_KEYS {
                return None;
            }
            keys = next;
        }
        keys.sort();
        keys.dedup();
        Some(keys)
    }

    fn column_index(&self, col: &Column) -> Option<usize> {
        self.table
            .def
            .columns
            .iter()
            .position(|c| c.name == col.name)
    }

    /// Reads the rows selected by `filters` (all rows if they select no
    /// point keys), at most `limit` when there are no filters.
    pub fn read(&self, filters: &[Expr], limit: Option<usize>) -> Result<Vec<RecordBatch>> {
        // A limit applies to the scan only without filters (DataFusion
        // filters above it).
        let limit = if filters.is_empty() { limit } else { None };
        if self.table.chunked {
            return self.read_chunks(limit);
        }
        let types = self.table.types();
        let mut rows: Vec<Vec<ScalarValue>> = Vec::new();
        let mut batches = Vec::new();
        match self.point_keys(filters) {
            Some(keys) => {
                for v in self.store.multi_get(&keys)?.into_iter().flatten() {
                    self.decode_into(&v, &types, &mut rows)?;
                }
            }
            None => {
                let mut n = 0usize;
                self.store
                    .scan_prefix(&table_prefix(self.table.def.id), |_, v| {
                        n += self.decode_into(v, &types, &mut rows)?;
                        if rows.len() >= SCAN_BATCH_ROWS {
                            batches.push(self.to_batch(std::mem::take(&mut rows))?);
                        }
                        Ok(limit.is_none_or(|l| n < l))
                    })?;
            }
        }
        if !rows.is_empty() || batches.is_empty() {
            batches.push(self.to_batch(rows)?);
        }
        Ok(batches)
    }

    /// Reads an append-only view's chunks in insertion order, each chunk one
    /// batch as stored (no per-row decoding), at most `limit` rows.
    fn read_chunks(&self, limit: Option<usize>) -> Result<Vec<RecordBatch>> {
        let codec = ChunkCodec::new(self.table.schema.clone())?;
        let mut batches = Vec::new();
        let mut n = 0usize;
        self.store
            .scan_prefix(&table_prefix(self.table.def.id), |_, v| {
                let mut b = codec.decode(v)?;
                if let Some(l) = limit {
                    b = b.slice(0, b.num_rows().min(l - n));
                }
                n += b.num_rows();
                batches.push(b);
                Ok(limit.is_none_or(|l| n < l))
            })?;
        if batches.is_empty() {
            batches.push(RecordBatch::new_empty(self.table.schema.clone()));
        }
        Ok(batches)
    }

    /// Decodes a stored value into `rows`: one row, or — for a counted
    /// (materialized view) row — as many copies as its multiplicity.
    fn decode_into(
        &self,
        v: &[u8],
        types: &[SqlType],
        rows: &mut Vec<Vec<ScalarValue>>,
    ) -> Result<usize> {
        if !self.table.counted {
            rows.push(decode_row(v, types)?);
            return Ok(1);
        }
        let (row, count) = split_counted(v)?;
        let row = decode_row(row, types)?;
        for _ in 1..count {
            rows.push(row.clone());
        }
        rows.push(row);
        Ok(count.max(0) as usize)
    }

    fn to_batch(&self, rows: Vec<Vec<ScalarValue>>) -> Result<RecordBatch> {
        rows_to_batch(&self.table.schema, rows)
    }
}

/// Builds a batch of `schema` from rows of scalars.
pub fn rows_to_batch(schema: &SchemaRef, rows: Vec<Vec<ScalarValue>>) -> Result<RecordBatch> {
    let ncols = schema.fields().len();
    if rows.is_empty() {
        return Ok(RecordBatch::new_empty(schema.clone()));
    }
    let mut columns: Vec<Vec<ScalarValue>> =
        (0..ncols).map(|_| Vec::with_capacity(rows.len())).collect();
    for row in rows {
        for (i, v) in row.into_iter().enumerate() {
            columns[i].push(v);
        }
    }
    let arrays: Vec<ArrayRef> = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(vals, f)| {
            ScalarValue::iter_to_array(vals)
                .and_then(|a| {
                    if a.data_type() == f.data_type() {
                        Ok(a)
                    } else {
                        Ok(datafusion::arrow::compute::cast(&a, f.data_type())?)
                    }
                })
                .map_err(Error::from)
        })
        .collect::<Result<_>>()?;
    Ok(RecordBatch::try_new(schema.clone(), arrays)?)
}

fn split_conjunction(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = split_conjunction(left);
            v.extend(split_conjunction(right));
            v
        }
        other => vec![other],
    }
}

/// `col = lit`, `lit = col`, `col IN (lits)` → (col, values).
fn equality_values(e: &Expr) -> Option<((Column, bool), Vec<ScalarValue>)> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (left.as_ref(), right.as_ref()) {
            (c, Expr::Literal(v, _)) | (Expr::Literal(v, _), c) => {
                Some((key_column(c)?, vec![v.clone()]))
            }
            _ => None,
        },
        Expr::InList(il) if !il.negated => {
            let c = key_column(&il.expr)?;
            let mut vals = Vec::new();
            for item in &il.list {
                match item {
                    Expr::Literal(v, _) => vals.push(v.clone()),
                    _ => return None,
                }
            }
            Some((c, vals))
        }
        _ => None,
    }
}

/// The column of a key predicate's column side. A cast is accepted only when
/// it widens an integer column (`CAST(int4_col AS BIGINT)`), which is
/// injective, so equality on the cast value is equality on the column; any
/// other cast (`CAST(text_col AS INT)`: '05' and '5' both equal 5) forces a
/// scan. The filter is re-applied above the lookup either way.
fn key_column(e: &Expr) -> Option<(Column, bool)> {
    use datafusion::arrow::datatypes::DataType as D;
    match e {
        Expr::Column(c) => Some((c.clone(), false)),
        Expr::Cast(cast) => match (cast.expr.as_ref(), cast.field.data_type()) {
            (Expr::Column(c), D::Int16 | D::Int32 | D::Int64 | D::Float64 | D::Decimal128(..)) => {
                Some((c.clone(), true))
            }
            _ => None,
        },
        _ => None,
    }
}

#[async_trait]
impl TableProvider for StoredTable {
    fn schema(&self) -> SchemaRef {
        self.table.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Inexact: we use the filters to pick keys, DataFusion re-applies them.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self
            .read(filters, limit)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        let exec =
            MemorySourceConfig::try_new_exec(&[batches], self.schema(), projection.cloned())?;
        Ok(exec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, ColumnDef, TableDef};
    use datafusion::prelude::{cast, col, lit};
    use rocksdb::WriteBatch;

    fn table_with_rows(n: i64) -> (tempfile::TempDir, StoredTable) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), false).unwrap());
        let (catalog, _) = Catalog::load(store.clone()).unwrap();
        let t = catalog
            .create_table(TableDef {
                id: 0,
                name: "t".into(),
                columns: vec![
                    ColumnDef {
                        name: "id".into(),
                        ty: SqlType::Int8,
                        nullable: false,
                    },
                    ColumnDef {
                        name: "s".into(),
                        ty: SqlType::Text,
                        nullable: true,
                    },
                ],
                primary_key: vec![0],
            })
            .unwrap();
        let mut batch = WriteBatch::default();
        for i in 0..n {
            let mut k = table_prefix(t.def.id).to_vec();
            encode_value(&mut k, &SqlType::Int8, &ScalarValue::Int64(Some(i))).unwrap();
            let mut v = Vec::new();
            encode_value(&mut v, &SqlType::Int8, &ScalarValue::Int64(Some(i))).unwrap();
            encode_value(
                &mut v,
                &SqlType::Text,
                &ScalarValue::Utf8(Some(i.to_string())),
            )
            .unwrap();
            batch.put(k, v);
        }
        store.write(batch).unwrap();
        (dir, StoredTable::new(t, store))
    }

    fn rows(t: &StoredTable, filters: &[Expr]) -> usize {
        t.read(filters, None)
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum()
    }

    /// An append-only view stored in each layout: the per-row layout of
    /// views created before chunks, and chunks. Both read back the same
    /// rows in insertion order (a weight-2 row twice), and a LIMIT stops
    /// inside a chunk.
    #[test]
    fn append_only_views_read_the_same_in_both_layouts() {
        use crate::catalog::{MvDef, MvOwner};
        use crate::dataflow::operator::{Layout, Materialize, OpCtx, Operator};
        use crate::dataflow::ChangeBatch;
        for chunked in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::open(dir.path(), false).unwrap());
            let def = MvDef {
                id: 7,
                name: "v".into(),
                sql: String::new(),
                depends_on: vec![],
                columns: vec![
                    ColumnDef {
                        name: "id".into(),
                        ty: SqlType::Int8,
                        nullable: true,
                    },
                    ColumnDef {
                        name: "s".into(),
                        ty: SqlType::Text,
                        nullable: true,
                    },
                ],
                key: vec![],
                state_ids: vec![],
                append_only: true,
                chunked,
                owner: MvOwner::User,
            };
            let table = Arc::new(Table::for_mv(&def));
            let layout = Layout::of_stored(&def);
            let mut m = Materialize::new(7, table.types(), table.schema.clone(), layout).unwrap();
            for delta in [
                "+1 | 1 | a\n+2 | 2 | NULL\n0 | 9 | zero",
                "+1 | 3 | c",
                "+1 | NULL | d",
            ] {
                let mut batch = WriteBatch::default();
                let mut ctx = OpCtx::new(&store, &mut batch);
                let input = ChangeBatch::from_pretty(table.schema.clone(), delta).unwrap();
                m.process(input, &mut ctx).unwrap();
                store.write(batch).unwrap();
            }
            let t = StoredTable::new(table.clone(), store.clone());
            let text = |batches: Vec<RecordBatch>| {
                datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                    .unwrap()
                    .to_string()
            };
            let all = text(t.read(&[], None).unwrap());
            let want = "+----+---+\n| id | s |\n+----+---+\n| 1  | a |\n| 2  |   |\n| 2  |   |\n| 3  | c |\n|    | d |\n+----+---+";
            assert_eq!(all, want, "chunked = {chunked}");
            let two: usize = t
                .read(&[], Some(2))
                .unwrap()
                .iter()
                .map(|b| b.num_rows())
                .sum();
            assert_eq!(two, 2, "chunked = {chunked}");
            // A filter is applied above the scan: every row is read.
            assert_eq!(rows(&t, &[col("id").eq(lit(3i64))]), 5);
        }
    }

    #[test]
    fn primary_key_equality_reads_only_the_matching_keys() {
        let (_d, t) = table_with_rows(1000);
        assert_eq!(rows(&t, &[col("id").eq(lit(5i64))]), 1);
        assert_eq!(rows(&t, &[lit(7i64).eq(col("id"))]), 1);
        assert_eq!(
            rows(
                &t,
                &[col("id").in_list(vec![lit(1i64), lit(2i64), lit(5000i64)], false)]
            ),
            2
        );
        // A widening cast of the integer key is still a lookup.
        assert_eq!(
            rows(
                &t,
                &[cast(
                    col("id"),
                    datafusion::arrow::datatypes::DataType::Decimal128(20, 0)
                )
                .eq(lit(ScalarValue::Decimal128(Some(3), 20, 0)))]
            ),
            1
        );
        // Contradictory predicates on the key select nothing.
        assert_eq!(
            rows(&t, &[col("id").eq(lit(1i64)), col("id").eq(lit(2i64))]),
            0
        );
        // Anything else scans (the filter is applied above the scan).
        assert_eq!(rows(&t, &[col("id").gt(lit(5i64))]), 1000);
        assert_eq!(rows(&t, &[col("s").eq(lit("5"))]), 1000);
        assert_eq!(rows(&t, &[]), 1000);
    }
}
