//! The system call itself: the commands by name, the attribute buffer, and
//! the errors.

use std::{
    ffi::CString,
    fmt, io,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// The `enum bpf_cmd` values (linux/bpf.h) issued by this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Cmd {
    MapCreate = 0,
    MapLookupElem = 1,
    MapUpdateElem = 2,
    MapDeleteElem = 3,
    ProgLoad = 5,
    ObjGet = 7,
    ProgTestRun = 10,
    MapLookupBatch = 24,
    MapDeleteBatch = 27,
}

impl Cmd {
    /// The uapi name, as error messages and the kernel's docs spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::MapCreate => "BPF_MAP_CREATE",
            Self::MapLookupElem => "BPF_MAP_LOOKUP_ELEM",
            Self::MapUpdateElem => "BPF_MAP_UPDATE_ELEM",
            Self::MapDeleteElem => "BPF_MAP_DELETE_ELEM",
            Self::ProgLoad => "BPF_PROG_LOAD",
            Self::ObjGet => "BPF_OBJ_GET",
            Self::ProgTestRun => "BPF_PROG_TEST_RUN",
            Self::MapLookupBatch => "BPF_MAP_LOOKUP_BATCH",
            Self::MapDeleteBatch => "BPF_MAP_DELETE_BATCH",
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{cmd}: {source}")]
    Command { cmd: Cmd, source: io::Error },
    #[error("BPF_OBJ_GET {}: {source}", path.display())]
    ObjGet { path: PathBuf, source: io::Error },
    #[error("BPF object path {} contains a NUL byte", path.display())]
    PathWithNul { path: PathBuf },
    /// The verifier refused a program; `log` is what it said.
    #[error("BPF_PROG_LOAD: {source}\n{log}")]
    Verifier { source: io::Error, log: String },
    #[error("BPF_MAP_LOOKUP_BATCH returned {returned} entries for a batch of {asked}")]
    BatchOverrun { returned: usize, asked: usize },
    #[error("/sys/devices/system/cpu/possible: {detail}")]
    PossibleCpus { detail: String },
}

impl Error {
    /// The errno of a failed command, if that is what failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Command { source, .. }
            | Self::ObjGet { source, .. }
            | Self::Verifier { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Big enough for every `union bpf_attr` variant used here; the kernel
/// requires the unused tail to be zero.
#[repr(C, align(8))]
pub(crate) struct Attr([u8; 128]);

impl Attr {
    pub(crate) fn new() -> Self {
        Self([0; 128])
    }
    pub(crate) fn put_u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn put_u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    /// Stores a pointer the kernel reads or writes during the call.
    pub(crate) fn put_ptr<T>(&mut self, off: usize, p: *const T) -> &mut Self {
        self.put_u64(off, p as u64)
    }
    pub(crate) fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

/// Issues `cmd`; the raw return value (a new descriptor for the commands
/// that make one) or the errno.
pub(crate) fn sys_bpf(cmd: Cmd, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded, 8-aligned buffer at least as large as
    // the bpf_attr layout of `cmd`, and every pointer stored in it points to
    // memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.0.as_mut_ptr(),
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Issues `cmd`, which returns a new descriptor.
pub(crate) fn sys_bpf_fd(cmd: Cmd, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs `cmd` for its effect, naming it in the error.
pub(crate) fn command(cmd: Cmd, attr: &mut Attr) -> Result<()> {
    sys_bpf(cmd, attr)
        .map(drop)
        .map_err(|source| Error::Command { cmd, source })
}

/// A descriptor of the map or program pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::PathWithNul {
        path: path.to_owned(),
    })?;
    let mut a = Attr::new();
    a.put_ptr(0, c.as_ptr());
    sys_bpf_fd(Cmd::ObjGet, &mut a).map_err(|source| Error::ObjGet {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pin_names_the_command_and_the_path() {
        let e = obj_get(Path::new("/sys/fs/bpf/egress-bpf-test-no-such-pin")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let msg = e.to_string();
        assert!(
            msg.starts_with("BPF_OBJ_GET /sys/fs/bpf/egress-bpf-test-no-such-pin: "),
            "{msg}"
        );
    }

    #[test]
    fn a_path_with_nul_is_refused_before_the_call() {
        let e = obj_get(Path::new("a\0b")).unwrap_err();
        assert!(matches!(e, Error::PathWithNul { .. }), "{e}");
    }
}
