//! Reads and writes bbolt database files: etcd's backend, and so the body of an etcd
//! snapshot ([`Writer`] writes them; see `write.rs`).
//!
//! The format (bbolt's, version 2), as far as reading needs it:
//! - The file is a run of pages of the size the meta page gives (4096 for etcd). Every
//!   page starts with a 16-byte header: id (u64), flags (u16: branch 0x01, leaf 0x02,
//!   meta 0x04, freelist 0x10), count (u16: elements), overflow (u32: further pages the
//!   page spans). Integers are little-endian.
//! - Pages 0 and 1 are meta pages: magic `0xED0CDAED`, version 2, page size, flags, the
//!   root bucket (root page id, sequence), freelist page id, high-water page id, txid,
//!   and an FNV-1a 64 checksum of the 56 bytes before it. The valid one with the higher
//!   txid is current.
//! - A bucket is a B+tree. Branch elements (16 bytes: pos u32, ksize u32, page id u64)
//!   point at children; leaf elements (16 bytes: flags u32, pos u32, ksize u32, vsize
//!   u32) hold a key and a value, `pos` counting from the element itself. A leaf
//!   element with flag 0x01 holds a nested bucket: its value is a bucket header (root
//!   page id, sequence) and, when the root is 0, the bucket's one leaf page inline.
//!
//! Everything is read from a byte slice (a whole file, or a memory map of one) and
//! checked: a truncated or corrupt file is an [`Error`], never a panic.

use std::fmt;

mod write;

pub use write::Writer;

/// bbolt's magic number.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The file format version read here.
pub const VERSION: u32 = 2;

const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const META_SIZE: usize = 64;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const BUCKET_FLAG: u32 = 0x01;
const BUCKET_HEADER: usize = 16;
/// Deeper trees than this are taken for a cycle (bbolt's are a handful of levels).
const MAX_DEPTH: usize = 64;

/// Why a file cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Neither meta page is a valid bbolt meta page.
    #[error("not a bbolt file: {0}")]
    NotBbolt(String),
    /// A page lies (partly) beyond the end of the file.
    #[error("truncated: page {page} ends past the file's {len} bytes")]
    Truncated {
        /// The page.
        page: u64,
        /// The file's length.
        len: usize,
    },
    /// The structure is inconsistent.
    #[error("corrupt bbolt file: {0}")]
    Corrupt(String),
}

/// The current meta page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Page size of the file.
    pub page_size: u32,
    /// Root page of the root bucket (whose keys are the top-level buckets).
    pub root: u64,
    /// Freelist page.
    pub freelist: u64,
    /// First page id past the file's used pages.
    pub high_water: u64,
    /// Transaction id of the last commit.
    pub txid: u64,
}

/// An open file.
#[derive(Clone, Copy)]
pub struct Db<'a> {
    data: &'a [u8],
    meta: Meta,
}

impl fmt::Debug for Db<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("meta", &self.meta).finish()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// FNV-1a, 64 bits (bbolt's meta checksum).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Reads and checks the meta at `offset` (a meta page's start).
fn meta_at(data: &[u8], offset: usize) -> Result<Meta, String> {
    let m = data
        .get(offset + PAGE_HEADER..offset + PAGE_HEADER + META_SIZE)
        .ok_or("file shorter than its meta pages")?;
    let magic = u32_at(m, 0).ok_or("short meta")?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#x}"));
    }
    let version = u32_at(m, 4).ok_or("short meta")?;
    if version != VERSION {
        return Err(format!("format version {version}, not {VERSION}"));
    }
    let stored = u64_at(m, 56).ok_or("short meta")?;
    if fnv1a64(&m[..56]) != stored {
        return Err("meta checksum mismatch".into());
    }
    let page_size = u32_at(m, 8).ok_or("short meta")?;
    if !(512..=(1 << 20)).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(format!("page size {page_size}"));
    }
    Ok(Meta {
        page_size,
        root: u64_at(m, 16).ok_or("short meta")?,
        freelist: u64_at(m, 32).ok_or("short meta")?,
        high_water: u64_at(m, 40).ok_or("short meta")?,
        txid: u64_at(m, 48).ok_or("short meta")?,
    })
}

