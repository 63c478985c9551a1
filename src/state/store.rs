//! The RocksDB store: one database per data directory.
//!
//! Keyspace layout (all keys start with a big-endian `u32` table id, so every
//! table, and the system keyspace, is one contiguous key range):
//!
//! | key | value |
//! |-----|-------|
//! | `0u32 · 0x01 · object id (u32)` | catalog entry (JSON, see `catalog`) |
//! | `0u32 · 0x02 · name` | metadata (e.g. `next_object_id`, u32 BE) |
//! | `0u32 · 0x03 · table id (u32)` | next hidden row id of a table without a primary key (u64 BE) |
//! | `0u32 · 0x04 · source id (u32)` | committed position of a source (generator: u64 BE offset; Kafka: JSON `[[topic, partition, next offset], …]`), written with each epoch |
//! | `0u32 · 0x05 · source id · topic · 0 · partition · offset` | a record a Kafka source could not decode (JSON), written with the epoch that read it |
//! | `table id · encoded primary key` | encoded row (see [`super::encoding`]) |
//!
//! Every change — a DDL statement, a DML statement, a source epoch — is one
//! [`WriteBatch`], so it is applied atomically. Writes go to the write-ahead
//! log before they are acknowledged (and are fsynced when `sync` is on, the
//! default), so a statement that returned success survives `kill -9`.

use std::path::Path;

use rocksdb::{BlockBasedOptions, Cache, Options, WriteBatch, WriteOptions, DB};

use crate::error::{Error, Result};

/// Sub-keyspace of the system table (id 0) holding catalog entries.
pub const SYS_CATALOG: u8 = 0x01;
/// Sub-keyspace of the system table holding metadata.
pub const SYS_META: u8 = 0x02;
/// Sub-keyspace of the system table holding hidden row-id counters.
pub const SYS_ROWID: u8 = 0x03;

/// Sub-keyspace of the system table holding sources' committed offsets.
pub const SYS_OFFSET: u8 = 0x04;

/// Sub-keyspace of the system table holding Kafka sources' bad records.
pub const SYS_SOURCE_ERRORS: u8 = 0x05;

/// The key of a system-keyspace entry.
pub fn sys_key(space: u8, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + suffix.len());
    k.extend_from_slice(&0u32.to_be_bytes());
    k.push(space);
    k.extend_from_slice(suffix);
    k
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xFF: no upper bound exists; use a key that sorts after any real one.
    vec![0xFF; prefix.len() + 1]
}

/// Values at least this big are stored in blob files (see [`Store::open`]).
const MIN_BLOB_BYTES: u64 = 16 * 1024;

/// RocksDB's block cache (uncompressed SST blocks of state being read).
const BLOCK_CACHE_BYTES: usize = 128 * 1024 * 1024;

/// A handle on the RocksDB database.
#[derive(Debug)]
pub struct Store {
    db: DB,
    sync: bool,
}

