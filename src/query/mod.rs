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

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DfResult;

use crate::catalog::{Catalog, Relation};
use crate::state::Store;
pub use source::SourceTable;
pub use table::StoredTable;

/// Live system tables (`sluice_source_errors`, …): built by a layer above
/// this one, which knows the running sources, and answered as in-memory
/// tables at planning time.
pub trait SystemTables: Send + Sync {
    /// Their names.
    fn names(&self) -> Vec<String>;
    /// The current contents of `name`, if it is one.
    fn table(&self, name: &str) -> Option<crate::error::Result<RecordBatch>>;
}

/// The `public` schema, backed by the catalog.
#[derive(Clone)]
pub struct SluiceSchema {
    catalog: Arc<Catalog>,
    store: Arc<Store>,
    system: Arc<OnceLock<Weak<dyn SystemTables>>>,
}

impl std::fmt::Debug for SluiceSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SluiceSchema").finish()
    }
}

impl SluiceSchema {
    /// A schema provider over `catalog`, reading rows from `store`.
    pub fn new(catalog: Arc<Catalog>, store: Arc<Store>) -> Self {
        SluiceSchema {
            catalog,
            store,
            system: Arc::new(OnceLock::new()),
        }
    }

    /// Where system tables come from (set once, after the engine exists).
    pub fn set_system_tables(&self, system: Weak<dyn SystemTables>) {
        let _ = self.system.set(system);
    }

    fn system(&self) -> Option<Arc<dyn SystemTables>> {
        self.system.get().and_then(|w| w.upgrade())
    }
}

#[async_trait]
impl SchemaProvider for SluiceSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.catalog.relation_names();
        if let Some(s) = self.system() {
            names.extend(s.names());
        }
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(match self.catalog.get(name) {
            Some(Relation::Table(t)) => Some(Arc::new(StoredTable::new(t, self.store.clone()))),
            Some(Relation::MaterializedView(m)) => Some(Arc::new(StoredTable::new(
                m.table.clone(),
                self.store.clone(),
            ))),
            // A keyed source's current rows are stored like a table's.
            Some(Relation::Source(s)) => match &s.table {
                Some(t) => Some(Arc::new(StoredTable::new(t.clone(), self.store.clone()))),
                None => Some(Arc::new(SourceTable::new(s, self.store.clone()))),
            },
            Some(Relation::View(v)) => Some(Arc::new(ViewTable::new(
                v.plan.clone(),
                Some(v.def.sql.clone()),
            ))),
            None => match self.system().and_then(|s| s.table(name)) {
                None => None,
                Some(batch) => {
                    let batch = batch
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                    Some(Arc::new(MemTable::try_new(
                        batch.schema(),
                        vec![vec![batch]],
                    )?))
                }
            },
        })
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalog.get(name).is_some()
            || self
                .system()
                .is_some_and(|s| s.names().iter().any(|n| n == name))
    }
}
