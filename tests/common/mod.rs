//! Test helpers: run the real `sluice` binary on a free port.
#![allow(dead_code)]

pub mod kafka;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `sluice` process.
pub struct Server {
    child: Child,
    /// Port it listens on.
    pub port: u16,
    data_dir: PathBuf,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server on `127.0.0.1:0` with `data_dir`.
    pub fn start(data_dir: &Path) -> Server {
        Server::start_with(data_dir, &[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn sluice");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.strip_prefix("sluice: listening on ") {
                        let addr = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("sluice did not start within 60 s");
            }
        };
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        Server {
            child,
            port,
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `kill -9` and start again on the same data directory.
    pub fn restart_kill9(&mut self) {
        self.kill9();
        let extra: Vec<&str> = self.extra.iter().map(|s| s.as_str()).collect();
        *self = Server::start_with(&self.data_dir.clone(), &extra);
    }

    /// SIGKILL the process and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (graceful shutdown); returns whether it exited
    /// successfully within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if !status.success() {
                    eprintln!("sluice exited with {status}");
                }
                return status.success();
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection string for tokio-postgres.
    pub fn conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=sluice dbname=sluice connect_timeout=10",
            self.port
        )
    }

    /// Connects with tokio-postgres.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_postgres::connect(&self.conn_str(), tokio_postgres::NoTls),
        )
        .await
        .expect("connect timed out")
        .expect("connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The rows of `sql` (simple protocol), each as `a|b|NULL`, sorted.
pub async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", err_text(&e)));
    let mut out: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// Formats a tokio-postgres error as `SQLSTATE: message`.
pub fn err_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}
