//! `SHOW TABLES`.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::engine::Engine;
use crate::error::Result;
use crate::sql::{Outcome, Rows};

/// Schema of `SHOW TABLES`.
pub fn tables_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)]))
}

/// Lists the tables, sorted by name.
pub fn tables(engine: &Engine) -> Result<Outcome> {
    let schema = tables_schema();
    let names = StringArray::from(engine.catalog.table_names());
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(names)])?;
    Ok(Outcome::Rows(Rows {
        schema,
        batches: vec![batch],
        names: None,
        tag: "SHOW",
    }))
}
