//! Batched reads from librdkafka: a Kafka source's partitions forwarded to a
//! queue of the reader's own, drained many messages per call.
//!
//! Why: rdkafka's `BaseConsumer::poll` returns one message per call, and
//! every call reads the clock four times (three in librdkafka, one in the
//! Rust wrapper), takes the queue's lock and wraps an event. At a million
//! records a second that was ~15 % of the reader thread, the thread that
//! bounds ingestion (perf, 2026-11-28, `docs/benchmarks.md`).
//! `rd_kafka_consume_batch_queue` pays those once per batch. rdkafka does
//! not wrap it, so this module is the crate's one piece of `unsafe` FFI,
//! kept small and behind safe types.
//!
//! Why a queue of our own rather than the consumer's: the consumer queue
//! also carries events (errors, statistics, offset-commit results) that the
//! batch call would hand back as if they were messages. A partition's fetch
//! queue carries only its fetched messages, its consumer errors (returned
//! as messages with an error code) and librdkafka's own barriers, which the
//! batch call handles. The reader still polls the consumer queue, with
//! rdkafka's `poll`, for the events.
//!
//! Order matters: a partition is [`BatchQueue::attach`]ed *before* it is
//! assigned. librdkafka's assignment forwards a partition's fetch queue to
//! the consumer queue only if the application has not forwarded it already,
//! so every message of the partition arrives here, from the first.

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, Timestamp};
use rdkafka::types::RDKafkaRespErr;

use crate::error::{Error, Result};

/// The reader's own queue, fed by the fetch queues of its partitions.
pub struct BatchQueue {
    /// Keeps the client alive as long as the queue and its messages.
    consumer: Arc<BaseConsumer>,
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Partitions forwarded here, to undo at drop.
    attached: Vec<(CString, i32)>,
    /// Scratch array the batch call fills.
    scratch: RefCell<Vec<*mut rd::rd_kafka_message_t>>,
}

// SAFETY: librdkafka queues are thread-safe; the raw pointers are only
// handed to librdkafka calls.
unsafe impl Send for BatchQueue {}

impl BatchQueue {
    /// A new, empty queue on `consumer`'s client.
    pub fn new(consumer: Arc<BaseConsumer>) -> Result<BatchQueue> {
        // SAFETY: the client pointer is valid while `consumer` lives, and
        // the queue holds `consumer`.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        let queue = NonNull::new(queue)
            .ok_or_else(|| Error::Connector("librdkafka could not create a queue".into()))?;
        Ok(BatchQueue {
            consumer,
            queue,
            attached: Vec::new(),
            scratch: RefCell::new(Vec::new()),
        })
    }

    /// Forwards `topic`/`partition`'s fetched messages here. Call before
    /// assigning the partition (see the module docs).
    pub fn attach(&mut self, topic: &str, partition: i32) -> Result<()> {
        let name = CString::new(topic)
            .map_err(|_| Error::Connector(format!("topic name {topic:?} contains NUL")))?;
        if self
            .attached
            .iter()
            .any(|(t, p)| *t == name && *p == partition)
        {
            return Ok(());
        }
        // SAFETY: valid client and NUL-terminated name; the partition queue
        // handle is released right after forwarding (librdkafka keeps its
        // own reference to our queue while forwarding).
        unsafe {
            let pq = rd::rd_kafka_queue_get_partition(
                self.consumer.client().native_ptr(),
                name.as_ptr(),
                partition,
            );
            if pq.is_null() {
                return Err(Error::Connector(format!(
                    "librdkafka has no queue for {topic}/{partition}"
                )));
            }
            rd::rd_kafka_queue_forward(pq, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(pq);
        }
        self.attached.push((name, partition));
        Ok(())
    }

    /// Appends up to `max` messages to `out`, waiting at most `timeout` for
    /// them (zero: only what is already here). A consumer error on one of
    /// the partitions (a deleted topic, an offset out of range) is returned
    /// as text after the messages before it.
    pub fn consume<'q>(
        &'q self,
        timeout: Duration,
        max: usize,
        out: &mut Vec<RawMessage<'q>>,
    ) -> Option<String> {
        if max == 0 {
            return None;
        }
        // Round up: a wait of 0.4 ms must not become "do not wait".
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        scratch.reserve(max);
        // SAFETY: `scratch` has room for `max` pointers; librdkafka writes
        // `n ≤ max` of them and returns `n` (or -1 on error, writing none).
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), ms, scratch.as_mut_ptr(), max)
        };
        if n < 0 {
            return Some("librdkafka refused a batch read".into());
        }
        // SAFETY: librdkafka initialised the first `n` entries.
        unsafe { scratch.set_len(n as usize) };
        let mut error = None;
        for &ptr in scratch.iter() {
            let Some(ptr) = NonNull::new(ptr) else {
                continue;
            };
            let m = RawMessage {
                ptr,
                _queue: PhantomData,
            };
            // SAFETY: a message librdkafka returned, valid until destroyed.
            let err = unsafe { ptr.as_ref().err };
            if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                out.push(m);
            } else if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF {
                // SAFETY: as above; the text lives as long as the message.
                let text = unsafe { CStr::from_ptr(rd::rd_kafka_message_errstr(ptr.as_ptr())) };
                error = Some(format!(
                    "Kafka: {}/{}: {}",
                    m.topic(),
                    m.partition(),
                    text.to_string_lossy()
                ));
            }
        }
        error
    }
}

