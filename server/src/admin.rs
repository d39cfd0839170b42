//! Exclusive access to a keyspace for the commands that rewrite it while no instance
//! serves it (`pgetcd snapshot restore`, `pgetcd migrate`).
//!
//! [`Exclusive::take`] starts the managed Postgres when no `--postgres-url` is given,
//! sets the keyspace up, refuses while any instance of it is alive (still registered
//! within [`MEMBER_LIVE`] a little after that long) or holds the writer role, and then claims the writer role under the
//! command's own name, which fences every earlier writer. Instances started meanwhile
//! find the role taken and follow; [`Exclusive::release`] hands the role to whoever
//! campaigns next. A long command keeps its claim with [`Exclusive::renew`].

use std::sync::Arc;

use pgetcd_localpg::LocalPostgres;
use pgetcd_storage::{Campaign, Fence, Meta, Store};
use pgetcd_storage_postgres::PgStore;
use tracing::info;

use crate::ServerError;
use crate::config::StorageFlags;
use crate::node::{MEMBER_LIVE, ROLE_TTL};

/// The writer role held by an offline command.
pub struct Exclusive {
    /// The keyspace's store.
    pub store: Arc<PgStore>,
    /// The command's fence.
    pub fence: Fence,
    /// The meta record as of the claim.
    pub meta: Meta,
    name: String,
    url: String,
    postgres: Option<LocalPostgres>,
}

impl Exclusive {
    /// Takes the keyspace of `storage` for the command `name` (see the module doc).
    pub async fn take(storage: &StorageFlags, name: &str) -> Result<Exclusive, ServerError> {
        let (postgres, url) = crate::postgres_of(storage).await?;
        let store = Arc::new(PgStore::new(&storage.store_config(url.clone()))?);
        store.setup().await?;
        // An instance stopped just now stays registered until its registration lapses;
        // one that runs keeps renewing it.
        let deadline = std::time::Instant::now() + MEMBER_LIVE + std::time::Duration::from_secs(1);
        loop {
            let live: Vec<String> = store
                .members(MEMBER_LIVE)
                .await?
                .into_iter()
                .map(|m| m.name)
                .collect();
            if live.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(ServerError::Start(format!(
                    "keyspace {:?} is being served by pgetcd instance(s) {}: stop every instance of it first",
                    storage.keyspace,
                    live.join(", ")
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        if let Some(holder) = store.leader().await?
            && holder != name
        {
            return Err(ServerError::Start(format!(
                "keyspace {:?} is written by pgetcd instance {holder:?}: stop every instance of it first",
                storage.keyspace
            )));
        }
        let (fence, meta) = match store.campaign(name, ROLE_TTL).await? {
            Campaign::Won { fence, meta } => (fence, meta),
            Campaign::Lost { leader } => {
                return Err(ServerError::Start(format!(
                    "keyspace {:?} was taken by pgetcd instance {leader:?} meanwhile",
                    storage.keyspace
                )));
            }
        };
        info!(keyspace = %storage.keyspace, epoch = fence.epoch, "{name}: holding the keyspace");
        Ok(Exclusive {
            store,
            fence,
            meta,
            name: name.to_owned(),
            url,
            postgres,
        })
    }

    /// The connection string of the keyspace's Postgres (the managed one's when no
    /// --postgres-url was given).
    pub fn store_url(&self) -> &str {
        &self.url
    }

    /// Extends the claim (call more often than every [`ROLE_TTL`]).
    pub async fn renew(&self) -> Result<(), ServerError> {
        self.store
            .renew(&self.fence, &self.name, ROLE_TTL)
            .await
            .map_err(crate::ServerError::from)
    }

    /// Gives the writer role up, so the next instance to start takes it at once, and
    /// stops the managed Postgres.
    pub async fn release(mut self) -> Result<(), ServerError> {
        let given = self
            .store
            .hand_over(&self.fence, &self.name, None, ROLE_TTL)
            .await
            .map_err(crate::ServerError::from);
        if let Some(pg) = self.postgres.as_mut() {
            pg.stop();
        }
        given
    }
}
