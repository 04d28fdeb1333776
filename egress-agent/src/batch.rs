//! Batched reads and deletes of hash maps (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`): one bpf(2) call per few thousand entries. The
//! conntrack collector walks every flow each sweep; element by element that
//! is two calls per flow (next key, lookup), which at a few hundred thousand
//! flows takes a whole CPU away from the traffic. aya has no batch API, so
//! these two commands are issued directly.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries fetched per call. A hash bucket never holds more than this, so
/// the kernel's "bucket larger than the batch" error (`ENOSPC`) cannot occur.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`, padded to the size the kernel
/// zero-checks.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: attr is the batch layout of bpf_attr; every pointer in it refers
    // to a buffer that outlives the call and holds `count` elements.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every (key, value) of the hash map `map`, whose key and value types must
/// be exactly `K` and `V` (the map types of `egress-common`).
///
/// Like any walk of a live hash map this is not a snapshot: entries added or
/// removed meanwhile may or may not appear.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(CHUNK);
    // The hash map's cursor is a bucket index (u32); u64 leaves room.
    let mut cursor = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&cursor) as u64
            },
            out_batch: std::ptr::from_mut(&mut cursor) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        if n > CHUNK {
            return Err(io::Error::other(format!(
                "BPF_MAP_LOOKUP_BATCH returned {n} entries for a batch of {CHUNK}"
            )));
        }
        // SAFETY: the kernel wrote `n` keys and values, each of the map's
        // key and value size, which are K's and V's (plain-old-data types).
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        out.extend(keys.drain(..).zip(values.drain(..)));
        match result {
            Ok(()) => first = false,
            // The end of the map (possibly with a last partial batch).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Deletes `keys` from the hash map `map`; keys already gone (expired by
/// another path, or evicted by the LRU) are skipped. Returns how many were
/// deleted.
pub fn delete_all<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(CHUNK)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel deletes in order and stops at the first failure; count
        // says how many it got through.
        let done = (attr.count as usize).min(chunk.len());
        deleted += done;
        match result {
            Ok(()) => rest = &rest[chunk.len()..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
        // SAFETY: a zeroed 128-byte bpf_attr with the fields `cmd` reads set.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// An LRU hash map like the conntrack maps: u32 keys, u64 values. Sized
    /// well above what the tests insert, so that the LRU evicts nothing.
    fn lru_map(max_entries: u32) -> OwnedFd {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(BPF_MAP_TYPE_LRU_HASH) | (4u64 << 32);
        attr[1] = 8 | (u64::from(max_entries) << 32);
        let fd = bpf(BPF_MAP_CREATE, &mut attr).expect("BPF_MAP_CREATE (needs root)");
        // SAFETY: the kernel just returned this fd and nobody else owns it.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn put(map: &OwnedFd, key: u32, value: u64) {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = std::ptr::from_ref(&key) as u64;
        attr[2] = std::ptr::from_ref(&value) as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).unwrap();
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
}
