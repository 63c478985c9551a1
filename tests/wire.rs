//! The Postgres wire protocol as real clients use it: tokio-postgres for the
//! extended protocol and binary formats, the `psql` binary for the rest.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use common::{err_text, Server};
use rust_decimal::Decimal;
use tokio_postgres::types::{FromSql, Type};

/// Raw binary value of any type.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

async fn setup() -> (tempfile::TempDir, Server, tokio_postgres::Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let client = server.connect().await;
    (dir, server, client)
}

const TYPES_TABLE: &str = "CREATE TABLE ty (
    id INT PRIMARY KEY, b BOOLEAN, i2 SMALLINT, i4 INTEGER, i8 BIGINT, f4 REAL,
    f8 DOUBLE PRECISION, n NUMERIC(10, 3), t TEXT, v VARCHAR(10), by BYTEA, d DATE,
    tm TIME, ts TIMESTAMP, tz TIMESTAMPTZ, iv INTERVAL, j JSON, ai INT[], at TEXT[])";

#[tokio::test]
async fn every_type_roundtrips_in_binary_with_parameters() {
    let (_d, _s, c) = setup().await;
    c.batch_execute(TYPES_TABLE).await.unwrap();
    let ins = c
        .prepare("INSERT INTO ty VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,'1 day 02:00:00',$16,$17,$18)")
        .await
        .unwrap();
    // Parameter types are inferred from the target columns.
    assert_eq!(ins.params()[0], Type::INT4);
    assert_eq!(ins.params()[2], Type::INT2);
    assert_eq!(ins.params()[7], Type::NUMERIC);
    let ts = NaiveDate::from_ymd_opt(2024, 2, 29)
        .unwrap()
        .and_hms_micro_opt(13, 45, 30, 123456)
        .unwrap();
    let tz = Utc.with_ymd_and_hms(2024, 2, 29, 13, 45, 30).unwrap();
    let n: Decimal = "1234567.891".parse().unwrap();
    let n_rows = c
        .execute(
            &ins,
            &[
                &1i32,
                &true,
                &-32768i16,
                &i32::MAX,
                &i64::MIN,
                &1.5f32,
                &-2.25f64,
                &n,
                &"hello",
                &"wörld",
                &vec![0u8, 255, 16],
                &NaiveDate::from_ymd_opt(2024, 2, 29).unwrap(),
                &NaiveTime::from_hms_milli_opt(13, 45, 30, 500).unwrap(),
                &ts,
                &tz,
                &"{\"a\": 1}",
                &vec![Some(1i32), None, Some(3)],
                &vec!["x".to_string(), "y z".to_string()],
            ],
        )
        .await
        .unwrap();
    assert_eq!(n_rows, 1);

    let row = c
        .query_one("SELECT * FROM ty WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert!(row.get::<_, bool>("b"));
    assert_eq!(row.get::<_, i16>("i2"), -32768);
    assert_eq!(row.get::<_, i32>("i4"), i32::MAX);
    assert_eq!(row.get::<_, i64>("i8"), i64::MIN);
    assert_eq!(row.get::<_, f32>("f4"), 1.5);
    assert_eq!(row.get::<_, f64>("f8"), -2.25);
    assert_eq!(row.get::<_, Decimal>("n"), n);
    assert_eq!(row.get::<_, String>("t"), "hello");
    assert_eq!(row.get::<_, String>("v"), "wörld");
    assert_eq!(row.get::<_, Vec<u8>>("by"), vec![0, 255, 16]);
    assert_eq!(
        row.get::<_, NaiveDate>("d"),
        NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()
    );
    assert_eq!(
        row.get::<_, NaiveTime>("tm"),
        NaiveTime::from_hms_milli_opt(13, 45, 30, 500).unwrap()
    );
    assert_eq!(row.get::<_, NaiveDateTime>("ts"), ts);
    assert_eq!(row.get::<_, chrono::DateTime<Utc>>("tz"), tz);
    // interval, binary: microseconds (i64), days (i32), months (i32)
    let iv = row.get::<_, Raw>("iv").0;
    let mut expect = (2i64 * 3600 * 1_000_000).to_be_bytes().to_vec();
    expect.extend_from_slice(&1i32.to_be_bytes());
    expect.extend_from_slice(&0i32.to_be_bytes());
    assert_eq!(iv, expect);
    assert_eq!(row.get::<_, String>("j"), "{\"a\": 1}");
    assert_eq!(
        row.get::<_, Vec<Option<i32>>>("ai"),
        vec![Some(1), None, Some(3)]
    );
    assert_eq!(row.get::<_, Vec<String>>("at"), vec!["x", "y z"]);

    // Text format of the same row, through the simple protocol.
    let msgs = c
        .simple_query("SELECT n, by, tm, tz, iv, ai, at FROM ty")
        .await
        .unwrap();
    let tokio_postgres::SimpleQueryMessage::Row(r) = &msgs[1] else {
        panic!("{msgs:?}")
    };
    let got: Vec<&str> = (0..7).map(|i| r.get(i).unwrap()).collect();
    assert_eq!(
        got,
        vec![
            "1234567.891",
            "\\x00ff10",
            "13:45:30.5",
            "2024-02-29 13:45:30+00",
            "1 day 02:00:00",
            "{1,NULL,3}",
            "{x,\"y z\"}"
        ]
    );
}

#[tokio::test]
async fn extended_protocol_describe_portals_and_errors() {
    let (_d, _s, mut c) = setup().await;
    c.batch_execute("CREATE TABLE t (id INT PRIMARY KEY, name TEXT)")
        .await
        .unwrap();
    c.execute(
        "INSERT INTO t SELECT i, 'n' || i FROM generate_series(1, 10) AS s(i)",
        &[],
    )
    .await
    .unwrap();

    let st = c
        .prepare("SELECT id, name, id * 2 FROM t WHERE id > $1 ORDER BY id")
        .await
        .unwrap();
    assert_eq!(st.params(), &[Type::INT4]);
    let cols: Vec<(&str, Type)> = st
        .columns()
        .iter()
        .map(|c| (c.name(), c.type_().clone()))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("id", Type::INT4),
            ("name", Type::TEXT),
            ("?column?", Type::INT8)
        ]
    );

    // Portal with max_rows: rows arrive in chunks (PortalSuspended between).
    let tx = c.transaction().await.unwrap();
    let portal = tx.bind(&st, &[&3i32]).await.unwrap();
    let first = tx.query_portal(&portal, 4).await.unwrap();
    let second = tx.query_portal(&portal, 4).await.unwrap();
    let third = tx.query_portal(&portal, 4).await.unwrap();
    assert_eq!((first.len(), second.len(), third.len()), (4, 3, 0));
    assert_eq!(first[0].get::<_, i32>(0), 4);
    assert_eq!(second[2].get::<_, i32>(0), 10);
    tx.commit().await.unwrap();

    // A parameter only cast has the cast's type, as in PostgreSQL.
    let st = c.prepare("SELECT $1::int + 1").await.unwrap();
    assert_eq!(st.params(), &[Type::INT4]);
    // Untyped parameters are inferred; errors keep the connection usable.
    let e = c.query("SELECT 1 / $1", &[&0i64]).await.unwrap_err();
    assert!(err_text(&e).starts_with("22012"), "{}", err_text(&e));
    let e = c
        .execute("INSERT INTO t VALUES ($1, $2)", &[&1i32, &"dup"])
        .await
        .unwrap_err();
    assert!(err_text(&e).starts_with("23505"), "{}", err_text(&e));
    let e = c.prepare("SELECT nope FROM t").await.unwrap_err();
    assert!(err_text(&e).starts_with("42703"), "{}", err_text(&e));
    let e = c.prepare("SELEC 1").await.unwrap_err();
    assert!(err_text(&e).starts_with("42601"), "{}", err_text(&e));

    // Point lookup and DML with parameters.
    let n = c
        .execute("UPDATE t SET name = $1 WHERE id = $2", &[&"ten", &10i32])
        .await
        .unwrap();
    assert_eq!(n, 1);
    let row = c
        .query_one("SELECT name FROM t WHERE id = $1", &[&10i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ten");
    // RETURNING with parameters: described columns and rows.
    let st = c
        .prepare("INSERT INTO t VALUES ($1, $2) RETURNING id, upper(name)")
        .await
        .unwrap();
    assert_eq!(st.columns()[1].name(), "upper");
    let rows = c.query(&st, &[&42i32, &"x"]).await.unwrap();
    assert_eq!(
        (rows[0].get::<_, i32>(0), rows[0].get::<_, String>(1)),
        (42, "X".to_string())
    );
    let n = c
        .execute("DELETE FROM t WHERE id <= $1", &[&5i32])
        .await
        .unwrap();
    assert_eq!(n, 5);

    // EXPLAIN shows the key filter handed to the table scan.
    let plan = c
        .simple_query("EXPLAIN SELECT name FROM t WHERE id = 7")
        .await
        .unwrap();
    let text: String = plan
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(1).map(str::to_string),
            _ => None,
        })
        .collect();
    assert!(text.contains("partial_filters=[t.id = Int32(7)]"), "{text}");
}

