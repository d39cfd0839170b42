//! etcd's request semantics evaluated over the index: Range, Put, DeleteRange and Txn,
//! exactly as etcd's applier does them (order of checks, revisions of nested responses,
//! compare rules, sort and limit rules).
//!
//! An [`Exec`] evaluates one request as of revision `begin`. Reads (Range, read-only
//! Txn) run on any task at the published revision. Writes run only on the writer: they
//! append versions of revision `begin + 1` straight into the index (readers do not see
//! them until the writer publishes) and record them as [`Change`]s for Postgres.

use std::cmp::Ordering;

use bytes::Bytes;
use futures::future::BoxFuture;
use pgetcd_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse, compare,
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
};
use pgetcd_proto::mvccpb::KeyValue;

use crate::error::{Error, Result};
use crate::index::{KeyRange, Version, Visible};
use crate::state::State as Shared;

pub use pgetcd_storage::Change;

/// Which branches a txn and its nested txns take, decided before any op runs.
#[derive(Debug)]
struct Path {
    succeeded: bool,
    /// Paths of the nested txns of the chosen branch, in op order.
    nested: Vec<Path>,
}

/// Evaluation of one request as of revision `begin`.
pub(crate) struct Exec<'a> {
    sh: &'a Shared,
    begin: i64,
    compact: i64,
    changes: Vec<Change>,
}

pub(crate) fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn to_kv(v: Visible, keys_only: bool) -> KeyValue {
    KeyValue {
        key: v.key,
        create_revision: v.version.create_revision,
        mod_revision: v.version.mod_revision,
        version: v.version.version,
        value: if keys_only {
            Bytes::new()
        } else {
            v.version.value.unwrap_or_default()
        },
        lease: v.version.lease,
    }
}

fn is_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(t.failure.iter())
        .all(|op| matches!(op.request, Some(Request::RequestRange(_))))
}

/// Whether a txn only reads (then it needs no writer and no revision).
pub fn txn_is_read_only(t: &TxnRequest) -> bool {
    is_read_only(t)
}

/// Whether a txn (or a nested one) may put: etcd refuses those under NOSPACE.
pub fn txn_has_put(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(t.failure.iter())
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) => true,
            Some(Request::RequestTxn(inner)) => txn_has_put(inner),
            _ => false,
        })
}

fn cmp_i64(a: i64, b: i64) -> Ordering {
    a.cmp(&b)
}

/// etcd's compareKV: the compare's target field of `kv` against the compare's operand
/// (a missing operand of the wrong union variant counts as zero / empty).
pub fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let result = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(v)
        }
        Ok(CompareTarget::Create) => cmp_i64(
            kv.create_revision,
            match c.target_union {
                Some(TargetUnion::CreateRevision(r)) => r,
                _ => 0,
            },
        ),
        Ok(CompareTarget::Mod) => cmp_i64(
            kv.mod_revision,
            match c.target_union {
                Some(TargetUnion::ModRevision(r)) => r,
                _ => 0,
            },
        ),
        Ok(CompareTarget::Version) => cmp_i64(
            kv.version,
            match c.target_union {
                Some(TargetUnion::Version(r)) => r,
                _ => 0,
            },
        ),
        Ok(CompareTarget::Lease) => cmp_i64(
            kv.lease,
            match c.target_union {
                Some(TargetUnion::Lease(r)) => r,
                _ => 0,
            },
        ),
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => result == Ordering::Equal,
        Ok(CompareResult::NotEqual) => result != Ordering::Equal,
        Ok(CompareResult::Greater) => result == Ordering::Greater,
        Ok(CompareResult::Less) => result == Ordering::Less,
        Err(_) => true,
    }
}

fn sort_key_cmp(target: SortTarget, a: &Visible, b: &Visible) -> Ordering {
    match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.version.cmp(&b.version.version),
        SortTarget::Create => a.version.create_revision.cmp(&b.version.create_revision),
        SortTarget::Mod => a.version.mod_revision.cmp(&b.version.mod_revision),
        SortTarget::Value => a.version.value.cmp(&b.version.value),
    }
}

enum Check {
    Put,
    Range,
}

