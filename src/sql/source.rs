//! `CREATE SOURCE`, `DROP SOURCE`, `SHOW SOURCES` and connections:
//! statements sqlparser does not know, parsed here from its tokens.
//!
//! ```text
//! CREATE SOURCE [IF NOT EXISTS] name FROM GENERATOR COUNTER [(RATE n, MAX n)]
//! CREATE SOURCE [IF NOT EXISTS] name FROM GENERATOR NEXMARK
//!     (TABLE 'person' | 'auction' | 'bid' [, RATE n] [, EVENTS n] [, BASE TIME ms])
//! CREATE SOURCE [IF NOT EXISTS] name [(column type [NOT NULL], …)]
//!     FROM KAFKA (BROKERS '…' | CONNECTION name,
//!                 TOPIC '…' | TOPIC PATTERN 'regex'
//!                 [, START OFFSET 'earliest' | 'latest' | (offset, …)]
//!                 [, START TIMESTAMP ms] [, GROUP ID '…'] [, MAX RECORD BYTES n]
//!                 [, 'librdkafka.property' [=] 'value' …])
//!     FORMAT JSON | CSV [(DELIMITER 'c', HEADER true)] | TEXT | BYTES
//!          | AVRO (SCHEMA '…' | SCHEMA REGISTRY 'http://…')
//!     [ENVELOPE NONE | UPSERT | DEBEZIUM]
//!     [INCLUDE KEY | PARTITION | OFFSET | TIMESTAMP | HEADERS [AS name], …]
//!     [ON ERROR SKIP | FAIL | DEAD LETTER TOPIC 'topic']
//! DROP SOURCE [IF EXISTS] name [, …] [CASCADE | RESTRICT]
//! SHOW SOURCES
//! CREATE CONNECTION [IF NOT EXISTS] name TO KAFKA (BROKERS '…' [, 'property' 'value' …])
//! DROP CONNECTION [IF EXISTS] name [CASCADE | RESTRICT]
//! SHOW CONNECTIONS
//! ```
//!
//! [`split`] decides, per `;`-separated statement, whether it is one of
//! ours; everything else goes to sqlparser unchanged.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::catalog::types::SqlType;
use crate::catalog::{ColumnDef, ConnectionDef, Relation, SourceConnector, SourceDef};
use crate::connector::kafka::{OnError, StartOffset, Topics};
use crate::connector::{Envelope, Format, GeneratorSpec, KafkaSpec, Meta, NexmarkTable};
use crate::engine::Engine;
use crate::error::{DataErrorKind, Error, Result};
use crate::sql::tokens::{upper_word, Cursor};
use crate::sql::{Outcome, Rows};

/// Default rate of a counter: one row per second.
const DEFAULT_COUNTER_RATE: u64 = 1;
/// Default rate of a Nexmark source, in events of the whole sequence per
/// second.
const DEFAULT_NEXMARK_RATE: u64 = 1000;

/// One of our statements.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStatement {
    /// The statement's text (for logs and `Display`).
    pub text: String,
    /// What it asks for.
    pub kind: SourceStatementKind,
}

/// The source statements. (Parsed once per statement: the Kafka
/// variant's size does not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SourceStatementKind {
    /// `CREATE SOURCE`.
    Create {
        /// Source name.
        name: String,
        /// `IF NOT EXISTS`.
        if_not_exists: bool,
        /// The generator.
        generator: GeneratorSpec,
        /// No `BASE TIME` was given: a Nexmark source starts at the
        /// creation time.
        base_time_now: bool,
    },
    /// `CREATE SOURCE … FROM KAFKA`.
    CreateKafka {
        /// Source name.
        name: String,
        /// `IF NOT EXISTS`.
        if_not_exists: bool,
        /// Declared value columns.
        columns: Vec<ColumnDef>,
        /// The definition (brokers and start offsets resolved at execution).
        spec: KafkaSpec,
        /// Names of the `INCLUDE`d metadata columns.
        include_names: Vec<String>,
    },
    /// `CREATE CONNECTION … TO KAFKA`.
    CreateConnection {
        /// Name.
        name: String,
        /// `IF NOT EXISTS`.
        if_not_exists: bool,
        /// `bootstrap.servers`.
        brokers: String,
        /// librdkafka properties.
        properties: Vec<(String, String)>,
    },
    /// `DROP CONNECTION`.
    DropConnection {
        /// `IF EXISTS`.
        if_exists: bool,
        /// Name.
        name: String,
        /// `CASCADE`: drop the sources using it.
        cascade: bool,
    },
    /// `SHOW CONNECTIONS`.
    ShowConnections,
    /// `CREATE SINK`.
    CreateSink(crate::sql::sink::CreateSink),
    /// `DROP SINK`.
    DropSink {
        /// `IF EXISTS`.
        if_exists: bool,
        /// Name.
        name: String,
    },
    /// `SHOW SINKS`.
    ShowSinks,
    /// `DROP SOURCE`.
    Drop {
        /// `IF EXISTS`.
        if_exists: bool,
        /// Names.
        names: Vec<String>,
        /// `CASCADE`.
        cascade: bool,
    },
    /// `SHOW SOURCES`.
    Show,
}

impl std::fmt::Display for SourceStatement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A piece of a query string: one of our statements, or text for sqlparser.
#[allow(clippy::large_enum_variant)]
pub enum Piece {
    /// A source statement.
    Source(SourceStatement),
    /// `SUBSCRIBE`, `COPY … TO STDOUT`, a cursor statement.
    Stream(crate::sql::subscribe::StreamStatement),
    /// Anything else.
    Sql(String),
}

/// Splits `sql` at top-level `;` and parses our statements. `None` when it
/// holds none of ours (the caller then parses the whole text as before).
pub fn split(sql: &str) -> Result<Option<Vec<Piece>>> {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        // Let sqlparser report the error.
        return Ok(None);
    };
    let mut pieces = Vec::new();
    let mut ours = false;
    for chunk in tokens.split(|t| *t == Token::SemiColon) {
        let words: Vec<&Token> = chunk
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        if words.is_empty() {
            continue;
        }
        let text: String = chunk.iter().map(|t| t.to_string()).collect();
        let head: Vec<String> = words.iter().take(2).map(|t| upper_word(t)).collect();
        let all: Vec<String> = words.iter().map(|t| upper_word(t)).collect();
        if crate::sql::subscribe::is_ours(&all) {
            ours = true;
            pieces.push(Piece::Stream(crate::sql::subscribe::parse(chunk)?));
            continue;
        }
        let is_ours = matches!(
            head.iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice(),
            ["CREATE", "SOURCE"]
                | ["DROP", "SOURCE"]
                | ["SHOW", "SOURCES"]
                | ["CREATE", "CONNECTION"]
                | ["DROP", "CONNECTION"]
                | ["SHOW", "CONNECTIONS"]
                | ["CREATE", "SINK"]
                | ["DROP", "SINK"]
                | ["SHOW", "SINKS"]
        );
        if is_ours {
            ours = true;
            let kind = Cursor {
                tokens: words,
                pos: 0,
            }
            .statement()?;
            pieces.push(Piece::Source(SourceStatement {
                text: text.trim().to_string(),
                kind,
            }));
        } else {
            pieces.push(Piece::Sql(text));
        }
    }
    Ok(ours.then_some(pieces))
}

