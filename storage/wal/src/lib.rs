//! The logical-replication consumer of a keyspace's `history` table.
//!
//! Protocol:
//! - Names ([`FeedNames`]): the publication is `pgetcd_<schema>`; the default
//!   consumer's slot has the same name, a named consumer's (a follower instance) is
//!   `pgetcd_<schema>_<consumer>`, so each consumer confirms its own position. The
//!   publication covers
//!   `<schema>.history` with `publish = 'insert'` and `publish_via_partition_root`, so
//!   rows of every partition arrive as `history` and partition drops (DDL) and
//!   compaction's copies (`history_retained`) produce nothing.
//! - [`ensure_slot`] creates both when missing and reports a slot whose WAL was removed
//!   (`wal_status = 'lost'`) as [`WalError::SlotLost`].
//! - [`WalStream`] opens a replication connection and streams `pgoutput` (protocol 1,
//!   binary values) from the slot's confirmed position, with the TLS of the caller's
//!   connection settings (the Postgres store's `PgConnect`; see `tunnel`);
//!   [`WalStream::next`] yields each committed transaction's history rows in commit
//!   order.
//! - The caller confirms a commit's end LSN with [`WalStream::confirm`] only after it
//!   applied the rows; between transactions the stream itself confirms the server's
//!   keepalive position (everything before it was applied or held no history rows); after any error it opens a new stream, which resumes from the last
//!   confirmed LSN, so rows may be delivered again (callers skip revisions they have)
//!   but never lost.
//!
//! Must not depend on tonic, the watch bus or the engine: the Postgres store
//! (`pgetcd-storage-postgres`) wraps it as the keyspace's change feed.

/// The pgoutput fuzz target's core (also run by ordinary tests).
#[doc(hidden)]
pub mod fuzzing;
mod pgoutput;
/// TLS for the replication connection: a private unix socket piped over TLS.
mod tunnel;

use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tracing::{info, warn};

pub use pgoutput::Decoder;

/// What can go wrong.
#[derive(Debug, Error)]
pub enum WalError {
    /// The replication connection failed.
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// A normal Postgres query failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The stream carried something we cannot decode.
    #[error("pgoutput: {0}")]
    Protocol(String),
    /// The slot exists but Postgres removed WAL it still needed.
    #[error(
        "replication slot {0} lost WAL it needed (wal_status = lost); it must be dropped and recreated, and watchers behind it cannot be served from the stream"
    )]
    SlotLost(String),
    /// The connection string cannot be used for replication.
    #[error("cannot use connection settings for replication: {0}")]
    Config(String),
    /// The replication connection's TCP connect failed.
    #[error("replication: connecting to {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The replication connection's TLS failed (refused, bad certificate, ...).
    #[error("replication: TLS with {host}: {reason}")]
    Tls {
        /// The server's host.
        host: String,
        /// What failed.
        reason: String,
    },
    /// The stream ended.
    #[error("replication stream ended")]
    Ended,
}

/// One row inserted into `history`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryRow {
    /// Main revision.
    pub revision: i64,
    /// Sub-revision.
    pub sub: u32,
    /// Key.
    pub key: Bytes,
    /// 0 put, 1 delete.
    pub kind: i16,
    /// Create revision (0 for deletes).
    pub create_revision: i64,
    /// Version (0 for deletes).
    pub version: i64,
    /// Lease.
    pub lease: i64,
    /// Value (empty for deletes).
    pub value: Bytes,
}

/// One committed transaction's history rows, in (revision, sub) order.
#[derive(Debug, Clone)]
pub struct Commit {
    /// LSN to confirm once applied.
    pub end_lsn: u64,
    /// The rows.
    pub rows: Vec<HistoryRow>,
}

/// Slot and publication name of a keyspace's default consumer.
pub fn slot_name(schema: &str) -> String {
    format!("pgetcd_{schema}")
}

