//! Settings with their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6875";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./sluice-data";
/// Default checkpoint (epoch) interval of sources, in milliseconds.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 100;
/// Default connection cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the Postgres-wire server listens on.
    pub listen: SocketAddr,
    /// RocksDB data directory.
    pub data_dir: PathBuf,
    /// Maximum concurrent client connections; more are refused with 53300.
    pub max_connections: usize,
    /// fsync every commit (on by default; off trades power-loss durability
    /// for speed — a process crash still loses nothing).
    pub fsync: bool,
    /// How often the epoch driver commits source rows (see `epoch`).
    pub checkpoint_interval: Duration,
}

impl Config {
    /// Defaults with the given data directory; used by tests and benches.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().expect("valid literal address"),
            data_dir: data_dir.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            fsync: true,
            checkpoint_interval: Duration::from_millis(DEFAULT_CHECKPOINT_INTERVAL_MS),
        }
    }
}