#[tokio::test]
async fn cancel_request_stops_a_running_query() {
    let (_d, _s, c) = setup().await;
    assert_cancelled(
        &c,
        Duration::from_millis(500),
        c.simple_query("SELECT count(*) FROM generate_series(1, 100000) a(x), generate_series(1, 100000) b(y) WHERE a.x * b.y = 7"),
    )
    .await;
}

/// `pg_sleep` waits on a timer; a cancel request (here on the extended
/// protocol) ends the wait at once, with 57014.
#[tokio::test]
async fn cancel_request_stops_pg_sleep() {
    let (_d, _s, c) = setup().await;
    let started = std::time::Instant::now();
    c.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_cancelled(
        &c,
        Duration::from_millis(300),
        c.query("SELECT pg_sleep($1::float8)", &[&600.0f64]),
    )
    .await;
}

/// Runs `query` on `c` with a cancel request sent after `after`: it must
/// fail with 57014 within 30 s, and the connection stay usable.
async fn assert_cancelled<T>(
    c: &tokio_postgres::Client,
    after: Duration,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) {
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(after).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(60), query)
        .await
        .expect("cancel did not stop the query")
        .err()
        .expect("the query must fail");
    canceller.await.unwrap();
    assert!(err_text(&e).starts_with("57014"), "{}", err_text(&e));
    assert!(started.elapsed() < Duration::from_secs(30));
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_with_53300() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--max-connections", "2"]);
    let _a = server.connect().await;
    let _b = server.connect().await;
    let e = tokio_postgres::connect(&server.conn_str(), tokio_postgres::NoTls)
        .await
        .err()
        .expect("third connection must be refused");
    assert!(err_text(&e).starts_with("53300"), "{}", err_text(&e));
    drop(_a);
    // A slot frees up once a client disconnects.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok((c, conn)) =
            tokio_postgres::connect(&server.conn_str(), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            c.simple_query("SELECT 1").await.unwrap();
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn garbage_on_the_wire_does_not_hurt_the_server() {
    let (_d, server, c) = setup().await;
    for payload in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..], // SSLRequest, then hang up
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x00\x00\x03",
        b"\xff\xff\xff\xff\x00\x03\x00\x00",
        b"\x00\x00\x00\x09\x00\x03\x00\x00\x00", // startup without terminator
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(payload);
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    }
    // A connected client sending a bogus message type mid-session.
    c.simple_query("SELECT 1").await.unwrap();
    let other = server.connect().await;
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn sslrequest_is_declined_and_the_session_continues() {
    let (_d, server, _c) = setup().await;
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
}

