//! SUBSCRIBE, COPY … TO STDOUT and cursors, over the real wire.
//!
//! The oracle here: a subscription's snapshot plus every change it sent
//! adds up to exactly what `SELECT * FROM view` returns once the writes
//! are done — for a table-fed aggregate under random DML and for a
//! generator-fed query.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{err_text, rows, Server};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{CopyOutStream, SimpleQueryMessage};

/// A multiset of rows (`a|b|…` text) built from `ts\tdiff\tcols…` lines.
#[derive(Default, Debug)]
struct Accumulated {
    rows: BTreeMap<String, i64>,
    last_ts: i64,
}

impl Accumulated {
    /// Applies one COPY text line; checks timestamps never go back.
    fn apply(&mut self, line: &str) {
        let line = line.trim_end_matches('\n');
        let mut parts = line.split('\t');
        let ts: i64 = parts.next().and_then(|t| t.parse().ok()).expect("ts");
        let diff: i64 = parts.next().and_then(|t| t.parse().ok()).expect("diff");
        assert!(
            ts >= self.last_ts,
            "timestamps went back: {ts} after {}",
            self.last_ts
        );
        self.last_ts = ts;
        let row = parts
            .map(|p| if p == "\\N" { "NULL" } else { p })
            .collect::<Vec<_>>()
            .join("|");
        let e = self.rows.entry(row.clone()).or_insert(0);
        *e += diff;
        assert!(*e >= 0, "row {row} went negative");
        if *e == 0 {
            self.rows.remove(&row);
        }
    }

    fn sorted(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (r, n) in &self.rows {
            for _ in 0..*n {
                out.push(r.clone());
            }
        }
        out.sort();
        out
    }
}

