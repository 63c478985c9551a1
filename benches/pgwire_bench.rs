//! Point lookups and bulk inserts over pgwire against a real `sluice`
//! process (release build).
//!
//! ```sh
//! cargo bench --bench pgwire_bench            # BENCH_ROWS=100000 BENCH_SECS=10 BENCH_CLIENTS=16
//! ```
//!
//! Measures, in one run:
//! * bulk INSERT rows/s (multi-row INSERT statements of 1000 rows, one client);
//! * `SELECT 1` from 16 clients: the protocol + planning floor (baseline);
//! * `SELECT … WHERE id = $1` (primary key) from 16 clients: p50/p99/qps;
//! * `SELECT … WHERE n = $1` (not a key: scans the table) for contrast.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path) -> Server {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    let addr = line
        .strip_prefix("sluice: listening on ")
        .and_then(|r| r.split_whitespace().next())
        .expect("listening line");
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    Server(child, port)
}

async fn connect(port: u16) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=bench dbname=sluice"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    c
}

/// Runs `sql` with a random `$1` in `0..key_space` from `clients` clients
/// for `secs`; returns (histogram in µs, total queries, elapsed).
async fn load(
    port: u16,
    clients: usize,
    secs: u64,
    sql: &'static str,
    key_space: i64,
) -> (Histogram<u64>, u64, Duration) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let c = connect(port).await;
            let st = c.prepare(sql).await.expect("prepare");
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut rng = rand::rngs::StdRng::from_os_rng();
            while Instant::now() < deadline {
                let t = Instant::now();
                if st.params().is_empty() {
                    c.query(&st, &[]).await.expect("query");
                } else {
                    let k: i64 = rng.random_range(0..key_space);
                    let rows = c.query(&st, &[&k]).await.expect("query");
                    assert!(rows.len() <= 1 || sql.contains("n ="));
                }
                h.record(t.elapsed().as_micros() as u64).expect("record");
            }
            h
        }));
    }
    let mut total = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        total.add(t.await.expect("task")).expect("add");
    }
    let n = total.len();
    (total, n, start.elapsed())
}

fn report(name: &str, h: &Histogram<u64>, n: u64, elapsed: Duration) {
    println!(
        "| {name} | {:.0} | {:.2} | {:.2} |",
        n as f64 / elapsed.as_secs_f64(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let rows = env_usize("BENCH_ROWS", 100_000);
    let secs = env_usize("BENCH_SECS", 10) as u64;
    let clients = env_usize("BENCH_CLIENTS", 16);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    let port = server.1;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let c = connect(port).await;
        c.batch_execute("CREATE TABLE kv (id BIGINT PRIMARY KEY, v TEXT, n INT)")
            .await
            .expect("create");
        let batch = 1000;
        let t = Instant::now();
        let mut i = 0;
        while i < rows {
            let end = (i + batch).min(rows);
            let values: Vec<String> = (i..end)
                .map(|k| format!("({k}, 'value-{k}-{}', {})", "x".repeat(40), k % 1000))
                .collect();
            c.batch_execute(&format!("INSERT INTO kv VALUES {}", values.join(",")))
                .await
                .expect("insert");
            i = end;
        }
        let load_secs = t.elapsed().as_secs_f64();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        println!("cores: {cores}; rows: {rows}; clients: {clients}; seconds per load: {secs}");
        println!(
            "bulk INSERT (1000-row statements, fsync on): {rows} rows in {load_secs:.2} s = {:.0} rows/s",
            rows as f64 / load_secs
        );
        println!();
        println!("| query ({clients} clients, prepared) | queries/s | p50 ms | p99 ms |");
        println!("|---|---|---|---|");
        let (h, n, e) = load(port, clients, secs, "SELECT 1", 1).await;
        report("`SELECT 1` (baseline: protocol + planning)", &h, n, e);
        let (h, n, e) = load(port, clients, secs, "SELECT v, n FROM kv WHERE id = $1", rows as i64).await;
        report("`SELECT v, n FROM kv WHERE id = $1` (primary key)", &h, n, e);
        let (h, n, e) = load(port, clients, secs.min(5), "SELECT v FROM kv WHERE n = $1::bigint", 1000).await;
        report("`SELECT v FROM kv WHERE n = $1` (no key: full scan)", &h, n, e);
    });
    drop(server);
}