/// The publication of a keyspace and the slot of one of its consumers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedNames {
    /// The keyspace (Postgres schema).
    pub schema: String,
    /// The publication of its `history` table.
    pub publication: String,
    /// The consumer's replication slot.
    pub slot: String,
}

impl FeedNames {
    /// The keyspace's default consumer: publication and slot `pgetcd_<schema>`.
    pub fn new(schema: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            publication: slot_name(schema),
            slot: slot_name(schema),
        }
    }

    /// A named consumer: slot `pgetcd_<schema>_<consumer>`. The consumer name must be
    /// lowercase letters, digits and `_`, and the slot name at most 63 bytes.
    pub fn for_consumer(schema: &str, consumer: &str) -> Result<Self, WalError> {
        let slot = format!("pgetcd_{schema}_{consumer}");
        let valid = !consumer.is_empty()
            && consumer
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && slot.len() <= 63;
        if !valid {
            return Err(WalError::Config(format!(
                "{consumer:?} cannot name a replication slot (lowercase letters, digits and _, slot name at most 63 bytes)"
            )));
        }
        Ok(Self {
            schema: schema.to_owned(),
            publication: slot_name(schema),
            slot,
        })
    }
}

/// State of the slot found or created by [`ensure_slot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Created now: it streams changes committed from now on.
    Created,
    /// Existed and usable.
    Existing,
}

/// Creates the publication and the consumer's slot when missing.
pub async fn ensure_slot(
    client: &tokio_postgres::Client,
    names: &FeedNames,
) -> Result<SlotState, WalError> {
    let (schema, publication, name) = (&names.schema, &names.publication, &names.slot);
    let has_pub = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await?
        .is_some();
    if has_pub {
        // A publication outlives the tables it names: the keyspace's schema dropped and
        // restored (pg_restore) leaves it publishing nothing.
        let covers = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = 'history'",
                &[publication, schema],
            )
            .await?
            .is_some();
        if !covers {
            let added = client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {publication} ADD TABLE {schema}.history"
                ))
                .await;
            match added {
                Ok(()) => warn!(
                    %publication,
                    "the publication no longer covered {schema}.history (its tables were dropped and created again: a restore?); added it"
                ),
                Err(e) if created_meanwhile(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    } else {
        let created = client
            .batch_execute(&format!(
                "CREATE PUBLICATION {publication} FOR TABLE {schema}.history \
                 WITH (publish = 'insert', publish_via_partition_root = true)"
            ))
            .await;
        match created {
            Ok(()) => info!(%publication, "created publication"),
            // Another instance of the keyspace created it at the same moment.
            Err(e) if created_meanwhile(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let slot = client
        .query_opt(
            "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    match slot {
        Some(row) => {
            let status: String = row.get(0);
            if status == "lost" {
                return Err(WalError::SlotLost(name.clone()));
            }
            Ok(SlotState::Existing)
        }
        None => {
            let created = client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&name],
                )
                .await;
            match created {
                Ok(_) => {
                    info!(slot = %name, "created logical replication slot");
                    Ok(SlotState::Created)
                }
                Err(e) if created_meanwhile(&e) => Ok(SlotState::Existing),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Whether creating an object failed because a concurrent session created it first
/// (a publication's catalog row, or a slot of that name).
fn created_meanwhile(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code()
        .is_some_and(|c| *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::DUPLICATE_OBJECT)
}

/// Drops the consumer's slot (to recreate it after it was lost).
pub async fn drop_slot(client: &tokio_postgres::Client, names: &FeedNames) -> Result<(), WalError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&names.slot],
        )
        .await?;
    Ok(())
}

/// Bytes of WAL the slot keeps (current WAL position minus its confirmed position).
pub async fn retained_bytes(
    client: &tokio_postgres::Client,
    names: &FeedNames,
) -> Result<Option<i64>, WalError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&names.slot],
        )
        .await?;
    Ok(row.and_then(|r| r.get(0)))
}

