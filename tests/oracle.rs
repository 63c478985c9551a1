//! The oracle: random INSERT/UPDATE/DELETE sequences on tables; after every
//! statement each materialized view must equal its defining query run in
//! batch by DataFusion over the same tables — and still after a kill -9.
//!
//! Seeded (`SLUICE_ORACLE_SEED`, default fixed) so a failure reproduces.

mod common;

use common::{rows, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

const VIEWS: &[(&str, &str)] = &[
    ("m1", "SELECT id, a * 2 AS a2, b FROM t1 WHERE a % 3 <> 0"),
    ("m2", "SELECT b, a FROM t1 WHERE b IS NOT NULL AND a > 10"),
    ("m3", "SELECT k, v FROM t2 WHERE v IS NULL OR v < 50"),
    (
        "m4",
        "SELECT a2 + 1 AS x, upper(b) AS ub FROM m1 WHERE b <> 'b3'",
    ),
    ("m5", "SELECT coalesce(v, -1) AS v FROM t2"),
    (
        "a1",
        "SELECT b, count(*) AS c, sum(a) AS s, min(a) AS mn, max(a) AS mx, count(a) AS ca FROM t1 GROUP BY b",
    ),
    ("a2", "SELECT count(*) AS c, sum(v) AS s, avg(v) AS av, min(k) AS mk FROM t2"),
    ("a3", "SELECT k, sum(v) AS s, max(v) AS mx FROM t2 GROUP BY k HAVING count(*) > 1"),
    ("a4", "SELECT b, c * 10 AS c10 FROM a1 WHERE c > 1"),
    ("a5", "SELECT a % 4 AS bucket, count(*) AS c, sum(id) AS s FROM t1 WHERE b IS NOT NULL GROUP BY a % 4"),
    ("a6", "SELECT b, count(DISTINCT a) AS d FROM t1 GROUP BY b"),
    (
        "a7",
        "SELECT a % 3 AS g, min(b) AS mn, max(b) AS mx, sum(CAST(a AS DECIMAL(10,2))) AS ds, \
         avg(CAST(a AS DECIMAL(10,2))) AS da, sum(CAST(id AS DOUBLE)) AS fs, avg(id) AS av \
         FROM t1 GROUP BY a % 3",
    ),
    ("j1", "SELECT t1.id, t1.b, t2.v FROM t1 JOIN t2 ON t1.id % 10 = t2.k"),
    (
        "j2",
        "SELECT t2.k, count(*) AS c, sum(t1.a) AS s FROM t1 JOIN t2 ON t1.id % 10 = t2.k WHERE t2.v IS NOT NULL GROUP BY t2.k",
    ),
    (
        "s1",
        "SELECT b, round(stddev(a), 6) AS sd, round(var_pop(a), 6) AS vp, round(covar_samp(a, id), 6) AS cs, \
         round(corr(a, id), 6) AS c, round(regr_slope(a, id), 6) AS sl, round(regr_intercept(a, id), 6) AS ic, \
         round(regr_r2(a, id), 6) AS r2, regr_count(a, id) AS rc, bool_and(a > 0) AS ba, bool_or(a > 50) AS bo \
         FROM t1 GROUP BY b",
    ),
    ("tn1", "SELECT id, a FROM t1 ORDER BY a DESC, id LIMIT 3"),
    ("tn2", "SELECT b, a FROM t1 ORDER BY b NULLS FIRST, a, id LIMIT 4 OFFSET 2"),
    ("tn3", "SELECT k, v FROM t2 ORDER BY v, k LIMIT 2"),
    (
        "rn1",
        "SELECT id, b, a, rn FROM (SELECT id, b, a, ROW_NUMBER() OVER (PARTITION BY b ORDER BY a DESC, id) AS rn FROM t1) s WHERE rn <= 2",
    ),
    (
        "rn2",
        "SELECT k, v FROM (SELECT k, v, ROW_NUMBER() OVER (PARTITION BY k ORDER BY v NULLS LAST) AS rn FROM t2) s WHERE rn = 1",
    ),
    ("oj1", "SELECT t1.id, t1.b, t2.v FROM t1 LEFT JOIN t2 ON t1.id % 10 = t2.k"),
    ("oj2", "SELECT t2.k, t2.v, t1.id FROM t1 RIGHT JOIN t2 ON t1.id % 10 = t2.k"),
    ("oj3", "SELECT t1.id, t2.k, t2.v FROM t1 FULL JOIN t2 ON t1.a = t2.v"),
    (
        "oj5",
        "SELECT t1.id, t2.k, t2.v FROM t1 LEFT JOIN t2 ON t1.id % 10 = t2.k AND t2.v > t1.a",
    ),
    (
        "oj6",
        "SELECT t1.id, t1.a, t2.k, t2.v FROM t1 FULL JOIN t2 ON t1.id % 10 = t2.k AND t1.a < t2.v",
    ),
    (
        "oj7",
        "SELECT t2.k, t2.v, t1.b FROM t1 RIGHT JOIN t2 ON t1.id % 10 = t2.k AND t1.b <> 'b2'",
    ),
    (
        "oj4",
        "SELECT t1.b, count(t2.v) AS c, count(*) AS n FROM t1 LEFT JOIN t2 ON t1.id % 10 = t2.k GROUP BY t1.b",
    ),
    ("u1", "SELECT b AS x FROM t1 WHERE a > 50 UNION ALL SELECT CAST(v AS TEXT) AS x FROM t2"),
    ("u2", "SELECT k FROM t2 UNION SELECT id % 10 FROM t1"),
    ("d1", "SELECT DISTINCT b, a % 2 AS parity FROM t1"),
    ("j3", "SELECT x.k, x.v AS v1, y.v AS v2 FROM t2 x JOIN t2 y ON x.k = y.k AND x.v < y.v"),
    ("j4", "SELECT m1.a2, t2.v FROM m1 JOIN t2 ON m1.id % 10 = t2.k"),
    (
        "j5",
        "SELECT t1.b, t2.v, t3.k FROM t1 JOIN t2 ON t1.id % 10 = t2.k JOIN t2 t3 ON t3.v = t1.a",
    ),
];

async fn create_views(c: &Client) {
    for (name, query) in VIEWS {
        c.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {query}"))
            .await
            .unwrap();
    }
}

async fn check_all(c: &Client, step: usize, last: &str) {
    for (name, query) in VIEWS {
        let incremental = rows(c, &format!("SELECT * FROM {name}")).await;
        let batch = rows(c, query).await;
        assert_eq!(
            incremental, batch,
            "view {name} differs from its query after step {step}: {last}"
        );
    }
}

fn value(rng: &mut StdRng) -> String {
    if rng.random_bool(0.1) {
        "NULL".into()
    } else {
        rng.random_range(-5..100).to_string()
    }
}

fn text(rng: &mut StdRng) -> String {
    if rng.random_bool(0.1) {
        "NULL".into()
    } else {
        format!("'b{}'", rng.random_range(0..6))
    }
}

fn statement(rng: &mut StdRng) -> String {
    match rng.random_range(0..7) {
        0 | 1 => {
            let n = rng.random_range(1..5);
            let values: Vec<String> = (0..n)
                .map(|_| {
                    format!(
                        "({}, {}, {})",
                        rng.random_range(0..60),
                        value(rng),
                        text(rng)
                    )
                })
                .collect();
            // Duplicate keys make some inserts fail (23505): also a test.
            format!("INSERT INTO t1 VALUES {}", values.join(", "))
        }
        2 => {
            let n = rng.random_range(1..4);
            let values: Vec<String> = (0..n)
                .map(|_| format!("({}, {})", rng.random_range(0..10), value(rng)))
                .collect();
            format!("INSERT INTO t2 VALUES {}", values.join(", "))
        }
        3 => format!(
            "UPDATE t1 SET a = a + {}, b = {} WHERE id % 7 = {}",
            rng.random_range(-20..20),
            text(rng),
            rng.random_range(0..7)
        ),
        4 => format!(
            "UPDATE t2 SET v = {} WHERE k = {}",
            value(rng),
            rng.random_range(0..10)
        ),
        5 => format!("DELETE FROM t1 WHERE a < {}", rng.random_range(-5..30)),
        _ => format!("DELETE FROM t2 WHERE k = {}", rng.random_range(0..10)),
    }
}

#[tokio::test]
async fn views_equal_their_queries_under_random_changes_and_restarts() {
    let seed: u64 = std::env::var("SLUICE_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5105);
    let steps: usize = std::env::var("SLUICE_ORACLE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let mut c = server.connect().await;
    c.batch_execute(
        "CREATE TABLE t1 (id INT PRIMARY KEY, a INT, b TEXT);
         CREATE TABLE t2 (k INT, v INT);
         INSERT INTO t1 VALUES (1, 5, 'b1'), (2, 12, 'b3'), (3, 30, NULL);
         INSERT INTO t2 VALUES (1, 10), (1, 10), (2, NULL);",
    )
    .await
    .unwrap();
    // Created after some data exists: backfill is checked too.
    create_views(&c).await;
    check_all(&c, 0, "backfill").await;
    for step in 1..=steps {
        let sql = statement(&mut rng);
        if let Err(e) = c.batch_execute(&sql).await {
            let code = e.as_db_error().map(|d| d.code().code().to_string());
            assert_eq!(code.as_deref(), Some("23505"), "{sql}: {e}");
        }
        check_all(&c, step, &sql).await;
        if step == steps / 2 {
            server.restart_kill9();
            c = server.connect().await;
            check_all(&c, step, "restart").await;
        }
    }
}

/// kill -9 while a client writes as fast as it can: after the restart every
/// view equals its query over whatever the tables hold (each statement's
/// table write and view maintenance are one atomic batch).
#[tokio::test]
async fn views_survive_kill_9_during_continuous_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let c = server.connect().await;
    c.batch_execute(
        "CREATE TABLE t1 (id INT PRIMARY KEY, a INT, b TEXT);
         CREATE TABLE t2 (k INT, v INT);",
    )
    .await
    .unwrap();
    create_views(&c).await;
    let writer = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(99);
        let mut done = 0u64;
        // Runs until the server dies under it (23505 errors are expected).
        loop {
            if c.batch_execute(&statement(&mut rng)).await.is_ok() {
                done += 1;
            }
            if c.is_closed() || done > 100_000 {
                break;
            }
        }
        done
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    server.restart_kill9();
    let statements = writer.await.unwrap();
    assert!(statements > 5, "the writer made progress before the crash");
    let c = server.connect().await;
    check_all(&c, 0, "kill -9 during writes").await;
    // And maintenance continues.
    let mut rng = StdRng::seed_from_u64(7);
    for step in 1..=20 {
        let sql = statement(&mut rng);
        let _ = c.batch_execute(&sql).await;
        check_all(&c, step, &sql).await;
    }
}

/// Views over generator sources, one of them mixing a source with a table.
const SOURCE_VIEWS: &[(&str, &str)] = &[
    (
        "sc",
        "SELECT count(*) AS n, count(DISTINCT counter) AS d, min(counter) AS lo, max(counter) AS hi FROM c",
    ),
    (
        "sb",
        "SELECT bidder % 7 AS k, count(*) AS n, sum(price) AS s, max(price) AS mx, round(stddev_pop(price), 4) AS sd \
         FROM bid GROUP BY bidder % 7",
    ),
    (
        "sj",
        "SELECT a.category, count(*) AS n, max(b.price) AS mx FROM auction a JOIN bid b ON a.id = b.auction \
         WHERE b.date_time BETWEEN a.date_time AND a.expires GROUP BY a.category",
    ),
    (
        "st",
        "SELECT auction, price, rn FROM (SELECT auction, price, ROW_NUMBER() OVER (PARTITION BY auction % 10 ORDER BY price DESC, bidder, date_time, auction) AS rn FROM bid) x WHERE rn <= 3",
    ),
    (
        "sl",
        "SELECT auction, bidder, price FROM bid ORDER BY price DESC, auction, bidder LIMIT 5",
    ),
    (
        "sd",
        "SELECT bidder, auction, price FROM (SELECT bidder, auction, price, ROW_NUMBER() OVER (PARTITION BY bidder, auction ORDER BY price DESC, date_time DESC) AS rn FROM bid) x WHERE rn = 1",
    ),
    (
        "sm",
        "SELECT m.label, count(*) AS n FROM c JOIN marks m ON c.counter % 3 = m.k GROUP BY m.label",
    ),
];

async fn check_source_views(c: &Client, when: &str) {
    for (name, query) in SOURCE_VIEWS {
        let got = rows(c, &format!("SELECT * FROM {name}")).await;
        let want = rows(c, query).await;
        assert_eq!(got, want, "view {name} differs from its query ({when})");
    }
}

/// (offset, state) of a source, from SHOW SOURCES.
async fn source_status(c: &Client, name: &str) -> (u64, String) {
    for line in rows(c, "SHOW SOURCES").await {
        let parts: Vec<&str> = line.split('|').collect();
        if parts[0] == name {
            return (parts[2].parse().unwrap(), parts[3].to_string());
        }
    }
    panic!("no source {name}");
}

/// Generator sources under kill -9: the restarted sources resume at their
/// committed offsets (never behind what a client saw committed), and once
/// they finish every view equals its query run in batch over the same
/// rows — nothing lost, nothing counted twice.
#[tokio::test]
async fn source_views_are_exact_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let c = server.connect().await;
    c.batch_execute(
        "CREATE TABLE marks (k INT PRIMARY KEY, label TEXT);
         INSERT INTO marks VALUES (0, 'zero'), (1, 'one'), (2, 'two');
         CREATE SOURCE c FROM GENERATOR COUNTER (RATE 40000, MAX 120000);
         CREATE SOURCE auction FROM GENERATOR NEXMARK (TABLE auction, RATE 40000, EVENTS 120000);
         CREATE SOURCE bid FROM GENERATOR NEXMARK (TABLE bid, RATE 40000, EVENTS 120000);",
    )
    .await
    .unwrap();
    for (name, query) in SOURCE_VIEWS {
        c.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {query}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // What a client saw committed before the crash.
    c.batch_execute("FLUSH").await.unwrap();
    let (seen, _) = source_status(&c, "bid").await;
    assert!(seen > 0, "the bid source made progress");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.restart_kill9();
    let c = server.connect().await;
    let (resumed, _) = source_status(&c, "bid").await;
    assert!(
        resumed >= seen,
        "resumed at {resumed}, behind committed {seen}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let states: Vec<String> = rows(&c, "SHOW SOURCES")
            .await
            .iter()
            .map(|l| l.split('|').nth(3).unwrap().to_string())
            .collect();
        if states.iter().all(|s| s == "finished") {
            break;
        }
        assert!(
            states.iter().all(|s| s == "running" || s == "finished"),
            "{states:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "sources did not finish"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    check_source_views(&c, "after kill -9 and finishing").await;
    assert_eq!(
        rows(&c, "SELECT * FROM sc").await,
        vec!["120000|120000|1|120000".to_string()]
    );
    // Table changes still flow through the mixed view.
    c.batch_execute("UPDATE marks SET label = 'nought' WHERE k = 0")
        .await
        .unwrap();
    check_source_views(&c, "after a table update").await;
}
