//! Real drivers against a real server: pgjdbc (Debian's
//! `libpostgresql-jdbc-java`, what JDBC BI tools use) and psycopg 3.
//! `.ci/run` installs both; these tests fail, not skip, without them.

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