/// Reads COPY lines until the accumulated rows equal `want`.
async fn read_until(
    stream: &mut std::pin::Pin<Box<CopyOutStream>>,
    acc: &mut Accumulated,
    want: &[String],
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while acc.sorted() != want {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "subscription did not reach the view's contents\n have {:?}\n want {want:?}",
                    acc.sorted()
                )
            })
            .expect("stream ended")
            .expect("copy data");
        acc.apply(std::str::from_utf8(&next).expect("utf8"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_subscribe_adds_up_to_the_view_under_random_dml() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let writer = server.connect().await;
    let sub = server.connect().await;
    writer
        .batch_execute(
            "CREATE TABLE t (id INT PRIMARY KEY, b TEXT, a INT);
             INSERT INTO t VALUES (1, 'x', 5), (2, 'y', 7), (3, 'x', NULL);
             CREATE MATERIALIZED VIEW g AS SELECT b, count(*) AS c, sum(a) AS s FROM t GROUP BY b;",
        )
        .await
        .unwrap();
    let mut stream = Box::pin(
        sub.copy_out("COPY (SUBSCRIBE g) TO STDOUT")
            .await
            .unwrap_or_else(|e| panic!("{}", err_text(&e))),
    );
    let mut acc = Accumulated::default();
    // The snapshot first.
    read_until(
        &mut stream,
        &mut acc,
        &rows(&writer, "SELECT * FROM g").await,
    )
    .await;

    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..150 {
        let id = rng.random_range(1..40);
        let b = ["x", "y", "z"][rng.random_range(0..3)];
        let a = rng.random_range(0..100);
        let sql = match rng.random_range(0..3) {
            0 => format!("INSERT INTO t VALUES ({id}, '{b}', {a})"),
            1 => format!("UPDATE t SET a = {a}, b = '{b}' WHERE id = {id}"),
            _ => format!("DELETE FROM t WHERE id = {id}"),
        };
        // Duplicate keys are expected now and then.
        let _ = writer.simple_query(&sql).await;
    }
    writer.simple_query("FLUSH").await.unwrap();
    let want = rows(&writer, "SELECT * FROM g").await;
    read_until(&mut stream, &mut acc, &want).await;

    // Cancel ends it with 57014; the connection stays usable.
    sub.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(err_text(&e)),
                None => return None,
            }
        }
    })
    .await
    .expect("cancel did not end the subscription");
    let end = end.expect("stream ended without an error");
    assert!(end.starts_with("57014"), "{end}");
    assert_eq!(rows(&sub, "SELECT 1").await, vec!["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_a_query_over_a_generator_and_its_view_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let c = server.connect().await;
    c.batch_execute("CREATE SOURCE n FROM GENERATOR COUNTER (RATE 2000, MAX 3000)")
        .await
        .unwrap();
    let sub = server.connect().await;
    let mut stream = Box::pin(
        sub.copy_out(
            "COPY (SUBSCRIBE (SELECT counter % 3 AS r, count(*) AS c, sum(counter) AS s FROM n GROUP BY counter % 3)) TO STDOUT",
        )
        .await
        .unwrap_or_else(|e| panic!("{}", err_text(&e))),
    );
    let mut acc = Accumulated::default();
    // All 3000 counted, by the batch query over the same numbers.
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..3)
            .map(|r| {
                let vals: Vec<i64> = (1..=3000).filter(|v| v % 3 == r).collect();
                format!("{r}|{}|{}", vals.len(), vals.iter().sum::<i64>())
            })
            .collect();
        w.sort();
        w
    };
    read_until(&mut stream, &mut acc, &want).await;
    let temp =
        "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'sluice_subscribe%'";
    assert_eq!(rows(&c, temp).await, vec!["1"]);
    assert!(rows(&c, "SHOW MATERIALIZED VIEWS").await.is_empty());
    drop(stream);
    sub.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows(&c, temp).await != vec!["0"] {
        assert!(
            Instant::now() < deadline,
            "the subscription's view was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A subscription open at a crash leaves no view behind either.
    let sub = server.connect().await;
    let _stream = Box::pin(
        sub.copy_out("COPY (SUBSCRIBE (SELECT counter FROM n WHERE counter < 10)) TO STDOUT")
            .await
            .unwrap(),
    );
    assert_eq!(rows(&c, temp).await, vec!["1"]);
    server.restart_kill9();
    let c = server.connect().await;
    assert_eq!(rows(&c, temp).await, vec!["0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_subscribe_streams_rows_with_progress() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let writer = server.connect().await;
    writer
        .batch_execute("CREATE TABLE t (k INT PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a');")
        .await
        .unwrap();
    let sub = server.connect().await;
    let mut stream = Box::pin(
        sub.simple_query_raw("SUBSCRIBE TO t WITH (SNAPSHOT = false, PROGRESS)")
            .await
            .unwrap(),
    );
    // The columns come once the subscription is registered.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no row description")
        .expect("stream ended")
        .expect("row description");
    assert!(matches!(first, SimpleQueryMessage::RowDescription(_)));
    writer
        .batch_execute("INSERT INTO t VALUES (2, 'b'); UPDATE t SET v = 'c' WHERE k = 1;")
        .await
        .unwrap();
    // Rows arrive while the statement runs: columns, then the changes of
    // each commit followed by its progress row.
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("no row within 10 s")
            .expect("stream ended")
            .expect("row");
        if let SimpleQueryMessage::Row(r) = m {
            assert_eq!(r.columns()[0].name(), "sluice_ts");
            assert_eq!(r.columns()[1].name(), "sluice_progressed");
            got.push(
                (1..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            );
        }
    }
    assert_eq!(got[0], "f|1|2|b");
    assert_eq!(got[1], "t|NULL|NULL|NULL");
    let mut update = got[2..4].to_vec();
    update.sort();
    assert_eq!(update, vec!["f|-1|1|a", "f|1|1|c"]);
    assert_eq!(got[4], "t|NULL|NULL|NULL");

    // Two statements with a SUBSCRIBE in one query string: refused.
    let e = writer
        .simple_query("SELECT 1; SUBSCRIBE t")
        .await
        .unwrap_err();
    assert!(err_text(&e).starts_with("0A000"), "{}", err_text(&e));
    // Dropping the relation ends the subscription with a clear error.
    writer.batch_execute("DROP TABLE t").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = stream.next().await {
            if let Err(e) = m {
                return err_text(&e);
            }
        }
        "ended without error".to_string()
    })
    .await
    .unwrap();
    assert!(end.starts_with("55000"), "{end}");
    let e = writer
        .simple_query("SUBSCRIBE nothing_here")
        .await
        .unwrap_err();
    assert!(err_text(&e).starts_with("42P01"), "{}", err_text(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_fetch_subscriptions_and_queries_over_the_extended_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let writer = server.connect().await;
    writer
        .batch_execute(
            "CREATE TABLE t (k INT PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');",
        )
        .await
        .unwrap();
    let c = server.connect().await;
    let e = c
        .batch_execute("DECLARE c CURSOR FOR SUBSCRIBE t")
        .await
        .unwrap_err();
    assert!(err_text(&e).starts_with("25P01"), "{}", err_text(&e));

    c.batch_execute("BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t")
        .await
        .unwrap();
    // `query` prepares: FETCH is described from the session's cursor.
    let snap = c.query("FETCH ALL c", &[]).await.unwrap();
    assert_eq!(snap.len(), 2);
    let mut ks: Vec<i32> = snap.iter().map(|r| r.get::<_, i32>("k")).collect();
    ks.sort();
    assert_eq!(ks, vec![1, 2]);
    assert!(snap.iter().all(|r| r.get::<_, i64>("sluice_diff") == 1));
    // Nothing new: a zero timeout returns at once, empty.
    let none = c
        .query("FETCH ALL c WITH (TIMEOUT = 0)", &[])
        .await
        .unwrap();
    assert!(none.is_empty());
    // FETCH waits for the next change.
    let w = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer
            .batch_execute("DELETE FROM t WHERE k = 1")
            .await
            .unwrap();
        writer
    });
    let started = Instant::now();
    let next = c.query("FETCH 10 c", &[]).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].get::<_, i64>("sluice_diff"), -1);
    assert_eq!(next[0].get::<_, &str>("v"), "a");
    let _writer = w.await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let e = c.query("FETCH 1 c", &[]).await.unwrap_err();
    assert!(err_text(&e).starts_with("34000"), "{}", err_text(&e));

    // A cursor over a query, fetched in pieces (what psycopg's named
    // cursors send).
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(
        "DECLARE \"q\" CURSOR WITHOUT HOLD FOR SELECT k * 10 AS k10 FROM generate_series(1, 5) AS s(k) ORDER BY 1",
        &[],
    )
    .await
    .unwrap();
    let a = c.query("FETCH FORWARD 2 FROM \"q\"", &[]).await.unwrap();
    let b = c.query("FETCH FORWARD 10 FROM \"q\"", &[]).await.unwrap();
    let got: Vec<i64> = a.iter().chain(&b).map(|r| r.get::<_, i64>("k10")).collect();
    assert_eq!(got, vec![10, 20, 30, 40, 50]);
    assert!(c.query("FETCH 1 q", &[]).await.unwrap().is_empty());
    let e = c
        .batch_execute("DECLARE q CURSOR FOR SELECT 1")
        .await
        .unwrap_err();
    assert!(err_text(&e).starts_with("42P03"), "{}", err_text(&e));
    c.batch_execute("ROLLBACK; BEGIN").await.unwrap();
    c.batch_execute("DECLARE q CURSOR FOR SELECT 1; CLOSE q; COMMIT")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_cut_off_and_never_stalls_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let writer = server.connect().await;
    writer
        .batch_execute("CREATE TABLE t (k INT PRIMARY KEY)")
        .await
        .unwrap();
    let c = server.connect().await;
    c.batch_execute(
        "SET subscribe_buffer_rows = 10; BEGIN; DECLARE c CURSOR FOR SUBSCRIBE t WITH (SNAPSHOT false)",
    )
    .await
    .unwrap();
    // 50 commits while the subscriber reads nothing: none of them waits.
    let started = Instant::now();
    for k in 0..50 {
        writer
            .batch_execute(&format!("INSERT INTO t VALUES ({k})"))
            .await
            .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    let first = c.query("FETCH ALL c", &[]).await.unwrap();
    assert_eq!(first.len(), 10);
    let e = c.query("FETCH ALL c", &[]).await.unwrap_err();
    let text = err_text(&e);
    assert!(
        text.starts_with("54000") && text.contains("too far behind"),
        "{text}"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    let e = c
        .batch_execute(
            "SET subscribe_buffer_rows = 'lots'; BEGIN; DECLARE d CURSOR FOR SUBSCRIBE t",
        )
        .await
        .unwrap_err();
    assert!(err_text(&e).starts_with("22023"), "{}", err_text(&e));
}

/// psql prints `COPY (SUBSCRIBE …) TO STDOUT` as it arrives, and Ctrl-C
/// (a cancel request) ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_streams_copy_subscribe_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let writer = server.connect().await;
    writer
        .batch_execute(
            "CREATE TABLE t (k INT PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'one');
             CREATE MATERIALIZED VIEW m AS SELECT count(*) AS n FROM t;",
        )
        .await
        .unwrap();
    // psql's stdout is a pipe here, not a terminal: line-buffer it as a
    // terminal would be.
    let mut psql = Command::new("stdbuf")
        .args([
            "-oL",
            "psql",
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &server.port.to_string(),
            "-U",
            "sluice",
            "-d",
            "sluice",
        ])
        .args(["-c", "COPY (SUBSCRIBE m) TO STDOUT"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let stdout = psql.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = |rx: &std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(15))
            .expect("psql printed nothing within 15 s")
    };
    let snap = line(&rx);
    assert!(snap.ends_with("\t1\t1"), "{snap}");
    writer
        .batch_execute("INSERT INTO t VALUES (2, 'two')")
        .await
        .unwrap();
    let mut change = vec![line(&rx), line(&rx)];
    change.sort();
    assert!(change[0].ends_with("\t-1\t1"), "{change:?}");
    assert!(change[1].ends_with("\t1\t2"), "{change:?}");
    let pid = psql.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = psql.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "psql did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    psql.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
}

