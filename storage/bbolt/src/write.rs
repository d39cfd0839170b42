//! Writes bbolt files: top-level buckets of sorted entries, each a B+tree written leaf
//! by leaf as its entries come (memory holds one page and the first key of each page
//! of the level above), then the root bucket, an empty freelist and the two meta pages.
//!
//! Layout: pages 0 and 1 are the meta pages and page 2 the freelist, written last (the
//! output is seeked back to them); bucket pages follow from page 3. Leaves are filled
//! up to the page size; an entry larger than a page gets a page of its own with
//! overflow pages. Branch pages hold the first key of each child. Both metas name the
//! same root, so the file opens whichever bbolt picks.

use std::io::{self, Seek, SeekFrom, Write};

use crate::{BRANCH, BUCKET_FLAG, ELEMENT, LEAF, MAGIC, PAGE_HEADER, VERSION, fnv1a64};

const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
/// The first page id for bucket pages.
const FIRST_DATA_PAGE: u64 = 3;

/// Writes a bbolt file to `out`.
pub struct Writer<W: Write + Seek> {
    out: W,
    page_size: usize,
    next_page: u64,
    /// Top-level buckets written so far: name, root page.
    buckets: Vec<(Vec<u8>, u64)>,
}

/// One page being filled: its entries (key, value, leaf flags or child page).
struct Filling {
    entries: Vec<(Vec<u8>, Vec<u8>, u32)>,
    size: usize,
}

impl Filling {
    fn new() -> Filling {
        Filling {
            entries: Vec::new(),
            size: PAGE_HEADER,
        }
    }

    fn fits(&self, key: &[u8], value: &[u8], page_size: usize) -> bool {
        self.entries.is_empty() || self.size + ELEMENT + key.len() + value.len() <= page_size
    }

    /// Adds an entry taking `data` bytes of the page beside its element.
    fn push(&mut self, key: Vec<u8>, value: Vec<u8>, flags: u32, data: usize) {
        self.size += ELEMENT + data;
        self.entries.push((key, value, flags));
    }
}