impl Drop for BatchQueue {
    fn drop(&mut self) {
        // Undo the forwarding first, so the consumer (which may outlive
        // this queue) never feeds a queue nobody reads.
        // SAFETY: valid client, names and queue; each handle released.
        unsafe {
            let rk = self.consumer.client().native_ptr();
            for (name, partition) in &self.attached {
                let pq = rd::rd_kafka_queue_get_partition(rk, name.as_ptr(), *partition);
                if !pq.is_null() {
                    rd::rd_kafka_queue_forward(pq, std::ptr::null_mut());
                    rd::rd_kafka_queue_destroy(pq);
                }
            }
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// One message of a [`BatchQueue`], destroyed when dropped. Cannot outlive
/// the queue (and so the client) it came from.
pub struct RawMessage<'q> {
    ptr: NonNull<rd::rd_kafka_message_t>,
    _queue: PhantomData<&'q BatchQueue>,
}

// SAFETY: a fetched message is immutable and owned by this value alone.
unsafe impl Send for RawMessage<'_> {}
unsafe impl Sync for RawMessage<'_> {}

impl RawMessage<'_> {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: valid until `drop`.
        unsafe { self.ptr.as_ref() }
    }
}

/// `len` bytes at `ptr`, or `None` for a null pointer.
///
/// # Safety
/// A non-null `ptr` must point at `len` readable bytes living as long as
/// the returned slice.
unsafe fn opt_slice<'a>(ptr: *const std::ffi::c_void, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        None
    } else if len == 0 {
        Some(&[])
    } else {
        Some(std::slice::from_raw_parts(ptr as *const u8, len))
    }
}

impl Message for RawMessage<'_> {
    type Headers = RawHeaders;

    fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka's key and its length, owned by the message.
        unsafe { opt_slice(m.key, m.key_len) }
    }

    fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka's payload and its length, owned by the message.
        unsafe { opt_slice(m.payload, m.len) }
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let m = self.raw();
        if m.payload.is_null() {
            None
        } else {
            Some(std::slice::from_raw_parts_mut(m.payload as *mut u8, m.len))
        }
    }

    fn topic(&self) -> &str {
        // SAFETY: the topic handle is held by the message; its name is a
        // NUL-terminated string living as long as the handle. Kafka topic
        // names are ASCII; anything else reads as "".
        unsafe {
            CStr::from_ptr(rd::rd_kafka_topic_name(self.raw().rkt))
                .to_str()
                .unwrap_or("")
        }
    }

    fn partition(&self) -> i32 {
        self.raw().partition
    }

    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp(&self) -> Timestamp {
        use rd::rd_kafka_timestamp_type_t as T;
        let mut kind = T::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message; librdkafka writes `kind`.
        let ms = unsafe { rd::rd_kafka_message_timestamp(self.ptr.as_ptr(), &mut kind) };
        match kind {
            _ if ms == -1 => Timestamp::NotAvailable,
            T::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE => Timestamp::NotAvailable,
            T::RD_KAFKA_TIMESTAMP_CREATE_TIME => Timestamp::CreateTime(ms),
            T::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => Timestamp::LogAppendTime(ms),
        }
    }

    fn headers(&self) -> Option<&RawHeaders> {
        let mut h = std::ptr::null_mut();
        // SAFETY: a valid message; librdkafka parses its headers on first
        // access and keeps them with the message.
        let err = unsafe { rd::rd_kafka_message_headers(self.ptr.as_ptr(), &mut h) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || h.is_null() {
            return None;
        }
        // SAFETY: `RawHeaders` is a zero-sized stand-in for librdkafka's
        // opaque headers type, only ever used behind this pointer, which
        // lives as long as the message (and so as `&self`).
        Some(unsafe { &*(h as *const RawHeaders) })
    }
}

impl Drop for RawMessage<'_> {
    fn drop(&mut self) {
        // SAFETY: returned by the batch call, destroyed exactly once.
        unsafe { rd::rd_kafka_message_destroy(self.ptr.as_ptr()) }
    }
}

/// A message's headers, as librdkafka keeps them (only ever a reference
/// to librdkafka's `rd_kafka_headers_t`).
pub struct RawHeaders {
    _opaque: [u8; 0],
}

impl RawHeaders {
    fn native(&self) -> *const rd::rd_kafka_headers_t {
        self as *const RawHeaders as *const rd::rd_kafka_headers_t
    }
}