/// `COPY (query) TO STDOUT` and `COPY table TO STDOUT` (what psql's
/// `\copy … to stdout` sends) in text and CSV, and SUBSCRIBE over the
/// extended protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_queries_and_extended_protocol_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    c.batch_execute(
        "CREATE TABLE t (k INT PRIMARY KEY, v TEXT);
         INSERT INTO t VALUES (1, 'a,b'), (2, NULL), (3, 'tab\there');",
    )
    .await
    .unwrap();
    let read = |sql: &'static str| {
        let c = &c;
        async move {
            let stream = c
                .copy_out(sql)
                .await
                .unwrap_or_else(|e| panic!("{}", err_text(&e)));
            let chunks: Vec<_> = stream.collect().await;
            chunks
                .into_iter()
                .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
                .collect::<String>()
        }
    };
    assert_eq!(
        read("COPY (SELECT k, v FROM t ORDER BY k) TO STDOUT").await,
        "1\ta,b\n2\t\\N\n3\ttab\\there\n"
    );
    assert_eq!(
        read("COPY (SELECT k, v FROM t ORDER BY k) TO STDOUT WITH (FORMAT csv, HEADER)").await,
        "k,v\n1,\"a,b\"\n2,\n3,tab\there\n"
    );
    let mut all = read("COPY t TO STDOUT")
        .await
        .lines()
        .map(String::from)
        .collect::<Vec<_>>();
    all.sort();
    assert_eq!(all, vec!["1\ta,b", "2\t\\N", "3\ttab\\there"]);

    // Extended protocol: described at Parse, rows streamed as they come.
    let sub = server.connect().await;
    let params: Vec<String> = vec![];
    let stream = sub
        .query_raw("SUBSCRIBE (SELECT count(*) AS n FROM t)", params)
        .await
        .unwrap();
    let mut stream = Box::pin(stream);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.get::<_, i64>("sluice_diff"), 1);
    assert_eq!(first.get::<_, i64>("n"), 3);
    c.batch_execute("DELETE FROM t WHERE k = 2").await.unwrap();
    let mut change = Vec::new();
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        change.push((r.get::<_, i64>("sluice_diff"), r.get::<_, i64>("n")));
    }
    change.sort();
    assert_eq!(change, vec![(-1, 3), (1, 2)]);
}