impl Cursor<'_> {
    fn statement(mut self) -> Result<SourceStatementKind> {
        if self.keyword("SHOW") {
            if self.keyword("CONNECTIONS") {
                self.end()?;
                return Ok(SourceStatementKind::ShowConnections);
            }
            if self.keyword("SINKS") {
                self.end()?;
                return Ok(SourceStatementKind::ShowSinks);
            }
            self.expect_keyword("SOURCES")?;
            self.end()?;
            return Ok(SourceStatementKind::Show);
        }
        if self.peek().map(upper_word).as_deref() == Some("DROP")
            && self.tokens.get(1).map(|t| upper_word(t)).as_deref() == Some("SINK")
        {
            self.pos = 2;
            let if_exists = self.if_exists()?;
            let name = self.ident()?;
            self.end()?;
            return Ok(SourceStatementKind::DropSink { if_exists, name });
        }
        if self.keyword("DROP") && self.keyword("CONNECTION") {
            let if_exists = self.if_exists()?;
            let name = self.ident()?;
            let cascade = self.cascade();
            self.end()?;
            return Ok(SourceStatementKind::DropConnection {
                if_exists,
                name,
                cascade,
            });
        }
        if self.pos > 0 {
            self.expect_keyword("SOURCE")?;
            let if_exists = self.if_exists()?;
            let mut names = vec![self.ident()?];
            while self.token(&Token::Comma) {
                names.push(self.ident()?);
            }
            let cascade = self.cascade();
            self.end()?;
            return Ok(SourceStatementKind::Drop {
                if_exists,
                names,
                cascade,
            });
        }
        self.expect_keyword("CREATE")?;
        if self.keyword("SINK") {
            return self.sink();
        }
        let connection = self.keyword("CONNECTION");
        if !connection {
            self.expect_keyword("SOURCE")?;
        }
        let if_not_exists = self.if_not_exists()?;
        let name = self.ident()?;
        if connection {
            self.expect_keyword("TO")?;
            self.expect_keyword("KAFKA")?;
            let (opts, properties) = self.named_options(&["BROKERS"])?;
            self.end()?;
            let brokers = opts
                .into_iter()
                .find(|(k, _)| k == "BROKERS")
                .map(|(_, v)| v.text())
                .ok_or_else(|| Error::Syntax("CREATE CONNECTION needs BROKERS".into()))?;
            return Ok(SourceStatementKind::CreateConnection {
                name,
                if_not_exists,
                brokers,
                properties,
            });
        }
        let columns = if self.peek() == Some(&Token::LParen) {
            Some(self.column_list(&name)?)
        } else {
            None
        };
        self.expect_keyword("FROM")?;
        if self.keyword("KAFKA") {
            return self.kafka(name, if_not_exists, columns);
        }
        if columns.is_some() {
            return Err(Error::Syntax(
                "a column list in CREATE SOURCE is only for Kafka sources; a generator defines its own columns".into(),
            ));
        }
        self.expect_keyword("GENERATOR")?;
        let mut base_time_now = false;
        let generator = if self.keyword("COUNTER") {
            let opts = self.options(&["RATE", "MAX"])?;
            GeneratorSpec::Counter {
                rate: opt(&opts, "RATE")?.unwrap_or(DEFAULT_COUNTER_RATE),
                max: opt(&opts, "MAX")?,
            }
        } else if self.keyword("NEXMARK") {
            let opts = self.options(&["TABLE", "RATE", "EVENTS", "BASE TIME"])?;
            let table = match opts.iter().find(|(k, _)| k == "TABLE") {
                Some((_, v)) => NexmarkTable::parse(v)?,
                None => {
                    return Err(Error::Syntax(
                        "NEXMARK needs a TABLE option: 'person', 'auction' or 'bid'".into(),
                    ))
                }
            };
            let base_time = opt(&opts, "BASE TIME")?;
            base_time_now = base_time.is_none();
            GeneratorSpec::Nexmark {
                table,
                rate: opt(&opts, "RATE")?.unwrap_or(DEFAULT_NEXMARK_RATE),
                events: opt(&opts, "EVENTS")?,
                base_time_ms: base_time.unwrap_or(0),
            }
        } else {
            return Err(self.error("COUNTER or NEXMARK"));
        };
        self.end()?;
        Ok(SourceStatementKind::Create {
            name,
            if_not_exists,
            generator,
            base_time_now,
        })
    }

    /// `CREATE SINK [IF NOT EXISTS] name FROM relation INTO KAFKA (…
    /// [, EXACTLY ONCE]) [FORMAT JSON | AVRO [(…)] | CSV [(DELIMITER 'c')] |
    /// TEXT] [ENVELOPE APPEND | UPSERT | DEBEZIUM] [KEY (col, …)]`.
    fn sink(&mut self) -> Result<SourceStatementKind> {
        let if_not_exists = self.if_not_exists()?;
        let name = self.ident()?;
        // `FROM relation`, `FROM (SELECT …)`, or no FROM and a trailing
        // `AS SELECT …`.
        let (mut from, mut query) = (String::new(), None);
        if self.keyword("FROM") {
            if self.token(&Token::LParen) {
                query = Some(self.parenthesized_text()?);
            } else {
                from = self.ident()?;
            }
        }
        self.expect_keyword("INTO")?;
        self.expect_keyword("KAFKA")?;
        let (opts, properties) = self.named_options(&[
            "BROKERS",
            "CONNECTION",
            "TOPIC",
            "PARTITIONS",
            "EXACTLY ONCE",
        ])?;
        let exactly_once = opts.iter().any(|(n, _)| n == "EXACTLY ONCE");
        let get = |k: &str| opts.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let topic = get("TOPIC")
            .map(|v| v.text())
            .ok_or_else(|| Error::Syntax("INTO KAFKA needs TOPIC".into()))?;
        let (brokers, connection) = match (get("BROKERS"), get("CONNECTION")) {
            (Some(b), None) => (b.text(), None),
            (None, Some(c)) => (String::new(), Some(c.text().to_lowercase())),
            _ => {
                return Err(Error::Syntax(
                    "INTO KAFKA needs exactly one of BROKERS or CONNECTION".into(),
                ))
            }
        };
        let partitions = match get("PARTITIONS") {
            None => None,
            Some(v) => match v.int("PARTITIONS")? {
                n if (1..=100_000).contains(&n) => Some(n as i32),
                n => {
                    return Err(Error::data(
                        DataErrorKind::InvalidParameterValue,
                        format!("PARTITIONS must be between 1 and 100000, not {n}"),
                    ))
                }
            },
        };
        let mut envelope = None;
        let mut key = Vec::new();
        let mut format = None;
        while self.peek().is_some() {
            if self.keyword("FORMAT") {
                if format.is_some() {
                    return Err(Error::Syntax("FORMAT given twice".into()));
                }
                if self.keyword("BYTES") {
                    return Err(Error::unsupported(
                        "sinks write FORMAT JSON, AVRO, CSV or TEXT",
                    ));
                }
                format = Some(self.format_clause(&["DELIMITER"])?);
            } else if self.keyword("ENVELOPE") {
                envelope = Some(if self.keyword("APPEND") {
                    crate::connector::sink::SinkEnvelope::Append
                } else if self.keyword("UPSERT") {
                    crate::connector::sink::SinkEnvelope::Upsert
                } else if self.keyword("DEBEZIUM") {
                    crate::connector::sink::SinkEnvelope::Debezium
                } else {
                    return Err(self.error("APPEND, UPSERT or DEBEZIUM"));
                });
            } else if self.keyword("KEY") {
                if !self.token(&Token::LParen) {
                    return Err(self.error("\"(\""));
                }
                loop {
                    key.push(self.ident()?);
                    if !self.token(&Token::Comma) {
                        break;
                    }
                }
                if !self.token(&Token::RParen) {
                    return Err(self.error("\")\""));
                }
            } else if self.keyword("AS") {
                if !from.is_empty() || query.is_some() {
                    return Err(Error::Syntax(
                        "CREATE SINK takes FROM or AS SELECT, not both".into(),
                    ));
                }
                // The rest of the statement is the query.
                query = Some(self.rest_text());
            } else {
                return Err(self.error("FORMAT, ENVELOPE, KEY, AS or end of statement"));
            }
        }
        if from.is_empty() && query.is_none() {
            return Err(Error::Syntax(
                "CREATE SINK needs FROM relation, FROM (SELECT …) or AS SELECT …".into(),
            ));
        }
        Ok(SourceStatementKind::CreateSink(
            crate::sql::sink::CreateSink {
                name,
                if_not_exists,
                from,
                query,
                brokers,
                connection,
                topic,
                partitions,
                properties,
                envelope,
                key,
                format,
                exactly_once,
            },
        ))
    }

    /// `(col type …, …)`, parsed by sqlparser as a table's columns.
    fn column_list(&mut self, name: &str) -> Result<Vec<ColumnDef>> {
        let start = self.pos;
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return Err(self.error("\")\" closing the column list")),
                Some(Token::LParen) => depth += 1,
                Some(Token::RParen) => {
                    depth -= 1;
                    if depth == 0 {
                        self.pos += 1;
                        break;
                    }
                }
                _ => {}
            }
            self.pos += 1;
        }
        let text: Vec<String> = self.tokens[start..self.pos]
            .iter()
            .map(|t| t.to_string())
            .collect();
        let sql = format!("CREATE TABLE source_columns {}", text.join(" "));
        let stmts = crate::sql::parse_sql(&sql)?;
        let [ast::Statement::CreateTable(ct)] = stmts.as_slice() else {
            return Err(Error::Syntax("invalid column list".into()));
        };
        let def = crate::sql::create_table::table_def(name, ct)?;
        if !def.primary_key.is_empty() {
            return Err(Error::unsupported(
                "a source has no primary key (ENVELOPE UPSERT keys by the Kafka key)",
            ));
        }
        Ok(def.columns)
    }

    /// `FROM KAFKA (…) FORMAT … [ENVELOPE …] [INCLUDE …] [ON ERROR …]`.
    fn kafka(
        &mut self,
        name: String,
        if_not_exists: bool,
        columns: Option<Vec<ColumnDef>>,
    ) -> Result<SourceStatementKind> {
        let (opts, properties) = self.named_options(&[
            "BROKERS",
            "CONNECTION",
            "TOPIC",
            "TOPIC PATTERN",
            "START OFFSET",
            "START TIMESTAMP",
            "GROUP ID",
            "MAX RECORD BYTES",
        ])?;
        let get = |k: &str| opts.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let topics = match (get("TOPIC"), get("TOPIC PATTERN")) {
            (Some(t), None) => Topics::Name(t.text()),
            (None, Some(p)) => Topics::Pattern(p.text()),
            _ => {
                return Err(Error::Syntax(
                    "FROM KAFKA needs exactly one of TOPIC or TOPIC PATTERN".into(),
                ))
            }
        };
        let (brokers, connection) = match (get("BROKERS"), get("CONNECTION")) {
            (Some(b), None) => (b.text(), None),
            (None, Some(c)) => (String::new(), Some(c.text().to_lowercase())),
            _ => {
                return Err(Error::Syntax(
                    "FROM KAFKA needs exactly one of BROKERS or CONNECTION".into(),
                ))
            }
        };
        let start = match (get("START OFFSET"), get("START TIMESTAMP")) {
            (Some(_), Some(_)) => {
                return Err(Error::Syntax(
                    "START OFFSET and START TIMESTAMP exclude each other".into(),
                ))
            }
            (None, None) => StartOffset::Earliest,
            (None, Some(ts)) => StartOffset::Timestamp(ts.int("START TIMESTAMP")?),
            (Some(OptValue::List(l)), None) => {
                if matches!(topics, Topics::Pattern(_)) {
                    return Err(Error::Syntax(
                        "per-partition START OFFSET needs a single TOPIC".into(),
                    ));
                }
                StartOffset::Offsets(l.clone())
            }
            (Some(v), None) => match v.text().to_ascii_lowercase().as_str() {
                "earliest" => StartOffset::Earliest,
                "latest" => StartOffset::Latest,
                other => {
                    return Err(Error::data(
                        DataErrorKind::InvalidParameterValue,
                        format!(
                            "START OFFSET must be 'earliest', 'latest' or a list of offsets, not '{other}'"
                        ),
                    ))
                }
            },
        };
        let group_id = get("GROUP ID").map(|v| v.text());
        let max_record_bytes = match get("MAX RECORD BYTES") {
            None => None,
            Some(v) => match v.int("MAX RECORD BYTES")? {
                n if n > 0 => Some(n as usize),
                n => {
                    return Err(Error::data(
                        DataErrorKind::InvalidParameterValue,
                        format!("MAX RECORD BYTES must be positive, not {n}"),
                    ))
                }
            },
        };

        let mut format = None;
        let mut include: Vec<(Meta, String)> = Vec::new();
        let mut on_error = None;
        let mut dead_letter = None;
        let mut envelope = None;
        while self.peek().is_some() {
            if self.keyword("FORMAT") {
                if format.is_some() {
                    return Err(Error::Syntax("FORMAT given twice".into()));
                }
                let f = self.format_clause(&["DELIMITER", "HEADER"])?;
                if let Format::Avro { schema, registry } = &f {
                    if schema.is_some() == registry.is_some() {
                        return Err(Error::Syntax(
                            "FORMAT AVRO needs exactly one of SCHEMA '…' or SCHEMA REGISTRY 'http://…'"
                                .into(),
                        ));
                    }
                }
                format = Some(f);
            } else if self.keyword("ENVELOPE") {
                if envelope.is_some() {
                    return Err(Error::Syntax("ENVELOPE given twice".into()));
                }
                envelope = Some(if self.keyword("UPSERT") {
                    Envelope::Upsert
                } else if self.keyword("DEBEZIUM") {
                    Envelope::Debezium
                } else {
                    self.expect_keyword("NONE")?;
                    Envelope::None
                });
            } else if self.keyword("INCLUDE") {
                loop {
                    let word = upper_word(self.peek().unwrap_or(&Token::EOF));
                    let m = Meta::parse(&word).ok_or_else(|| {
                        self.error("KEY, PARTITION, OFFSET, TIMESTAMP or HEADERS")
                    })?;
                    self.pos += 1;
                    let col = if self.keyword("AS") {
                        self.ident()?
                    } else {
                        m.default_name().to_string()
                    };
                    if include.iter().any(|(x, _)| *x == m) {
                        return Err(Error::Syntax(format!("INCLUDE {word} given twice")));
                    }
                    include.push((m, col));
                    if !self.token(&Token::Comma) {
                        break;
                    }
                }
            } else if self.keyword("ON") {
                self.expect_keyword("ERROR")?;
                if on_error.is_some() {
                    return Err(Error::Syntax("ON ERROR given twice".into()));
                }
                on_error = Some(if self.keyword("SKIP") {
                    OnError::Skip
                } else if self.keyword("FAIL") {
                    OnError::Fail
                } else if self.keyword("DEAD") {
                    self.expect_keyword("LETTER")?;
                    self.expect_keyword("TOPIC")?;
                    match self.peek() {
                        Some(Token::SingleQuotedString(t)) => dead_letter = Some(t.clone()),
                        _ => return Err(self.error("a quoted topic name")),
                    }
                    self.pos += 1;
                    OnError::Skip
                } else {
                    return Err(self.error("SKIP, FAIL or DEAD LETTER TOPIC 'topic'"));
                });
            } else {
                return Err(self.error("FORMAT, ENVELOPE, INCLUDE, ON ERROR or end of statement"));
            }
        }
        let format = format.ok_or_else(|| {
            Error::Syntax("a Kafka source needs FORMAT JSON, CSV, AVRO, TEXT or BYTES".into())
        })?;
        let envelope = envelope.unwrap_or_default();
        // A keyed envelope keys rows by the Kafka key: it is a column.
        if envelope != Envelope::None && !include.iter().any(|(m, _)| *m == Meta::Key) {
            include.push((Meta::Key, Meta::Key.default_name().to_string()));
        }
        let columns = match (columns, &format) {
            (Some(c), _) => c,
            (None, Format::Text) => vec![ColumnDef {
                name: "text".into(),
                ty: SqlType::Text,
                nullable: false,
            }],
            (None, Format::Bytes) => vec![ColumnDef {
                name: "data".into(),
                ty: SqlType::Bytea,
                nullable: false,
            }],
            (None, _) => {
                return Err(Error::Syntax(format!(
                "FORMAT {} needs a column list: CREATE SOURCE {name} (column type, …) FROM KAFKA …",
                format.to_string().to_uppercase()
            )))
            }
        };
        Ok(SourceStatementKind::CreateKafka {
            name,
            if_not_exists,
            columns,
            include_names: include.iter().map(|(_, n)| n.clone()).collect(),
            spec: KafkaSpec {
                brokers,
                topics,
                properties,
                connection,
                group_id,
                start,
                format,
                include: include.into_iter().map(|(m, _)| m).collect(),
                on_error: on_error.unwrap_or(OnError::Skip),
                dead_letter,
                envelope,
                max_record_bytes,
                starts: Vec::new(),
            },
        })
    }

    /// `JSON | CSV [(option, …)] | TEXT | BYTES | AVRO [(SCHEMA '…',
    /// SCHEMA REGISTRY '…')]` after `FORMAT`; the caller checks what its
    /// statement allows.
    fn format_clause(&mut self, csv_options: &[&str]) -> Result<Format> {
        Ok(if self.keyword("JSON") {
            Format::Json
        } else if self.keyword("CSV") {
            let o = self.options(csv_options)?;
            let header = match o.iter().find(|(k, _)| k == "HEADER") {
                None => false,
                Some((_, v)) => match v.to_ascii_lowercase().as_str() {
                    "true" | "on" | "yes" => true,
                    "false" | "off" | "no" => false,
                    other => {
                        return Err(Error::data(
                            DataErrorKind::InvalidParameterValue,
                            format!("HEADER must be true or false, not '{other}'"),
                        ))
                    }
                },
            };
            let delimiter = match o.iter().find(|(k, _)| k == "DELIMITER") {
                None => b',',
                // A quote or a line break would make lines unreadable.
                Some((_, d))
                    if d.len() == 1
                        && d.is_ascii()
                        && !matches!(d.as_bytes()[0], b'"' | b'\n' | b'\r') =>
                {
                    d.as_bytes()[0]
                }
                Some((_, d)) => {
                    return Err(Error::data(
                        DataErrorKind::InvalidParameterValue,
                        format!("DELIMITER must be one ASCII character, not '{d}'"),
                    ))
                }
            };
            Format::Csv { delimiter, header }
        } else if self.keyword("TEXT") {
            Format::Text
        } else if self.keyword("BYTES") {
            Format::Bytes
        } else if self.keyword("AVRO") {
            if self.peek() != Some(&Token::LParen) {
                return Ok(Format::Avro {
                    schema: None,
                    registry: None,
                });
            }
            let (o, props) = self.named_options(&["SCHEMA", "SCHEMA REGISTRY"])?;
            if let Some((k, _)) = props.first() {
                return Err(Error::Syntax(format!("unknown AVRO option '{k}'")));
            }
            let get = |k: &str| o.iter().find(|(n, _)| n == k).map(|(_, v)| v.text());
            Format::Avro {
                schema: get("SCHEMA"),
                registry: get("SCHEMA REGISTRY"),
            }
        } else {
            return Err(self.error("JSON, CSV, AVRO, TEXT or BYTES"));
        })
    }

    /// `( NAME value, … )` where NAME is one of `allowed` (two-word names
    /// like `GROUP ID` included) and a quoted name is a librdkafka property.
    fn named_options(&mut self, allowed: &[&str]) -> Result<KafkaOptions> {
        let mut opts: Vec<(String, OptValue)> = Vec::new();
        let mut props: Vec<(String, String)> = Vec::new();
        if !self.token(&Token::LParen) {
            return Err(self.error("\"(\" and options"));
        }
        loop {
            if let Some(Token::SingleQuotedString(k)) = self.peek() {
                let k = k.clone();
                self.pos += 1;
                self.token(&Token::Eq);
                let v = self.opt_value(&k)?.text();
                props.push((k, v));
            } else {
                let mut name = upper_word(self.peek().unwrap_or(&Token::EOF));
                if name.is_empty() {
                    return Err(self.error(&format!("an option ({})", allowed.join(", "))));
                }
                self.pos += 1;
                // Names of up to three words (`MAX RECORD BYTES`).
                for _ in 0..2 {
                    let next = upper_word(self.peek().unwrap_or(&Token::EOF));
                    let longer = format!("{name} {next}");
                    if next.is_empty() || !allowed.iter().any(|a| a.starts_with(&longer)) {
                        break;
                    }
                    self.pos += 1;
                    name = longer;
                }
                if !allowed.contains(&name.as_str()) {
                    return Err(Error::Syntax(format!(
                        "unknown option {name}; expected one of {}",
                        allowed.join(", ")
                    )));
                }
                if opts.iter().any(|(k, _)| *k == name) {
                    return Err(Error::Syntax(format!("option {name} given twice")));
                }
                if FLAG_OPTIONS.contains(&name.as_str()) {
                    opts.push((name, OptValue::Text("true".into())));
                } else {
                    self.token(&Token::Eq);
                    let v = self.opt_value(&name)?;
                    opts.push((name, v));
                }
            }
            if !self.token(&Token::Comma) {
                break;
            }
        }
        if !self.token(&Token::RParen) {
            return Err(self.error("\",\" or \")\""));
        }
        Ok((opts, props))
    }

    fn opt_value(&mut self, name: &str) -> Result<OptValue> {
        let v = match self.peek() {
            Some(Token::SingleQuotedString(s)) => OptValue::Text(s.clone()),
            Some(Token::Word(w)) => OptValue::Text(w.value.clone()),
            Some(Token::Number(n, _)) => OptValue::Text(n.clone()),
            Some(Token::LParen) => {
                self.pos += 1;
                let mut list = Vec::new();
                loop {
                    let neg = self.token(&Token::Minus);
                    match self.peek() {
                        Some(Token::Number(n, _)) => {
                            let v: i64 = n.parse().map_err(|_| {
                                Error::data(
                                    DataErrorKind::InvalidParameterValue,
                                    format!("{name}: '{n}' is not an integer"),
                                )
                            })?;
                            list.push(if neg { -v } else { v });
                            self.pos += 1;
                        }
                        _ => return Err(self.error("an integer")),
                    }
                    if !self.token(&Token::Comma) {
                        break;
                    }
                }
                if !self.token(&Token::RParen) {
                    return Err(self.error("\")\""));
                }
                return Ok(OptValue::List(list));
            }
            _ => return Err(self.error(&format!("a value for {name}"))),
        };
        self.pos += 1;
        Ok(v)
    }

    /// `[( NAME [=] value, … )]`, names from `allowed`, each at most once.
    fn options(&mut self, allowed: &[&str]) -> Result<Vec<(String, String)>> {
        if self.peek() != Some(&Token::LParen) {
            return Ok(Vec::new());
        }
        let (opts, props) = self.named_options(allowed)?;
        if let Some((k, _)) = props.first() {
            return Err(Error::Syntax(format!(
                "unknown option '{k}'; expected one of {}",
                allowed.join(", ")
            )));
        }
        Ok(opts.into_iter().map(|(k, v)| (k, v.text())).collect())
    }
}

