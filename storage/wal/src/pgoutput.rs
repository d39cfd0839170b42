//! A decoder for the parts of PostgreSQL's `pgoutput` logical replication protocol
//! (version 1) that carry pgetcd's `history` rows: Relation and Insert. Other messages
//! (Type, Origin, Update, Delete, Truncate) are recognised and ignored: history rows are
//! only ever inserted, and partition drops must not produce events.
//!
//! Values may arrive in binary (`binary 'true'`) or text form; both are decoded.

use std::collections::HashMap;

use bytes::Bytes;

use crate::{HistoryRow, WalError};

/// Column layout of one relation, from its Relation message.
#[derive(Debug, Clone)]
struct Relation {
    namespace: String,
    name: String,
    columns: Vec<String>,
}

/// Decodes pgoutput messages, remembering relations.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, Relation>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short() -> WalError {
    WalError::Protocol("pgoutput message ends early".into())
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WalError> {
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let s = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WalError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, WalError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WalError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, WalError> {
        Ok(self.u32()? as i32)
    }
    fn cstr(&mut self) -> Result<String, WalError> {
        let rest = &self.buf[self.pos.min(self.buf.len())..];
        let n = rest.iter().position(|&b| b == 0).ok_or_else(short)?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
}

/// One column value of a tuple.
enum Value<'a> {
    Null,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

fn int(v: &Value<'_>, col: &str) -> Result<i64, WalError> {
    let bad = || WalError::Protocol(format!("history column {col} has an unexpected value"));
    match v {
        Value::Binary(b) => match b.len() {
            8 => Ok(i64::from_be_bytes(b[..8].try_into().map_err(|_| bad())?)),
            4 => Ok(i64::from(i32::from_be_bytes(
                b[..4].try_into().map_err(|_| bad())?,
            ))),
            2 => Ok(i64::from(i16::from_be_bytes(
                b[..2].try_into().map_err(|_| bad())?,
            ))),
            _ => Err(bad()),
        },
        Value::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad),
        Value::Null => Err(bad()),
    }
}

fn bytea(v: &Value<'_>, col: &str) -> Result<Bytes, WalError> {
    let bad = || WalError::Protocol(format!("history column {col} has an unexpected value"));
    match v {
        Value::Binary(b) => Ok(Bytes::copy_from_slice(b)),
        Value::Text(t) => {
            let hex = t.strip_prefix(b"\\x").ok_or_else(bad)?;
            if hex.len() % 2 != 0 {
                return Err(bad());
            }
            let nib = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(bad()),
            };
            hex.chunks(2)
                .map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?))
                .collect::<Result<Vec<u8>, WalError>>()
                .map(Bytes::from)
        }
        Value::Null => Err(bad()),
    }
}