impl<'a> Db<'a> {
    /// Opens the bbolt file held in `data`: picks the current meta page.
    pub fn open(data: &'a [u8]) -> Result<Db<'a>, Error> {
        let first = meta_at(data, 0);
        // The second meta page sits one page in; its size comes from the first, or,
        // when the first is damaged, from the usual sizes.
        let sizes: Vec<usize> = match &first {
            Ok(m) => vec![m.page_size as usize],
            Err(_) => vec![4096, 8192, 16384, 65536, 1024, 2048],
        };
        let second = sizes
            .iter()
            .map(|&s| meta_at(data, s))
            .find(|m| m.is_ok())
            .unwrap_or_else(|| meta_at(data, sizes[0]));
        let meta = match (first, second) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid && b.page_size == a.page_size {
                    b
                } else {
                    a
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(a), Err(b)) => return Err(Error::NotBbolt(format!("meta 0: {a}; meta 1: {b}"))),
        };
        // Every page the meta counts must be in the file.
        let needed = usize::try_from(meta.high_water)
            .ok()
            .and_then(|p| p.checked_mul(meta.page_size as usize));
        if needed.is_none_or(|n| n > data.len()) {
            return Err(Error::Truncated {
                page: meta.high_water.saturating_sub(1),
                len: data.len(),
            });
        }
        Ok(Db { data, meta })
    }

    /// The current meta page.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// The root bucket: its entries are the top-level buckets.
    pub fn root(&self) -> Bucket<'a> {
        Bucket {
            db: *self,
            root: Root::Page(self.meta.root),
        }
    }

    /// The top-level bucket `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'a>>, Error> {
        match self.root().get(name)? {
            Some(Value::Bucket(b)) => Ok(Some(b)),
            _ => Ok(None),
        }
    }

    /// Names of the top-level buckets, in key order.
    pub fn bucket_names(&self) -> Result<Vec<Vec<u8>>, Error> {
        let mut names = Vec::new();
        self.root().for_each(&mut |k, v| {
            if matches!(v, Value::Bucket(_)) {
                names.push(k.to_vec());
            }
            Ok(())
        })?;
        Ok(names)
    }

    /// The bytes of page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<Page<'a>, Error> {
        let size = self.meta.page_size as usize;
        let truncated = || Error::Truncated {
            page: id,
            len: self.data.len(),
        };
        let start = usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_mul(size))
            .ok_or_else(truncated)?;
        let head = self
            .data
            .get(start..start + PAGE_HEADER)
            .ok_or_else(truncated)?;
        let stored_id = u64_at(head, 0).unwrap_or(u64::MAX);
        if stored_id != id {
            return Err(Error::Corrupt(format!(
                "page {id} says it is page {stored_id}"
            )));
        }
        let overflow = u32_at(head, 12).unwrap_or(0) as usize;
        let len = (overflow + 1).checked_mul(size).ok_or_else(truncated)?;
        let bytes = self
            .data
            .get(start..start.checked_add(len).ok_or_else(truncated)?)
            .ok_or_else(truncated)?;
        Page::parse(bytes).map_err(|e| Error::Corrupt(format!("page {id}: {e}")))
    }
}

/// A page's header fields and bytes (header included).
#[derive(Clone, Copy)]
struct Page<'a> {
    flags: u16,
    count: usize,
    bytes: &'a [u8],
}

impl<'a> Page<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Page<'a>, String> {
        let flags = u16_at(bytes, 8).ok_or("short page header")?;
        let count = u16_at(bytes, 10).ok_or("short page header")? as usize;
        if PAGE_HEADER + count * ELEMENT > bytes.len() {
            return Err(format!("{count} elements do not fit"));
        }
        Ok(Page {
            flags,
            count,
            bytes,
        })
    }

    /// The `i`th element's key (and, for leaves, value), bounds-checked.
    fn slice(&self, elem: usize, pos: u32, len: usize) -> Result<&'a [u8], String> {
        let at = elem
            .checked_add(pos as usize)
            .ok_or("element position overflows")?;
        self.bytes
            .get(at..at.checked_add(len).ok_or("element length overflows")?)
            .ok_or_else(|| format!("element data at {at}+{len} outside the page"))
    }

    fn branch(&self, i: usize) -> Result<(&'a [u8], u64), String> {
        let e = PAGE_HEADER + i * ELEMENT;
        let pos = u32_at(self.bytes, e).ok_or("short element")?;
        let ksize = u32_at(self.bytes, e + 4).ok_or("short element")? as usize;
        let child = u64_at(self.bytes, e + 8).ok_or("short element")?;
        Ok((self.slice(e, pos, ksize)?, child))
    }

    fn leaf(&self, i: usize) -> Result<(u32, &'a [u8], &'a [u8]), String> {
        let e = PAGE_HEADER + i * ELEMENT;
        let flags = u32_at(self.bytes, e).ok_or("short element")?;
        let pos = u32_at(self.bytes, e + 4).ok_or("short element")?;
        let ksize = u32_at(self.bytes, e + 8).ok_or("short element")? as usize;
        let vsize = u32_at(self.bytes, e + 12).ok_or("short element")? as usize;
        let both = self.slice(e, pos, ksize + vsize)?;
        Ok((flags, &both[..ksize], &both[ksize..]))
    }
}

