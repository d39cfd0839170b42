//! Instances of a keyspace and the writer role, on the server's clock.
//!
//! - `members`: one row per instance name, with its member id, URLs and when it last
//!   registered (every heartbeat).
//! - `meta.leader`, `meta.leader_until`: the writer role's holder and the end of its
//!   claim. A campaign is one `UPDATE meta` that takes the role only when it is free,
//!   lapsed (`leader_until < now()`) or already the caller's, and raises the leader epoch
//!   in the same statement: the compare-and-swap that fences every earlier writer.
//!   Renewing is an `UPDATE` on the holder's name *and* epoch.

use std::time::Duration;

use pgetcd_partitioning::Layout;
use pgetcd_storage::{Campaign, Fence, MemberInfo, Removal, Result, StoreError};
use pgetcd_wal::FeedNames;
use tokio_postgres::Client;

use crate::error::{read_error, write_error};
use crate::setup::{META_COLUMNS, meta_of, to_i64, to_u64};

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(crate) async fn register(client: &Client, layout: &Layout, m: &MemberInfo) -> Result<u64> {
    let s = layout.schema();
    // The first instance takes the keyspace's member id; later ones a random one; a
    // known name keeps its own.
    let fresh = to_i64(rand::random::<u64>() | 1);
    let row = client
        .query_one(
            &format!(
                "INSERT INTO {s}.members (name, member_id, client_urls, peer_urls, seen) \
                 SELECT $1, CASE WHEN EXISTS (SELECT 1 FROM {s}.members) THEN $2 \
                   ELSE (SELECT member_id FROM {s}.meta WHERE id = 1) END, $3, $4, now() \
                 ON CONFLICT (name) DO UPDATE SET client_urls = excluded.client_urls, \
                   peer_urls = excluded.peer_urls, seen = excluded.seen \
                 RETURNING member_id"
            ),
            &[&m.name, &fresh, &m.client_urls, &m.peer_urls],
        )
        .await
        .map_err(write_error("register member"))?;
    Ok(to_u64(row.get(0)))
}

pub(crate) async fn members(
    client: &Client,
    layout: &Layout,
    live: Duration,
) -> Result<Vec<MemberInfo>> {
    let rows = client
        .query(
            &format!(
                "SELECT name, member_id, client_urls, peer_urls FROM {} \
                 WHERE seen >= now() - make_interval(secs => $1) ORDER BY name",
                layout.table("members")
            ),
            &[&seconds(live)],
        )
        .await
        .map_err(read_error("list members"))?;
    Ok(rows
        .iter()
        .map(|r| MemberInfo {
            name: r.get(0),
            member_id: to_u64(r.get(1)),
            client_urls: r.get(2),
            peer_urls: r.get(3),
        })
        .collect())
}

/// Deletes the member row unless it registered within `live`, then drops its slot
/// (unless something streams from it: then it is not gone).
pub(crate) async fn remove(
    client: &Client,
    layout: &Layout,
    name: &str,
    feed: &FeedNames,
    live: Duration,
) -> Result<Removal> {
    let members = layout.table("members");
    let removed = client
        .execute(
            &format!(
                "DELETE FROM {members} WHERE name = $1 \
                 AND seen < now() - make_interval(secs => $2)"
            ),
            &[&name, &seconds(live)],
        )
        .await
        .map_err(write_error("remove member"))?;
    if removed == 0 {
        let known = client
            .query_opt(
                &format!("SELECT 1 FROM {members} WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(read_error("read member"))?
            .is_some();
        return Ok(if known {
            Removal::Live
        } else {
            Removal::Unknown
        });
    }
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&feed.slot],
        )
        .await
        .map_err(write_error("drop the member's replication slot"))?;
    Ok(Removal::Removed)
}

pub(crate) async fn campaign(
    client: &Client,
    layout: &Layout,
    name: &str,
    ttl: Duration,
) -> Result<Campaign> {
    let meta = layout.table("meta");
    let won = client
        .query_opt(
            &format!(
                "UPDATE {meta} SET leader = $1, leader_until = now() + make_interval(secs => $2), \
                 leader_epoch = leader_epoch + 1 \
                 WHERE id = 1 AND (leader = $1 OR leader = '' OR leader_until < now()) \
                 RETURNING {META_COLUMNS}"
            ),
            &[&name, &seconds(ttl)],
        )
        .await
        .map_err(write_error("campaign for the writer role"))?;
    if let Some(row) = won {
        let meta = meta_of(&row);
        return Ok(Campaign::Won {
            fence: Fence {
                epoch: meta.leader_epoch,
            },
            meta,
        });
    }
    let leader = client
        .query_one(&format!("SELECT leader FROM {meta} WHERE id = 1"), &[])
        .await
        .map_err(read_error("read the writer role"))?
        .get(0);
    Ok(Campaign::Lost { leader })
}

