//! Real drivers against a real server: psqlODBC (through unixODBC's
//! `isql`), pgjdbc (Debian's `libpostgresql-jdbc-java`, what JDBC BI tools
//! use) and psycopg 3. `.ci/run` installs them; these tests fail, not skip,
//! without them.

mod common;

use std::process::Command;

use common::Server;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("client runtime must be installed (see .ci/run)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed\n{stdout}\n{stderr}");
}

#[test]
fn pgjdbc() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/JdbcSmoke.java");
    run(Command::new("timeout")
        .args(["120", "java", "-cp", "/usr/share/java/postgresql.jar", src])
        .arg(server.port.to_string()));
}

#[test]
fn psycopg3() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/psycopg_smoke.py"
    );
    run(Command::new("timeout")
        .args(["120", "python3", src])
        .arg(server.port.to_string()));
}

#[test]
fn psqlodbc() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let conn = format!(
        "Driver=/usr/lib/x86_64-linux-gnu/odbc/psqlodbcw.so;Server=127.0.0.1;Port={};Database=sluice;UID=odbc;PWD=x",
        server.port
    );
    let script = "CREATE TABLE o (id INT PRIMARY KEY, name TEXT)\n\
                  INSERT INTO o VALUES (1, 'odbc')\n\
                  INSERT INTO o VALUES (1, 'dup')\n\
                  SELECT id, name FROM o WHERE id = 1\n";
    let mut child = Command::new("timeout")
        .args(["60", "isql", "-v", "-b", "-k", &conn])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("isql must be installed (unixodbc, odbc-postgresql; see .ci/run)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[23505]"), "{text}");
    assert!(text.contains("| odbc"), "{text}");
    assert!(!text.contains("[08001]"), "connection failed: {text}");
}
