//! The core of the `pgoutput` fuzz target (`fuzz/fuzz_targets/pgoutput.rs`), here so
//! that ordinary tests run it too (seeded random inputs, no nightly toolchain).
//!
//! Input: a sequence of messages, each `[u16 big-endian length][bytes]` (a length past
//! the end takes the rest), decoded in order by one [`Decoder`] for schema `ks`, so
//! Relation messages defined early shape how later Inserts are read. Whatever the
//! bytes, decoding must return (a row, nothing, or an error), never panic, and a
//! decoded row's key and value must lie within the message.

use crate::Decoder;

/// Decodes every message of `data`; returns how many gave a history row.
pub fn decode_messages(data: &[u8]) -> usize {
    let mut decoder = Decoder::default();
    let mut rest = data;
    let mut rows = 0;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let (msg, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        if let Ok(Some(row)) = decoder.decode(msg, "ks") {
            assert!(row.key.len() <= msg.len() && row.value.len() <= msg.len());
            rows += 1;
        }
    }
    rows
}

/// Frames `messages` as [`decode_messages`] reads them.
pub fn frame(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let len = u16::try_from(m.len()).unwrap_or(u16::MAX);
        out.extend(len.to_be_bytes());
        out.extend(&m[..usize::from(len)]);
    }
    out
}

/// A Relation message for `schema.name` with `columns` (as pgoutput sends it).
pub fn relation(id: u32, schema: &str, name: &str, columns: &[&str]) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend(id.to_be_bytes());
    m.extend(schema.as_bytes());
    m.push(0);
    m.extend(name.as_bytes());
    m.push(0);
    m.push(b'd');
    m.extend((columns.len() as i16).to_be_bytes());
    for c in columns {
        m.push(0);
        m.extend(c.as_bytes());
        m.push(0);
        m.extend(20u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
    }
    m
}

/// The columns of pgetcd's history table, in order.
pub const HISTORY_COLUMNS: [&str; 8] = [
    "revision",
    "sub",
    "key",
    "kind",
    "create_revision",
    "version",
    "lease",
    "value",
];

/// An Insert into relation `id` of a history row; `text` sends values in text form.
pub fn insert(id: u32, revision: i64, key: &[u8], value: &[u8], text: bool) -> Vec<u8> {
    let mut m = vec![b'I'];
    m.extend(id.to_be_bytes());
    m.push(b'N');
    m.extend(8i16.to_be_bytes());
    let mut col = |kind: u8, data: &[u8]| {
        m.push(kind);
        m.extend((data.len() as i32).to_be_bytes());
        m.extend(data);
    };
    if text {
        let hex = |b: &[u8]| {
            let mut s = b"\\x".to_vec();
            for x in b {
                s.extend(format!("{x:02x}").as_bytes());
            }
            s
        };
        col(b't', revision.to_string().as_bytes());
        col(b't', b"0");
        col(b't', &hex(key));
        col(b't', b"0");
        col(b't', revision.to_string().as_bytes());
        col(b't', b"1");
        col(b't', b"0");
        col(b't', &hex(value));
    } else {
        col(b'b', &revision.to_be_bytes());
        col(b'b', &0i32.to_be_bytes());
        col(b'b', key);
        col(b'b', &0i16.to_be_bytes());
        col(b'b', &revision.to_be_bytes());
        col(b'b', &1i64.to_be_bytes());
        col(b'b', &0i64.to_be_bytes());
        col(b'b', value);
    }
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Valid streams decode every insert.
    #[test]
    fn valid_streams_decode() {
        let msgs = vec![
            relation(1, "ks", "history", &HISTORY_COLUMNS),
            insert(1, 2, b"a", b"v", false),
            insert(1, 3, b"b", b"", true),
            relation(2, "other", "history", &HISTORY_COLUMNS),
            insert(2, 4, b"c", b"v", false),
        ];
        assert_eq!(decode_messages(&frame(&msgs)), 2);
    }

    /// The fuzz target's core on mutated valid streams and random bytes: 20,000
    /// inputs from a fixed seed (the cargo-fuzz target explores further).
    #[test]
    fn mutated_streams_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0001);
        for round in 0..20_000u32 {
            let mut msgs = vec![relation(
                rng.random_range(0..3),
                "ks",
                "history",
                &HISTORY_COLUMNS[..rng.random_range(0..=8)],
            )];
            for _ in 0..rng.random_range(0..4) {
                let key: Vec<u8> = (0..rng.random_range(0..8)).map(|_| rng.random()).collect();
                msgs.push(insert(
                    rng.random_range(0..3),
                    rng.random(),
                    &key,
                    b"value",
                    rng.random(),
                ));
            }
            let mut data = frame(&msgs);
            match round % 4 {
                // Flip bytes.
                0 => {
                    for _ in 0..rng.random_range(1..6) {
                        let i = rng.random_range(0..data.len());
                        data[i] = rng.random();
                    }
                }
                // Truncate.
                1 => data.truncate(rng.random_range(0..data.len())),
                // Huge lengths in place of a length field.
                2 => {
                    let i = rng.random_range(0..data.len().saturating_sub(4).max(1));
                    let v: i32 = *[i32::MAX, i32::MIN, -1, 0x7fff_0000]
                        .get(rng.random_range(0..4))
                        .unwrap();
                    for (j, b) in v.to_be_bytes().iter().enumerate() {
                        if let Some(x) = data.get_mut(i + j) {
                            *x = *b;
                        }
                    }
                }
                // Random bytes.
                _ => {
                    data = (0..rng.random_range(0..200))
                        .map(|_| rng.random())
                        .collect()
                }
            }
            decode_messages(&data);
        }
    }
}