impl Decoder {
    /// Decodes one message; returns the history row it inserts, if any. Only rows of
    /// relation `schema.history` count.
    pub fn decode(&mut self, msg: &[u8], schema: &str) -> Result<Option<HistoryRow>, WalError> {
        let mut r = Reader { buf: msg, pos: 0 };
        match r.u8()? {
            b'R' => {
                let id = r.u32()?;
                let namespace = r.cstr()?;
                let name = r.cstr()?;
                let _identity = r.u8()?;
                let n = r.i16()?;
                let mut columns = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n {
                    let _flags = r.u8()?;
                    columns.push(r.cstr()?);
                    let _type = r.u32()?;
                    let _typmod = r.i32()?;
                }
                self.relations.insert(
                    id,
                    Relation {
                        namespace,
                        name,
                        columns,
                    },
                );
                Ok(None)
            }
            b'I' => {
                let id = r.u32()?;
                if r.u8()? != b'N' {
                    return Err(WalError::Protocol("insert without new tuple".into()));
                }
                let rel = self.relations.get(&id).ok_or_else(|| {
                    WalError::Protocol(format!("insert into unknown relation {id}"))
                })?;
                if rel.namespace != schema || rel.name != "history" {
                    return Ok(None);
                }
                let n = r.i16()?;
                let mut row = HistoryRow::default();
                for i in 0..n.max(0) as usize {
                    let value = match r.u8()? {
                        b'n' => Value::Null,
                        b'u' => Value::Null,
                        b't' => {
                            let len = r.i32()?;
                            Value::Text(r.take(len.max(0) as usize)?)
                        }
                        b'b' => {
                            let len = r.i32()?;
                            Value::Binary(r.take(len.max(0) as usize)?)
                        }
                        k => return Err(WalError::Protocol(format!("unknown tuple kind {k}"))),
                    };
                    let col = rel.columns.get(i).map(String::as_str).unwrap_or("");
                    match col {
                        "revision" => row.revision = int(&value, col)?,
                        "sub" => row.sub = int(&value, col)? as u32,
                        "key" => row.key = bytea(&value, col)?,
                        "kind" => row.kind = int(&value, col)? as i16,
                        "create_revision" => row.create_revision = int(&value, col)?,
                        "version" => row.version = int(&value, col)?,
                        "lease" => row.lease = int(&value, col)?,
                        "value" => row.value = bytea(&value, col)?,
                        _ => {}
                    }
                }
                Ok(Some(row))
            }
            // Type, Origin, Update, Delete, Truncate, logical messages: no events.
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn relation(id: u32, ns: &str, name: &str, cols: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        m.extend(ns.as_bytes());
        m.push(0);
        m.extend(name.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((cols.len() as i16).to_be_bytes());
        for c in cols {
            m.push(0);
            m.extend(c.as_bytes());
            m.push(0);
            m.extend(20u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn col(m: &mut Vec<u8>, kind: u8, data: &[u8]) {
        m.push(kind);
        m.extend((data.len() as i32).to_be_bytes());
        m.extend(data);
    }

    const COLS: [&str; 8] = [
        "revision",
        "sub",
        "key",
        "kind",
        "create_revision",
        "version",
        "lease",
        "value",
    ];

    #[test]
    fn decodes_binary_and_text_inserts_of_history_only() {
        let mut d = Decoder::default();
        assert!(
            d.decode(&relation(7, "ks", "history", &COLS), "ks")
                .unwrap()
                .is_none()
        );
        assert!(
            d.decode(&relation(8, "ks", "kv", &["key"]), "ks")
                .unwrap()
                .is_none()
        );
        let mut ins = vec![b'I'];
        ins.extend(7u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(8i16.to_be_bytes());
        col(&mut ins, b'b', &42i64.to_be_bytes());
        col(&mut ins, b'b', &3i32.to_be_bytes());
        col(&mut ins, b'b', b"a/key");
        col(&mut ins, b'b', &0i16.to_be_bytes());
        col(&mut ins, b'b', &40i64.to_be_bytes());
        col(&mut ins, b'b', &2i64.to_be_bytes());
        col(&mut ins, b't', b"0");
        col(&mut ins, b't', b"\\x00ff41");
        let row = d.decode(&ins, "ks").unwrap().unwrap();
        assert_eq!(
            row,
            HistoryRow {
                revision: 42,
                sub: 3,
                key: Bytes::from_static(b"a/key"),
                kind: 0,
                create_revision: 40,
                version: 2,
                lease: 0,
                value: Bytes::from_static(&[0, 0xff, 0x41]),
            }
        );
        // Inserts into other relations, and other message kinds, are not history rows.
        let mut other = vec![b'I'];
        other.extend(8u32.to_be_bytes());
        other.push(b'N');
        other.extend(1i16.to_be_bytes());
        col(&mut other, b't', b"\\x00");
        assert!(d.decode(&other, "ks").unwrap().is_none());
        assert!(
            d.decode(b"T\0\0\0\x01\0\0\0\0\x07", "ks")
                .unwrap()
                .is_none()
        );
        // Truncated input is an error, not a panic.
        assert!(d.decode(&ins[..ins.len() - 3], "ks").is_err());
    }
}
