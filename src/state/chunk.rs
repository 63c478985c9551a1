//! Arrow IPC chunks: how append-only materialized views store their rows.
//!
//! A view whose input can never retract (a source through filters,
//! projections and inner joins) has no key and is never updated, so it
//! does not need one RocksDB entry per row. Each commit appends its rows as
//! **one** value: the Arrow IPC record-batch message of the delta, under
//! the view's prefix and the first hidden row id of the chunk (so chunks
//! scan in insertion order and the row-id counter keeps its meaning).
//!
//! Why: per-row entries cost a memcomparable encode per cell, a WriteBatch
//! entry, a memtable skiplist insert, and a decode back through
//! `ScalarValue` for every SELECT. A chunk is a few `memcpy`s of Arrow
//! buffers on write and zero-copy arrays on read; for a pass-through view
//! the epoch thread's work drops to almost nothing (see
//! docs/benchmarks.md).
//!
//! The schema is not repeated in every chunk (for small commits it would be
//! most of the bytes): a [`ChunkCodec`] holds the view's schema message
//! once and prepends it when decoding.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamDecoder;
use datafusion::arrow::ipc::writer::{
    write_message, DictionaryTracker, IpcDataGenerator, IpcWriteOptions, StreamWriter,
};

use crate::error::{Error, Result};

/// Encodes and decodes the chunks of one view.
#[derive(Debug)]
pub struct ChunkCodec {
    schema: SchemaRef,
    /// The IPC schema message of `schema`, fed to each decoder first.
    schema_message: Buffer,
    /// Encoding buffers, kept between commits.
    scratch: Scratch,
}

/// The IPC and compressed bytes of the last chunk encoded.
///
/// Why keep them: a pass-through view over a busy source encodes a chunk of
/// ~12 MB every commit. Fresh buffers that size are fresh pages — the
/// kernel zeroes each (2 MiB transparent huge pages, here) on first touch,
/// and a zero-filled output buffer was memset once more: together a fifth
/// of the epoch thread in the Kafka benchmark (docs/benchmarks.md). Kept
/// buffers are already mapped. Buffers that grew past [`RETAIN`] bytes are
/// dropped at the next encode, so one huge commit does not pin its memory.
#[derive(Default)]
struct Scratch {
    ipc: Vec<u8>,
    /// Its length is the largest block bound needed so far: only growth
    /// writes zeros.
    out: Vec<u8>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("ipc", &self.ipc.capacity())
            .field("out", &self.out.capacity())
            .finish()
    }
}

/// Encoding buffers larger than this are not kept for the next chunk.
const RETAIN: usize = 32 << 20;

impl ChunkCodec {
    /// A codec for rows of `schema`.
    pub fn new(schema: SchemaRef) -> Result<Self> {
        let generator = IpcDataGenerator::default();
        let options = IpcWriteOptions::default();
        let mut tracker = DictionaryTracker::new(false);
        let encoded =
            generator.schema_to_bytes_with_dictionary_tracker(&schema, &mut tracker, &options);
        let mut out = Vec::new();
        write_message(&mut out, encoded, &options)?;
        Ok(ChunkCodec {
            schema,
            schema_message: Buffer::from_vec(out),
            scratch: Scratch::default(),
        })
    }

    /// One chunk: the tag `LZ4_BLOCK`, the uncompressed length (u32, little
    /// endian), then the IPC messages of `batch` (dictionaries first, if
    /// any) as one LZ4 block — or, past `MAX_BLOCK` bytes, those IPC
    /// messages uncompressed. The bytes live in the codec's buffers until
    /// the next call.
    ///
    /// Compressing here, before the write-ahead log, shrinks what the log
    /// and the blob files copy (the kernel's page-cache copy of the log was
    /// the epoch thread's largest cost), and RocksDB does not compress blob
    /// files a second time. One block over the whole message rather than
    /// IPC's own per-buffer LZ4 frames: those copied every buffer into the
    /// frame encoder, then the compressed bytes into the message (memcpy was
    /// a third of the epoch thread in the pass-through Kafka benchmark, as
    /// much as the compression itself).
    ///
    /// Chunks written by an older Sluice — IPC messages, uncompressed or
    /// with per-buffer frames — still decode: they start with IPC's
    /// continuation marker, which the tag is not.
    pub fn encode(&mut self, batch: &RecordBatch) -> Result<&[u8]> {
        self.encode_within(batch, MAX_BLOCK)
    }