impl<'a> Exec<'a> {
    /// Evaluation as of `begin` with compaction at `compact`.
    pub(crate) fn new(sh: &'a Shared, begin: i64, compact: i64) -> Self {
        Self {
            sh,
            begin,
            compact,
            changes: Vec::new(),
        }
    }

    /// The revision this request's reads see: `begin`, or `begin + 1` once it wrote.
    fn cur(&self) -> i64 {
        self.begin + i64::from(!self.changes.is_empty())
    }

    /// The changes made so far.
    pub(crate) fn into_changes(self) -> Vec<Change> {
        self.changes
    }

    /// Undoes this request's appended versions (writer only).
    pub(crate) fn rollback(&mut self) {
        let keys: Vec<Bytes> = self.changes.drain(..).map(|c| c.key).collect();
        self.sh.index.rollback(&keys, self.begin);
    }

    async fn fill(&self, kvs: &mut [Visible], at: i64) -> Result<()> {
        self.sh.fill_values(kvs, at).await
    }

    /// etcd's Range at revision `cur()`.
    pub(crate) async fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        let cur = self.cur();
        let mut rev = r.revision;
        if rev > cur {
            return Err(Error::FutureRevision);
        }
        if rev <= 0 {
            rev = cur;
        }
        if rev < self.compact {
            return Err(Error::Compacted);
        }
        let kr = KeyRange::new(&r.key, &r.range_end);
        if r.count_only {
            let count = self.sh.index.count(&kr, rev);
            self.sh.check_not_compacted(rev)?;
            return Ok(RangeResponse {
                header: header(cur),
                kvs: Vec::new(),
                more: false,
                count: count as i64,
            });
        }
        let order = SortOrder::try_from(r.sort_order).map_err(|_| Error::InvalidSortOption)?;
        let target = SortTarget::try_from(r.sort_target).map_err(|_| Error::InvalidSortOption)?;
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        let mut limit = r.limit;
        if order != SortOrder::None || filtered {
            limit = 0;
        }
        if limit > 0 {
            limit += 1;
        }
        let scan_limit = usize::try_from(limit).unwrap_or(0);
        let (mut kvs, total) = if scan_limit == 0 {
            self.sh.index.range(&kr, rev, 0)
        } else {
            // A page: scan only its keys (plus one to know there are more); the total
            // comes from the page count memo or one count.
            let kvs = self.sh.index.range_first(&kr, rev, scan_limit);
            let total = if kvs.len() < scan_limit {
                kvs.len()
            } else {
                let page = scan_limit - 1;
                self.sh.index.page_total(&kr, rev, page, &kvs[page - 1].key)
            };
            (kvs, total)
        };
        self.sh.check_not_compacted(rev)?;
        if r.max_mod_revision != 0 {
            kvs.retain(|v| v.version.mod_revision <= r.max_mod_revision);
        }
        if r.min_mod_revision != 0 {
            kvs.retain(|v| v.version.mod_revision >= r.min_mod_revision);
        }
        if r.max_create_revision != 0 {
            kvs.retain(|v| v.version.create_revision <= r.max_create_revision);
        }
        if r.min_create_revision != 0 {
            kvs.retain(|v| v.version.create_revision >= r.min_create_revision);
        }
        let order = match (target, order) {
            (t, SortOrder::None) if t != SortTarget::Key => SortOrder::Ascend,
            (SortTarget::Key, SortOrder::Ascend) => SortOrder::None,
            (_, o) => o,
        };
        let values_filled = target == SortTarget::Value && order != SortOrder::None;
        if values_filled {
            self.fill(&mut kvs, rev).await?;
        }
        match order {
            SortOrder::Ascend => kvs.sort_by(|a, b| sort_key_cmp(target, a, b)),
            SortOrder::Descend => kvs.sort_by(|a, b| sort_key_cmp(target, b, a)),
            SortOrder::None => {}
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() > r.limit as usize {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if !r.keys_only && !values_filled {
            self.fill(&mut kvs, rev).await?;
        }
        Ok(RangeResponse {
            header: header(cur),
            kvs: kvs.into_iter().map(|v| to_kv(v, r.keys_only)).collect(),
            more,
            count: total as i64,
        })
    }

    /// The live version of `key` as this request sees it now, with its value.
    async fn get(&self, key: &Bytes, with_value: bool) -> Result<Option<Visible>> {
        let at = self.cur();
        match self.sh.index.get(key, at) {
            Some(v) => {
                let mut one = [v];
                if with_value {
                    self.fill(&mut one, at).await?;
                }
                let [v] = one;
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }

    /// Appends, in this request's revision, the version `make` builds from the key's
    /// live version.
    fn append(&mut self, key: &Bytes, make: impl FnOnce(Option<&Version>) -> Version) {
        let rev = self.begin + 1;
        let sub = self.changes.len() as u32;
        let mut version = None;
        let (key, prev) = self.sh.index.append_from(key, |prev| {
            let mut v = make(prev);
            v.mod_revision = rev;
            v.sub = sub;
            version = Some(v.clone());
            v
        });
        if let Some(version) = version {
            self.changes.push(Change { key, version, prev });
        }
    }

    fn tombstone(&mut self, key: &Bytes) {
        self.append(key, |_| Version::tombstone());
    }

    fn put_version(&mut self, key: &Bytes, value: Bytes, lease: i64) {
        let rev = self.begin + 1;
        // Its own copy: a value decoded from gRPC shares the request's receive buffer,
        // which the cache must not keep alive.
        let value = Some(Bytes::copy_from_slice(&value));
        self.append(key, |prev| {
            let (create_revision, version) = match prev {
                Some(v) => (v.create_revision, v.version + 1),
                None => (rev, 1),
            };
            Version {
                mod_revision: rev,
                sub: 0,
                create_revision,
                version,
                lease,
                value,
            }
        });
    }

    /// etcd's top-level Put: lease check, then the ignore_* checks, then the write.
    pub(crate) async fn put(&mut self, p: &PutRequest) -> Result<PutResponse> {
        if p.lease != 0 && !self.sh.lease_exists(p.lease) {
            return Err(Error::LeaseNotFound);
        }
        self.put_in_txn(p).await
    }

    async fn put_in_txn(&mut self, p: &PutRequest) -> Result<PutResponse> {
        let prev = if p.ignore_value || p.ignore_lease || p.prev_kv {
            self.get(&p.key, p.ignore_value || p.prev_kv).await?
        } else {
            None
        };
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(Error::KeyNotFound);
        }
        let value = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.version.value.clone().unwrap_or_default(),
            _ => p.value.clone(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.version.lease,
            _ => p.lease,
        };
        self.put_version(&p.key, value, lease);
        Ok(PutResponse {
            header: header(self.begin + 1),
            prev_kv: if p.prev_kv {
                prev.map(|v| to_kv(v, false))
            } else {
                None
            },
        })
    }

    /// etcd's DeleteRange: optional prev_kvs, then one tombstone per live key in key
    /// order.
    pub(crate) async fn delete_range(
        &mut self,
        d: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        let kr = KeyRange::new(&d.key, &d.range_end);
        let at = self.cur();
        let (mut live, _) = self.sh.index.range(&kr, at, 0);
        if d.prev_kv {
            self.fill(&mut live, at).await?;
        }
        for v in &live {
            self.tombstone(&v.key);
        }
        let deleted = live.len() as i64;
        let rev = if deleted != 0 || !self.changes.is_empty() {
            self.begin + 1
        } else {
            self.begin
        };
        Ok(DeleteRangeResponse {
            header: header(rev),
            deleted,
            prev_kvs: if d.prev_kv {
                live.into_iter().map(|v| to_kv(v, false)).collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Deletes those of `keys` whose live version holds `lease`, in this request's
    /// revision: a lease revoke. Returns the header revision.
    pub(crate) fn delete_leased_keys(&mut self, keys: &[Bytes], lease: i64) -> i64 {
        for key in keys {
            let held = self
                .sh
                .index
                .get(key, self.cur())
                .is_some_and(|v| v.version.lease == lease);
            if held {
                self.tombstone(key);
            }
        }
        self.cur()
    }

    async fn compare(&self, c: &Compare) -> Result<bool> {
        let kr = KeyRange::new(&c.key, &c.range_end);
        let at = self.cur();
        let (mut kvs, _) = self.sh.index.range(&kr, at, 0);
        let is_value = c.target == compare::CompareTarget::Value as i32;
        if kvs.is_empty() {
            // A missing key has no value to compare; other targets compare as zero.
            return Ok(!is_value && compare_kv(c, &KeyValue::default()));
        }
        if is_value {
            self.fill(&mut kvs, at).await?;
        }
        Ok(kvs.into_iter().all(|v| compare_kv(c, &to_kv(v, false))))
    }

    fn path<'b>(&'b self, t: &'b TxnRequest) -> BoxFuture<'b, Result<Path>> {
        Box::pin(async move {
            let mut succeeded = true;
            for c in &t.compare {
                if !self.compare(c).await? {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded { &t.success } else { &t.failure };
            let mut nested = Vec::new();
            for op in ops {
                if let Some(Request::RequestTxn(inner)) = &op.request {
                    nested.push(self.path(inner).await?);
                }
            }
            Ok(Path { succeeded, nested })
        })
    }

    fn check_requests(&self, t: &TxnRequest, path: &Path, check: &Check) -> Result<()> {
        let ops = if path.succeeded {
            &t.success
        } else {
            &t.failure
        };
        let mut nested = path.nested.iter();
        for op in ops {
            match (&op.request, check) {
                (Some(Request::RequestTxn(inner)), _) => {
                    let p = nested.next().ok_or(Error::Stopped)?;
                    self.check_requests(inner, p, check)?;
                }
                (Some(Request::RequestPut(p)), Check::Put) => {
                    if (p.ignore_value || p.ignore_lease)
                        && self.sh.index.get(&p.key, self.begin).is_none()
                    {
                        return Err(Error::KeyNotFound);
                    }
                    if p.lease != 0 && !self.sh.lease_exists(p.lease) {
                        return Err(Error::LeaseNotFound);
                    }
                }
                (Some(Request::RequestRange(r)), Check::Range) if r.revision != 0 => {
                    if r.revision > self.begin {
                        return Err(Error::FutureRevision);
                    }
                    if r.revision < self.compact {
                        return Err(Error::Compacted);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn apply<'b>(
        &'b mut self,
        t: &'b TxnRequest,
        path: &'b Path,
    ) -> BoxFuture<'b, Result<TxnResponse>> {
        Box::pin(async move {
            let ops: &[RequestOp] = if path.succeeded {
                &t.success
            } else {
                &t.failure
            };
            let mut nested = path.nested.iter();
            let mut responses = Vec::with_capacity(ops.len());
            for op in ops {
                let response = match &op.request {
                    Some(Request::RequestRange(r)) => Response::ResponseRange(self.range(r).await?),
                    Some(Request::RequestPut(p)) => {
                        Response::ResponsePut(self.put_in_txn(p).await?)
                    }
                    Some(Request::RequestDeleteRange(d)) => {
                        Response::ResponseDeleteRange(self.delete_range(d).await?)
                    }
                    Some(Request::RequestTxn(inner)) => {
                        let p = nested.next().ok_or(Error::Stopped)?;
                        Response::ResponseTxn(self.apply(inner, p).await?)
                    }
                    None => return Err(Error::KeyNotFound),
                };
                responses.push(ResponseOp {
                    response: Some(response),
                });
            }
            // Nested txn responses carry an empty header in etcd; the top level one is
            // filled by the caller.
            Ok(TxnResponse {
                header: Some(ResponseHeader::default()),
                succeeded: path.succeeded,
                responses,
            })
        })
    }

    /// etcd's Txn: compares (and those of nested txns) against the state before the
    /// txn, then put checks, then range checks, then the ops in order.
    pub(crate) async fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse> {
        let path = self.path(t).await?;
        if !is_read_only(t) {
            self.check_requests(t, &path, &Check::Put)?;
        }
        self.check_requests(t, &path, &Check::Range)?;
        let mut resp = self.apply(t, &path).await?;
        resp.header = header(self.cur());
        Ok(resp)
    }
}
