//! [`SourceTable`]: a bounded scan of a source as DataFusion sees it.
//!
//! `SELECT … FROM generator_source` reads rows `0..committed offset`:
//! exactly the rows every view over the source has counted, so a view can
//! be checked against its defining query run in batch. Generator sources
//! keep no rows; the scan regenerates them lazily, one Arrow batch at a
//! time.
//!
//! `SELECT … FROM kafka_source` reads the topic from the source's start
//! offsets to the partitions' high watermarks at the time of the query, so
//! users can inspect a topic with SQL (records that fail to decode are
//! skipped; they are in `sluice_source_errors` once the source reads them).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::ExecutionPlan;

use crate::catalog::{read_source_offset, Source, SourceConnector};
use crate::connector::{GeneratorSpec, KafkaSpec, RecordDecoder};
use crate::state::Store;

/// Rows per generated batch.
const BATCH_ROWS: u64 = 8192;

/// A source, scanned up to its committed offset.
#[derive(Debug)]
pub struct SourceTable {
    source: Arc<Source>,
    store: Arc<Store>,
}

impl SourceTable {
    /// Wraps a catalog source.
    pub fn new(source: Arc<Source>, store: Arc<Store>) -> Self {
        SourceTable { source, store }
    }
}

#[derive(Debug)]
struct Generated {
    spec: GeneratorSpec,
    schema: SchemaRef,
    end: u64,
}

impl PartitionStream for Generated {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let spec = self.spec.clone();
        let end = self.end;
        let batches = (0..end).step_by(BATCH_ROWS as usize).map(move |from| {
            spec.generate(from, (from + BATCH_ROWS).min(end))
                .map_err(|e| DataFusionError::External(Box::new(e)))
        });
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches),
        ))
    }
}

#[derive(Debug)]
struct KafkaScan {
    name: String,
    spec: KafkaSpec,
    decoder: RecordDecoder,
    schema: SchemaRef,
    limit: Option<usize>,
}

impl PartitionStream for KafkaScan {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (name, spec, decoder, limit) = (
            self.name.clone(),
            self.spec.clone(),
            self.decoder.clone(),
            self.limit,
        );
        // librdkafka blocks: read on a blocking thread.
        let read = tokio::task::spawn_blocking(move || {
            let to = spec.high_watermarks(&name)?;
            spec.read_range(&name, &decoder, &spec.initial_positions(), &to, limit)
        });
        let batches = futures::stream::once(async move {
            let result = match read.await {
                Ok(Ok(batches)) => Ok(batches),
                Ok(Err(e)) => Err(DataFusionError::External(Box::new(e))),
                Err(e) => Err(DataFusionError::External(Box::new(e))),
            };
            futures::stream::iter(match result {
                Ok(b) => b.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
        });
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::StreamExt::flatten(batches),
        ))
    }
}

#[async_trait]
impl TableProvider for SourceTable {
    fn schema(&self) -> SchemaRef {
        self.source.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let external = |e| DataFusionError::External(Box::new(e));
        let part: Arc<dyn PartitionStream> = match &self.source.def.connector {
            SourceConnector::Generator(spec) => {
                // Read while the caller holds the engine's snapshot lock: the
                // same commit as the views this statement reads.
                let end = read_source_offset(&self.store, self.source.def.id).map_err(external)?;
                let end = match limit {
                    Some(l) => end.min(l as u64),
                    None => end,
                };
                Arc::new(Generated {
                    spec: spec.clone(),
                    schema: self.source.schema.clone(),
                    end,
                })
            }
            SourceConnector::Kafka(k) => Arc::new(KafkaScan {
                name: self.source.def.name.clone(),
                spec: k.clone(),
                decoder: self
                    .source
                    .def
                    .decoder()
                    .map_err(external)?
                    .ok_or_else(|| DataFusionError::Internal("no decoder".into()))?,
                schema: self.source.schema.clone(),
                limit,
            }),
        };
        Ok(Arc::new(StreamingTableExec::try_new(
            self.source.schema.clone(),
            vec![part],
            projection,
            vec![],
            false,
            limit,
        )?))
    }
}
