//! The change feed: the keyspace's logical replication slot, through `pgetcd-wal`.
//! Positions are commit end LSNs; confirming one advances the slot.

use async_trait::async_trait;
use pgetcd_storage::{ChangeFeed, FeedCommit, FeedPrepared, Result, Version};
use pgetcd_wal::{FeedNames, SlotState, WalError, WalStream, drop_slot, ensure_slot};
use tokio_postgres::Client;
use tracing::warn;

use crate::PgConnect;
use crate::error::read_error;

/// Creates the slot and publication when missing; a slot that lost WAL is dropped and
/// created again.
pub(crate) async fn prepare(client: &Client, names: &FeedNames) -> Result<FeedPrepared> {
    match ensure_slot(client, names).await {
        Ok(SlotState::Existing) => Ok(FeedPrepared::Existing),
        Ok(SlotState::Created) => Ok(FeedPrepared::Created),
        Err(WalError::SlotLost(slot)) => {
            warn!(%slot, "replication slot lost WAL; recreating it");
            drop_slot(client, names)
                .await
                .map_err(read_error("drop the lost replication slot"))?;
            ensure_slot(client, names)
                .await
                .map_err(read_error("recreate the replication slot"))?;
            Ok(FeedPrepared::Recreated)
        }
        Err(e) => Err(read_error("prepare the replication slot")(e)),
    }
}

/// One replication connection.
pub(crate) struct PgFeed {
    stream: WalStream,
}

impl PgFeed {
    pub(crate) async fn open(target: &PgConnect, names: &FeedNames) -> Result<PgFeed> {
        let stream = WalStream::start(target, names)
            .await
            .map_err(read_error("open the replication stream"))?;
        Ok(PgFeed { stream })
    }
}

#[async_trait]
impl ChangeFeed for PgFeed {
    async fn next(&mut self) -> Result<FeedCommit> {
        let commit = self
            .stream
            .next()
            .await
            .map_err(read_error("replication stream"))?;
        Ok(FeedCommit {
            position: commit.end_lsn,
            changes: commit
                .rows
                .into_iter()
                .map(|r| {
                    let version = Version {
                        mod_revision: r.revision,
                        sub: r.sub,
                        create_revision: r.create_revision,
                        version: r.version,
                        lease: r.lease,
                        value: (r.kind == 0).then(|| r.value.clone()),
                    };
                    (r.key, version)
                })
                .collect(),
        })
    }

    fn confirm(&mut self, position: u64) {
        self.stream.confirm(position);
    }
}
