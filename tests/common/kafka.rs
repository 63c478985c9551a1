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

/// A running Tansu broker; killed on drop.
pub struct Broker {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// S3 endpoint and bucket when it stores in S3 (moto), so a restart
    /// keeps the data.
    s3: Option<(String, String)>,
}

/// A local S3 stand-in (moto) for a broker whose data survives restarts.
pub struct S3 {
    child: Child,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
}

impl S3 {
    /// Starts moto (installing `moto[server]` with pip if it is missing)
    /// and creates `bucket`.
    pub fn start(bucket: &str) -> S3 {
        let have = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            let ok = Command::new("python3")
                .args(["-m", "pip", "install", "-q", "moto[server]"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "pip install moto[server] failed");
        }
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        // Create the bucket: a bare HTTP PUT.
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("moto");
        use std::io::{Read, Write};
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("create bucket");
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
        S3 { child, endpoint }
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    /// Starts a broker with in-memory storage and waits until it accepts
    /// connections.
    pub fn start() -> Broker {
        Broker::spawn(free_port(), None)
    }

    /// Starts a broker storing in `bucket` of `s3`: its topics survive
    /// [`Broker::kill9`] and [`Broker::restart`]. (Tansu's S3 storage
    /// reports wrong high watermarks: wait for views, not `FLUSH`.)
    pub fn start_s3(s3: &S3, bucket: &str) -> Broker {
        Broker::spawn(free_port(), Some((s3.endpoint.clone(), bucket.to_string())))
    }

    fn spawn(port: u16, s3: Option<(String, String)>) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(tansu_binary());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ]);
        match &s3 {
            None => cmd.args(["--storage-engine", "memory://tansu/"]),
            Some((endpoint, bucket)) => cmd
                .args(["--storage-engine", &format!("s3://{bucket}/")])
                .env("AWS_ENDPOINT", endpoint)
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "x")
                .env("AWS_SECRET_ACCESS_KEY", "x")
                .env("AWS_REGION", "us-east-1"),
        };
        let child = cmd
            .arg("--silent")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { child, port, s3 }
    }

    /// SIGKILL the broker.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port (and storage).
    pub fn restart(&mut self) {
        self.kill9();
        let fresh = Broker::spawn(self.port, self.s3.clone());
        *self = fresh;
    }

    /// The broker's process id (the Kafka benchmark reads its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// Deletes a topic.
    pub fn delete_topic(&self, name: &str) {
        let status = Command::new(tansu_binary())
            .args(["topic", "delete", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg(name)
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic delete");
        assert!(status.success(), "deleting topic {name}");
    }

    /// Every record of `topic` (value, headers as `k=v`), waiting up to
    /// 20 s for at least `want` of them.
    pub fn read_topic(&self, topic: &str, want: usize) -> Vec<(Vec<u8>, Vec<String>)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let deadline = Instant::now() + Duration::from_secs(20);
        let md = loop {
            let md = c
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .expect("metadata");
            if md
                .topics()
                .first()
                .is_some_and(|t| !t.partitions().is_empty())
            {
                break md;
            }
            assert!(Instant::now() < deadline, "topic {topic} never appeared");
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                .expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        while Instant::now() < deadline && out.len() < want {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                format!(
                                    "{}={}",
                                    h.key,
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    }

    /// The offsets group `group` has committed for partitions
    /// `0..partitions` of `topic` (-1 where none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(|p| {
                got.find_partition(topic, p)
                    .and_then(|e| e.offset().to_raw())
                    .unwrap_or(-1)
            })
            .collect()
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

/// Queues `rec`, waiting for room while librdkafka's queue is full.
pub fn enqueue<K: rdkafka::message::ToBytes + ?Sized>(
    p: &BaseProducer,
    mut rec: BaseRecord<'_, K, [u8]>,
) {
    loop {
        match p.send(rec) {
            Ok(()) => break,
            Err((_, r)) => {
                rec = r;
                p.poll(Duration::from_millis(10));
            }
        }
    }
    p.poll(Duration::ZERO);
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
            enqueue(&self.0, rec);
        }
        self.0.flush(Duration::from_secs(60)).expect("flush");
    }

    /// Sends many values round-robin over `partitions`, then waits for all.
    pub fn send_all(&self, topic: &str, partitions: i32, values: &[String]) {
        for (i, v) in values.iter().enumerate() {
            enqueue(
                &self.0,
                BaseRecord::<(), [u8]>::to(topic)
                    .partition(i as i32 % partitions)
                    .payload(v.as_bytes()),
            );
        }
        self.0.flush(Duration::from_secs(60)).expect("flush");
    }
}

/// A tiny Confluent schema registry (`POST /subjects/{s}/versions`,
/// `GET /schemas/ids/{id}`) on a free port, in a thread; it lives as long
/// as the test process.
pub struct Registry {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// (subject, schema) by id - 1.
    pub schemas: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Registry {
    /// Starts it.
    pub fn start() -> Registry {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind registry");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let schemas = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
        let store = schemas.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 8192];
                // The head, then Content-Length bytes of body.
                let (head, body) = loop {
                    let Ok(n) = stream.read(&mut buf) else {
                        break (String::new(), String::new());
                    };
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len || n == 0 {
                            break (head.to_string(), body.to_string());
                        }
                    } else if n == 0 {
                        break (text, String::new());
                    }
                };
                let line = head.lines().next().unwrap_or_default().to_string();
                let path = line.split_whitespace().nth(1).unwrap_or_default();
                let (status, reply) = if let Some(subject) = path
                    .strip_prefix("/subjects/")
                    .and_then(|p| p.strip_suffix("/versions"))
                    .filter(|_| line.starts_with("POST"))
                {
                    let schema = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["schema"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    let mut s = store.lock().expect("registry lock");
                    let id = match s.iter().position(|x| x.0 == subject && x.1 == schema) {
                        Some(i) => i + 1,
                        None => {
                            s.push((subject.to_string(), schema));
                            s.len()
                        }
                    };
                    ("200 OK", serde_json::json!({ "id": id }).to_string())
                } else if let Some(id) = path
                    .strip_prefix("/schemas/ids/")
                    .and_then(|i| i.parse::<usize>().ok())
                {
                    match store.lock().expect("registry lock").get(id.wrapping_sub(1)) {
                        Some((_, schema)) => (
                            "200 OK",
                            serde_json::json!({ "schema": schema }).to_string(),
                        ),
                        None => ("404 Not Found", r#"{"error_code":40403}"#.to_string()),
                    }
                } else {
                    ("404 Not Found", "{}".to_string())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        Registry { url, schemas }
    }
}
