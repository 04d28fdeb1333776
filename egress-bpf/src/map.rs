//! Maps: creation, element operations on a map's descriptor, and batched
//! walks and deletes of hash maps.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::sys::{Attr, Cmd, Error, Result, command, sys_bpf, sys_bpf_fd};

/// The `enum bpf_map_type` values (linux/bpf.h) this workspace creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapType {
    Hash = 1,
    ProgArray = 3,
    LruHash = 9,
}

/// A new map (`BPF_MAP_CREATE`) without flags or name.
pub fn map_create(
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.put_u32(0, map_type as u32)
        .put_u32(4, key_size)
        .put_u32(8, value_size)
        .put_u32(12, max_entries);
    sys_bpf_fd(Cmd::MapCreate, &mut a).map_err(|source| Error::Command {
        cmd: Cmd::MapCreate,
        source,
    })
}

/// Byte views of the `#[repr(C)]` map types shared with the datapath.
pub fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data map type from egress-common (repr(C),
    // explicit padding), so all of its bytes are initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// The `map_elem` member of `union bpf_attr`: map_fd, key, value, flags.
fn elem(map: &OwnedFd, key: &[u8]) -> Attr {
    let mut a = Attr::new();
    a.put_u32(0, map.as_raw_fd() as u32)
        .put_ptr(8, key.as_ptr());
    a
}

/// Creates or replaces `key`'s value (`BPF_ANY`).
pub fn update(map: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    let mut a = elem(map, key);
    a.put_ptr(16, value.as_ptr());
    command(Cmd::MapUpdateElem, &mut a)
}

pub fn delete(map: &OwnedFd, key: &[u8]) -> Result<()> {
    command(Cmd::MapDeleteElem, &mut elem(map, key))
}

/// Looks `key` up; `value` must be the map's full value size (for per-CPU
/// maps: the rounded-up value size times the possible CPUs). `false` when
/// the key is absent.
pub fn lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> Result<bool> {
    let mut a = elem(map, key);
    a.put_ptr(16, value.as_mut_ptr());
    match command(Cmd::MapLookupElem, &mut a) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// How many CPUs per-CPU map values have a slot for.
pub fn possible_cpus() -> Result<usize> {
    const PATH: &str = "/sys/devices/system/cpu/possible";
    let bad = |detail: String| Error::PossibleCpus { detail };
    let s = std::fs::read_to_string(PATH).map_err(|e| bad(e.to_string()))?;
    let number = |t: &str| t.parse::<usize>().map_err(|e| bad(format!("{t:?}: {e}")));
    let mut n = 0;
    for part in s.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        n += hi - lo + 1;
    }
    if n == 0 {
        return Err(bad("no possible CPUs".into()));
    }
    Ok(n)
}

/// Entries per batched call. A hash bucket never holds more than this, so
/// the kernel's "bucket larger than the batch" error (`ENOSPC`) cannot occur.
const CHUNK: usize = 4096;

/// Offsets in the `batch` member of `union bpf_attr`.
mod batch {
    pub const IN_BATCH: usize = 0;
    pub const OUT_BATCH: usize = 8;
    pub const KEYS: usize = 16;
    pub const VALUES: usize = 24;
    pub const COUNT: usize = 32;
    pub const MAP_FD: usize = 36;
}

/// Every (key, value) of the hash map `map` (`BPF_MAP_LOOKUP_BATCH`), whose
/// key and value types must be exactly `K` and `V` (the map types of
/// `egress-common`).
///
/// Like any walk of a live hash map this is not a snapshot: entries added or
/// removed meanwhile may or may not appear.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    // The hash map's cursor is a bucket index (u32); u64 leaves room.
    let mut cursor = 0u64;
    let mut first = true;
    loop {
        let mut a = Attr::new();
        if !first {
            a.put_ptr(batch::IN_BATCH, &raw const cursor);
        }
        a.put_ptr(batch::OUT_BATCH, &raw mut cursor)
            .put_ptr(batch::KEYS, keys.as_mut_ptr())
            .put_ptr(batch::VALUES, values.as_mut_ptr())
            .put_u32(batch::COUNT, CHUNK as u32)
            .put_u32(batch::MAP_FD, map.as_raw_fd() as u32);
        let result = sys_bpf(Cmd::MapLookupBatch, &mut a);
        let n = a.get_u32(batch::COUNT) as usize;
        if n > CHUNK {
            return Err(Error::BatchOverrun {
                returned: n,
                asked: CHUNK,
            });
        }
        // SAFETY: the kernel wrote `n` keys and values, each of the map's
        // key and value size, which are K's and V's (plain-old-data types).
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(keys.drain(..).zip(values.drain(..)));
        match result {
            Ok(_) => first = false,
            // The end of the map (possibly with a last partial batch).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(source) => {
                return Err(Error::Command {
                    cmd: Cmd::MapLookupBatch,
                    source,
                });
            }
        }
    }
}