    /// [`ChunkCodec::encode`], storing IPC messages of more than `limit`
    /// bytes uncompressed (the older form, which still decodes).
    fn encode_within(&mut self, batch: &RecordBatch, limit: usize) -> Result<&[u8]> {
        let Scratch { ipc, out } = &mut self.scratch;
        if ipc.capacity() > RETAIN || out.capacity() > RETAIN {
            *ipc = Vec::new();
            *out = Vec::new();
        }
        ipc.clear();
        ipc.reserve(batch.get_array_memory_size() + 1024);
        // A stream writer writes each Arrow buffer straight into the Vec
        // (`IpcDataGenerator::encode` gathers them into a body Vec first, one
        // more copy); the schema message it starts with is skipped, the
        // codec supplies it when decoding.
        let schema_len = {
            let mut writer = StreamWriter::try_new(&mut *ipc, &self.schema)?;
            let schema_len = writer.get_ref().len();
            writer.write(batch)?;
            schema_len
        };
        let ipc = &ipc[schema_len..];
        if ipc.len() > limit {
            return Ok(ipc);
        }
        let len = u32::try_from(ipc.len())
            .map_err(|_| Error::Storage(format!("chunk of {} bytes is too large", ipc.len())))?;
        let need = HEADER + lz4_flex::block::get_maximum_output_size(ipc.len());
        if out.len() < need {
            out.resize(need, 0);
        }
        out[..4].copy_from_slice(&LZ4_BLOCK);
        out[4..HEADER].copy_from_slice(&len.to_le_bytes());
        let n = lz4_flex::block::compress_into(ipc, &mut out[HEADER..])
            .map_err(|e| Error::Storage(format!("compressing a chunk: {e}")))?;
        Ok(&out[..HEADER + n])
    }

    /// The rows of a stored chunk, with the view's schema.
    pub fn decode(&self, chunk: &[u8]) -> Result<RecordBatch> {
        let mut body = match chunk.strip_prefix(&LZ4_BLOCK) {
            Some(rest) => {
                let (len, block) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| Error::Storage("truncated chunk header".into()))?;
                let len = u32::from_le_bytes(*len) as usize;
                // LZ4 expands at most ~255-fold: a larger length is damage,
                // not a reason to allocate it.
                if len > block.len().saturating_mul(256) {
                    return Err(Error::Storage(format!(
                        "corrupt stored chunk: {} bytes cannot hold {len}",
                        block.len()
                    )));
                }
                let mut ipc = vec![0u8; len];
                let n = lz4_flex::block::decompress_into(block, &mut ipc)
                    .map_err(|e| Error::Storage(format!("corrupt stored chunk: {e}")))?;
                if n != len {
                    return Err(Error::Storage(format!(
                        "corrupt stored chunk: {n} bytes, its header says {len}"
                    )));
                }
                Buffer::from_vec(ipc)
            }
            None => Buffer::from(chunk),
        };
        let mut decoder = StreamDecoder::new();
        let mut schema = self.schema_message.clone();
        if decoder.decode(&mut schema).map_err(corrupt)?.is_some() {
            return Err(Error::Storage("chunk schema message held rows".into()));
        }
        while !body.is_empty() {
            if let Some(batch) = decoder.decode(&mut body).map_err(corrupt)? {
                if !body.is_empty() {
                    return Err(Error::Storage("trailing bytes after a stored chunk".into()));
                }
                // The decoder's schema is the one encoded above; the view's
                // own `SchemaRef` keeps pointer equality for DataFusion.
                return RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())
                    .map_err(corrupt);
            }
        }
        Err(Error::Storage("truncated chunk".into()))
    }
}

/// The tag opening a chunk compressed as one LZ4 block (an IPC stream starts
/// with `FF FF FF FF` instead).
const LZ4_BLOCK: [u8; 4] = *b"SLZ1";

/// Tag and uncompressed length.
const HEADER: usize = 8;

/// Larger chunks (an epoch of huge rows) are stored uncompressed: the
/// length field is 32 bits and LZ4 implementations cap a block near 2 GiB.
const MAX_BLOCK: usize = 1 << 30;

