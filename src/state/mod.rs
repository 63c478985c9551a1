//! Durable state in RocksDB.
//!
//! [`store::Store`] owns the database and its keyspace layout;
//! [`encoding`] defines the order-preserving byte encoding of SQL values used
//! for keys and rows; [`chunk`] the Arrow IPC chunks append-only views are
//! stored in. Everything above this module sees typed rows, never
//! RocksDB.

pub mod chunk;
pub mod encoding;
pub mod store;

pub use store::Store;
