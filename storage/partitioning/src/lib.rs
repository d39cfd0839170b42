//! Where pgetcd's data lives in Postgres, as pure functions: the schema of one keyspace,
//! the mapping of revisions to `history` partitions, and the DDL each step implies.
//!
//! Invariants:
//! - One keyspace is one Postgres schema with one revision space.
//! - `history` is `PARTITION BY RANGE (revision)`; partition `history_p<start>` holds
//!   revisions `[start, start + partition_revisions)`, starts are multiples of
//!   `partition_revisions`.
//! - A partition may be dropped once every revision in it is at or below the compact
//!   revision and the rows still visible from it were copied to `history_retained`.
//!
//! This crate does no I/O: callers run the statements it returns.

use thiserror::Error;

/// Version of the schema this build writes. Start-up migrates older schemas and refuses
/// newer ones.
pub const SCHEMA_VERSION: i32 = 5;

/// Default number of revisions per `history` partition.
pub const DEFAULT_PARTITION_REVISIONS: i64 = 100_000;

/// How many partitions beyond the one being written are kept created ahead of need.
pub const PARTITIONS_AHEAD: i64 = 2;

/// Row kinds in `history.kind`, equal to etcd's `mvccpb.Event.EventType`.
pub const KIND_PUT: i16 = 0;
/// A deletion (tombstone) row.
pub const KIND_DELETE: i16 = 1;

/// Columns of `history` and `history_retained` (the same rows move between them).
const HISTORY_COLUMNS: &str = "revision bigint NOT NULL, sub int NOT NULL, key bytea NOT NULL, \
     kind smallint NOT NULL, create_revision bigint NOT NULL, version bigint NOT NULL, \
     lease bigint NOT NULL, value bytea NOT NULL, PRIMARY KEY (revision, sub)";

/// A layout argument that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Schema names are quoted into DDL, so only plain identifiers are accepted.
    #[error(
        "keyspace schema name {0:?} is not a plain identifier (lowercase letters, digits, '_', not starting with a digit, at most 48 characters)"
    )]
    BadSchemaName(String),
    /// Partitions must hold at least one revision.
    #[error("history partition size must be at least 1 revision, got {0}")]
    BadPartitionSize(i64),
}

/// The Postgres layout of one keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    schema: String,
    partition_revisions: i64,
}

impl Layout {
    /// A layout for `schema` with `partition_revisions` revisions per history partition.
    pub fn new(schema: &str, partition_revisions: i64) -> Result<Self, LayoutError> {
        let plain = !schema.is_empty()
            && schema.len() <= 48
            && !schema.as_bytes()[0].is_ascii_digit()
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plain {
            return Err(LayoutError::BadSchemaName(schema.to_owned()));
        }
        if partition_revisions < 1 {
            return Err(LayoutError::BadPartitionSize(partition_revisions));
        }
        Ok(Self {
            schema: schema.to_owned(),
            partition_revisions,
        })
    }

    /// The schema (keyspace) name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Revisions per history partition.
    pub fn partition_revisions(&self) -> i64 {
        self.partition_revisions
    }

