//! The highest revision this instance served, kept outside Postgres, and the start-up
//! guard built on it.
//!
//! Postgres cannot tell that it was rolled back: a keyspace restored from `pg_dump`,
//! recovered to a point in time, or promoted from an asynchronous replica that missed
//! the last commits looks like any other. Its clients can tell: they saw revisions the
//! keyspace no longer has, and once those revisions are assigned again to other
//! changes, every watch cache and every resumed watch is silently wrong. So each
//! instance records, under `--data-dir`, the highest revision it served of its keyspace
//! (its published revision: response headers, reads, watch events), and refuses to
//! start on a keyspace below it.
//!
//! The record ([`Record`]):
//! - `<data-dir>/served/<keyspace>`: the keyspace's cluster id and the revision, as
//!   text. Written whole to a temporary file, synced, renamed over the old record and
//!   the directory synced: a crash leaves the old record or the new one, never a part.
//! - Written at start-up once the guard passed (the store's revision), then at most once
//!   every [`RECORD_EVERY`] while the published revision grows, and at shutdown after
//!   every in-flight request was answered ([`Recorder`]). After a crash it may lag what
//!   was served by the last second of writes.
//! - Only ever raised: a write keeps the larger of the file's revision and the
//!   instance's, so instances sharing a data directory add up. A record of another
//!   cluster id (a keyspace of the same name created anew) is replaced.
//! - Followers record what they applied and served, as the writer does.
//!
//! The guard ([`check`]), before the instance joins its keyspace: when the store's
//! revision (`Store::setup`'s meta) is below the recorded one of the same cluster id, the
//! keyspace went back in time, and start-up is refused with both revisions, the likely
//! causes and the flags. With `--bump-revision N --mark-compacted` the instance instead
//! raises the revision by N and marks every revision up to the new one compacted
//! ([`pgetcd_storage::Store::bump_revision`] after raising the fencing epoch, so a writer
//! still running is deposed and loads the bumped keyspace), as `etcdutl snapshot restore
//! --bump-revision N --mark-compacted` does: the next write gets a revision above
//! everything served, and clients reading or watching from an older revision are told
//! it was compacted, so they list again. N must take the revision above the recorded
//! one.
//!
//! One bump per rollback: the flags bump only when the guard fires, or when this data
//! directory holds no record of the keyspace (an explicit request nothing shows was
//! carried out: a new instance after a restore). The record then holds the bumped
//! revision, so a restart with the flags still given starts normally (logged).
//!
//! Limits: an instance whose data directory does not persist, or cannot be written (a
//! warning says so), detects nothing; each instance knows only what it served itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use pgetcd_storage::{Meta, Store};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ServerError;
use crate::node::Node;

/// How often the record follows the published revision.
pub const RECORD_EVERY: Duration = Duration::from_secs(1);

/// What an instance served of a keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The keyspace's cluster id (its meta record's).
    pub cluster_id: u64,
    /// The highest revision served.
    pub revision: i64,
}

/// The record of one keyspace under a data directory.
#[derive(Debug, Clone)]
pub struct Record {
    path: PathBuf,
    keyspace: String,
}

impl Record {
    /// The record of `keyspace` under `data_dir` (nothing is read or created yet).
    pub fn new(data_dir: &Path, keyspace: &str) -> Record {
        Record {
            path: data_dir.join("served").join(keyspace),
            keyspace: keyspace.to_owned(),
        }
    }

    /// The record's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the record holds: None when there is none; an error when it cannot be read
    /// or parsed (it may hold a higher revision, so it is never ignored).
    pub fn read(&self) -> Result<Option<Served>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        parse(&text).map(Some).ok_or_else(|| {
            format!(
                "{} is not a record of the revision served (expected `cluster_id <hex>` and `revision <n>` lines); \
                 remove it only if this instance never served the keyspace",
                self.path.display()
            )
        })
    }

    /// Raises the record to `served` (kept when it holds a higher revision of the same
    /// cluster id); returns what it holds afterwards.
    pub fn raise(&self, served: Served) -> std::io::Result<Served> {
        let keep = match self.read() {
            Ok(Some(r)) if r.cluster_id == served.cluster_id && r.revision >= served.revision => {
                return Ok(r);
            }
            _ => served,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.{}.tmp", self.keyspace, std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        write!(
            f,
            "# pgetcd: the highest revision this instance served of keyspace {:?}.\n\
             # Start-up refuses a keyspace below it (docs/operations.md, Backups with Postgres).\n\
             cluster_id {:016x}\nrevision {}\n",
            self.keyspace, keep.cluster_id, keep.revision
        )?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(keep)
    }
}

