//! Results sent over time: a `SUBSCRIBE` as data rows, and
//! `COPY … TO STDOUT` (of a subscription or of a finished query) as
//! `CopyData`.
//!
//! pgwire sends a query's rows only after the handler returns, and
//! coalesces them into one flush; a subscription never ends, so its rows
//! are written here, from inside the handler, and flushed after every
//! commit's batch. That also keeps the whole stream inside pgwire's cancel
//! `select`: a `CancelRequest` (psql: Ctrl-C) drops this future and the
//! client gets SQLSTATE 57014, as PostgreSQL sends for a canceled `COPY`.
//! A client that went away is noticed at the next write, which fails.

use std::fmt::Debug;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use futures::{Sink, SinkExt};
use pgwire::api::portal::Format;
use pgwire::api::results::{Response, Tag};
use pgwire::api::ClientInfo;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
use pgwire::messages::data::RowDescription;
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;

use crate::server::errors::to_pgwire;
use crate::server::handler::{data_rows, pg_fields};
use crate::sql::subscribe::{CopyOptions, Stream};

/// Streams `stream` to the client; returns the final command tag (only a
/// finished `COPY` of a query gets there: a subscription ends by cancel,
/// disconnect or error).
pub async fn send<C>(
    client: &mut C,
    stream: Stream,
    copy: Option<CopyOptions>,
    format: &Format,
    opts: Arc<FormatOptions>,
    send_describe: bool,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    match copy {
        Some(options) => copy_out(client, stream, &options).await,
        None => {
            let Stream::Live(mut live) = stream else {
                return Err(to_pgwire(crate::error::Error::Internal(
                    "a finished result streamed without COPY".into(),
                )));
            };
            let schema = live.sub.schema();
            let fields = Arc::new(pg_fields(&schema, None, format, Some(opts))?);
            if send_describe {
                client
                    .send(PgWireBackendMessage::RowDescription(RowDescription::new(
                        fields.iter().map(Into::into).collect(),
                    )))
                    .await?;
            }
            loop {
                let batch = live.sub.next().await.map_err(to_pgwire)?;
                for row in data_rows(&fields, batch) {
                    client.feed(PgWireBackendMessage::DataRow(row?)).await?;
                }
                client.flush().await?;
            }
        }
    }
}

async fn copy_out<C>(
    client: &mut C,
    stream: Stream,
    options: &CopyOptions,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let schema = match &stream {
        Stream::Live(l) => l.sub.schema(),
        Stream::Rows(r) => r.schema.clone(),
    };
    let columns = schema.fields().len();
    client
        .send(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
            0,
            columns as i16,
            vec![0; columns],
        )))
        .await?;
    if options.header {
        let names: Vec<String> = match &stream {
            Stream::Rows(r) if r.names.is_some() => r.names.clone().unwrap_or_default(),
            _ => schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        let mut line = String::new();
        for (i, n) in names.iter().enumerate() {
            if i > 0 {
                line.push(options.delimiter);
            }
            csv_field(n, options.delimiter, &mut line);
        }
        line.push('\n');
        client
            .feed(PgWireBackendMessage::CopyData(CopyData::new(line.into())))
            .await?;
    }
    match stream {
        Stream::Rows(rows) => {
            let mut n = 0;
            for b in &rows.batches {
                n += b.num_rows();
                for line in lines(b, options) {
                    client
                        .feed(PgWireBackendMessage::CopyData(CopyData::new(line.into())))
                        .await?;
                }
            }
            client
                .feed(PgWireBackendMessage::CopyDone(CopyDone::new()))
                .await?;
            Ok(Response::Execution(Tag::new("COPY").with_rows(n)))
        }
        Stream::Live(mut live) => loop {
            client.flush().await?;
            let b = live.sub.next().await.map_err(to_pgwire)?;
            for line in lines(&b, options) {
                client
                    .feed(PgWireBackendMessage::CopyData(CopyData::new(line.into())))
                    .await?;
            }
        },
    }
}

/// One `COPY` line per row of `b`, in PostgreSQL's text or CSV format.
fn lines(b: &RecordBatch, options: &CopyOptions) -> Vec<String> {
    let mut out = Vec::with_capacity(b.num_rows());
    let mut cell = String::new();
    for r in 0..b.num_rows() {
        let mut line = String::new();
        for (i, col) in b.columns().iter().enumerate() {
            if i > 0 {
                line.push(options.delimiter);
            }
            cell.clear();
            if !crate::pgtext::write_text(col, r, &mut cell) {
                if !options.csv {
                    line.push_str("\\N");
                }
                continue;
            }
            if options.csv {
                // An empty string is quoted so that it differs from NULL.
                if cell.is_empty() {
                    line.push_str("\"\"");
                } else {
                    csv_field(&cell, options.delimiter, &mut line);
                }
            } else {
                text_field(&cell, options.delimiter, &mut line);
            }
        }
        line.push('\n');
        out.push(line);
    }
    out
}

/// Text format: backslash escapes for the characters that would break a
/// line or a column.
fn text_field(v: &str, delimiter: char, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' if delimiter == '\t' => out.push_str("\\t"),
            c if c == delimiter => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

/// CSV: quoted (quotes doubled) when it holds a delimiter, quote or line
/// break.
fn csv_field(v: &str, delimiter: char, out: &mut String) {
    if v.contains([delimiter, '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
                Arc::new(StringArray::from(vec![
                    Some("x\ty\\z"),
                    Some(""),
                    Some("say \"hi\", bye\n"),
                ])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn text_format_escapes_like_postgres() {
        let o = CopyOptions {
            csv: false,
            header: false,
            delimiter: '\t',
        };
        assert_eq!(
            lines(&batch(), &o),
            vec!["1\tx\\ty\\\\z\n", "\\N\t\n", "3\tsay \"hi\", bye\\n\n"]
        );
    }

    #[test]
    fn csv_format_quotes_like_postgres() {
        let o = CopyOptions {
            csv: true,
            header: false,
            delimiter: ',',
        };
        assert_eq!(
            lines(&batch(), &o),
            vec!["1,x\ty\\z\n", ",\"\"\n", "3,\"say \"\"hi\"\", bye\n\"\n"]
        );
    }
}
