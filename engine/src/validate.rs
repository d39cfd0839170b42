//! Request checks done before a request reaches the writer, in etcd's order: the same
//! requests are rejected with the same error as etcd's gRPC layer would.

use std::collections::HashSet;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, range_request,
    request_op::Request,
};

use crate::error::{Error, Result};

/// Checks a Range: key present, sort order and target inside their enums.
pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err()
        || range_request::SortTarget::try_from(r.sort_target).is_err()
    {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

/// Checks a Put: key present, `ignore_value` without value, `ignore_lease` without lease.
pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// Checks a DeleteRange: key present.
pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// Checks a Txn: op counts against `max_txn_ops` (nested txns get what is left), keys
/// present, every op valid, then no key written twice on one path.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<()> {
    check_txn_ops(r, max_txn_ops as i64)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: i64) -> Result<()> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if opc > max_txn_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        check_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_txn_ops: i64) -> Result<()> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(r)) => check_txn_ops(r, max_txn_ops),
        // etcd answers an empty op with "key not found".
        None => Err(Error::KeyNotFound),
    }
}

/// A deleted interval `[begin, end)` in etcd's "affine" string order, where an empty
/// end means +infinity. A point delete of `k` is `[k, k+"\0")`.
#[derive(Debug, Clone)]
struct Interval {
    begin: Bytes,
    end: Bytes,
}

/// Compares like etcd's StringAffineComparable: the empty string is +infinity.
fn affine_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Equal,
        (true, false) => Greater,
        (false, true) => Less,
        (false, false) => a.cmp(b),
    }
}

fn point_end(k: &[u8]) -> Vec<u8> {
    let mut e = k.to_vec();
    e.push(0);
    e
}

fn intersects_point(dels: &[Interval], key: &[u8]) -> bool {
    let pe = point_end(key);
    dels.iter().any(|d| {
        affine_cmp(&d.begin, &pe) == std::cmp::Ordering::Less
            && affine_cmp(key, &d.end) == std::cmp::Ordering::Less
    })
}

/// Rejects two puts of one key, or a put inside a deleted range, on one branch level
/// including nested txns (then/else of one nested txn may both write a key).
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Bytes>, Vec<Interval>)> {
    let mut dels: Vec<Interval> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Interval {
                begin: d.key.clone(),
                end: if d.range_end.is_empty() {
                    Bytes::from(point_end(&d.key))
                } else {
                    d.range_end.clone()
                },
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Bytes> = HashSet::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || intersects_point(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(Error::DuplicateKey);
            }
            if intersects_point(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || intersects_point(&dels, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgetcd_proto::etcdserverpb::Compare;

    fn put(k: &'static str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from_static(k.as_bytes()),
                ..Default::default()
            })),
        }
    }

    fn del(k: &'static str, end: &'static [u8]) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::from_static(k.as_bytes()),
                range_end: Bytes::from_static(end),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(t)),
        }
    }

    fn is_dup(r: Result<()>) -> bool {
        matches!(r, Err(Error::DuplicateKey))
    }

    #[test]
    fn duplicate_puts_and_puts_in_deleted_ranges() {
        assert!(is_dup(check_txn(
            &txn(vec![put("a"), put("a")], vec![]),
            128
        )));
        assert!(is_dup(check_txn(
            &txn(vec![put("b"), del("a", b"c")], vec![]),
            128
        )));
        assert!(is_dup(check_txn(
            &txn(vec![del("b", b""), put("b")], vec![]),
            128
        )));
        assert!(check_txn(&txn(vec![put("a")], vec![put("a")]), 128).is_ok());
        assert!(check_txn(&txn(vec![put("c"), del("a", b"c")], vec![]), 128).is_ok());
        // "\0" as range end is a literal string in etcd's interval check.
        assert!(check_txn(&txn(vec![put("b"), del("a", b"\0")], vec![]), 128).is_ok());
        // then/else of one nested txn may both put a key, but not with the outer level.
        let inner = nested(txn(vec![put("x")], vec![put("x")]));
        assert!(check_txn(&txn(vec![inner.clone()], vec![]), 128).is_ok());
        assert!(is_dup(check_txn(&txn(vec![inner, put("x")], vec![]), 128)));
        let inner_del = nested(txn(vec![del("a", b"z")], vec![]));
        assert!(is_dup(check_txn(
            &txn(vec![inner_del, put("m")], vec![]),
            128
        )));
    }

    #[test]
    fn op_limits_and_empty_keys() {
        let many: Vec<RequestOp> = (0..129).map(|_| put("k")).collect();
        assert!(matches!(
            check_txn(&txn(many, vec![]), 128),
            Err(Error::TooManyOps)
        ));
        let bad_compare = TxnRequest {
            compare: vec![Compare::default()],
            ..Default::default()
        };
        assert!(matches!(check_txn(&bad_compare, 128), Err(Error::EmptyKey)));
        let empty_op = txn(vec![RequestOp { request: None }], vec![]);
        assert!(matches!(check_txn(&empty_op, 128), Err(Error::KeyNotFound)));
        let bad_sort = RangeRequest {
            key: Bytes::from_static(b"a"),
            sort_order: 7,
            ..Default::default()
        };
        assert!(matches!(
            check_range(&bad_sort),
            Err(Error::InvalidSortOption)
        ));
    }
}