fn parse(text: &str) -> Option<Served> {
    let (mut cluster_id, mut revision) = (None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once(' ')?;
        match name {
            "cluster_id" => cluster_id = Some(u64::from_str_radix(value.trim(), 16).ok()?),
            "revision" => revision = Some(value.trim().parse().ok()?),
            _ => {}
        }
    }
    Some(Served {
        cluster_id: cluster_id?,
        revision: revision?,
    })
}

/// What start-up does about the keyspace's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it as it is.
    Serve,
    /// Raise its revision to this first (and mark it compacted).
    Bump(i64),
    /// Refuse to start, saying why.
    Refuse(String),
}

/// The guard's decision for a keyspace whose meta record is `meta`, given what was
/// recorded under the data directory and `--bump-revision` (None: not given).
pub fn verdict(
    meta: &Meta,
    recorded: Option<Served>,
    bump: Option<u64>,
    record: &Record,
) -> Verdict {
    let served = recorded
        .filter(|r| r.cluster_id == meta.cluster_id)
        .map(|r| r.revision);
    let behind = served.filter(|&s| meta.revision < s);
    let Some(by) = bump else {
        return match behind {
            None => Verdict::Serve,
            Some(s) => Verdict::Refuse(refusal(meta, s, record)),
        };
    };
    let to = i64::try_from(by)
        .ok()
        .and_then(|by| meta.revision.checked_add(by));
    match (served, behind, to) {
        // Served here and not behind: bumped already, or nothing went back.
        (Some(_), None, _) => Verdict::Serve,
        (_, _, None) => Verdict::Refuse(format!(
            "--bump-revision {by} takes keyspace {:?} past the largest revision",
            record.keyspace
        )),
        (_, Some(s), Some(to)) if to <= s => Verdict::Refuse(format!(
            "keyspace {:?} is at revision {}, below revision {s} that this instance served \
             (recorded in {}), and --bump-revision {by} would raise it only to {to}: \
             give at least --bump-revision {}, more if other instances served more",
            record.keyspace,
            meta.revision,
            record.path.display(),
            s - meta.revision + 1
        )),
        (_, _, Some(to)) => Verdict::Bump(to),
    }
}

fn refusal(meta: &Meta, served: i64, record: &Record) -> String {
    format!(
        "keyspace {ks:?} is at revision {rev}, below revision {served} that this instance \
         already served (recorded in {path}): the keyspace went back in time. Likely causes: \
         it was restored from a pg_dump or a base backup, recovered to a point in time, \
         restored from an older etcd snapshot, or an asynchronous replica missing the last \
         commits was promoted. Clients that saw revisions up to {served} would see them \
         assigned again to other changes, so pgetcd refuses to start. If serving this state is \
         intended, start with --bump-revision N --mark-compacted (N of at least {min}; \
         more if other instances served more, e.g. 1000000): the revision is raised by N and \
         every revision up to the new one is marked compacted, so clients list again, as \
         after `etcdutl snapshot restore --bump-revision N --mark-compacted`",
        ks = record.keyspace,
        rev = meta.revision,
        path = record.path.display(),
        min = served - meta.revision + 1,
    )
}