/// A chunk that does not decode is damaged storage, not a user error.
fn corrupt(e: datafusion::arrow::error::ArrowError) -> Error {
    Error::Storage(format!("corrupt stored chunk: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{
        ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array,
        Float64Array, Int16Array, Int32Array, Int64Array, IntervalMonthDayNanoArray, ListArray,
        StringArray, Time64MicrosecondArray, TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::{
        DataType, Field, Int64Type, IntervalMonthDayNano, IntervalUnit, Schema, TimeUnit,
    };
    use datafusion::arrow::ipc::writer::IpcWriteContext;
    use datafusion::arrow::ipc::CompressionType;
    use std::sync::Arc;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("i", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("f", DataType::Float64, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("d", DataType::Decimal128(10, 2), true),
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new(
                "tz",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("i2", DataType::Int16, true),
            Field::new("i4", DataType::Int32, true),
            Field::new("f4", DataType::Float32, true),
            Field::new("by", DataType::Binary, true),
            Field::new("da", DataType::Date32, true),
            Field::new("ti", DataType::Time64(TimeUnit::Microsecond), true),
            Field::new("iv", DataType::Interval(IntervalUnit::MonthDayNano), true),
            Field::new(
                "li",
                DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
                true,
            ),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![Some(1), None, Some(-3)])),
            Arc::new(StringArray::from(vec![Some("a"), Some(""), None])),
            Arc::new(Float64Array::from(vec![Some(1.5), Some(-0.5), None])),
            Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])),
            Arc::new(
                Decimal128Array::from(vec![Some(12345), None, Some(-1)])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ),
            Arc::new(TimestampMicrosecondArray::from(vec![
                Some(0),
                Some(1),
                None,
            ])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![None, Some(-5), Some(7)]).with_timezone("UTC"),
            ),
            Arc::new(Int16Array::from(vec![Some(-2), None, Some(3)])),
            Arc::new(Int32Array::from(vec![None, Some(i32::MAX), Some(0)])),
            Arc::new(Float32Array::from(vec![Some(0.25), None, Some(-1.0)])),
            Arc::new(BinaryArray::from(vec![
                Some(&b"\x00\xff"[..]),
                None,
                Some(&b""[..]),
            ])),
            Arc::new(Date32Array::from(vec![Some(19000), None, Some(-1)])),
            Arc::new(Time64MicrosecondArray::from(vec![
                None,
                Some(1),
                Some(86_399_999_999),
            ])),
            Arc::new(IntervalMonthDayNanoArray::from(vec![
                Some(IntervalMonthDayNano::new(1, -2, 3_000)),
                None,
                Some(IntervalMonthDayNano::new(0, 0, 0)),
            ])),
            Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
                Some(vec![Some(1), None]),
                None,
                Some(vec![]),
            ])),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    #[test]
    fn chunks_round_trip_every_column_kind_and_nulls() {
        let b = batch();
        let mut codec = ChunkCodec::new(b.schema()).unwrap();
        let chunk = codec.encode(&b).unwrap().to_vec();
        let back = codec.decode(&chunk).unwrap();
        assert_eq!(back.num_rows(), 3);
        for (x, y) in b.columns().iter().zip(back.columns()) {
            assert_eq!(x.to_data(), y.to_data());
        }
        // A slice (what a LIMIT or an offset read would store) as well.
        let sliced = b.slice(1, 2);
        let chunk = codec.encode(&sliced).unwrap().to_vec();
        let back = codec.decode(&chunk).unwrap();
        assert_eq!(back.num_rows(), 2);
        assert_eq!(back.column(1).to_data(), sliced.column(1).to_data());
    }

    /// The codec's kept buffers never leak one chunk's bytes into the next:
    /// a small chunk after a large one, the same chunk twice, and chunks
    /// after buffers past `RETAIN` were dropped all encode as a fresh codec
    /// encodes them.
    #[test]
    fn kept_buffers_do_not_change_the_chunks() {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let rows = |n: usize, width: usize| {
            let text: Vec<String> = (0..n)
                .map(|i| format!("{i:0width$}-{}", i * 7919 % 104729))
                .collect();
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(text))]).unwrap()
        };
        let fresh = |b: &RecordBatch| {
            ChunkCodec::new(schema.clone())
                .unwrap()
                .encode(b)
                .unwrap()
                .to_vec()
        };
        let mut codec = ChunkCodec::new(schema.clone()).unwrap();
        // The last one's IPC is past RETAIN: kept, used, dropped next time.
        for b in [
            rows(20_000, 12),
            rows(3, 1),
            rows(3, 1),
            rows(5_000, 40),
            rows(1_200_000, 24),
            rows(10, 2),
        ] {
            let chunk = codec.encode(&b).unwrap().to_vec();
            assert_eq!(chunk, fresh(&b), "{} rows", b.num_rows());
            let back = codec.decode(&chunk).unwrap();
            assert_eq!(back.column(0).to_data(), b.column(0).to_data());
        }
        assert!(codec.scratch.ipc.capacity() <= RETAIN);
    }

    #[test]
    fn chunks_are_compressed_and_uncompressed_ones_still_decode() {
        // Repetitive text compresses: the stored chunk is smaller than the
        // raw Arrow buffers.
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let text: Vec<String> = (0..1000)
            .map(|i| format!("https://example.com/bid/{}", i % 7))
            .collect();
        let b =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(text))]).unwrap();
        let mut codec = ChunkCodec::new(schema).unwrap();
        let chunk = codec.encode(&b).unwrap().to_vec();
        assert!(
            chunk.len() * 4 < b.get_array_memory_size(),
            "{} bytes",
            chunk.len()
        );
        assert_eq!(
            codec.decode(&chunk).unwrap().column(0).to_data(),
            b.column(0).to_data()
        );
        // Chunks written by an older Sluice: plain IPC, uncompressed or
        // with IPC's per-buffer LZ4 frames.
        let b = batch();
        let codec = ChunkCodec::new(b.schema()).unwrap();
        for compression in [None, Some(CompressionType::LZ4_FRAME)] {
            let options = IpcWriteOptions::default()
                .try_with_compression(compression)
                .unwrap();
            let (_, message) = IpcDataGenerator::default()
                .encode(
                    &b,
                    &mut DictionaryTracker::new(false),
                    &options,
                    &mut IpcWriteContext::default(),
                )
                .unwrap();
            let mut old = Vec::new();
            write_message(&mut old, message, &options).unwrap();
            let back = codec.decode(&old).unwrap();
            for (x, y) in b.columns().iter().zip(back.columns()) {
                assert_eq!(x.to_data(), y.to_data());
            }
        }
    }

    #[test]
    fn chunks_past_the_block_limit_are_stored_uncompressed() {
        let b = batch();
        let mut codec = ChunkCodec::new(b.schema()).unwrap();
        let plain = codec.encode_within(&b, 0).unwrap().to_vec();
        assert_eq!(plain[..4], [0xFF; 4], "plain IPC");
        let back = codec.decode(&plain).unwrap();
        for (x, y) in b.columns().iter().zip(back.columns()) {
            assert_eq!(x.to_data(), y.to_data());
        }
        assert_eq!(codec.encode(&b).unwrap()[..4], LZ4_BLOCK);
    }

    #[test]
    fn damaged_chunks_are_errors_not_panics() {
        let b = batch();
        let mut codec = ChunkCodec::new(b.schema()).unwrap();
        let chunk = codec.encode(&b).unwrap().to_vec();
        for cut in [0, 3, 6, 8, 9, chunk.len() / 2, chunk.len() - 1] {
            assert!(codec.decode(&chunk[..cut]).is_err(), "cut at {cut}");
        }
        // A header that promises more or fewer bytes than the block holds,
        // and a damaged block.
        for len in [0u32, 1, u32::MAX / 16] {
            let mut c = chunk.clone();
            c[4..8].copy_from_slice(&len.to_le_bytes());
            assert!(codec.decode(&c).is_err(), "length {len}");
        }
        let mut c = chunk.clone();
        for byte in c[8..].iter_mut().step_by(7) {
            *byte ^= 0x5A;
        }
        assert!(codec.decode(&c).is_err());
        let mut extra = chunk.clone();
        extra.extend_from_slice(&chunk);
        assert!(codec.decode(&extra).is_err());
    }
}