    /// Qualified name of a table of this keyspace.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", self.schema, name)
    }

    /// Start of the partition holding `revision`.
    pub fn partition_start(&self, revision: i64) -> i64 {
        revision.div_euclid(self.partition_revisions) * self.partition_revisions
    }

    /// Name (unqualified) of the partition starting at `start`.
    pub fn partition_name(&self, start: i64) -> String {
        format!("history_p{start}")
    }

    /// Parses a partition name back to its start, for partitions found in the catalog.
    pub fn parse_partition_name(&self, name: &str) -> Option<i64> {
        name.strip_prefix("history_p")?.parse().ok()
    }

    /// Statements creating the keyspace's schema and tables if they do not exist.
    /// `meta` is filled by the caller (it needs random ids).
    pub fn create_schema_ddl(&self) -> Vec<String> {
        let s = &self.schema;
        vec![
            format!("CREATE SCHEMA IF NOT EXISTS {s}"),
            format!(
                "CREATE TABLE IF NOT EXISTS {s}.meta (\
                 id int PRIMARY KEY CHECK (id = 1), \
                 schema_version int NOT NULL, \
                 cluster_id bigint NOT NULL, \
                 member_id bigint NOT NULL, \
                 revision bigint NOT NULL, \
                 compact_revision bigint NOT NULL, \
                 leader_epoch bigint NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {s}.kv (\
                 key bytea PRIMARY KEY, \
                 create_revision bigint NOT NULL, \
                 mod_revision bigint NOT NULL, \
                 mod_sub int NOT NULL, \
                 version bigint NOT NULL, \
                 lease bigint NOT NULL, \
                 value bytea NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {s}.history ({HISTORY_COLUMNS}) \
                 PARTITION BY RANGE (revision)"
            ),
            format!("CREATE TABLE IF NOT EXISTS {s}.history_retained ({HISTORY_COLUMNS})"),
            self.leases_ddl(),
            self.leader_ddl(),
            self.members_ddl(),
            self.alarms_ddl(),
            self.auth_ddl(),
        ]
    }

    /// Statements taking a schema from `version` to `version + 1`.
    pub fn migration_ddl(&self, version: i32) -> Vec<String> {
        match version {
            1 => vec![self.leases_ddl()],
            2 => vec![self.leader_ddl(), self.members_ddl()],
            3 => vec![self.alarms_ddl()],
            4 => vec![self.auth_ddl()],
            _ => Vec::new(),
        }
    }

    /// The writer's lease in `meta` (schema version 3): who holds it and until when
    /// (the server's clock).
    fn leader_ddl(&self) -> String {
        format!(
            "ALTER TABLE {}.meta ADD COLUMN IF NOT EXISTS leader text NOT NULL DEFAULT '', \
             ADD COLUMN IF NOT EXISTS leader_until timestamptz NOT NULL DEFAULT '-infinity'",
            self.schema
        )
    }

    /// The instances of the keyspace (schema version 3): name, member id, URLs, and
    /// when each last said it is alive (the server's clock).
    fn members_ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.members (name text PRIMARY KEY, member_id bigint NOT NULL, \
             client_urls text[] NOT NULL, peer_urls text[] NOT NULL, seen timestamptz NOT NULL)",
            self.schema
        )
    }

    /// The keyspace's alarms (schema version 4): etcd's, one per member id and type.
    fn alarms_ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.alarms (member_id bigint NOT NULL, alarm int NOT NULL, \
             PRIMARY KEY (member_id, alarm))",
            self.schema
        )
    }

    /// The keyspace's auth state (schema version 5): etcd's users, roles and auth flag,
    /// encoded by the server, in one row whose auth revision every change raises.
    fn auth_ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.auth (id int PRIMARY KEY CHECK (id = 1), \
             revision bigint NOT NULL, state bytea NOT NULL)",
            self.schema
        )
    }

    fn leases_ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.leases (id bigint PRIMARY KEY, ttl bigint NOT NULL)",
            self.schema
        )
    }

    /// Statement creating the partition that starts at `start`.
    pub fn create_partition_ddl(&self, start: i64) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {s}.{name} PARTITION OF {s}.history FOR VALUES FROM ({start}) TO ({end})",
            s = self.schema,
            name = self.partition_name(start),
            end = start + self.partition_revisions,
        )
    }

    /// Statement dropping the partition that starts at `start`.
    pub fn drop_partition_ddl(&self, start: i64) -> String {
        format!(
            "DROP TABLE IF EXISTS {}.{}",
            self.schema,
            self.partition_name(start)
        )
    }

    /// Starts of the partitions to create before revisions up to `max_revision` are
    /// written, given that partitions below `created_upto` exist already. Nothing while at
    /// least one whole partition beyond `max_revision`'s exists; otherwise the partitions
    /// up to [`PARTITIONS_AHEAD`] beyond it, so DDL runs once per partition, not per batch.
    pub fn partitions_to_create(&self, created_upto: i64, max_revision: i64) -> Vec<i64> {
        let current = self.partition_start(max_revision);
        if created_upto >= current + 2 * self.partition_revisions {
            return Vec::new();
        }
        let want_upto = current + (PARTITIONS_AHEAD + 1) * self.partition_revisions;
        let mut start = self.partition_start(created_upto).max(current);
        let mut out = Vec::new();
        while start < want_upto {
            out.push(start);
            start += self.partition_revisions;
        }
        out
    }

    /// Starts of the partitions a keyspace loaded whole needs: every partition holding
    /// a revision in `from..=to`, and those kept ahead of `to` for the writes after.
    pub fn partitions_covering(&self, from: i64, to: i64) -> Vec<i64> {
        let want_upto =
            self.partition_start(to) + (PARTITIONS_AHEAD + 1) * self.partition_revisions;
        let mut start = self.partition_start(from.min(to));
        let mut out = Vec::new();
        while start < want_upto {
            out.push(start);
            start += self.partition_revisions;
        }
        out
    }

    /// Of `existing` partition starts, those wholly at or below `compact_revision`.
    pub fn droppable_partitions(&self, existing: &[i64], compact_revision: i64) -> Vec<i64> {
        existing
            .iter()
            .copied()
            .filter(|&start| start + self.partition_revisions - 1 <= compact_revision)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("pgetcd", 100).expect("valid layout")
    }

    #[test]
    fn rejects_unsafe_schema_names() {
        for bad in ["", "Pg", "a-b", "1abc", "a;drop", "x\"y"] {
            assert!(Layout::new(bad, 10).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Layout::new("ok", 0), Err(LayoutError::BadPartitionSize(0)));
        assert!(Layout::new("events_2", 10).is_ok());
    }

    #[test]
    fn maps_revisions_to_partitions() {
        let l = layout();
        assert_eq!(l.partition_start(0), 0);
        assert_eq!(l.partition_start(99), 0);
        assert_eq!(l.partition_start(100), 100);
        assert_eq!(l.partition_start(250), 200);
        assert_eq!(l.parse_partition_name(&l.partition_name(300)), Some(300));
        assert_eq!(l.parse_partition_name("kv"), None);
    }

    #[test]
    fn creates_partitions_ahead_only_when_needed() {
        let l = layout();
        assert_eq!(l.partitions_to_create(0, 1), vec![0, 100, 200]);
        // A whole history of revisions 150..=420 loaded at once.
        assert_eq!(
            l.partitions_covering(150, 420),
            vec![100, 200, 300, 400, 500, 600]
        );
        // Everything up to 300 exists: writing revision 150 needs nothing.
        assert!(l.partitions_to_create(300, 150).is_empty());
        // Writing into the last created partition creates the ones after it.
        assert_eq!(l.partitions_to_create(300, 250), vec![300, 400]);
        assert_eq!(l.partitions_to_create(300, 300), vec![300, 400, 500]);
    }

    #[test]
    fn drops_only_partitions_wholly_compacted() {
        let l = layout();
        let existing = [0, 100, 200];
        assert!(l.droppable_partitions(&existing, 98).is_empty());
        assert_eq!(l.droppable_partitions(&existing, 99), vec![0]);
        assert_eq!(l.droppable_partitions(&existing, 250), vec![0, 100]);
    }

    #[test]
    fn migrations_lead_to_the_current_schema() {
        let l = layout();
        assert!(l.migration_ddl(1)[0].contains("pgetcd.leases"));
        assert!(l.migration_ddl(SCHEMA_VERSION).is_empty());
        assert!(
            l.create_schema_ddl()
                .iter()
                .any(|s| s.contains("pgetcd.leases"))
        );
    }

    #[test]
    fn ddl_names_the_schema() {
        let l = layout();
        assert!(l.create_schema_ddl().iter().all(|s| s.contains("pgetcd")));
        assert_eq!(
            l.create_partition_ddl(100),
            "CREATE TABLE IF NOT EXISTS pgetcd.history_p100 PARTITION OF pgetcd.history FOR VALUES FROM (100) TO (200)"
        );
    }
}
