//! The claim ledger: the addresses this agent added, in a JSON file written
//! through atomically, so that release never touches an address it did not
//! add.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::{Error, Result};

/// One address the agent added itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub ip: Ipv4Addr,
    pub interface: String,
    pub prefix_len: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    version: u32,
    claims: Vec<LedgerEntry>,
}

/// [`LedgerFile`] borrowed, for writing without a copy of the entries.
#[derive(Serialize)]
struct LedgerFileRef<'a> {
    version: u32,
    claims: &'a [LedgerEntry],
}

const VERSION: u32 = 1;

/// The addresses this agent added, kept in a JSON file so that a restarted
/// agent releases exactly those and never an address an admin configured.
///
/// Every change is written through before the call returns, atomically
/// (temporary file, fsync, rename, fsync of the directory): after a crash
/// the file holds the old or the new list, never a torn one. One agent per
/// file; concurrent writers are not coordinated.
#[derive(Debug)]
pub struct ClaimLedger {
    path: PathBuf,
    entries: Vec<LedgerEntry>,
}

impl ClaimLedger {
    /// Reads the ledger at `path`; a missing file is an empty ledger (first
    /// start). The file and its directory are created on the first change.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let entries = match fs::read(&path) {
            Ok(bytes) => {
                let file: LedgerFile =
                    serde_json::from_slice(&bytes).map_err(|source| Error::LedgerCorrupt {
                        path: path.clone(),
                        source,
                    })?;
                if file.version != VERSION {
                    return Err(Error::LedgerCorrupt {
                        path,
                        source: serde::de::Error::custom(format!(
                            "version {} is not the supported version {VERSION}",
                            file.version
                        )),
                    });
                }
                let mut entries = file.claims;
                entries.sort();
                entries.dedup_by(|a, b| a.ip == b.ip && a.interface == b.interface);
                entries
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::LedgerIo {
                    path,
                    op: "read it",
                    source,
                });
            }
        };
        debug!(path = %path.display(), entries = entries.len(), "opened claim ledger");
        Ok(ClaimLedger { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sorted by address, then interface.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    pub fn contains(&self, ip: Ipv4Addr, interface: &str) -> bool {
        self.position(ip, interface).is_ok()
    }

    fn position(&self, ip: Ipv4Addr, interface: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|e| (e.ip, e.interface.as_str()).cmp(&(ip, interface)))
    }

    /// Notes that the agent added `ip` on `interface` and persists it.
    /// Returns `false` (after updating the prefix length if it changed) when
    /// the pair was already recorded.
    pub fn record(&mut self, ip: Ipv4Addr, interface: &str, prefix_len: u8) -> Result<bool> {
        let entry = LedgerEntry {
            ip,
            interface: interface.to_owned(),
            prefix_len,
        };
        Ok(self.record_all(std::slice::from_ref(&entry))?[0])
    }

    /// [`ClaimLedger::record`] for many entries with one write of the file:
    /// a write per entry (fsync, rename, fsync) made claiming ten thousand
    /// addresses quadratic in time and in bytes written. Returns, for each
    /// entry, whether it is new. If the write fails nothing is recorded.
    pub fn record_all(&mut self, entries: &[LedgerEntry]) -> Result<Vec<bool>> {
        // Every apply claims its IPs again, nearly always nothing new.
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let before = self.entries.clone();
        let mut changed = false;
        let mut new = Vec::with_capacity(entries.len());
        // Appended and sorted once at the end: an insert each would move the
        // tail every time.
        let mut added: Vec<LedgerEntry> = Vec::new();
        let mut added_at: HashMap<(Ipv4Addr, &str), usize> = HashMap::new();
        for entry in entries {
            match self.position(entry.ip, &entry.interface) {
                Ok(i) => {
                    if self.entries[i].prefix_len != entry.prefix_len {
                        self.entries[i].prefix_len = entry.prefix_len;
                        changed = true;
                    }
                    new.push(false);
                }
                Err(_) => match added_at.entry((entry.ip, entry.interface.as_str())) {
                    Entry::Occupied(at) => {
                        added[*at.get()].prefix_len = entry.prefix_len;
                        new.push(false);
                    }
                    Entry::Vacant(at) => {
                        at.insert(added.len());
                        added.push(entry.clone());
                        new.push(true);
                    }
                },
            }
        }
        if !added.is_empty() {
            self.entries.extend(added);
            self.entries.sort();
            changed = true;
        }
        if changed {
            self.persist_or_restore(before)?;
        }
        Ok(new)
    }

    /// Drops the entry and persists; `false` if there was none.
    pub fn forget(&mut self, ip: Ipv4Addr, interface: &str) -> Result<bool> {
        Ok(self.forget_all(&[(ip, interface)])? == 1)
    }

    /// [`ClaimLedger::forget`] for many pairs with one write of the file.
    /// Returns how many entries there were. If the write fails nothing is
    /// forgotten.
    pub fn forget_all(&mut self, pairs: &[(Ipv4Addr, &str)]) -> Result<usize> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let gone: HashSet<(Ipv4Addr, &str)> = pairs.iter().copied().collect();
        let before = self.entries.clone();
        self.entries
            .retain(|e| !gone.contains(&(e.ip, e.interface.as_str())));
        let removed = before.len() - self.entries.len();
        if removed > 0 {
            self.persist_or_restore(before)?;
        }
        Ok(removed)
    }

    /// Keeps memory and file in step: if the write fails, memory goes back
    /// to `before` too, so `entries` never claims more than the file (which
    /// is what the next agent will believe).
    fn persist_or_restore(&mut self, before: Vec<LedgerEntry>) -> Result<()> {
        let result = self.persist();
        if result.is_err() {
            self.entries = before;
        }
        result
    }

    fn persist(&self) -> Result<()> {
        let io_err = |op: &'static str| {
            let path = self.path.clone();
            move |source| Error::LedgerIo { path, op, source }
        };
        let json = serde_json::to_vec_pretty(&LedgerFileRef {
            version: VERSION,
            claims: &self.entries,
        })
        .map_err(|source| Error::LedgerCorrupt {
            path: self.path.clone(),
            source,
        })?;

        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err("create its directory"))?;
        let file_name = self
            .path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
            .map_err(io_err("name its temporary file"))?;
        // Same directory, so the rename cannot cross filesystems; the pid
        // keeps a second process from truncating our half-written file.
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);

        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write its temporary file")(e));
        }
        if let Err(e) = fs::rename(&tmp, &self.path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename its temporary file over it")(e));
        }
        // The rename itself lives in the directory: without this a power
        // loss may bring back the previous list.
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync its directory"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "egress-netlink-ledger-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn survives_reload_and_forgets() {
        let dir = TempDir::new();
        let path = dir.0.join("sub/claims.json");
        let mut l = ClaimLedger::open(&path).unwrap();
        assert!(l.entries().is_empty());
        assert!(!path.exists(), "opening must not create the file");

        assert!(l.record(ip("172.18.0.100"), "eth0", 16).unwrap());
        assert!(l.record(ip("10.0.0.5"), "eth1", 24).unwrap());
        assert!(!l.record(ip("10.0.0.5"), "eth1", 24).unwrap());
        // Same pair, new prefix: updated, not duplicated.
        assert!(!l.record(ip("10.0.0.5"), "eth1", 25).unwrap());

        let reloaded = ClaimLedger::open(&path).unwrap();
        assert_eq!(reloaded.entries(), l.entries());
        assert_eq!(
            reloaded.entries(),
            &[
                LedgerEntry {
                    ip: ip("10.0.0.5"),
                    interface: "eth1".into(),
                    prefix_len: 25
                },
                LedgerEntry {
                    ip: ip("172.18.0.100"),
                    interface: "eth0".into(),
                    prefix_len: 16
                },
            ]
        );
        assert!(reloaded.contains(ip("172.18.0.100"), "eth0"));
        assert!(!reloaded.contains(ip("172.18.0.100"), "eth1"));

        assert!(l.forget(ip("10.0.0.5"), "eth1").unwrap());
        assert!(!l.forget(ip("10.0.0.5"), "eth1").unwrap());
        let reloaded = ClaimLedger::open(&path).unwrap();
        assert_eq!(reloaded.entries().len(), 1);

        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.0.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("claims.json")]);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = TempDir::new();
        let path = dir.0.join("claims.json");
        fs::write(&path, b"{\"version\":1,\"claims\":[{\"ip\":\"nope\"").unwrap();
        let err = ClaimLedger::open(&path).unwrap_err();
        assert!(matches!(err, Error::LedgerCorrupt { .. }), "{err}");
        assert!(err.to_string().contains("claims.json"), "{err}");

        fs::write(&path, b"{\"version\":7,\"claims\":[]}").unwrap();
        let err = ClaimLedger::open(&path).unwrap_err();
        assert!(err.to_string().contains("version 7"), "{err}");
    }

    #[test]
    fn failed_write_leaves_memory_matching_the_file() {
        let dir = TempDir::new();
        // A directory where the file should be: rename over it fails.
        let path = dir.0.join("claims.json");
        fs::create_dir_all(path.join("x")).unwrap();
        let mut l = ClaimLedger::open(dir.0.join("other.json")).unwrap();
        l.path = path;
        let err = l.record(ip("10.0.0.1"), "eth0", 24).unwrap_err();
        assert!(matches!(err, Error::LedgerIo { .. }), "{err}");
        assert!(l.entries().is_empty());
    }

    fn entry(ip_: &str, interface: &str, prefix_len: u8) -> LedgerEntry {
        LedgerEntry {
            ip: ip(ip_),
            interface: interface.into(),
            prefix_len,
        }
    }

    #[test]
    fn batches_record_and_forget_with_one_write_each() {
        let dir = TempDir::new();
        let path = dir.0.join("claims.json");
        let mut l = ClaimLedger::open(&path).unwrap();
        l.record(ip("10.0.0.5"), "eth0", 24).unwrap();
        let new = l
            .record_all(&[
                entry("10.0.0.9", "eth0", 24),
                // Already there, with a new prefix: updated, not new.
                entry("10.0.0.5", "eth0", 16),
                entry("10.0.0.1", "eth1", 24),
                // Twice in one batch: new once, the last prefix wins.
                entry("10.0.0.9", "eth0", 25),
            ])
            .unwrap();
        assert_eq!(new, vec![true, false, true, false]);
        let expected = vec![
            entry("10.0.0.1", "eth1", 24),
            entry("10.0.0.5", "eth0", 16),
            entry("10.0.0.9", "eth0", 25),
        ];
        assert_eq!(l.entries(), expected.as_slice(), "sorted, one per pair");
        assert_eq!(
            ClaimLedger::open(&path).unwrap().entries(),
            expected.as_slice()
        );

        let forgotten = l
            .forget_all(&[
                (ip("10.0.0.9"), "eth0"),
                (ip("10.0.0.9"), "eth0"),
                (ip("10.0.0.1"), "eth0"),
                (ip("10.0.0.1"), "eth1"),
            ])
            .unwrap();
        assert_eq!(forgotten, 2);
        let left = vec![entry("10.0.0.5", "eth0", 16)];
        assert_eq!(l.entries(), left.as_slice());
        assert_eq!(ClaimLedger::open(&path).unwrap().entries(), left.as_slice());
        assert_eq!(l.forget_all(&[(ip("10.9.9.9"), "eth0")]).unwrap(), 0);
    }

    #[test]
    fn a_failed_batch_write_changes_nothing() {
        let dir = TempDir::new();
        let mut l = ClaimLedger::open(dir.0.join("other.json")).unwrap();
        l.record(ip("10.0.0.5"), "eth0", 24).unwrap();
        // A directory where the file should be: rename over it fails.
        let path = dir.0.join("claims.json");
        fs::create_dir_all(path.join("x")).unwrap();
        l.path = path;
        let before = l.entries().to_vec();
        let err = l
            .record_all(&[entry("10.0.0.9", "eth0", 24), entry("10.0.0.5", "eth0", 16)])
            .unwrap_err();
        assert!(matches!(err, Error::LedgerIo { .. }), "{err}");
        assert_eq!(l.entries(), before.as_slice());
        let err = l.forget_all(&[(ip("10.0.0.5"), "eth0")]).unwrap_err();
        assert!(matches!(err, Error::LedgerIo { .. }), "{err}");
        assert_eq!(l.entries(), before.as_slice());
    }
}
