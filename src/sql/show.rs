//! `SHOW TABLES`, `SHOW VIEWS`, `SHOW MATERIALIZED VIEWS`.

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

/// `SHOW VIEWS` / `SHOW MATERIALIZED VIEWS`, sorted by name.
pub fn views(engine: &Engine, materialized: bool) -> Result<Outcome> {
    names(if materialized {
        engine.catalog.mv_names()
    } else {
        engine.catalog.view_names()
    })
}

/// Lists the tables, sorted by name.
pub fn tables(engine: &Engine) -> Result<Outcome> {
    names(engine.catalog.table_names())
}

fn names(list: Vec<String>) -> Result<Outcome> {
    let schema = tables_schema();
    let names = StringArray::from(list);
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(names)])?;
    Ok(Outcome::Rows(Rows {
        schema,
        batches: vec![batch],
        names: None,
        tag: "SHOW",
    }))
}