/// A replication stream of one keyspace's history.
pub struct WalStream {
    client: ReplicationClient,
    decoder: Decoder,
    schema: String,
    rows: Vec<HistoryRow>,
    /// Between a Begin and its Commit.
    in_txn: bool,
}

impl WalStream {
    /// Opens a replication connection to the target of `settings` (connection
    /// settings that are also their TLS connector, such as the Postgres store's `PgConnect`)
    /// and starts streaming from the slot's confirmed position. Over TCP the
    /// connection uses TLS as the settings' `ssl_mode` says (disable, prefer or
    /// require), with the connector's certificate checks.
    pub async fn start<T>(settings: &T, names: &FeedNames) -> Result<WalStream, WalError>
    where
        T: AsRef<tokio_postgres::Config> + MakeTlsConnect<TcpStream> + Clone,
        T::Stream: Send + 'static,
    {
        let config = settings.as_ref();
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let db = config.get_dbname().unwrap_or(&user).to_owned();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let schema = names.schema.as_str();
        let (name, publication) = (names.slot.clone(), names.publication.as_str());
        let unix = |dir: String, user: String, password: String, db: String| {
            ReplicationConfig::unix(dir, port, user, password, db, name.clone(), publication)
        };
        let cfg = match config.get_hosts().first() {
            Some(Host::Unix(dir)) => unix(dir.to_string_lossy().into_owned(), user, password, db),
            Some(Host::Tcp(host)) => {
                let tunnel = if config.get_ssl_mode() == SslMode::Disable {
                    None
                } else {
                    tunnel::open(settings, host, port).await?
                };
                match tunnel {
                    Some(dir) => unix(dir, user, password, db),
                    None => ReplicationConfig::new(
                        host.clone(),
                        user,
                        password,
                        db,
                        name.clone(),
                        publication,
                    )
                    .with_port(port),
                }
            }
            None => return Err(WalError::Config("no host".into())),
        };
        // TLS, when used, is the tunnel's: the client itself always speaks plaintext.
        let cfg = cfg
            .with_tls(TlsConfig::disabled())
            .with_start_lsn(Lsn::ZERO)
            .with_binary(true)
            .with_status_interval(Duration::from_millis(500))
            .with_application_name(format!("pgetcd-wal-{schema}"));
        let client = ReplicationClient::connect(cfg).await?;
        Ok(WalStream {
            client,
            decoder: Decoder::default(),
            schema: schema.to_owned(),
            rows: Vec::new(),
            in_txn: false,
        })
    }

    /// The next committed transaction that inserted history rows.
    pub async fn next(&mut self) -> Result<Commit, WalError> {
        loop {
            match self.client.recv().await? {
                Some(ReplicationEvent::Begin { .. }) => {
                    self.rows.clear();
                    self.in_txn = true;
                }
                // Outside a transaction every commit handed out was applied and
                // confirmed by the caller (it calls `next` only then), so the server's
                // position can be confirmed: without it a walsender at shutdown waits
                // forever for us to catch up with WAL that holds no history rows.
                Some(ReplicationEvent::KeepAlive { wal_end, .. }) if !self.in_txn => {
                    self.client.update_applied_lsn(wal_end);
                }
                Some(ReplicationEvent::XLogData { data, .. }) => {
                    if let Some(row) = self.decoder.decode(&data, &self.schema)? {
                        self.rows.push(row);
                    }
                }
                Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                    self.in_txn = false;
                    let rows = std::mem::take(&mut self.rows);
                    if rows.is_empty() {
                        self.client.update_applied_lsn(end_lsn);
                        continue;
                    }
                    return Ok(Commit {
                        end_lsn: end_lsn.as_u64(),
                        rows,
                    });
                }
                Some(_) => {}
                None => return Err(WalError::Ended),
            }
        }
    }

    /// Confirms that everything up to `lsn` was applied; the slot may release it.
    pub fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }
}
