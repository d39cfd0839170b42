//! The `requests` fuzz target's core (`pgetcd_engine::fuzzing`) on seeded random
//! inputs, so CI runs it without a nightly toolchain: valid requests of every kind,
//! encoded, then mutated (bytes flipped, truncated, a huge length or a wrong wire type
//! put in), and plain random bytes. The engine must answer each one.

#![allow(clippy::unwrap_used)]

use pgetcd_engine::fuzzing::Requests;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, compare, request_op,
};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn key(rng: &mut StdRng) -> Vec<u8> {
    let alphabet = [b"a".as_slice(), b"b", b"\0", b"\xff", b""];
    (0..rng.random_range(0..3))
        .flat_map(|_| alphabet[rng.random_range(0..alphabet.len())].to_vec())
        .collect()
}

fn range(rng: &mut StdRng) -> RangeRequest {
    RangeRequest {
        key: key(rng).into(),
        range_end: key(rng).into(),
        limit: rng.random_range(-2..4),
        revision: rng.random_range(-2..30),
        sort_order: rng.random_range(-1..4),
        sort_target: rng.random_range(-1..6),
        serializable: rng.random(),
        keys_only: rng.random(),
        count_only: rng.random(),
        min_mod_revision: rng.random_range(-1..10),
        max_mod_revision: rng.random_range(-1..10),
        min_create_revision: rng.random_range(-1..10),
        max_create_revision: rng.random_range(-1..10),
    }
}

fn put(rng: &mut StdRng) -> PutRequest {
    PutRequest {
        key: key(rng).into(),
        value: key(rng).into(),
        lease: rng.random_range(-1..2),
        prev_kv: rng.random(),
        ignore_value: rng.random_bool(0.1),
        ignore_lease: rng.random_bool(0.1),
    }
}

fn delete(rng: &mut StdRng) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key(rng).into(),
        range_end: key(rng).into(),
        prev_kv: rng.random(),
    }
}

fn op(rng: &mut StdRng, depth: u32) -> RequestOp {
    use request_op::Request;
    let request = match rng.random_range(0..if depth > 2 { 4 } else { 5 }) {
        0 => Some(Request::RequestRange(range(rng))),
        1 => Some(Request::RequestPut(put(rng))),
        2 => Some(Request::RequestDeleteRange(delete(rng))),
        3 => None,
        _ => Some(Request::RequestTxn(txn(rng, depth + 1))),
    };
    RequestOp { request }
}

fn txn(rng: &mut StdRng, depth: u32) -> TxnRequest {
    let compares = (0..rng.random_range(0..3))
        .map(|_| Compare {
            result: rng.random_range(-1..5),
            target: rng.random_range(-1..6),
            key: key(rng).into(),
            range_end: key(rng).into(),
            target_union: Some(match rng.random_range(0..5) {
                0 => compare::TargetUnion::Version(rng.random_range(-1..3)),
                1 => compare::TargetUnion::CreateRevision(rng.random_range(-1..5)),
                2 => compare::TargetUnion::ModRevision(rng.random_range(-1..5)),
                3 => compare::TargetUnion::Value(key(rng).into()),
                _ => compare::TargetUnion::Lease(rng.random_range(-1..2)),
            }),
        })
        .collect();
    TxnRequest {
        compare: compares,
        success: (0..rng.random_range(0..4))
            .map(|_| op(rng, depth))
            .collect(),
        failure: (0..rng.random_range(0..3))
            .map(|_| op(rng, depth))
            .collect(),
    }
}

/// A valid request of a random kind: (kind byte, encoded message).
fn valid(rng: &mut StdRng) -> (u8, Vec<u8>) {
    let kind = rng.random_range(0..5u8);
    let body = match kind {
        0 => range(rng).encode_to_vec(),
        1 => put(rng).encode_to_vec(),
        2 => delete(rng).encode_to_vec(),
        3 => txn(rng, 0).encode_to_vec(),
        _ => CompactionRequest {
            revision: rng.random_range(-1..20),
            physical: rng.random(),
        }
        .encode_to_vec(),
    };
    (kind, body)
}

fn mutate(rng: &mut StdRng, body: &mut Vec<u8>) {
    if body.is_empty() {
        return;
    }
    match rng.random_range(0..4) {
        0 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..body.len());
                body[i] = rng.random();
            }
        }
        1 => body.truncate(rng.random_range(0..body.len())),
        // A length varint of 2^31 in place of a byte.
        2 => {
            let i = rng.random_range(0..body.len());
            body.splice(i..=i, [0x80, 0x80, 0x80, 0x80, 0x08]);
        }
        // A field's tag with another wire type.
        _ => {
            let i = rng.random_range(0..body.len());
            body[i] = (body[i] & !7) | rng.random_range(0..8);
        }
    }
}

#[test]
fn seeded_requests_are_all_answered() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let mut target = Requests::new();
    let (mut decoded, mut total) = (0u32, 0u32);
    for round in 0..6_000u32 {
        let (kind, mut body) = valid(&mut rng);
        match round % 3 {
            0 => {}
            1 => mutate(&mut rng, &mut body),
            _ => body = (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
        }
        let mut input = vec![kind];
        input.extend(body);
        decoded += u32::from(target.run(&input));
        total += 1;
    }
    // Every valid request decodes; most mutated ones too.
    assert!(decoded > total / 3, "{decoded} of {total} decoded");
}