pub(crate) async fn renew(
    client: &Client,
    layout: &Layout,
    fence: &Fence,
    name: &str,
    ttl: Duration,
) -> Result<()> {
    let n = client
        .execute(
            &format!(
                "UPDATE {} SET leader_until = now() + make_interval(secs => $3) \
                 WHERE id = 1 AND leader = $1 AND leader_epoch = $2",
                layout.table("meta")
            ),
            &[&name, &fence.epoch, &seconds(ttl)],
        )
        .await
        .map_err(write_error("renew the writer role"))?;
    held(n, name, fence)
}

pub(crate) async fn hand_over(
    client: &Client,
    layout: &Layout,
    fence: &Fence,
    name: &str,
    to: Option<&str>,
    ttl: Duration,
) -> Result<()> {
    // `to` holds the claim (a campaign of its own name wins and raises the epoch); an
    // empty holder is free for anyone.
    let n = client
        .execute(
            &format!(
                "UPDATE {} SET leader = $3, leader_until = now() + make_interval(secs => $4) \
                 WHERE id = 1 AND leader = $1 AND leader_epoch = $2",
                layout.table("meta")
            ),
            &[&name, &fence.epoch, &to.unwrap_or(""), &seconds(ttl)],
        )
        .await
        .map_err(write_error("hand the writer role over"))?;
    held(n, name, fence)
}

pub(crate) async fn leader(client: &Client, layout: &Layout) -> Result<Option<String>> {
    let row = client
        .query_one(
            &format!(
                "SELECT CASE WHEN leader_until >= now() THEN leader ELSE '' END FROM {} WHERE id = 1",
                layout.table("meta")
            ),
            &[],
        )
        .await
        .map_err(read_error("read the writer role"))?;
    let name: String = row.get(0);
    Ok((!name.is_empty()).then_some(name))
}

/// The outcome of an `UPDATE` of the role made only while `name` holds it at `fence`'s
/// epoch: `n` rows changed.
fn held(n: u64, name: &str, fence: &Fence) -> Result<()> {
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::Fenced(format!(
            "{name} no longer holds the writer role at epoch {}",
            fence.epoch
        )))
    }
}

pub(crate) async fn alarms(client: &Client, layout: &Layout) -> Result<Vec<(u64, i32)>> {
    let rows = client
        .query(
            &format!(
                "SELECT member_id, alarm FROM {} ORDER BY member_id, alarm",
                layout.table("alarms")
            ),
            &[],
        )
        .await
        .map_err(read_error("list alarms"))?;
    let mut alarms: Vec<(u64, i32)> = rows.iter().map(|r| (to_u64(r.get(0)), r.get(1))).collect();
    // Ordered as u64 (the bigint column orders member ids above 2^63 first).
    alarms.sort_unstable();
    Ok(alarms)
}

pub(crate) async fn set_alarm(
    client: &Client,
    layout: &Layout,
    member_id: u64,
    alarm: i32,
    on: bool,
) -> Result<bool> {
    let table = layout.table("alarms");
    let sql = if on {
        format!(
            "WITH added AS (INSERT INTO {table} (member_id, alarm) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING RETURNING 1) SELECT NOT EXISTS (SELECT 1 FROM added)"
        )
    } else {
        format!(
            "WITH gone AS (DELETE FROM {table} WHERE member_id = $1 AND alarm = $2 RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM gone)"
        )
    };
    let row = client
        .query_one(&sql, &[&to_i64(member_id), &alarm])
        .await
        .map_err(write_error("set an alarm"))?;
    Ok(row.get(0))
}

pub(crate) async fn auth(client: &Client, layout: &Layout) -> Result<pgetcd_storage::AuthRecord> {
    let row = client
        .query_opt(
            &format!(
                "SELECT revision, state FROM {} WHERE id = 1",
                layout.table("auth")
            ),
            &[],
        )
        .await
        .map_err(read_error("read the auth state"))?;
    Ok(match row {
        None => pgetcd_storage::AuthRecord::default(),
        Some(r) => pgetcd_storage::AuthRecord {
            revision: to_u64(r.get(0)),
            state: bytes::Bytes::from(r.get::<_, Vec<u8>>(1)),
        },
    })
}

pub(crate) async fn swap_auth(
    client: &Client,
    layout: &Layout,
    expected: u64,
    record: &pgetcd_storage::AuthRecord,
) -> Result<bool> {
    let table = layout.table("auth");
    let state: &[u8] = &record.state;
    let rows = if expected == 0 {
        client
            .execute(
                &format!(
                    "INSERT INTO {table} (id, revision, state) VALUES (1, $1, $2) \
                     ON CONFLICT (id) DO NOTHING"
                ),
                &[&to_i64(record.revision), &state],
            )
            .await
    } else {
        client
            .execute(
                &format!(
                    "UPDATE {table} SET revision = $1, state = $2 WHERE id = 1 AND revision = $3"
                ),
                &[&to_i64(record.revision), &state, &to_i64(expected)],
            )
            .await
    }
    .map_err(write_error("write the auth state"))?;
    Ok(rows == 1)
}