/// Makes flushes insert the blocks they write into the block cache.
fn warm_cache_on_flush(db: &DB) -> std::result::Result<(), rocksdb::Error> {
    db.set_options(&[(
        "block_based_table_factory",
        "{prepopulate_block_cache=kFlushOnly;}",
    )])
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// Fails with a clear message when the directory is unusable or when
    /// another running Sluice holds RocksDB's lock on it.
    pub fn open(dir: &Path, sync: bool) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Config(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // LZ4 where data is young (memtable flushes, upper levels): it
        // compresses ~5x faster than Zstd, and Zstd at flush was a third of
        // the CPU of ingesting a Kafka topic into a view. Data that settles
        // in the bottommost level gets Zstd's better ratio. Files written by
        // an older Sluice (Zstd everywhere) read as they are: each file
        // records its own compression.
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
        opts.increase_parallelism(2);
        // Large values (an append-only view's chunks: one per commit, often
        // megabytes) go to blob files at flush, so compactions move small
        // references instead of rewriting the rows level after level; blobs
        // of dropped views are reclaimed by blob GC during compaction.
        opts.set_enable_blob_files(true);
        opts.set_min_blob_size(MIN_BLOB_BYTES);
        // Chunks arrive LZ4-compressed by their own encoder (state/chunk.rs).
        opts.set_blob_compression_type(rocksdb::DBCompressionType::None);
        opts.set_enable_blob_gc(true);
        // Operators look up state by exact key (an aggregate's group, a
        // keyed view's row) and most lookups of a growing key space miss:
        // a bloom filter answers those without reading SST blocks.
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES));
        opts.set_block_based_table_factory(&table);
        // The same for the memtable, where a MultiGet of an epoch's
        // touched groups otherwise walks the skip list for every new group.
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.02);
        // Flushes and compactions write their files with direct I/O: on
        // the VMs we measure on, a buffered write that needs a page-cache
        // page the guest never touched before ran at 150–380 MB/s against
        // 2.3 GB/s direct (`dd`), and the flush thread's copy into the page
        // cache was a sixth of all CPU while ingesting Kafka into an
        // append-only view. What a flush writes reaches memory through the
        // block cache instead (`warm_cache_on_flush`, below). Filesystems
        // without O_DIRECT (tmpfs) get buffered writes instead.
        opts.set_use_direct_io_for_flush_and_compaction(true);
        let db = match DB::open(&opts, dir) {
            Err(e) if e.as_ref().contains("Direct I/O is not supported") => {
                tracing::info!(
                    "{}: no direct I/O on this filesystem; flushes use the page cache",
                    dir.display()
                );
                opts.set_use_direct_io_for_flush_and_compaction(false);
                DB::open(&opts, dir)
            }
            r => r,
        };
        let db = db.map_err(|e| {
            let msg = e.into_string();
            if msg.contains("lock") || msg.contains("LOCK") {
                Error::Config(format!(
                    "data directory {} is in use by another running Sluice (RocksDB lock held): {msg}",
                    dir.display()
                ))
            } else {
                Error::Config(format!(
                    "cannot open data directory {}: {msg}",
                    dir.display()
                ))
            }
        })?;
        // With flushes bypassing the page cache, a lookup of state that was
        // just flushed (a GROUP BY view's active groups) read its block back
        // from disk: such preads were most of the epoch thread's waiting.
        // Flushes put the blocks they write into the block cache instead.
        // The C API of rust-rocksdb has no setter for it, so it goes through
        // `SetOptions`; without it Sluice is only slower, so a refusal is
        // logged, not fatal.
        if let Err(e) = warm_cache_on_flush(&db) {
            tracing::warn!("RocksDB refused prepopulate_block_cache: {e}");
        }
        Ok(Store { db, sync })
    }

    /// Reads one key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?)
    }

    /// Reads many keys at once (one RocksDB `multi_get`).
    pub fn multi_get<K: AsRef<[u8]>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        self.db
            .multi_get(keys)
            .into_iter()
            .map(|r| r.map_err(Error::from))
            .collect()
    }

    /// Calls `f` for every key/value pair whose key starts with `prefix`, in
    /// key order, until `f` returns `false`.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(prefix));
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(prefix);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !f(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }

    /// Like [`Store::scan_prefix`] for several prefixes, given in ascending
    /// order, with one iterator: `f` gets the prefix's index, and returning
    /// `false` moves on to the next prefix. Creating an iterator costs more
    /// than a seek, so batch lookups use this.
    pub fn scan_prefixes(
        &self,
        sorted: &[&[u8]],
        mut f: impl FnMut(usize, &[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let Some(last) = sorted.last() else {
            return Ok(());
        };
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(last));
        let mut it = self.db.raw_iterator_opt(ro);
        for (i, prefix) in sorted.iter().enumerate() {
            it.seek(prefix);
            while it.valid() {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                if !k.starts_with(prefix) || !f(i, k, v)? {
                    break;
                }
                it.next();
            }
            it.status()?;
        }
        Ok(())
    }

    /// Applies a batch atomically and durably.
    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(&[0, 0, 0, 1]), vec![0, 0, 0, 2]);
        assert_eq!(prefix_end(&[0, 0xFF]), vec![1]);
    }

    #[test]
    fn second_open_of_a_locked_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path(), false).unwrap();
        let err = Store::open(dir.path(), false).err().unwrap();
        assert!(
            err.to_string().contains("in use by another running Sluice"),
            "{err}"
        );
    }

    #[test]
    fn opens_where_direct_io_is_missing() {
        // tmpfs has no O_DIRECT: the store must fall back to buffered
        // flushes rather than refuse the directory.
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        let mut b = WriteBatch::default();
        b.put([0, 0, 0, 9, 1], vec![7u8; 64 * 1024]);
        s.write(b).unwrap();
        s.db.flush().unwrap();
        assert_eq!(s.get(&[0, 0, 0, 9, 1]).unwrap(), Some(vec![7u8; 64 * 1024]));
    }

    #[test]
    fn flushed_values_read_back_with_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        let mut b = WriteBatch::default();
        b.put([0, 0, 0, 9, 1], vec![7u8; 64 * 1024]);
        b.put([0, 0, 0, 9, 2], b"small");
        s.write(b).unwrap();
        s.db.flush().unwrap();
        drop(s);
        let s = Store::open(dir.path(), false).unwrap();
        assert_eq!(s.get(&[0, 0, 0, 9, 1]).unwrap(), Some(vec![7u8; 64 * 1024]));
        assert_eq!(s.get(&[0, 0, 0, 9, 2]).unwrap(), Some(b"small".to_vec()));
    }

    #[test]
    fn flushes_fill_the_block_cache() {
        // With direct-I/O flushes, a flushed block is in memory only if the
        // flush put it in the block cache (nothing has read it yet).
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        warm_cache_on_flush(&s.db).unwrap();
        let mut b = WriteBatch::default();
        for i in 0u32..10_000 {
            b.put([&[0, 0, 0, 9][..], &i.to_be_bytes()].concat(), b"value");
        }
        s.write(b).unwrap();
        let usage = |s: &Store| {
            s.db.property_int_value("rocksdb.block-cache-usage")
                .unwrap()
                .unwrap()
        };
        let before = usage(&s);
        s.db.flush().unwrap();
        assert!(
            usage(&s) > before + 50_000,
            "{before} -> {} bytes",
            usage(&s)
        );
    }

    #[test]
    fn scan_prefix_sees_only_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        let mut b = WriteBatch::default();
        b.put([0, 0, 0, 1, 5], b"a");
        b.put([0, 0, 0, 2, 1], b"b");
        b.put([0, 0, 0, 2, 2], b"c");
        b.put([0, 0, 0, 3], b"d");
        s.write(b).unwrap();
        let mut seen = vec![];
        s.scan_prefix(&[0, 0, 0, 2], |_, v| {
            seen.push(v.to_vec());
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![b"b".to_vec(), b"c".to_vec()]);
    }
}