/// The guard (see the module doc): sets the keyspace up, refuses a keyspace below what
/// this instance served unless `bump` (`--bump-revision`) raises it, and records the
/// store's revision. Returns the meta record as it stands after any bump.
pub async fn check(
    store: &dyn Store,
    record: &Record,
    bump: Option<u64>,
) -> Result<Meta, ServerError> {
    let recorded = record.read().map_err(ServerError::Start)?;
    let mut meta = store.setup().await.map_err(pgetcd_engine::Error::from)?;
    if let Some(r) = recorded
        && r.cluster_id != meta.cluster_id
    {
        info!(
            record = %record.path.display(),
            recorded_cluster_id = format!("{:x}", r.cluster_id),
            cluster_id = format!("{:x}", meta.cluster_id),
            "the record of the revision served is of another keyspace of this name; starting a new one"
        );
    }
    match verdict(&meta, recorded, bump, record) {
        Verdict::Refuse(why) => return Err(ServerError::Start(why)),
        Verdict::Serve => {
            if let Some(by) = bump {
                info!(
                    bump_revision = by,
                    revision = meta.revision,
                    served = recorded.map(|r| r.revision),
                    "not bumping the revision: the keyspace is not behind what this instance served"
                );
            }
        }
        Verdict::Bump(_) => meta = bump_now(store, record, recorded, bump).await?,
    }
    let served = Served {
        cluster_id: meta.cluster_id,
        revision: meta.revision,
    };
    if let Err(e) = record.raise(served) {
        warn!(
            record = %record.path.display(),
            error = %e,
            "cannot record the revision served: this instance will not detect a keyspace restored to an older revision"
        );
    }
    Ok(meta)
}

/// Takes the keyspace (raising the fencing epoch) and bumps it as decided on the meta
/// record the fence read (another instance may have bumped it meanwhile).
async fn bump_now(
    store: &dyn Store,
    record: &Record,
    recorded: Option<Served>,
    bump: Option<u64>,
) -> Result<Meta, ServerError> {
    let (fence, meta) = store.fence().await.map_err(pgetcd_engine::Error::from)?;
    let to = match verdict(&meta, recorded, bump, record) {
        Verdict::Bump(to) => to,
        Verdict::Serve => return Ok(meta),
        Verdict::Refuse(why) => return Err(ServerError::Start(why)),
    };
    let bumped = store
        .bump_revision(&fence, meta.revision, to, true)
        .await
        .map_err(pgetcd_engine::Error::from)?;
    let served = recorded
        .filter(|r| r.cluster_id == meta.cluster_id)
        .map(|r| r.revision);
    warn!(
        keyspace = %record.keyspace,
        from = meta.revision,
        to = bumped.revision,
        compact_revision = bumped.compact_revision,
        served,
        "raised the keyspace's revision and marked every revision up to it compacted (--bump-revision, --mark-compacted)"
    );
    if served.is_none() {
        warn!(
            record = %record.path.display(),
            "bumped because this data directory holds no record of the keyspace; with the flags \
             still given, a start without a record (a data directory that does not persist) bumps again"
        );
    }
    Ok(bumped)
}

/// Keeps the record following the instance's published revision.
pub struct Recorder {
    record: Record,
    /// The revision last recorded.
    written: AtomicI64,
    /// Whether the last write failed (warned once per run of failures).
    failing: AtomicBool,
}

impl Recorder {
    /// A recorder of `record`, which holds `revision` now.
    pub fn new(record: Record, revision: i64) -> Arc<Recorder> {
        Arc::new(Recorder {
            record,
            written: AtomicI64::new(revision),
            failing: AtomicBool::new(false),
        })
    }