/// Options that take no value: present or not.
const FLAG_OPTIONS: &[&str] = &["EXACTLY ONCE"];

/// Named options and quoted librdkafka properties.
type KafkaOptions = (Vec<(String, OptValue)>, Vec<(String, String)>);

/// A Kafka option's value.
#[derive(Debug, Clone)]
enum OptValue {
    Text(String),
    List(Vec<i64>),
}

impl OptValue {
    fn text(&self) -> String {
        match self {
            OptValue::Text(s) => s.clone(),
            OptValue::List(l) => format!("{l:?}"),
        }
    }

    fn int(&self, name: &str) -> Result<i64> {
        self.text().parse().map_err(|_| {
            Error::data(
                DataErrorKind::InvalidParameterValue,
                format!("{name} must be an integer, not '{}'", self.text()),
            )
        })
    }
}

/// An integer option's value.
fn opt(opts: &[(String, String)], name: &str) -> Result<Option<u64>> {
    match opts.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v.parse::<u64>().map(Some).map_err(|_| {
            Error::data(
                DataErrorKind::InvalidParameterValue,
                format!("{name} must be a non-negative integer, not '{v}'"),
            )
        }),
    }
}

/// Schema of `SHOW SOURCES`.
pub fn show_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("connector", DataType::Utf8, false),
        Field::new("offset", DataType::UInt64, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("errors", DataType::UInt64, false),
    ]))
}

