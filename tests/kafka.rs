//! Kafka sources end to end: the real `sluice` binary reading topics of a
//! real Kafka-protocol broker (Tansu, started by the test on a free port).
//!
//! Every view is checked against its defining query run in batch over the
//! source — which reads the topic itself up to its high watermarks — so
//! "incremental == batch" here means "exactly the records in the topic".

mod common;

use std::time::{Duration, Instant};

use common::kafka::Broker;
use common::{err_text, rows, Server};
use tokio_postgres::Client;

async fn one(c: &Client, sql: &str) -> String {
    let r = rows(c, sql).await;
    assert_eq!(r.len(), 1, "{sql}: {r:?}");
    r[0].clone()
}

async fn exec(c: &Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", err_text(&e)));
}

async fn err(c: &Client, sql: &str) -> String {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("{sql} should fail"),
        Err(e) => err_text(&e),
    }
}

fn bid(i: i64) -> String {
    format!(
        r#"{{"auction": {}, "bidder": {}, "price": {}, "date_time": "2026-11-27T10:{:02}:{:02}", "extra": [1, 2]}}"#,
        1000 + i % 17,
        i % 101,
        (i * 37) % 1000,
        (i / 60) % 60,
        i % 60
    )
}

const VIEWS: &[(&str, &str)] = &[
    ("pass", "SELECT auction, bidder, price, date_time FROM bids WHERE price > 100"),
    (
        "per_auction",
        "SELECT auction, count(*) AS n, sum(price) AS total, max(price) AS top FROM bids GROUP BY auction",
    ),
    ("totals", "SELECT count(*) AS n, sum(price) AS s FROM bids"),
];

async fn check_views(c: &Client, when: &str) {
    for (name, query) in VIEWS {
        let incremental = rows(c, &format!("SELECT * FROM {name}")).await;
        let batch = rows(c, query).await;
        assert_eq!(
            incremental, batch,
            "view {name} differs from its query {when}"
        );
    }
}

