//! Runs every `sqllogictest/**/*.slt` file against a real Sluice server over
//! the Postgres wire protocol (simple query protocol, text results).
//!
//! Each file gets a fresh server and data directory. Errors are reported as
//! `SQLSTATE: message`, so a test can assert the code:
//! `statement error 23505`. A comment line `# sluice: restart` kills the
//! server with SIGKILL (no shutdown, like a crash) and starts it again on the
//! same data directory, to test durability.
//!
//! `cargo test --test sqllogictest -- <filter>` runs the files whose path
//! contains `<filter>`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use common::Server;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Record, Runner};
use tokio_postgres::SimpleQueryMessage;

const FILE_TIMEOUT: Duration = Duration::from_secs(300);
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct DbError(String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DbError {}

struct Sluice {
    client: tokio_postgres::Client,
}

#[async_trait]
impl AsyncDB for Sluice {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let msgs = tokio::time::timeout(STATEMENT_TIMEOUT, self.client.simple_query(sql))
            .await
            .map_err(|_| DbError(format!("timed out after {STATEMENT_TIMEOUT:?}: {sql}")))?
            .map_err(|e| DbError(common::err_text(&e)))?;
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut ncols: Option<usize> = None;
        let mut affected = 0;
        for m in msgs {
            match m {
                SimpleQueryMessage::RowDescription(cols) => ncols = Some(cols.len()),
                SimpleQueryMessage::Row(r) => {
                    ncols = Some(r.len());
                    rows.push(
                        (0..r.len())
                            .map(|i| match r.get(i) {
                                None => "NULL".to_string(),
                                Some("") => "(empty)".to_string(),
                                Some(v) => v.to_string(),
                            })
                            .collect(),
                    );
                }
                SimpleQueryMessage::CommandComplete(n) => affected = n,
                _ => {}
            }
        }
        Ok(match ncols {
            Some(n) => DBOutput::Rows {
                types: vec![DefaultColumnType::Any; n],
                rows,
            },
            None => DBOutput::StatementComplete(affected),
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "sluice"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await
    }
}

fn runner(port: u16) -> Runner<Sluice, impl sqllogictest::MakeConnection<Conn = Sluice>> {
    let mut r = Runner::new(move || async move {
        let conn =
            format!("host=127.0.0.1 port={port} user=sluice dbname=sluice connect_timeout=10");
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .map_err(|e| DbError(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Sluice { client })
    });
    r.with_column_validator(sqllogictest::default_column_validator);
    r
}

fn is_restart(lines: &[String]) -> bool {
    lines.iter().any(|l| l.trim() == "sluice: restart")
}

async fn run_file(path: &Path) -> Result<(), String> {
    let records = sqllogictest::parse_file::<DefaultColumnType>(path).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut server = Server::start(dir.path());
    let mut r = runner(server.port);
    for record in records {
        if let Record::Comment(lines) = &record {
            if is_restart(lines) {
                server.restart_kill9();
                r = runner(server.port);
            }
            continue;
        }
        r.run_async(record)
            .await
            .map_err(|e| e.display(true).to_string())?;
    }
    Ok(())
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            slt_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "slt") {
            out.push(p);
        }
    }
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sqllogictest");
    let mut files = Vec::new();
    slt_files(&root, &mut files);
    if let Some(f) = &filter {
        files.retain(|p| p.to_string_lossy().contains(f.as_str()));
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let result = rt.block_on(async {
            tokio::time::timeout(FILE_TIMEOUT, run_file(file))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {FILE_TIMEOUT:?}")))
        });
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}");
            }
        }
    }
    println!("\nsqllogictest: {passed} passed, {failed} failed");
    if failed > 0 || files.is_empty() {
        std::process::exit(1);
    }
}