/// Schema of `SHOW CONNECTIONS`.
pub fn show_connections_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("brokers", DataType::Utf8, false),
        Field::new("properties", DataType::Utf8, false),
    ]))
}

/// Runs a source statement.
pub async fn execute(engine: &Engine, stmt: &SourceStatement) -> Result<Outcome> {
    match &stmt.kind {
        SourceStatementKind::Create {
            name,
            if_not_exists,
            generator,
            base_time_now,
        } => {
            let mut generator = generator.clone();
            if let GeneratorSpec::Nexmark { base_time_ms, .. } = &mut generator {
                if *base_time_now {
                    *base_time_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                }
            }
            let columns = generator
                .schema()
                .fields()
                .iter()
                .map(|f| {
                    Ok(ColumnDef {
                        name: f.name().clone(),
                        ty: SqlType::from_arrow(f.data_type())?,
                        nullable: f.is_nullable(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            create(
                engine,
                name,
                *if_not_exists,
                columns,
                SourceConnector::Generator(generator),
            )
            .await
        }
        SourceStatementKind::CreateKafka {
            name,
            if_not_exists,
            columns,
            spec,
            include_names,
        } => {
            create_kafka(
                engine,
                name,
                *if_not_exists,
                columns,
                spec.clone(),
                include_names,
            )
            .await
        }
        SourceStatementKind::CreateConnection {
            name,
            if_not_exists,
            brokers,
            properties,
        } => {
            let _writer = engine.writer().await;
            match engine.catalog.create_connection(ConnectionDef {
                id: 0,
                name: name.clone(),
                brokers: brokers.clone(),
                properties: properties.clone(),
            }) {
                Ok(()) => {}
                Err(Error::DuplicateObject(_)) if *if_not_exists => {}
                Err(Error::DuplicateObject(n)) => {
                    return Err(Error::DuplicateObject(format!("connection {n}")))
                }
                Err(e) => return Err(e),
            }
            Ok(Outcome::Command {
                tag: "CREATE CONNECTION",
                rows: None,
            })
        }
        SourceStatementKind::DropConnection {
            if_exists,
            name,
            cascade,
        } => drop_connection(engine, *if_exists, name, *cascade).await,
        SourceStatementKind::ShowConnections => {
            let conns = engine.catalog.connections();
            let schema = show_connections_schema();
            let names: StringArray = conns.iter().map(|c| Some(c.name.clone())).collect();
            let brokers: StringArray = conns.iter().map(|c| Some(c.brokers.clone())).collect();
            // Property values may be secrets (SASL passwords): names only.
            let props: StringArray = conns
                .iter()
                .map(|c| {
                    Some(
                        c.properties
                            .iter()
                            .map(|(k, _)| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                })
                .collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(names), Arc::new(brokers), Arc::new(props)],
            )?;
            Ok(Outcome::Rows(Rows {
                schema,
                batches: vec![batch],
                names: None,
                tag: "SHOW",
            }))
        }
        SourceStatementKind::Drop {
            if_exists,
            names,
            cascade,
        } => drop_sources(engine, *if_exists, names, *cascade).await,
        SourceStatementKind::Show => show(engine),
        SourceStatementKind::CreateSink(c) => crate::sql::sink::create(engine, c).await,
        SourceStatementKind::DropSink { if_exists, name } => {
            crate::sql::sink::drop(engine, *if_exists, name).await
        }
        SourceStatementKind::ShowSinks => crate::sql::sink::show(engine),
    }
}

async fn create(
    engine: &Engine,
    name: &str,
    if_not_exists: bool,
    columns: Vec<ColumnDef>,
    connector: SourceConnector,
) -> Result<Outcome> {
    let done = Outcome::Command {
        tag: "CREATE SOURCE",
        rows: None,
    };
    let _writer = engine.writer().await;
    if engine.catalog.get(name).is_some() {
        if if_not_exists {
            return Ok(done);
        }
        return Err(Error::DuplicateObject(name.to_string()));
    }
    let source = engine.catalog.create_source(SourceDef {
        id: 0,
        name: name.to_string(),
        columns,
        connector,
    })?;
    if let Err(e) = engine.driver.add(engine, &source) {
        // Nothing half-created: the source goes again.
        let _ = engine.catalog.drop_relations(&[name.to_string()]);
        return Err(e);
    }
    Ok(done)
}

async fn create_kafka(
    engine: &Engine,
    name: &str,
    if_not_exists: bool,
    columns: &[ColumnDef],
    mut spec: KafkaSpec,
    include_names: &[String],
) -> Result<Outcome> {
    if if_not_exists && engine.catalog.get(name).is_some() {
        return Ok(Outcome::Command {
            tag: "CREATE SOURCE",
            rows: None,
        });
    }
    if let Some(conn) = &spec.connection {
        let c = engine.catalog.connection(conn).ok_or_else(|| {
            Error::UndefinedObject(format!("connection \"{conn}\" does not exist"))
        })?;
        spec.brokers = c.brokers;
        let own = std::mem::take(&mut spec.properties);
        spec.properties = c.properties;
        spec.properties.extend(own);
    }
    let mut columns = columns.to_vec();
    for (m, n) in spec.include.iter().zip(include_names) {
        columns.push(ColumnDef {
            name: n.clone(),
            ty: SqlType::from_arrow(&m.data_type())?,
            nullable: true,
        });
    }
    for (i, c) in columns.iter().enumerate() {
        if columns[..i].iter().any(|d| d.name == c.name) {
            return Err(Error::Plan(format!(
                "column \"{}\" specified more than once (rename an INCLUDEd column with AS)",
                c.name
            )));
        }
    }
    // Check the columns fit the format before contacting the brokers.
    let probe = SourceDef {
        id: 0,
        name: name.to_string(),
        columns: columns.clone(),
        connector: SourceConnector::Kafka(spec.clone()),
    };
    probe.decoder()?;
    // librdkafka blocks while it contacts the brokers.
    let source_name = name.to_string();
    let spec = tokio::task::spawn_blocking(move || {
        spec.resolve(&source_name)?;
        Ok::<_, Error>(spec)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    create(
        engine,
        name,
        if_not_exists,
        columns,
        SourceConnector::Kafka(spec),
    )
    .await
}

async fn drop_connection(
    engine: &Engine,
    if_exists: bool,
    name: &str,
    cascade: bool,
) -> Result<Outcome> {
    let _writer = engine.writer().await;
    if engine.catalog.connection(name).is_none() {
        if if_exists {
            return Ok(Outcome::Command {
                tag: "DROP CONNECTION",
                rows: None,
            });
        }
        return Err(Error::UndefinedObject(format!(
            "connection \"{name}\" does not exist"
        )));
    }
    let users: Vec<String> = engine
        .catalog
        .sources()
        .iter()
        .filter(|s| {
            matches!(&s.def.connector, SourceConnector::Kafka(k) if k.connection.as_deref() == Some(name))
        })
        .map(|s| s.def.name.clone())
        .collect();
    if !users.is_empty() {
        if !cascade {
            return Err(Error::DependentObjects(format!(
                "cannot drop connection {name} because source {} uses it (use DROP … CASCADE)",
                users.join(", ")
            )));
        }
        let mut to_drop = Vec::new();
        for u in &users {
            crate::sql::drop::collect(engine, u, true, &mut to_drop)?;
        }
        crate::sql::drop::drop_collected(engine, &to_drop)?;
    }
    engine.catalog.drop_connection(name)?;
    Ok(Outcome::Command {
        tag: "DROP CONNECTION",
        rows: None,
    })
}

async fn drop_sources(
    engine: &Engine,
    if_exists: bool,
    names: &[String],
    cascade: bool,
) -> Result<Outcome> {
    let _writer = engine.writer().await;
    let mut to_drop: Vec<String> = Vec::new();
    for name in names {
        match engine.catalog.get(name) {
            None if if_exists => continue,
            None => {
                return Err(Error::UndefinedObject(format!(
                    "source \"{name}\" does not exist"
                )))
            }
            Some(Relation::Source(_)) => {}
            Some(_) => {
                return Err(Error::WrongObjectType(format!(
                    "\"{name}\" is not a source"
                )))
            }
        }
        crate::sql::drop::collect(engine, name, cascade, &mut to_drop)?;
    }
    crate::sql::drop::drop_collected(engine, &to_drop)?;
    Ok(Outcome::Command {
        tag: "DROP SOURCE",
        rows: None,
    })
}

fn show(engine: &Engine) -> Result<Outcome> {
    let status = engine.driver.status();
    let schema = show_schema();
    let names: StringArray = status.iter().map(|s| Some(s.name.clone())).collect();
    let connectors: StringArray = status.iter().map(|s| Some(s.connector.clone())).collect();
    let offsets: UInt64Array = status.iter().map(|s| Some(s.offset)).collect();
    let states: StringArray = status.iter().map(|s| Some(s.state.clone())).collect();
    let errors: UInt64Array = status.iter().map(|s| Some(s.errors)).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(names),
            Arc::new(connectors),
            Arc::new(offsets),
            Arc::new(states),
            Arc::new(errors),
        ],
    )?;
    Ok(Outcome::Rows(Rows {
        schema,
        batches: vec![batch],
        names: None,
        tag: "SHOW",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Result<SourceStatementKind> {
        let pieces = split(sql)?.expect("a source statement");
        match pieces.into_iter().next() {
            Some(Piece::Source(s)) => Ok(s.kind),
            _ => panic!("not ours"),
        }
    }

    #[test]
    fn parses_sink_queries() {
        let sink = |sql: &str| match one(sql) {
            Ok(SourceStatementKind::CreateSink(c)) => Ok(c),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let c = sink(
            "CREATE SINK s INTO KAFKA (BROKERS 'b', TOPIC 't') ENVELOPE UPSERT KEY (k)
               AS SELECT k, count(*) AS n FROM \"T\" WHERE v > 'x' GROUP BY k",
        )
        .unwrap();
        assert_eq!(c.from, "");
        assert_eq!(
            c.query.as_deref(),
            Some("SELECT k , count ( * ) AS n FROM \"T\" WHERE v > 'x' GROUP BY k")
        );
        assert_eq!(c.key, vec!["k".to_string()]);
        let c = sink("CREATE SINK s FROM (SELECT a FROM (SELECT 1 AS a) q) INTO KAFKA (BROKERS 'b', TOPIC 't')")
            .unwrap();
        assert_eq!(
            c.query.as_deref(),
            Some("SELECT a FROM ( SELECT 1 AS a ) q")
        );
        assert!(sink("CREATE SINK s INTO KAFKA (BROKERS 'b', TOPIC 't')").is_err());
        assert!(
            sink("CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't') AS SELECT 1").is_err()
        );
        assert!(sink("CREATE SINK s FROM (SELECT 1 INTO KAFKA (BROKERS 'b', TOPIC 't')").is_err());
    }

    #[test]
    fn parses_sink_formats_and_exactly_once() {
        let sink = |sql: &str| match one(sql) {
            Ok(SourceStatementKind::CreateSink(c)) => Ok(c),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let c = sink(
            "CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't', EXACTLY ONCE,
               'transactional.id' 'x') FORMAT AVRO (SCHEMA REGISTRY 'http://r:1') KEY (k)",
        )
        .unwrap();
        assert!(c.exactly_once);
        assert_eq!(c.properties, vec![("transactional.id".into(), "x".into())]);
        assert_eq!(
            c.format,
            Some(Format::Avro {
                schema: None,
                registry: Some("http://r:1".into())
            })
        );
        assert_eq!(c.key, vec!["k".to_string()]);
        let c =
            sink("CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't') FORMAT AVRO").unwrap();
        assert!(!c.exactly_once);
        assert_eq!(
            c.format,
            Some(Format::Avro {
                schema: None,
                registry: None
            })
        );
        let c = sink(
            "CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't') FORMAT CSV (DELIMITER '|') ENVELOPE APPEND",
        )
        .unwrap();
        assert_eq!(
            c.format,
            Some(Format::Csv {
                delimiter: b'|',
                header: false
            })
        );
        let c =
            sink("CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't') FORMAT TEXT").unwrap();
        assert_eq!(c.format, Some(Format::Text));
        let c = sink("CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't')").unwrap();
        assert_eq!(c.format, None);
        for (sql, want) in [
            ("FORMAT BYTES", "JSON, AVRO, CSV or TEXT"),
            ("FORMAT CSV (HEADER true)", "unknown option HEADER"),
            ("FORMAT CSV (DELIMITER '\"')", "DELIMITER must be"),
            ("FORMAT JSON FORMAT JSON", "FORMAT given twice"),
            ("FORMAT AVRO (SCHEMA)", "a value for SCHEMA"),
        ] {
            let e = sink(&format!(
                "CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't') {sql}"
            ))
            .unwrap_err();
            assert!(e.to_string().contains(want), "{sql}: {e}");
        }
        let e = sink(
            "CREATE SINK s FROM v INTO KAFKA (BROKERS 'b', TOPIC 't', EXACTLY ONCE, EXACTLY ONCE)",
        )
        .unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
    }

    #[test]
    fn parses_generators() {
        assert_eq!(
            one("create source c from generator counter (rate 0, max 10)").unwrap(),
            SourceStatementKind::Create {
                name: "c".into(),
                if_not_exists: false,
                generator: GeneratorSpec::Counter {
                    rate: 0,
                    max: Some(10)
                },
                base_time_now: false,
            }
        );
        assert_eq!(
            one("CREATE SOURCE IF NOT EXISTS \"Bids\" FROM GENERATOR NEXMARK (TABLE 'bid', RATE = 5, EVENTS 100, BASE TIME 7);").unwrap(),
            SourceStatementKind::Create {
                name: "Bids".into(),
                if_not_exists: true,
                generator: GeneratorSpec::Nexmark {
                    table: NexmarkTable::Bid,
                    rate: 5,
                    events: Some(100),
                    base_time_ms: 7
                },
                base_time_now: false,
            }
        );
        assert_eq!(
            one("drop source if exists a, b cascade").unwrap(),
            SourceStatementKind::Drop {
                if_exists: true,
                names: vec!["a".into(), "b".into()],
                cascade: true
            }
        );
    }

    #[test]
    fn parses_kafka() {
        let SourceStatementKind::CreateKafka {
            name,
            columns,
            spec,
            include_names,
            ..
        } = one(
            "CREATE SOURCE bids (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP)
             FROM KAFKA (BROKERS '127.0.0.1:9092', TOPIC 'bids', START OFFSET 'earliest')
             FORMAT JSON;",
        )
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(name, "bids");
        assert_eq!(columns.len(), 4);
        assert!(include_names.is_empty());
        assert_eq!(spec.brokers, "127.0.0.1:9092");
        assert_eq!(spec.topics, Topics::Name("bids".into()));
        assert_eq!(spec.start, StartOffset::Earliest);
        assert_eq!(spec.format, Format::Json);
        assert_eq!(spec.on_error, OnError::Skip);

        let SourceStatementKind::CreateKafka {
            columns,
            spec,
            include_names,
            ..
        } = one("create source s from kafka (connection k, topic 'bids',
               start offset (1, 2), group id 'g', 'security.protocol' = 'plaintext',
               'fetch.min.bytes' 1)
             format text include partition, offset as o, key on error fail")
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(columns[0].name, "text");
        assert_eq!(include_names, vec!["partition", "o", "key"]);
        assert_eq!(spec.connection.as_deref(), Some("k"));
        assert_eq!(spec.topics, Topics::Name("bids".into()));
        assert_eq!(spec.start, StartOffset::Offsets(vec![1, 2]));
        let SourceStatementKind::CreateKafka { spec: pattern, .. } = one(
            "create source s (v bytea) from kafka (brokers 'b', topic pattern 'bids-.*', start timestamp 5) format bytes",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(pattern.topics, Topics::Pattern("bids-.*".into()));
        assert_eq!(pattern.start, StartOffset::Timestamp(5));
        assert_eq!(spec.group_id.as_deref(), Some("g"));
        assert_eq!(
            spec.properties,
            vec![
                ("security.protocol".into(), "plaintext".into()),
                ("fetch.min.bytes".into(), "1".into())
            ]
        );
        assert_eq!(spec.include, vec![Meta::Partition, Meta::Offset, Meta::Key]);
        assert_eq!(spec.on_error, OnError::Fail);

        assert_eq!(
            one("CREATE CONNECTION k TO KAFKA (BROKERS 'b:9092', 'sasl.username' 'u')").unwrap(),
            SourceStatementKind::CreateConnection {
                name: "k".into(),
                if_not_exists: false,
                brokers: "b:9092".into(),
                properties: vec![("sasl.username".into(), "u".into())],
            }
        );
        assert_eq!(
            one("drop connection if exists k cascade").unwrap(),
            SourceStatementKind::DropConnection {
                if_exists: true,
                name: "k".into(),
                cascade: true
            }
        );
    }

    #[test]
    fn mixes_with_sqlparser_statements() {
        let pieces = split("select ';'; show sources; select 2")
            .unwrap()
            .unwrap();
        assert_eq!(pieces.len(), 3);
        assert!(matches!(&pieces[0], Piece::Sql(s) if s.contains("';'")));
        assert!(matches!(&pieces[1], Piece::Source(_)));
        assert!(split("select 1; create table t (a int)").unwrap().is_none());
    }

    #[test]
    fn bad_options_are_errors_not_panics() {
        for sql in [
            "create source c from generator counter (rate -1)",
            "create source c from generator counter (speed 3)",
            "create source c from generator counter (rate 1, rate 2)",
            "create source c from generator counter (rate 1",
            "create source c from generator nexmark (rate 1)",
            "create source c from generator nexmark (table 'bids')",
            "create source c from generator",
            "create source c from kafka (brokers 'x')",
            "create source c from kafka (brokers 'x', topic 't')",
            "create source c (a int) from kafka (brokers 'x', topic 't', topic pattern 'u') format json",
            "create source c (a int) from kafka (topic 't') format json",
            "create source c (a int) from kafka (brokers 'x', topic 't', start offset 'middle') format json",
            "create source c (a int) from kafka (brokers 'x', topic 't') format json format json",
            "create source c (a int) from kafka (brokers 'x', topic 't') format json include nothing",
            "create source c (a int) from kafka (brokers 'x', topic 't') format csv (delimiter 'ab')",
            "create source c (a int primary key) from kafka (brokers 'x', topic 't') format json",
            "create source c (a int) from kafka (brokers 'x', topic 't') format avro",
            "create source c (a int) from kafka (brokers 'x', topic 't') format avro (schema 'x', schema registry 'y')",
            "create source c (a int) from kafka (brokers 'x', topic 't') format json envelope upsert envelope none",
            "create source c (a int) from kafka (brokers 'x', topic 't') format json envelope sideways",
            "create connection k to kafka ('a' 'b')",
            "create source (a int) from generator counter",
            "drop source",
            "show sources now",
            "create source c from generator counter (rate 99999999999999999999999)",
        ] {
            assert!(one(sql).is_err(), "{sql} should fail");
        }
    }
}
