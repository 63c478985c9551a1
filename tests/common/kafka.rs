//! A real Kafka-protocol broker for tests: Tansu, started on a free port.
//!
//! The binary is obtained by `.ci/get-tansu` (a pinned, checksummed
//! download, cached under `~/.cache/sluice-tools`), or taken from
//! `SLUICE_TANSU`. Records are produced one per request (`linger.ms=0`,
//! `batch.num.messages=1`): Tansu reports a partition's high watermark as
//! the first offset of its last batch + 1, which is exact only for
//! one-record batches.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// A running Tansu broker (in-memory storage); killed on drop.
pub struct Broker {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_TANSU") {
        return PathBuf::from(p);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/get-tansu");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run .ci/get-tansu");
    assert!(out.status.success(), ".ci/get-tansu failed");
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().expect("tansu path").trim())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Broker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Broker {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { child, port }
    }

    /// `host:port` for BROKERS.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(tansu_binary())
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success(), "creating topic {name}");
    }

    /// A producer that sends every record in its own request.
    pub fn producer(&self) -> Producer1 {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .set("message.max.bytes", "2000000")
            // Keyed tests rely on per-partition order.
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        Producer1(p)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keyed record: partition, key, value (`None` = tombstone).
pub type Keyed = (i32, Vec<u8>, Option<Vec<u8>>);

/// A producer for tests.
pub struct Producer1(BaseProducer);

impl Producer1 {
    /// Sends one record (value `None` = tombstone) and waits for it.
    pub fn send(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: *v });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).partition(partition).headers(h);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        self.0.send(rec).map_err(|(e, _)| e).expect("send");
        self.0.flush(Duration::from_secs(30)).expect("flush");
    }

    /// Sends keyed records (value `None` = tombstone) in order, then waits
    /// for all.
    pub fn send_keyed(&self, topic: &str, records: &[Keyed]) {
        for (partition, key, value) in records {
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                .partition(*partition)
                .key(key.as_slice());
            if let Some(v) = value {
                rec = rec.payload(v.as_slice());
            }
            loop {
                match self.0.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        self.0.poll(Duration::from_millis(10));
                    }
                }
            }
            self.0.poll(Duration::ZERO);
        }
        self.0.flush(Duration::from_secs(60)).expect("flush");
    }

    /// Sends many values round-robin over `partitions`, then waits for all.
    pub fn send_all(&self, topic: &str, partitions: i32, values: &[String]) {
        for (i, v) in values.iter().enumerate() {
            let rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                .partition(i as i32 % partitions)
                .payload(v.as_bytes());
            let mut rec = rec;
            loop {
                match self.0.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        self.0.poll(Duration::from_millis(10));
                    }
                }
            }
            self.0.poll(Duration::ZERO);
        }
        self.0.flush(Duration::from_secs(60)).expect("flush");
    }
}
