//! Ad-hoc queries: DataFusion's view of Sluice's durable state.
//!
//! [`SluiceSchema`] is the `public` schema DataFusion plans against: it
//! resolves names through the [`Catalog`] to a [`StoredTable`] (rows in
//! RocksDB), a [`SourceTable`] (a bounded scan of a source) or a DataFusion
//! `ViewTable` (a view's planned query).
//!
//! [`StoredTable::scan`] recognises equality predicates on the whole primary
//! key (`id = 5`, `id IN (1, 2)`, `a = 1 AND b = 'x'`) and answers them with
//! point reads (`multi_get`) instead of a scan, so a primary-key lookup costs
//! O(keys), not O(table).

pub mod functions;
pub mod source;
pub mod table;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::Result as DfResult;

use crate::catalog::{Catalog, Relation};
use crate::state::Store;
pub use source::SourceTable;
pub use table::StoredTable;

/// The `public` schema, backed by the catalog.
#[derive(Clone)]
pub struct SluiceSchema {
    catalog: Arc<Catalog>,
    store: Arc<Store>,
}

impl std::fmt::Debug for SluiceSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SluiceSchema").finish()
    }
}

impl SluiceSchema {
    /// A schema provider over `catalog`, reading rows from `store`.
    pub fn new(catalog: Arc<Catalog>, store: Arc<Store>) -> Self {
        SluiceSchema { catalog, store }
    }
}

#[async_trait]
impl SchemaProvider for SluiceSchema {
    fn table_names(&self) -> Vec<String> {
        self.catalog.relation_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(match self.catalog.get(name) {
            Some(Relation::Table(t)) => Some(Arc::new(StoredTable::new(t, self.store.clone()))),
            Some(Relation::MaterializedView(m)) => Some(Arc::new(StoredTable::new(
                m.table.clone(),
                self.store.clone(),
            ))),
            Some(Relation::Source(s)) => Some(Arc::new(SourceTable::new(s, self.store.clone()))),
            Some(Relation::View(v)) => Some(Arc::new(ViewTable::new(
                v.plan.clone(),
                Some(v.def.sql.clone()),
            ))),
            None => None,
        })
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalog.get(name).is_some()
    }
}