/// Polls `sql` until `done` holds for its rows, or panics after 30 s.
async fn poll_until(c: &Client, sql: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = rows(c, sql).await;
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{sql}: still {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `sql` returns `want` (a single row), or panics after 30 s.
async fn wait_for(c: &Client, sql: &str, want: &str) {
    poll_until(c, sql, |got| got.len() == 1 && got[0] == want).await;
}

/// Polls until source `name`'s `SHOW SOURCES` row contains `part`.
async fn wait_source(c: &Client, name: &str, part: &str) -> String {
    let prefix = format!("{name}|");
    let got = poll_until(c, "SHOW SOURCES", |r| {
        r.iter().any(|l| l.starts_with(&prefix) && l.contains(part))
    })
    .await;
    got.into_iter()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_source_views_equal_the_topic_and_bad_records_are_kept() {
    let broker = Broker::start();
    broker.create_topic("bids", 4);
    let p = broker.producer();
    let values: Vec<String> = (0..2000).map(bid).collect();
    p.send_all("bids", 4, &values);
    // Bad records, all on partition 1: broken JSON, a wrong type, two
    // objects, a tombstone, a NOT NULL column missing, a value over the
    // source's MAX RECORD BYTES.
    p.send("bids", 1, None, Some(b"{\"auction\": 1, "), &[]);
    p.send(
        "bids",
        1,
        None,
        Some(br#"{"auction": "one", "bidder": 1}"#),
        &[],
    );
    p.send(
        "bids",
        1,
        None,
        Some(br#"{"auction": 1}{"auction": 2}"#),
        &[],
    );
    p.send("bids", 1, Some(b"k"), None, &[]);
    p.send("bids", 1, None, Some(br#"{"bidder": 5}"#), &[]);
    // Over the source's MAX RECORD BYTES (valid JSON otherwise).
    let huge = format!(r#"{{"auction": 1, "extra": "{}"}}"#, "x".repeat(900_000));
    p.send("bids", 1, None, Some(huge.as_bytes()), &[]);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    // The exact form from the issue, plus NOT NULL on auction.
    exec(
        &c,
        &format!(
            "CREATE SOURCE bids (auction BIGINT NOT NULL, bidder BIGINT, price BIGINT, date_time TIMESTAMP)
             FROM KAFKA (BROKERS '{}', TOPIC 'bids', START OFFSET 'earliest',
                         MAX RECORD BYTES 500000)
             FORMAT JSON ON ERROR DEAD LETTER TOPIC 'bids-dlq';",
            broker.addr()
        ),
    )
    .await;
    for (name, query) in &VIEWS[..2] {
        exec(&c, &format!("CREATE MATERIALIZED VIEW {name} AS {query}")).await;
    }
    exec(&c, "FLUSH").await;
    // A view created later backfills from the topic.
    exec(
        &c,
        &format!("CREATE MATERIALIZED VIEW {} AS {}", VIEWS[2].0, VIEWS[2].1),
    )
    .await;
    check_views(&c, "after the first FLUSH").await;
    assert_eq!(one(&c, "SELECT n FROM totals").await, "2000");

    // More records while running.
    let more: Vec<String> = (2000..3000).map(bid).collect();
    p.send_all("bids", 4, &more);
    exec(&c, "FLUSH").await;
    check_views(&c, "after more records").await;
    assert_eq!(one(&c, "SELECT n FROM totals").await, "3000");

    // Every bad record is in the error table, once, with its offset.
    let errors = rows(
        &c,
        "SELECT source, topic, partition, \"offset\", raw_length FROM sluice_source_errors",
    )
    .await;
    assert_eq!(
        errors,
        vec![
            "bids|bids|1|500|15",
            "bids|bids|1|501|31",
            "bids|bids|1|502|28",
            "bids|bids|1|503|0",
            "bids|bids|1|504|13",
            "bids|bids|1|505|900027",
        ],
    );
    let msg = one(
        &c,
        "SELECT error FROM sluice_source_errors WHERE \"offset\" = 503",
    )
    .await;
    assert!(msg.contains("tombstone"), "{msg}");
    let status = one(&c, "SHOW SOURCES").await;
    assert!(
        status.starts_with("bids|kafka topic 'bids' (json)|3006|running|6"),
        "{status}"
    );
    // The committed offsets reach the consumer group, for lag tools.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let committed = broker.committed("sluice-bids", "bids", 4);
        if committed.iter().sum::<i64>() == 3006 {
            break;
        }
        assert!(Instant::now() < deadline, "group offsets {committed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The dead letter topic has the whole records, with why.
    let mut dlq = broker.read_topic("bids-dlq", 6);
    dlq.sort_by_key(|(v, _)| v.len());
    assert_eq!(dlq.len(), 6, "{} records", dlq.len());
    assert_eq!(dlq[5].0.len(), 900_027);
    dlq.truncate(5);
    dlq.sort();
    assert_eq!(dlq[4].0, br#"{"bidder": 5}"#.to_vec());
    assert!(
        dlq[4].1.contains(&"sluice.offset=504".to_string())
            && dlq[4].1.contains(&"sluice.source=bids".to_string())
            && dlq[4].1.iter().any(|h| h.starts_with("sluice.error=")),
        "{:?}",
        dlq[4].1
    );
    // Per-partition observability: caught up, four partitions.
    wait_for(
        &c,
        "SELECT count(*), sum(\"offset\"), sum(lag), sum(errors) FROM sluice_source_partitions WHERE source = 'bids'",
        "4|3006|0|6",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_metadata_patterns_and_connections() {
    let broker = Broker::start();
    broker.create_topic("csv", 1);
    broker.create_topic("ev-a", 2);
    broker.create_topic("ev-b", 1);
    broker.create_topic("other", 1);
    let p = broker.producer();
    p.send("csv", 0, None, Some(b"1;one"), &[]);
    p.send("csv", 0, None, Some(b"2;two;extra"), &[]);
    p.send("csv", 0, None, Some(b"x;three"), &[]);
    p.send("csv", 0, None, Some(b"4;four\n"), &[]);
    // A repeated header line: skipped with HEADER.
    p.send("csv", 0, None, Some(b"n;word"), &[]);
    p.send(
        "ev-a",
        0,
        Some(b"ka"),
        Some(b"a0"),
        &[("h", Some(b"v")), ("n", None)],
    );
    p.send("ev-a", 1, None, Some(b"a1"), &[]);
    p.send("ev-b", 0, Some(b"kb"), Some(b"b0"), &[]);
    p.send("other", 0, None, Some(b"nope"), &[]);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE CONNECTION k TO KAFKA (BROKERS '{}', 'client.id' 'sluice-test');
             CREATE SOURCE nums (n INT, word TEXT)
               FROM KAFKA (CONNECTION k, TOPIC 'csv') FORMAT CSV (DELIMITER ';', HEADER true)
               INCLUDE OFFSET AS off;
             CREATE SOURCE ev FROM KAFKA (CONNECTION k, TOPIC PATTERN 'ev-.*')
               FORMAT TEXT INCLUDE KEY, PARTITION, TIMESTAMP AS ts, HEADERS;
             CREATE MATERIALIZED VIEW nums_mv AS SELECT n, word, off FROM nums;
             CREATE MATERIALIZED VIEW ev_mv AS
               SELECT text, CAST(key AS TEXT) AS k, partition, headers, ts IS NOT NULL AS has_ts FROM ev;
             FLUSH;",
            broker.addr()
        ),
    )
    .await;
    assert_eq!(
        rows(&c, "SELECT * FROM nums_mv").await,
        vec!["1|one|0", "4|four|3"]
    );
    assert_eq!(
        rows(&c, "SELECT * FROM ev_mv").await,
        vec![
            r#"a0|ka|0|[{"key":"h","value":"v"},{"key":"n","value":null}]|t"#,
            "a1|NULL|1|[]|t",
            "b0|kb|0|[]|t",
        ]
    );
    assert_eq!(
        rows(
            &c,
            "SELECT \"offset\" FROM sluice_source_errors WHERE source = 'nums'"
        )
        .await,
        vec!["1", "2"]
    );
    // A topic created later that matches the pattern is picked up.
    broker.create_topic("ev-c", 1);
    p.send("ev-c", 0, None, Some(b"c0"), &[]);
    wait_for(&c, "SELECT count(*) FROM ev_mv WHERE text = 'c0'", "1").await;
    // A connection in use is not dropped without CASCADE.
    assert!(err(&c, "DROP CONNECTION k").await.starts_with("2BP01"));
    exec(&c, "DROP CONNECTION k CASCADE").await;
    assert!(rows(&c, "SHOW SOURCES").await.is_empty());
    assert!(err(&c, "SELECT * FROM ev_mv").await.starts_with("42P01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_a_clear_error_and_creates_nothing() {
    let broker = Broker::start();
    broker.create_topic("t", 1);
    let p = broker.producer();
    p.send("t", 0, None, Some(br#"{"a": 1}"#), &[]);
    p.send("t", 0, None, Some(br#"{"a": "x"}"#), &[]);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    let dead = common::kafka::free_port();
    let e = err(
        &c,
        &format!("CREATE SOURCE s (a INT) FROM KAFKA (BROKERS '127.0.0.1:{dead}', TOPIC 't') FORMAT JSON"),
    )
    .await;
    assert!(e.starts_with("08001"), "{e}");
    let e = err(
        &c,
        &format!(
            "CREATE SOURCE s (a INT) FROM KAFKA (BROKERS '{}', TOPIC 'missing') FORMAT JSON",
            broker.addr()
        ),
    )
    .await;
    assert!(e.starts_with("42704"), "{e}");
    let e = err(
        &c,
        &format!(
            "CREATE SOURCE s (a INT, b INT) FROM KAFKA (BROKERS '{}', TOPIC 't') FORMAT TEXT",
            broker.addr()
        ),
    )
    .await;
    assert!(e.starts_with("42804"), "{e}");
    assert!(rows(&c, "SHOW SOURCES").await.is_empty());

    // ON ERROR FAIL stops the source at the bad record, visibly.
    exec(
        &c,
        &format!("CREATE SOURCE s (a INT) FROM KAFKA (BROKERS '{}', TOPIC 't') FORMAT JSON ON ERROR FAIL;
                  CREATE MATERIALIZED VIEW v AS SELECT count(*) AS n FROM s", broker.addr()),
    )
    .await;
    let s = wait_source(&c, "s", "|failed: ").await;
    assert!(s.contains("t/0@1"), "{s}");
    assert_eq!(one(&c, "SELECT n FROM v").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_ingest_loses_nothing_and_counts_nothing_twice() {
    let broker = Broker::start();
    broker.create_topic("bids", 4);
    let p = broker.producer();
    p.send_all("bids", 4, &(0..100).map(bid).collect::<Vec<_>>());

    let dir = tempfile::tempdir().unwrap();
    // Short epochs, so the kill lands between many of them.
    let mut server = Server::start_with(dir.path(), &["--checkpoint-interval-ms", "20"]);
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE SOURCE bids (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP)
             FROM KAFKA (BROKERS '{}', TOPIC 'bids', GROUP ID 'lag-tools') FORMAT JSON",
            broker.addr()
        ),
    )
    .await;
    for (name, query) in VIEWS {
        exec(&c, &format!("CREATE MATERIALIZED VIEW {name} AS {query}")).await;
    }
    // Records keep arriving while Sluice is killed and restarted.
    let producer = std::thread::spawn(move || {
        for chunk in (100..20_000).collect::<Vec<i64>>().chunks(500) {
            let values: Vec<String> = chunk.iter().map(|i| bid(*i)).collect();
            p.send_all("bids", 4, &values);
        }
        p
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen: i64 = loop {
        let n: i64 = one(&c, "SELECT n FROM totals").await.parse().unwrap();
        if n > 2000 {
            break n;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    drop(c);
    server.restart_kill9();
    let c = server.connect().await;
    let after: i64 = one(&c, "SELECT n FROM totals").await.parse().unwrap();
    assert!(
        after >= seen,
        "committed {seen} before the crash, {after} after"
    );
    let p = producer.join().unwrap();
    p.send_all("bids", 4, &(20_000..21_000).map(bid).collect::<Vec<_>>());
    exec(&c, "FLUSH").await;
    check_views(&c, "after kill -9 and restart").await;
    assert_eq!(one(&c, "SELECT n FROM totals").await, "21000");
    assert_eq!(
        one(&c, "SELECT count(*) FROM sluice_source_errors").await,
        "0"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.committed("lag-tools", "bids", 4).iter().sum::<i64>() != 21000 {
        assert!(
            Instant::now() < deadline,
            "GROUP ID offsets never committed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Model = std::collections::BTreeMap<String, (i64, i64)>;

/// A seeded sequence of upserts and deletes over 40 keys, applied to the
/// model (the last value per key). A key always goes to the same partition.
struct Upserts(u64);

impl Upserts {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn send(&mut self, p: &common::kafka::Producer1, model: &mut Model, n: usize) {
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.next() % 40;
            let key = format!("k{k}");
            let partition = (k % 2) as i32;
            if self.next().is_multiple_of(5) {
                records.push((partition, key.clone().into_bytes(), None));
                model.remove(&key);
            } else {
                let (g, v) = ((self.next() % 4) as i64, (self.next() % 1000) as i64);
                let value = format!(r#"{{"g": {g}, "v": {v}}}"#);
                records.push((
                    partition,
                    key.clone().into_bytes(),
                    Some(value.into_bytes()),
                ));
                model.insert(key, (g, v));
            }
        }
        p.send_keyed("up", &records);
    }
}

async fn check_upsert(c: &Client, model: &Model, when: &str) {
    let mut want: Vec<String> = model
        .iter()
        .map(|(k, (g, v))| format!("{k}|{g}|{v}"))
        .collect();
    want.sort();
    exec(c, "FLUSH").await;
    assert_eq!(rows(c, "SELECT * FROM up_all").await, want, "{when}");
    assert_eq!(
        rows(c, "SELECT CAST(key AS TEXT), g, v FROM up").await,
        want,
        "{when}"
    );
    assert_eq!(
        rows(c, "SELECT * FROM up_groups").await,
        rows(c, "SELECT g, count(*), sum(v), max(v) FROM up GROUP BY g").await,
        "{when}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_and_debezium_sources_keep_the_latest_row_per_key() {
    let broker = Broker::start();
    broker.create_topic("up", 2);
    broker.create_topic("cdc", 1);
    let p = broker.producer();
    let mut model = Model::new();
    let mut gen = Upserts(7);
    gen.send(&p, &mut model, 300);

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE SOURCE up (g INT, v BIGINT) FROM KAFKA (BROKERS '{0}', TOPIC 'up')
               FORMAT JSON ENVELOPE UPSERT;
             CREATE MATERIALIZED VIEW up_groups AS
               SELECT g, count(*) AS n, sum(v) AS s, max(v) AS m FROM up GROUP BY g;
             CREATE MATERIALIZED VIEW up_all AS SELECT CAST(key AS TEXT) AS k, g, v FROM up;
             CREATE SOURCE cdc (id INT, name TEXT) FROM KAFKA (BROKERS '{0}', TOPIC 'cdc')
               FORMAT JSON ENVELOPE DEBEZIUM;
             CREATE MATERIALIZED VIEW cdc_mv AS SELECT id, name FROM cdc;",
            broker.addr()
        ),
    )
    .await;
    check_upsert(&c, &model, "after the first records").await;
    // A view created now backfills from the stored rows.
    exec(
        &c,
        "CREATE MATERIALIZED VIEW up_n AS SELECT count(*) AS n FROM up",
    )
    .await;
    assert_eq!(one(&c, "SELECT n FROM up_n").await, model.len().to_string());

    gen.send(&p, &mut model, 300);
    check_upsert(&c, &model, "after more records").await;
    drop(c);
    server.restart_kill9();
    let c = server.connect().await;
    check_upsert(&c, &model, "after kill -9").await;
    gen.send(&p, &mut model, 200);
    check_upsert(&c, &model, "after more records after the restart").await;
    assert_eq!(one(&c, "SELECT n FROM up_n").await, model.len().to_string());

    // Debezium: create, update, delete, and a tombstone after the delete.
    let events: Vec<common::kafka::Keyed> = [
        (
            "1",
            Some(r#"{"before": null, "after": {"id": 1, "name": "a"}, "op": "c"}"#),
        ),
        (
            "2",
            Some(r#"{"before": null, "after": {"id": 2, "name": "b"}, "op": "r"}"#),
        ),
        (
            "1",
            Some(
                r#"{"before": {"id": 1, "name": "a"}, "after": {"id": 1, "name": "A"}, "op": "u"}"#,
            ),
        ),
        (
            "2",
            Some(r#"{"before": {"id": 2, "name": "b"}, "after": null, "op": "d"}"#),
        ),
        ("2", None),
        (
            "3",
            Some(r#"{"before": null, "after": {"id": 3, "name": "c"}, "op": "c"}"#),
        ),
    ]
    .iter()
    .map(|(k, v)| (0, k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
    .collect();
    p.send_keyed("cdc", &events);
    exec(&c, "FLUSH").await;
    assert_eq!(rows(&c, "SELECT * FROM cdc_mv").await, vec!["1|A", "3|c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_shows_in_sql_and_loses_nothing() {
    let s3 = common::kafka::S3::start("tansu");
    let mut broker = Broker::start_s3(&s3, "tansu");
    broker.create_topic("bids", 2);
    // One acknowledged request at a time: Tansu's S3 storage loses
    // concurrent in-flight batches to the same partition.
    let p = broker.producer();
    for i in 0..40 {
        p.send("bids", (i % 2) as i32, None, Some(bid(i).as_bytes()), &[]);
    }
    drop(p);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE SOURCE bids (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP)
             FROM KAFKA (BROKERS '{}', TOPIC 'bids') FORMAT JSON;
             CREATE MATERIALIZED VIEW totals AS SELECT count(*) AS n, sum(price) AS s FROM bids;",
            broker.addr()
        ),
    )
    .await;
    let sum = |n: i64| (0..n).map(|i| (i * 37) % 1000).sum::<i64>();
    wait_for(&c, "SELECT n, s FROM totals", &format!("40|{}", sum(40))).await;

    broker.kill9();
    // The outage is visible, and nothing else breaks.
    wait_source(&c, "bids", "|retrying: ").await;
    assert_eq!(one(&c, "SELECT n FROM totals").await, "40");

    broker.restart();
    let p = broker.producer();
    for i in 40..80 {
        p.send("bids", (i % 2) as i32, None, Some(bid(i).as_bytes()), &[]);
    }
    wait_for(&c, "SELECT n, s FROM totals", &format!("80|{}", sum(80))).await;
    // And the state is back to running.
    wait_source(&c, "bids", "|running|").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_decode_and_truncated_ones_are_kept_as_errors() {
    use apache_avro::types::Value;
    let schema_text = r#"{"type": "record", "name": "bid", "fields": [
        {"name": "auction", "type": "long"},
        {"name": "price", "type": "long"},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "note", "type": ["null", "string"], "default": null}]}"#;
    let schema = apache_avro::Schema::parse_str(schema_text).unwrap();
    let broker = Broker::start();
    broker.create_topic("avro", 1);
    let p = broker.producer();
    let mut values = Vec::new();
    for i in 0..50i64 {
        let v = Value::Record(vec![
            ("auction".into(), Value::Long(i % 5)),
            ("price".into(), Value::Long(i * 10)),
            ("at".into(), Value::TimestampMillis(1_700_000_000_000 + i)),
            (
                "note".into(),
                if i % 2 == 0 {
                    Value::Union(0, Box::new(Value::Null))
                } else {
                    Value::Union(1, Box::new(Value::String(format!("n{i}"))))
                },
            ),
        ]);
        #[allow(deprecated)]
        values.push(apache_avro::to_avro_datum(&schema, v).unwrap());
    }
    for v in &values {
        p.send("avro", 0, None, Some(v), &[]);
    }
    // Truncated: the last byte missing.
    p.send(
        "avro",
        0,
        None,
        Some(&values[3][..values[3].len() - 1]),
        &[],
    );

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE SOURCE a (auction INT, price BIGINT, at TIMESTAMP, note TEXT)
               FROM KAFKA (BROKERS '{}', TOPIC 'avro') FORMAT AVRO (SCHEMA '{}');
             CREATE MATERIALIZED VIEW a_mv AS
               SELECT auction, count(*) AS n, sum(price) AS s, count(note) AS notes, min(at) AS first
               FROM a GROUP BY auction;
             FLUSH;",
            broker.addr(),
            schema_text.replace('\'', "''")
        ),
    )
    .await;
    assert_eq!(
        rows(&c, "SELECT * FROM a_mv").await,
        rows(
            &c,
            "SELECT auction, count(*), sum(price), count(note), min(at) FROM a GROUP BY auction"
        )
        .await
    );
    assert_eq!(
        one(&c, "SELECT * FROM a_mv WHERE auction = 1").await,
        "1|10|2350|5|2023-11-14 22:13:20.001"
    );
    let status = rows(&c, "SHOW SOURCES").await;
    assert_eq!(status.len(), 1, "{status:?}");
    assert!(status[0].ends_with("|51|running|1"), "{status:?}");
    let e = one(&c, "SELECT \"offset\", error FROM sluice_source_errors").await;
    assert!(e.starts_with("50|invalid Avro"), "{e}");
}

/// The round trip's outputs equal its inputs.
async fn round_trip_equal(c: &Client) {
    wait_equal(c, "SELECT * FROM back_mv", "SELECT * FROM big_bids").await;
    wait_equal(c, "SELECT id, body FROM notes_back", "SELECT * FROM notes").await;
}

/// Polls until `a` and `b` return the same rows (and `a` some), or panics
/// after 60 s.
async fn wait_equal(c: &Client, a: &str, b: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (x, y) = (rows(c, a).await, rows(c, b).await);
        if x == y && !x.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{a} and {b} still differ:\n{x:?}\n{y:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_sink_round_trips_through_kafka_across_kill_9() {
    let broker = Broker::start();
    broker.create_topic("bids", 2);
    let p = broker.producer();
    p.send_all("bids", 2, &(0..500).map(bid).collect::<Vec<_>>());

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE SOURCE bids (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP)
               FROM KAFKA (BROKERS '{0}', TOPIC 'bids') FORMAT JSON;
             CREATE MATERIALIZED VIEW big_bids AS
               SELECT auction, count(*) AS n, max(price) AS top, max(date_time) AS last
               FROM bids WHERE price > 100 GROUP BY auction;
             CREATE TABLE notes (id INT PRIMARY KEY, body TEXT);
             INSERT INTO notes VALUES (1, 'one'), (2, 'two');",
            broker.addr()
        ),
    )
    .await;
    // APPEND is refused for an input that can delete rows.
    let e = err(
        &c,
        &format!(
            "CREATE SINK bad FROM big_bids INTO KAFKA (BROKERS '{}', TOPIC 'x') FORMAT JSON ENVELOPE APPEND",
            broker.addr()
        ),
    )
    .await;
    assert!(e.starts_with("0A000"), "{e}");
    // The exact form from the issue, then a source reading it back.
    exec(
        &c,
        &format!(
            "CREATE SINK big_bids_out FROM big_bids
               INTO KAFKA (BROKERS '{0}', TOPIC 'big_bids')
               FORMAT JSON ENVELOPE UPSERT KEY (auction);
             CREATE SINK notes_cdc FROM notes
               INTO KAFKA (BROKERS '{0}', TOPIC 'notes', PARTITIONS 2)
               FORMAT JSON ENVELOPE DEBEZIUM KEY (id);
             CREATE SOURCE back (auction BIGINT, n BIGINT, top BIGINT, last TIMESTAMP)
               FROM KAFKA (BROKERS '{0}', TOPIC 'big_bids') FORMAT JSON ENVELOPE UPSERT;
             CREATE SOURCE notes_back (id INT, body TEXT)
               FROM KAFKA (BROKERS '{0}', TOPIC 'notes') FORMAT JSON ENVELOPE DEBEZIUM;
             CREATE MATERIALIZED VIEW back_mv AS SELECT auction, n, top, last FROM back;",
            broker.addr()
        ),
    )
    .await;
    round_trip_equal(&c).await;
    // Changes flow too: more bids, updates and deletes of table rows.
    p.send_all("bids", 2, &(500..1000).map(bid).collect::<Vec<_>>());
    exec(
        &c,
        "UPDATE notes SET body = 'uno' WHERE id = 1; DELETE FROM notes WHERE id = 2;
         INSERT INTO notes VALUES (3, 'three');",
    )
    .await;
    round_trip_equal(&c).await;
    let sinks = rows(&c, "SHOW SINKS").await;
    assert!(sinks.iter().all(|s| s.contains("|running|")), "{sinks:?}");
    drop(c);
    server.restart_kill9();
    let c = server.connect().await;
    p.send_all("bids", 2, &(1000..1500).map(bid).collect::<Vec<_>>());
    exec(&c, "DELETE FROM notes WHERE id = 1").await;
    round_trip_equal(&c).await;
    // Dropping the view needs CASCADE: the sink depends on it.
    assert!(err(&c, "DROP MATERIALIZED VIEW big_bids")
        .await
        .starts_with("2BP01"));
    exec(&c, "DROP SINK big_bids_out").await;
    exec(&c, "DROP MATERIALIZED VIEW big_bids").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_csv_sinks_round_trip_through_sources() {
    let broker = Broker::start();
    let registry = common::kafka::Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    let cols =
        "id INT, name TEXT, price NUMERIC(10,2), at TIMESTAMP, ok BOOLEAN, day DATE, n BIGINT";
    exec(
        &c,
        &format!(
            "CREATE TABLE items (id INT PRIMARY KEY, name TEXT, price NUMERIC(10,2), at TIMESTAMP,
                                 ok BOOLEAN, day DATE);
             INSERT INTO items VALUES
               (1, 'plain', 12.50, '2024-01-02 03:04:05.123456', true, '2024-01-02'),
               (2, 'a; \"quoted\", text', -0.01, '1969-12-31 23:59:59.999999', false, '1900-03-01'),
               (3, NULL, NULL, NULL, NULL, NULL);
             CREATE MATERIALIZED VIEW items_mv AS
               SELECT id, name, price, at, ok, day, count(*) AS n FROM items
               GROUP BY id, name, price, at, ok, day;
             CREATE SINK items_avro FROM items_mv
               INTO KAFKA (BROKERS '{0}', TOPIC 'items_avro')
               FORMAT AVRO (SCHEMA REGISTRY '{1}') ENVELOPE UPSERT KEY (id);
             CREATE SINK items_csv FROM items_mv
               INTO KAFKA (BROKERS '{0}', TOPIC 'items_csv')
               FORMAT CSV (DELIMITER ';') ENVELOPE UPSERT KEY (id);
             CREATE SOURCE avro_back ({cols})
               FROM KAFKA (BROKERS '{0}', TOPIC 'items_avro')
               FORMAT AVRO (SCHEMA REGISTRY '{1}') ENVELOPE UPSERT;
             CREATE SOURCE csv_back ({cols})
               FROM KAFKA (BROKERS '{0}', TOPIC 'items_csv')
               FORMAT CSV (DELIMITER ';') ENVELOPE UPSERT;",
            broker.addr(),
            registry.url
        ),
    )
    .await;
    let check = || async {
        for back in ["avro_back", "csv_back"] {
            wait_equal(
                &c,
                &format!("SELECT id, name, price, at, ok, day, n FROM {back}"),
                "SELECT * FROM items_mv",
            )
            .await;
        }
    };
    check().await;
    // The registry holds the derived schemas under <topic>-value/-key.
    {
        let schemas = registry.schemas.lock().unwrap();
        let value = &schemas
            .iter()
            .find(|s| s.0 == "items_avro-value")
            .unwrap()
            .1;
        assert!(
            value.contains(r#""logicalType":"timestamp-micros""#),
            "{value}"
        );
        assert!(schemas.iter().any(|s| s.0 == "items_avro-key"));
    }
    // Changes: an update, a delete, an insert.
    exec(
        &c,
        "UPDATE items SET price = 99999999.99, name = 'new' WHERE id = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO items VALUES (4, 'four', 4, '2030-01-01 00:00:00', true, '2030-01-01');",
    )
    .await;
    check().await;
    assert_eq!(
        one(&c, "SELECT price FROM avro_back WHERE id = 1").await,
        "99999999.99"
    );
    let sinks = rows(&c, "SHOW SINKS").await;
    assert!(
        sinks[0].contains(&format!(
            "|upsert|avro (registry {})|running|",
            registry.url
        )),
        "{sinks:?}"
    );
    assert!(
        sinks[1].contains("|upsert|csv (delimiter ';')|running|"),
        "{sinks:?}"
    );

    // An inline schema that does not hold the columns; TEXT of many columns.
    let e = err(
        &c,
        &format!(
            "CREATE SINK bad FROM items_mv INTO KAFKA (BROKERS '{}', TOPIC 'bad')
               FORMAT AVRO (SCHEMA '{{\"type\": \"record\", \"name\": \"r\", \"fields\": [{{\"name\": \"id\", \"type\": \"string\"}}]}}')
               ENVELOPE UPSERT KEY (id)",
            broker.addr()
        ),
    )
    .await;
    assert!(e.starts_with("42804: Avro field \"id\""), "{e}");
    let e = err(
        &c,
        &format!(
            "CREATE SINK bad FROM items_mv INTO KAFKA (BROKERS '{}', TOPIC 'bad')
               FORMAT TEXT ENVELOPE UPSERT KEY (id)",
            broker.addr()
        ),
    )
    .await;
    assert!(
        e.starts_with("0A000: FORMAT TEXT writes exactly one"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_sink_writes_in_transactions() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let c = server.connect().await;
    exec(
        &c,
        &format!(
            "CREATE TABLE t (id INT PRIMARY KEY, v TEXT);
             INSERT INTO t VALUES (1, 'a'), (2, 'b');
             CREATE SINK t_out FROM t INTO KAFKA (BROKERS '{0}', TOPIC 't_out', EXACTLY ONCE)
               FORMAT JSON ENVELOPE UPSERT KEY (id);
             CREATE SOURCE t_back (id INT, v TEXT)
               FROM KAFKA (BROKERS '{0}', TOPIC 't_out') FORMAT JSON ENVELOPE UPSERT;",
            broker.addr()
        ),
    )
    .await;
    wait_equal(&c, "SELECT id, v FROM t_back", "SELECT * FROM t").await;
    exec(
        &c,
        "UPDATE t SET v = 'c' WHERE id = 1; DELETE FROM t WHERE id = 2",
    )
    .await;
    wait_equal(&c, "SELECT id, v FROM t_back", "SELECT * FROM t").await;
    let sinks = rows(&c, "SHOW SINKS").await;
    assert!(
        sinks[0].contains("|json, exactly once|running|"),
        "{sinks:?}"
    );
    drop(c);
    server.restart_kill9();
    let c = server.connect().await;
    exec(&c, "INSERT INTO t VALUES (3, 'd')").await;
    wait_equal(&c, "SELECT id, v FROM t_back", "SELECT * FROM t").await;
}

/// `CREATE SINK … AS SELECT`, a sink from an append-only source, and a
/// sink that keeps its changes through a broker outage (Tansu on S3, so
/// the topics survive the broker's kill -9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_as_select_from_a_source_and_across_a_broker_outage() {
    let s3 = common::kafka::S3::start("tansu-sink");
    let mut broker = Broker::start_s3(&s3, "tansu-sink");
    broker.create_topic("ev", 1);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let c = server.connect().await;
    // Tansu on S3 loses concurrent in-flight batches to one partition: the
    // sinks send one request at a time here (a real broker needs no such
    // care).
    exec(
        &c,
        &format!(
            "CREATE SOURCE ev (k BIGINT, v BIGINT) FROM KAFKA (BROKERS '{0}', TOPIC 'ev') FORMAT JSON;
             CREATE MATERIALIZED VIEW ev_agg AS SELECT k, count(*) AS n, sum(v) AS s FROM ev GROUP BY k;
             CREATE SINK agg
               INTO KAFKA (BROKERS '{0}', TOPIC 'agg', 'max.in.flight.requests.per.connection' '1')
               FORMAT JSON ENVELOPE UPSERT KEY (k)
               AS SELECT k, count(*) AS n, sum(v) AS s FROM ev GROUP BY k;
             CREATE SINK raw FROM ev
               INTO KAFKA (BROKERS '{0}', TOPIC 'raw', 'max.in.flight.requests.per.connection' '1');
             CREATE TABLE t (id INT PRIMARY KEY, x INT);
             -- A snapshot of more than one outbox entry (10 000 messages each).
             INSERT INTO t SELECT CAST(value + 100 AS INT), CAST(value AS INT) FROM generate_series(1, 25000);
             CREATE SINK t_out FROM t
               INTO KAFKA (BROKERS '{0}', TOPIC 't', 'max.in.flight.requests.per.connection' '1')
               ENVELOPE UPSERT KEY (id);
             CREATE SOURCE agg_back (k BIGINT, n BIGINT, s BIGINT)
               FROM KAFKA (BROKERS '{0}', TOPIC 'agg') FORMAT JSON ENVELOPE UPSERT;
             CREATE SOURCE raw_back (k BIGINT, v BIGINT) FROM KAFKA (BROKERS '{0}', TOPIC 'raw') FORMAT JSON;
             CREATE SOURCE t_back (id INT, x INT)
               FROM KAFKA (BROKERS '{0}', TOPIC 't') FORMAT JSON ENVELOPE UPSERT;
             CREATE MATERIALIZED VIEW agg_back_mv AS SELECT k, n, s FROM agg_back;
             CREATE MATERIALIZED VIEW raw_back_agg AS SELECT k, count(*) AS n, sum(v) AS s FROM raw_back GROUP BY k;
             CREATE MATERIALIZED VIEW t_back_mv AS SELECT id, x FROM t_back;",
            broker.addr()
        ),
    )
    .await;
    // The sink's own view is not the user's to see or drop.
    assert_eq!(rows(&c, "SHOW MATERIALIZED VIEWS").await.len(), 4);
    let p = broker.producer();
    for i in 0..30i64 {
        let rec = format!("{{\"k\": {}, \"v\": {}}}", i % 4, i * 7);
        p.send("ev", 0, None, Some(rec.as_bytes()), &[]);
    }
    exec(&c, "INSERT INTO t VALUES (1, 10), (2, 20)").await;
    wait_equal(&c, "SELECT * FROM agg_back_mv", "SELECT * FROM ev_agg").await;
    wait_equal(&c, "SELECT * FROM raw_back_agg", "SELECT * FROM ev_agg").await;
    wait_equal(&c, "SELECT * FROM t_back_mv", "SELECT * FROM t").await;

    broker.kill9();
    // Commits go on while the broker is away; the sink shows it waits.
    exec(
        &c,
        "INSERT INTO t VALUES (3, 30); UPDATE t SET x = 11 WHERE id = 1; DELETE FROM t WHERE id = 2;",
    )
    .await;
    let sinks = poll_until(&c, "SHOW SINKS", |r| {
        r.iter()
            .any(|l| l.starts_with("t_out|") && l.contains("|retrying: "))
    })
    .await;
    let t_out = sinks.iter().find(|l| l.starts_with("t_out|")).unwrap();
    assert!(!t_out.ends_with("|0"), "nothing pending: {t_out}");
    // The same in the system table, for monitoring by SQL.
    let lag = one(
        &c,
        "SELECT state, pending_commits > 0 FROM sluice_sinks WHERE sink = 't_out'",
    )
    .await;
    assert!(
        lag.starts_with("retrying: ") && lag.ends_with("|t"),
        "{lag}"
    );
    broker.restart();
    wait_equal(&c, "SELECT * FROM t_back_mv", "SELECT * FROM t").await;
    poll_until(&c, "SHOW SINKS", |r| {
        r.iter()
            .any(|l| l.starts_with("t_out|") && l.contains("|running|") && l.ends_with("|0"))
    })
    .await;

    // DROP SINK takes its view along.
    exec(&c, "DROP SINK agg").await;
    assert_eq!(
        one(
            &c,
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'sluice_sink_agg'"
        )
        .await,
        "0"
    );
}