impl<W: Write + Seek> Writer<W> {
    /// A writer with bbolt's page size `page_size` (etcd's is 4096).
    pub fn new(mut out: W, page_size: usize) -> io::Result<Writer<W>> {
        if !(512..=(1 << 20)).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page size {page_size}"),
            ));
        }
        // Placeholders for the metas and the freelist, written by `finish`.
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&vec![0; page_size * FIRST_DATA_PAGE as usize])?;
        Ok(Writer {
            out,
            page_size,
            next_page: FIRST_DATA_PAGE,
            buckets: Vec::new(),
        })
    }

    /// Writes the top-level bucket `name` with `entries`, which must come in strictly
    /// increasing key order (checked).
    pub fn bucket<I>(&mut self, name: &[u8], entries: I) -> io::Result<()>
    where
        I: IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    {
        if self
            .buckets
            .last()
            .is_some_and(|(last, _)| last.as_slice() >= name)
        {
            return Err(invalid("buckets must be written in increasing name order"));
        }
        let root = self.tree(entries.into_iter().map(|(k, v)| (k, v, 0)), LEAF)?;
        self.buckets.push((name.to_vec(), root));
        Ok(())
    }

    /// Writes the root bucket, the freelist and the metas (transaction id `txid`), and
    /// returns the output.
    pub fn finish(mut self, txid: u64) -> io::Result<W> {
        let buckets = std::mem::take(&mut self.buckets);
        let headers = buckets.into_iter().map(|(name, root)| {
            let mut header = Vec::with_capacity(16);
            header.extend_from_slice(&root.to_le_bytes());
            header.extend_from_slice(&0u64.to_le_bytes()); // sequence
            (name, header, BUCKET_FLAG)
        });
        let root = self.tree(headers, LEAF)?;
        let high_water = self.next_page;
        // The freelist: empty (every page up to the high water is in use).
        let mut freelist = vec![0u8; self.page_size];
        header(&mut freelist, 2, FREELIST, 0, 0);
        self.out.seek(SeekFrom::Start(2 * self.page_size as u64))?;
        self.out.write_all(&freelist)?;
        for id in [0u64, 1] {
            let mut page = vec![0u8; self.page_size];
            header(&mut page, id, META, 0, 0);
            let m = &mut page[PAGE_HEADER..PAGE_HEADER + 64];
            m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            m[4..8].copy_from_slice(&VERSION.to_le_bytes());
            m[8..12].copy_from_slice(&(self.page_size as u32).to_le_bytes());
            m[16..24].copy_from_slice(&root.to_le_bytes());
            m[32..40].copy_from_slice(&2u64.to_le_bytes());
            m[40..48].copy_from_slice(&high_water.to_le_bytes());
            // bbolt picks the meta with the higher txid; both describe this file.
            let tx = if id == 0 {
                txid.saturating_sub(1)
            } else {
                txid
            };
            m[48..56].copy_from_slice(&tx.to_le_bytes());
            let sum = fnv1a64(&m[..56]);
            m[56..64].copy_from_slice(&sum.to_le_bytes());
            self.out.seek(SeekFrom::Start(id * self.page_size as u64))?;
            self.out.write_all(&page)?;
        }
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Writes a B+tree of `entries` (leaf level first, then branch levels); returns
    /// the root page.
    fn tree<I>(&mut self, entries: I, flags: u16) -> io::Result<u64>
    where
        I: Iterator<Item = (Vec<u8>, Vec<u8>, u32)>,
    {
        // (first key, page) of every page of the level being written.
        let mut level: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut page = Filling::new();
        let mut last: Option<Vec<u8>> = None;
        for (key, value, leaf_flags) in entries {
            if last.as_ref().is_some_and(|l| *l >= key) {
                return Err(invalid("keys must come in strictly increasing order"));
            }
            last = Some(key.clone());
            if !page.fits(&key, &value, self.page_size) {
                let full = std::mem::replace(&mut page, Filling::new());
                level.push(self.write_page(full, flags)?);
            }
            let data = key.len() + value.len();
            page.push(key, value, leaf_flags, data);
        }
        if !page.entries.is_empty() || level.is_empty() {
            level.push(self.write_page(page, flags)?);
        }
        while level.len() > 1 {
            let mut above = Vec::new();
            let mut page = Filling::new();
            for (key, child) in level {
                let value = child.to_le_bytes().to_vec();
                // A branch element stores its page id in the element, not as data.
                if !page.fits(&key, &[], self.page_size) {
                    let full = std::mem::replace(&mut page, Filling::new());
                    above.push(self.write_page(full, BRANCH)?);
                }
                let data = key.len();
                page.push(key, value, 0, data);
            }
            above.push(self.write_page(page, BRANCH)?);
            level = above;
        }
        Ok(level[0].1)
    }

    /// Writes one page (with overflow pages when it needs them); its first key and id.
    fn write_page(&mut self, page: Filling, flags: u16) -> io::Result<(Vec<u8>, u64)> {
        let id = self.next_page;
        let data: usize = page
            .entries
            .iter()
            .map(|(k, v, _)| k.len() + if flags == BRANCH { 0 } else { v.len() })
            .sum();
        let len = PAGE_HEADER + page.entries.len() * ELEMENT + data;
        let pages = len.div_ceil(self.page_size).max(1);
        let mut buf = vec![0u8; pages * self.page_size];
        let count = u16::try_from(page.entries.len()).map_err(|_| invalid("too many entries"))?;
        header(&mut buf, id, flags, count, (pages - 1) as u32);
        let mut at = PAGE_HEADER + page.entries.len() * ELEMENT;
        for (i, (key, value, leaf_flags)) in page.entries.iter().enumerate() {
            let e = PAGE_HEADER + i * ELEMENT;
            let pos = (at - e) as u32;
            if flags == BRANCH {
                buf[e..e + 4].copy_from_slice(&pos.to_le_bytes());
                buf[e + 4..e + 8].copy_from_slice(&(key.len() as u32).to_le_bytes());
                buf[e + 8..e + 16].copy_from_slice(value);
                buf[at..at + key.len()].copy_from_slice(key);
                at += key.len();
            } else {
                buf[e..e + 4].copy_from_slice(&leaf_flags.to_le_bytes());
                buf[e + 4..e + 8].copy_from_slice(&pos.to_le_bytes());
                buf[e + 8..e + 12].copy_from_slice(&(key.len() as u32).to_le_bytes());
                buf[e + 12..e + 16].copy_from_slice(&(value.len() as u32).to_le_bytes());
                buf[at..at + key.len()].copy_from_slice(key);
                at += key.len();
                buf[at..at + value.len()].copy_from_slice(value);
                at += value.len();
            }
        }
        self.out.seek(SeekFrom::Start(id * self.page_size as u64))?;
        self.out.write_all(&buf)?;
        self.next_page += pages as u64;
        let first = page
            .entries
            .into_iter()
            .next()
            .map(|(k, _, _)| k)
            .unwrap_or_default();
        Ok((first, id))
    }
}

fn header(buf: &mut [u8], id: u64, flags: u16, count: u16, overflow: u32) {
    buf[0..8].copy_from_slice(&id.to_le_bytes());
    buf[8..10].copy_from_slice(&flags.to_le_bytes());
    buf[10..12].copy_from_slice(&count.to_le_bytes());
    buf[12..16].copy_from_slice(&overflow.to_le_bytes());
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}