/// Where a bucket's tree starts.
#[derive(Clone, Copy)]
enum Root<'a> {
    Page(u64),
    /// An inline bucket: its one leaf page, inside the parent's value.
    Inline(&'a [u8]),
}

/// A bucket of an open file.
#[derive(Clone, Copy)]
pub struct Bucket<'a> {
    db: Db<'a>,
    root: Root<'a>,
}

impl fmt::Debug for Bucket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.root {
            Root::Page(p) => write!(f, "Bucket(page {p})"),
            Root::Inline(_) => write!(f, "Bucket(inline)"),
        }
    }
}

/// A bucket entry's value.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// Plain bytes.
    Data(&'a [u8]),
    /// A nested bucket.
    Bucket(Bucket<'a>),
}

impl<'a> Bucket<'a> {
    /// Calls `f` with every entry, in key order; stops at the first error `f` returns.
    pub fn for_each(
        &self,
        f: &mut dyn FnMut(&'a [u8], Value<'a>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        match self.root {
            Root::Page(id) => self.walk(id, 0, f),
            Root::Inline(bytes) => {
                let page = Page::parse(bytes)
                    .map_err(|e| Error::Corrupt(format!("inline bucket: {e}")))?;
                if page.flags & LEAF == 0 {
                    return Err(Error::Corrupt("inline bucket page is not a leaf".into()));
                }
                self.leaf_entries(&page, f)
            }
        }
    }

    /// Entries in the bucket (nested buckets included).
    pub fn len(&self) -> Result<usize, Error> {
        let mut n = 0;
        self.for_each(&mut |_, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// Whether the bucket has no entries.
    pub fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len()? == 0)
    }

    /// The value of `key` (a scan of the bucket: for small buckets and tests).
    pub fn get(&self, key: &[u8]) -> Result<Option<Value<'a>>, Error> {
        let mut found = None;
        self.for_each(&mut |k, v| {
            if k == key {
                found = Some(v);
            }
            Ok(())
        })?;
        Ok(found)
    }

    fn walk(
        &self,
        id: u64,
        depth: usize,
        f: &mut dyn FnMut(&'a [u8], Value<'a>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::Corrupt(format!(
                "tree deeper than {MAX_DEPTH} at page {id}"
            )));
        }
        if id < 2 || id >= self.db.meta.high_water {
            return Err(Error::Corrupt(format!(
                "page {id} outside the data pages (2..{})",
                self.db.meta.high_water
            )));
        }
        let page = self.db.page(id)?;
        let corrupt = |e: String| Error::Corrupt(format!("page {id}: {e}"));
        if page.flags & BRANCH != 0 {
            for i in 0..page.count {
                let (_, child) = page.branch(i).map_err(corrupt)?;
                self.walk(child, depth + 1, f)?;
            }
            Ok(())
        } else if page.flags & LEAF != 0 {
            self.leaf_entries(&page, f)
        } else {
            Err(corrupt(format!(
                "flags {:#x}: not a branch or leaf",
                page.flags
            )))
        }
    }

    fn leaf_entries(
        &self,
        page: &Page<'a>,
        f: &mut dyn FnMut(&'a [u8], Value<'a>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for i in 0..page.count {
            let (flags, key, value) = page.leaf(i).map_err(Error::Corrupt)?;
            let value = if flags & BUCKET_FLAG != 0 {
                Value::Bucket(self.nested(value)?)
            } else {
                Value::Data(value)
            };
            f(key, value)?;
        }
        Ok(())
    }

    fn nested(&self, value: &'a [u8]) -> Result<Bucket<'a>, Error> {
        let root = u64_at(value, 0)
            .ok_or_else(|| Error::Corrupt("nested bucket header too short".into()))?;
        let root = if root == 0 {
            Root::Inline(
                value
                    .get(BUCKET_HEADER..)
                    .ok_or_else(|| Error::Corrupt("inline bucket without a page".into()))?,
            )
        } else {
            Root::Page(root)
        };
        Ok(Bucket { db: self.db, root })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for data in [&b""[..], &[0u8; 100][..], &[0xffu8; 9000][..]] {
            assert!(matches!(Db::open(data), Err(Error::NotBbolt(_))));
        }
    }
}
