//! `CREATE SOURCE`, `DROP SOURCE`, `SHOW SOURCES`: statements sqlparser
//! does not know, parsed here from its tokens.
//!
//! ```text
//! CREATE SOURCE [IF NOT EXISTS] name FROM GENERATOR COUNTER [(RATE n, MAX n)]
//! CREATE SOURCE [IF NOT EXISTS] name FROM GENERATOR NEXMARK
//!     (TABLE 'person' | 'auction' | 'bid' [, RATE n] [, EVENTS n] [, BASE TIME ms])
//! DROP SOURCE [IF EXISTS] name [, …] [CASCADE | RESTRICT]
//! SHOW SOURCES
//! ```
//!
//! [`split`] decides, per `;`-separated statement, whether it is one of
//! ours; everything else goes to sqlparser unchanged.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::catalog::types::SqlType;
use crate::catalog::{ColumnDef, Relation, SourceDef};
use crate::connector::{GeneratorSpec, NexmarkTable};
use crate::engine::Engine;
use crate::error::{DataErrorKind, Error, Result};
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

/// The source statements.
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
pub enum Piece {
    /// A source statement.
    Source(SourceStatement),
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
        let is_ours = matches!(
            head.iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice(),
            ["CREATE", "SOURCE"] | ["DROP", "SOURCE"] | ["SHOW", "SOURCES"]
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

fn upper_word(t: &Token) -> String {
    match t {
        Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
        _ => String::new(),
    }
}

struct Cursor<'a> {
    tokens: Vec<&'a Token>,
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).copied()
    }

    fn found(&self) -> String {
        match self.peek() {
            Some(t) => format!("at or near \"{t}\""),
            None => "at end of input".to_string(),
        }
    }

    fn error(&self, expected: &str) -> Error {
        Error::Syntax(format!(
            "syntax error {}: expected {expected}",
            self.found()
        ))
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if self.peek().map(upper_word).as_deref() == Some(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<()> {
        if self.keyword(kw) {
            Ok(())
        } else {
            Err(self.error(kw))
        }
    }

    fn token(&mut self, t: &Token) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// An identifier: unquoted ones are lower-cased, as in PostgreSQL.
    fn ident(&mut self) -> Result<String> {
        match self.peek() {
            Some(Token::Word(w)) => {
                let name = if w.quote_style.is_some() {
                    w.value.clone()
                } else {
                    w.value.to_lowercase()
                };
                self.pos += 1;
                // `public.name`
                if self.token(&Token::Period) {
                    if name != crate::engine::SCHEMA {
                        return Err(Error::unsupported(format!(
                            "schema \"{name}\" does not exist; only \"public\" is supported"
                        )));
                    }
                    return self.ident();
                }
                Ok(name)
            }
            _ => Err(self.error("a name")),
        }
    }

    fn end(&self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("end of statement")),
        }
    }

    fn statement(mut self) -> Result<SourceStatementKind> {
        if self.keyword("SHOW") {
            self.expect_keyword("SOURCES")?;
            self.end()?;
            return Ok(SourceStatementKind::Show);
        }
        if self.keyword("DROP") {
            self.expect_keyword("SOURCE")?;
            let if_exists = self.keyword("IF") && {
                self.expect_keyword("EXISTS")?;
                true
            };
            let mut names = vec![self.ident()?];
            while self.token(&Token::Comma) {
                names.push(self.ident()?);
            }
            let cascade = self.keyword("CASCADE");
            if !cascade {
                self.keyword("RESTRICT");
            }
            self.end()?;
            return Ok(SourceStatementKind::Drop {
                if_exists,
                names,
                cascade,
            });
        }
        self.expect_keyword("CREATE")?;
        self.expect_keyword("SOURCE")?;
        let if_not_exists = self.keyword("IF") && {
            self.expect_keyword("NOT")?;
            self.expect_keyword("EXISTS")?;
            true
        };
        let name = self.ident()?;
        if self.token(&Token::LParen) {
            return Err(Error::unsupported(
                "a column list in CREATE SOURCE is only for Kafka sources, which are not supported yet; a generator defines its own columns",
            ));
        }
        self.expect_keyword("FROM")?;
        if self.keyword("KAFKA") {
            return Err(Error::unsupported(
                "Kafka sources are not supported yet; use FROM GENERATOR COUNTER or NEXMARK",
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

    /// `[( NAME [=] value, … )]`, names from `allowed`, each at most once.
    fn options(&mut self, allowed: &[&str]) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        if !self.token(&Token::LParen) {
            return Ok(out);
        }
        loop {
            let mut name = upper_word(self.peek().unwrap_or(&Token::EOF));
            if name.is_empty() {
                return Err(self.error(&format!("an option ({})", allowed.join(", "))));
            }
            self.pos += 1;
            if name == "BASE" {
                self.expect_keyword("TIME")?;
                name = "BASE TIME".into();
            }
            if !allowed.contains(&name.as_str()) {
                return Err(Error::Syntax(format!(
                    "unknown option {name}; expected one of {}",
                    allowed.join(", ")
                )));
            }
            if out.iter().any(|(k, _)| *k == name) {
                return Err(Error::Syntax(format!("option {name} given twice")));
            }
            self.token(&Token::Eq);
            let value = match self.peek() {
                Some(Token::SingleQuotedString(s)) => s.clone(),
                Some(Token::Word(w)) => w.value.clone(),
                // Integer options are validated by `opt`.
                Some(Token::Number(n, _)) => n.clone(),
                _ => return Err(self.error(&format!("a value for {name}"))),
            };
            self.pos += 1;
            out.push((name, value));
            if !self.token(&Token::Comma) {
                break;
            }
        }
        if !self.token(&Token::RParen) {
            return Err(self.error("\",\" or \")\""));
        }
        Ok(out)
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
        Field::new("generator", DataType::Utf8, false),
        Field::new("offset", DataType::UInt64, false),
        Field::new("state", DataType::Utf8, false),
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
            create(engine, name, *if_not_exists, generator).await
        }
        SourceStatementKind::Drop {
            if_exists,
            names,
            cascade,
        } => drop_sources(engine, *if_exists, names, *cascade).await,
        SourceStatementKind::Show => show(engine),
    }
}

async fn create(
    engine: &Engine,
    name: &str,
    if_not_exists: bool,
    generator: GeneratorSpec,
) -> Result<Outcome> {
    let done = Outcome::Command {
        tag: "CREATE SOURCE",
        rows: None,
    };
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
        generator,
    })?;
    engine.driver.add(engine, &source)?;
    Ok(done)
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
    let names: StringArray = status.iter().map(|s| Some(s.0.clone())).collect();
    let generators: StringArray = status
        .iter()
        .map(|(_, spec, _, _)| {
            Some(match spec {
                GeneratorSpec::Counter { rate, max } => format!(
                    "counter (rate {}{})",
                    rate_text(*rate),
                    max.map(|m| format!(", max {m}")).unwrap_or_default()
                ),
                GeneratorSpec::Nexmark {
                    table,
                    rate,
                    events,
                    ..
                } => format!(
                    "nexmark {} (rate {}{})",
                    match table {
                        NexmarkTable::Person => "person",
                        NexmarkTable::Auction => "auction",
                        NexmarkTable::Bid => "bid",
                    },
                    rate_text(*rate),
                    events.map(|e| format!(", events {e}")).unwrap_or_default()
                ),
            })
        })
        .collect();
    let offsets: UInt64Array = status.iter().map(|s| Some(s.2)).collect();
    let states: StringArray = status.iter().map(|s| Some(s.3.to_string())).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(names),
            Arc::new(generators),
            Arc::new(offsets),
            Arc::new(states),
        ],
    )?;
    Ok(Outcome::Rows(Rows {
        schema,
        batches: vec![batch],
        names: None,
        tag: "SHOW",
    }))
}

fn rate_text(rate: u64) -> String {
    if rate == 0 {
        "unlimited".into()
    } else {
        format!("{rate}/s")
    }
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
            "create source (a int) from generator counter",
            "drop source",
            "show sources now",
            "create source c from generator counter (rate 99999999999999999999999)",
        ] {
            assert!(one(sql).is_err(), "{sql} should fail");
        }
    }
}
