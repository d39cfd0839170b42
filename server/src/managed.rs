//! Managed mode: pgetcd runs its own PostgreSQL under `--data-dir` when no
//! `--postgres-url` is given. The cluster listens on a unix socket only, and is
//! supervised: a postmaster that dies (a crash, `kill -9`) is restarted with back-off
//! (100 ms doubling to 5 s) while the engine, the writer and the watch feed reconnect
//! by themselves. [`LocalPostgres::stop`] ends the supervision before Postgres.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use pgetcd_localpg::{LocalPostgres, Options, RestartPolicy};
use tracing::info;

use crate::ServerError;

/// Longest unix socket directory we use (socket paths are limited to ~107 bytes).
const MAX_SOCKET_DIR: usize = 80;
/// Port number naming the managed cluster's socket (no TCP listener).
const MANAGED_PORT: u16 = 5432;

fn short_hash(p: &Path) -> String {
    let mut h = DefaultHasher::new();
    p.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Starts (initialising on first use) the managed cluster for `data_dir`.
pub fn start(data_dir: &Path) -> Result<LocalPostgres, ServerError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| ServerError::Start(format!("creating {}: {e}", data_dir.display())))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| ServerError::Start(format!("resolving {}: {e}", data_dir.display())))?;
    // As root, Postgres runs as the `postgres` user, which must reach the cluster
    // directory. When an ancestor is closed to it (e.g. /root), the cluster lives in
    // /var/lib/pgetcd instead, keyed by the data directory.
    let as_root = pgetcd_localpg::running_as_root();
    let cluster_dir =
        if as_root && !pgetcd_localpg::traversable_by_others(&data_dir.join("postgres")) {
            PathBuf::from("/var/lib/pgetcd")
                .join(short_hash(&data_dir))
                .join("postgres")
        } else {
            data_dir.join("postgres")
        };
    let mut socket_dir = data_dir.join("run");
    if socket_dir.as_os_str().len() > MAX_SOCKET_DIR || cluster_dir.parent() != Some(&data_dir) {
        socket_dir = std::env::temp_dir().join(format!("pgetcd-{}", short_hash(&data_dir)));
    }
    info!(cluster = %cluster_dir.display(), socket = %socket_dir.display(), "starting managed PostgreSQL");
    let log_file = cluster_dir
        .parent()
        .unwrap_or(&data_dir)
        .join("postgres.log");
    if let Some(parent) = cluster_dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| ServerError::Start(format!("creating {}: {e}", parent.display())))?;
    }
    LocalPostgres::start_supervised(
        Options {
            data_dir: cluster_dir,
            socket_dir,
            port: MANAGED_PORT,
            listen_tcp: false,
            // Postgres's durable defaults: fsync, synchronous_commit and
            // full_page_writes on.
            settings: Vec::new(),
            log_file,
        },
        RestartPolicy::default(),
    )
    .map_err(|e| ServerError::Start(e.to_string()))
}