    /// Records the node's published revision if it grew since the last write.
    pub async fn note(self: &Arc<Self>, node: &Node) {
        let engine = node.engine();
        let served = Served {
            cluster_id: engine.cluster_id(),
            revision: engine.revision(),
        };
        if served.revision <= self.written.load(Ordering::Relaxed) {
            return;
        }
        let me = self.clone();
        let wrote = tokio::task::spawn_blocking(move || me.record.raise(served)).await;
        match wrote {
            Ok(Ok(_)) => {
                self.written.fetch_max(served.revision, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(record = %self.record.path.display(), "recording the revision served again");
                }
            }
            Ok(Err(e)) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(
                        record = %self.record.path.display(),
                        error = %e,
                        "cannot record the revision served; retrying every second"
                    );
                }
            }
            Err(e) => warn!(error = %e, "recording the revision served"),
        }
    }

    /// Follows the node's published revision every [`RECORD_EVERY`] until `shutdown`
    /// (the last write is [`Recorder::note`]'s, once every request was answered).
    pub async fn run(self: Arc<Self>, node: Node, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RECORD_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => self.note(&node).await,
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(cluster_id: u64, revision: i64) -> Meta {
        Meta {
            cluster_id,
            member_id: 1,
            revision,
            compact_revision: -1,
            leader_epoch: 1,
        }
    }

    fn served(cluster_id: u64, revision: i64) -> Option<Served> {
        Some(Served {
            cluster_id,
            revision,
        })
    }

    #[test]
    fn the_guard_refuses_a_keyspace_behind_what_was_served_unless_bumped_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = Record::new(dir.path(), "ks");
        let path = r.path().display().to_string();
        // Nothing recorded, or the keyspace at or above the record: serve.
        assert_eq!(verdict(&meta(7, 10), None, None, &r), Verdict::Serve);
        assert_eq!(
            verdict(&meta(7, 10), served(7, 10), None, &r),
            Verdict::Serve
        );
        assert_eq!(
            verdict(&meta(7, 11), served(7, 10), None, &r),
            Verdict::Serve
        );
        // Another keyspace of the same name: its revisions do not compare.
        assert_eq!(
            verdict(&meta(8, 3), served(7, 10), None, &r),
            Verdict::Serve
        );
        // Behind: refused, with both revisions, the record, the causes and the flags.
        let Verdict::Refuse(why) = verdict(&meta(7, 4), served(7, 10), None, &r) else {
            panic!("not refused");
        };
        for part in [
            "at revision 4",
            "below revision 10",
            path.as_str(),
            "pg_dump",
            "point in time",
            "asynchronous replica",
            "--bump-revision N --mark-compacted",
            "at least 7",
        ] {
            assert!(why.contains(part), "{part:?} not in {why}");
        }
        // Bumped past the record: bump; not past it: refused with the least that is.
        assert_eq!(
            verdict(&meta(7, 4), served(7, 10), Some(7), &r),
            Verdict::Bump(11)
        );
        let Verdict::Refuse(why) = verdict(&meta(7, 4), served(7, 10), Some(6), &r) else {
            panic!("too small a bump accepted");
        };
        assert!(why.contains("at least --bump-revision 7"), "{why}");
        // One bump per rollback: with the record at or below the keyspace, the flags
        // change nothing; with no record of this keyspace they are an explicit request.
        assert_eq!(
            verdict(&meta(7, 11), served(7, 11), Some(7), &r),
            Verdict::Serve
        );
        assert_eq!(
            verdict(&meta(7, 4), None, Some(100), &r),
            Verdict::Bump(104)
        );
        assert_eq!(
            verdict(&meta(8, 4), served(7, 10), Some(100), &r),
            Verdict::Bump(104)
        );
        assert!(matches!(
            verdict(&meta(7, 4), None, Some(u64::MAX), &r),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn the_record_is_only_raised_and_survives_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let r = Record::new(&dir.path().join("data"), "ks");
        assert_eq!(r.read().unwrap(), None);
        assert_eq!(
            r.raise(served(7, 10).unwrap()).unwrap(),
            served(7, 10).unwrap()
        );
        assert_eq!(r.read().unwrap(), served(7, 10));
        // Lower: kept as it is; higher: raised.
        assert_eq!(
            r.raise(served(7, 5).unwrap()).unwrap(),
            served(7, 10).unwrap()
        );
        assert_eq!(
            r.raise(served(7, 12).unwrap()).unwrap(),
            served(7, 12).unwrap()
        );
        assert_eq!(r.read().unwrap(), served(7, 12));
        // Another cluster id replaces it.
        assert_eq!(
            r.raise(served(9, 3).unwrap()).unwrap(),
            served(9, 3).unwrap()
        );
        assert_eq!(r.read().unwrap(), served(9, 3));
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("data/served"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ks"]);
        // A damaged record is an error, never ignored.
        std::fs::write(r.path(), "revision twelve\n").unwrap();
        let err = r.read().unwrap_err();
        assert!(err.contains(&r.path().display().to_string()), "{err}");
        std::fs::write(r.path(), "cluster_id 7\n").unwrap();
        assert!(r.read().is_err());
    }
}