/// Deletes `keys` from the hash map `map` (`BPF_MAP_DELETE_BATCH`); keys
/// already gone (expired by another path, or evicted by the LRU) are
/// skipped. Returns how many were deleted.
pub fn delete_all<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(CHUNK)];
        let mut a = Attr::new();
        a.put_ptr(batch::KEYS, chunk.as_ptr())
            .put_u32(batch::COUNT, chunk.len() as u32)
            .put_u32(batch::MAP_FD, map.as_raw_fd() as u32);
        let result = sys_bpf(Cmd::MapDeleteBatch, &mut a);
        // The kernel deletes in order and stops at the first failure; count
        // says how many it got through.
        let done = (a.get_u32(batch::COUNT) as usize).min(chunk.len());
        deleted += done;
        match result {
            Ok(_) => rest = &rest[chunk.len()..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(source) => {
                return Err(Error::Command {
                    cmd: Cmd::MapDeleteBatch,
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// An LRU hash map like the conntrack maps: u32 keys, u64 values. Sized
    /// well above what the tests insert, so that the LRU evicts nothing.
    fn lru_map(max_entries: u32) -> OwnedFd {
        map_create(MapType::LruHash, 4, 8, max_entries).expect("BPF_MAP_CREATE (needs root)")
    }

    fn put(map: &OwnedFd, key: u32, value: u64) {
        update(map, &key.to_ne_bytes(), &value.to_ne_bytes()).unwrap();
    }

    #[test]
    fn walks_and_deletes_more_entries_than_one_batch() {
        let n = 3 * CHUNK as u32 + 17;
        let map = lru_map(4 * n);
        for k in 0..n {
            put(&map, k, u64::from(k) * 3);
        }
        let mut all: Vec<(u32, u64)> = lookup_all(map.as_fd()).unwrap();
        all.sort_unstable();
        assert_eq!(all.len(), n as usize);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, &(k, v))| k == i as u32 && v == u64::from(k) * 3)
        );

        // Every other key, plus keys that are not there: those are skipped.
        let mut doomed: Vec<u32> = (0..n).step_by(2).collect();
        doomed.insert(5, n + 1);
        doomed.push(n + 2);
        assert_eq!(
            delete_all(map.as_fd(), &doomed).unwrap(),
            n.div_ceil(2) as usize
        );
        let mut left: Vec<u32> = lookup_all::<u32, u64>(map.as_fd())
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        left.sort_unstable();
        assert_eq!(left, (1..n).step_by(2).collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_map_walks_to_nothing() {
        let map = lru_map(16);
        assert!(lookup_all::<u32, u64>(map.as_fd()).unwrap().is_empty());
        assert_eq!(delete_all::<u32>(map.as_fd(), &[]).unwrap(), 0);
    }

    #[test]
    fn element_operations_round_trip() {
        let map = map_create(MapType::Hash, 4, 8, 4).unwrap();
        let mut v = [0u8; 8];
        assert!(!lookup(&map, &1u32.to_ne_bytes(), &mut v).unwrap());
        put(&map, 1, 77);
        assert!(lookup(&map, &1u32.to_ne_bytes(), &mut v).unwrap());
        assert_eq!(u64::from_ne_bytes(v), 77);
        delete(&map, &1u32.to_ne_bytes()).unwrap();
        assert!(!lookup(&map, &1u32.to_ne_bytes(), &mut v).unwrap());
        let e = delete(&map, &1u32.to_ne_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(e.to_string().starts_with("BPF_MAP_DELETE_ELEM: "), "{e}");
    }

    #[test]
    fn possible_cpus_counts_at_least_this_one() {
        assert!(possible_cpus().unwrap() >= 1);
    }
}