#[tokio::test]
async fn startup_reports_the_parameters_clients_need() {
    let (_d, _s, c) = setup().await;
    let row = c.query_one("SELECT version()", &[]).await.unwrap();
    let v: String = row.get(0);
    assert!(
        v.starts_with("PostgreSQL 15.0") && v.contains("Sluice"),
        "{v}"
    );
    for (name, value) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
        ("IntervalStyle", "postgres"),
    ] {
        let msgs = c.simple_query(&format!("SHOW {name}")).await.unwrap();
        let got = msgs.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(got.as_deref(), Some(value), "{name}");
    }
}

fn psql(port: u16, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "sluice",
        "-d",
        "sluice",
    ])
    .args(args)
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("psql must be installed (apt-get install postgresql-client)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_real_psql_binary_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let script = "
CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL, score DOUBLE PRECISION);
INSERT INTO users VALUES (1, 'ann', 90), (2, 'bob', 1.5);
SELECT id, name, score FROM users ORDER BY id;
SELECT count(*) FROM users;
";
    let (ok, out, err) = psql(server.port, &["-v", "ON_ERROR_STOP=1"], Some(script));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("CREATE TABLE"), "{out}");
    assert!(out.contains("INSERT 0 2"), "{out}");
    assert!(out.contains("  1 | ann  |    90"), "{out}");
    assert!(out.contains("  2 | bob  |   1.5"), "{out}");

    // An error: psql prints it with its SQLSTATE in verbose mode.
    let (ok, _out, err) = psql(
        server.port,
        &[
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "INSERT INTO users VALUES (1, 'x', 0)",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("23505") && err.contains("users_pkey"), "{err}");

    // psql's own catalog queries: \dt and \d.
    let (ok, out, err) = psql(server.port, &["-c", "\\dt"], None);
    assert!(ok && out.contains("users"), "{out}\n{err}");
    let (ok, out, err) = psql(server.port, &["-c", "\\d users"], None);
    assert!(
        ok && out.contains("bigint") && out.contains("not null"),
        "{out}\n{err}"
    );

    // kill -9, restart: the data is still there.
    server.restart_kill9();
    let (ok, out, err) = psql(
        server.port,
        &["-A", "-t", "-c", "SELECT name FROM users WHERE id = 2"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "bob");
}

#[test]
fn graceful_shutdown_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    assert!(
        server.terminate(Duration::from_secs(15)),
        "sluice did not exit cleanly on SIGTERM"
    );
    // And it starts again on the same data directory.
    let server = Server::start(dir.path());
    let (ok, _, err) = psql(server.port, &["-c", "SELECT 1"], None);
    assert!(ok, "{err}");
}

#[test]
fn clear_errors_for_a_taken_port_and_a_locked_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", server.port),
            "--data-dir",
        ])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot listen on") && !err.contains("panicked"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("in use by another running Sluice") && !err.contains("panicked"),
        "{err}"
    );

    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("data directory") && !err.contains("panicked"),
        "{err}"
    );
}