impl Headers for RawHeaders {
    fn count(&self) -> usize {
        // SAFETY: a valid headers pointer (see `RawMessage::headers`).
        unsafe { rd::rd_kafka_header_cnt(self.native()) }
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: a valid headers pointer; librdkafka writes the three
        // outputs, all owned by the headers.
        let err = unsafe {
            rd::rd_kafka_header_get_all(self.native(), idx, &mut name, &mut value, &mut size)
        };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: as above. A header name that is not UTF-8 (the protocol
        // allows any bytes) reads as "" rather than panicking as rdkafka's
        // own reader does.
        let key = unsafe { CStr::from_ptr(name) }.to_str().unwrap_or("");
        // SAFETY: as above.
        let value = unsafe { opt_slice(value, size) };
        Some(Header { key, value })
    }
}

#[cfg(test)]
mod tests {
    //! Against librdkafka's mock cluster: what arrives, and where.

    use std::time::Instant;

    use rdkafka::config::ClientConfig;
    use rdkafka::message::OwnedHeaders;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;

    #[test]
    fn attached_partitions_arrive_in_batches_with_every_field() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        for i in 0..10i64 {
            let value = format!("v{i}");
            let key = format!("k{i}");
            let mut rec = BaseRecord::to("t")
                .partition((i % 2) as i32)
                .payload(value.as_bytes())
                .key(key.as_bytes())
                .timestamp(1_700_000_000_000 + i);
            if i == 3 {
                rec = rec.headers(
                    OwnedHeaders::new()
                        .insert(rdkafka::message::Header {
                            key: "h",
                            value: Some(&b"x"[..]),
                        })
                        .insert(rdkafka::message::Header::<&[u8]> {
                            key: "null",
                            value: None,
                        }),
                );
            }
            p.send(rec).map_err(|(e, _)| e).unwrap();
        }
        // A tombstone: no value.
        p.send(
            BaseRecord::<[u8], [u8]>::to("t")
                .partition(0)
                .key(&b"gone"[..]),
        )
        .map_err(|(e, _)| e)
        .unwrap();
        p.flush(Duration::from_secs(10)).unwrap();

        let consumer: Arc<BaseConsumer> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "g")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap(),
        );
        let mut q = BatchQueue::new(consumer.clone()).unwrap();
        let mut tpl = TopicPartitionList::new();
        for part in 0..2 {
            q.attach("t", part).unwrap();
            q.attach("t", part).unwrap(); // idempotent
            tpl.add_partition_offset("t", part, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();

        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < 11 && Instant::now() < deadline {
            // Nothing ever reaches the consumer queue: it only has events.
            assert!(!matches!(consumer.poll(Duration::ZERO), Some(Ok(_))));
            assert_eq!(q.consume(Duration::from_millis(100), 64, &mut got), None);
        }
        assert_eq!(got.len(), 11);
        let mut rows: Vec<_> = got
            .iter()
            .map(|m| {
                (
                    m.partition(),
                    m.offset(),
                    m.topic().to_string(),
                    m.key().map(|k| k.to_vec()),
                    m.payload().map(|v| v.to_vec()),
                )
            })
            .collect();
        rows.sort();
        assert_eq!(
            rows[0],
            (0, 0, "t".into(), Some(b"k0".to_vec()), Some(b"v0".to_vec()))
        );
        assert_eq!(rows[5], (0, 5, "t".into(), Some(b"gone".to_vec()), None));
        let third = got.iter().find(|m| m.key() == Some(&b"k3"[..])).unwrap();
        assert_eq!(third.timestamp(), Timestamp::CreateTime(1_700_000_000_003));
        let h = third.headers().unwrap();
        assert_eq!(h.count(), 2);
        let all: Vec<_> = h.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(all, vec![("h", Some(&b"x"[..])), ("null", None)]);
        assert!(got
            .iter()
            .find(|m| m.key() == Some(&b"k4"[..]))
            .unwrap()
            .headers()
            .is_none());
        // Nothing more: a zero wait returns at once, empty.
        let mut more = Vec::new();
        assert_eq!(q.consume(Duration::ZERO, 64, &mut more), None);
        assert!(more.is_empty());
        drop(more);
        drop(got);
        // The queue goes before the consumer; the consumer still works.
        drop(q);
        assert!(consumer.position().is_ok());
    }

    #[test]
    fn a_partition_error_comes_back_as_text() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let consumer: Arc<BaseConsumer> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .set("group.id", "g")
                .set("auto.offset.reset", "error")
                .create()
                .unwrap(),
        );
        let mut q = BatchQueue::new(consumer.clone()).unwrap();
        q.attach("t", 0).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(100))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        let error = loop {
            assert!(Instant::now() < deadline, "no error");
            if let Some(e) = q.consume(Duration::from_millis(100), 8, &mut got) {
                break e;
            }
        };
        assert!(got.is_empty());
        assert!(error.contains("t/0"), "{error}");
        assert!(error.to_lowercase().contains("offset"), "{error}");
    }
}
