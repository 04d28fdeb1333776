//! The few bpf(2) commands the benchmark needs on the agent's pinned objects,
//! issued directly: control-plane timings must not include a process start,
//! and `BPF_PROG_TEST_RUN` with `repeat = 1` per distinct packet is how
//! first-packet cost is measured.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET: libc::c_long = 7;

/// Big enough for every `union bpf_attr` variant used here; the kernel
/// requires the unused tail to be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded, 8-aligned buffer at least as large as
    // the bpf_attr layout of `cmd`, and every pointer stored in it points to
    // memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut a = Attr::new();
    a.put_u64(0, c.as_ptr() as u64);
    let fd =
        sys_bpf(BPF_OBJ_GET, &mut a).with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Byte views of the `#[repr(C)]` map types shared with the datapath.
pub fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data map type from egress-common (repr(C),
    // explicit padding), so all of its bytes are initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

pub fn update(map: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_ptr() as u64)
        .put_u64(24, 0);
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).context("BPF_MAP_UPDATE_ELEM")?;
    Ok(())
}

pub fn delete(map: &OwnedFd, key: &[u8]) -> Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64);
    sys_bpf(BPF_MAP_DELETE_ELEM, &mut a).context("BPF_MAP_DELETE_ELEM")?;
    Ok(())
}

/// Looks `key` up; `value` must be the map's full value size (for per-CPU
/// maps: the rounded-up value size times the possible CPUs).
pub fn lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> Result<bool> {
    let mut a = Attr::new();
    a.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, key.as_ptr() as u64)
        .put_u64(16, value.as_mut_ptr() as u64);
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
    }
}

pub struct TestRun {
    pub retval: u32,
    /// Average ns per run, as the kernel measured it.
    pub duration_ns: u32,
}

/// `BPF_PROG_TEST_RUN` on a TC program with `pkt` as the frame (from the
/// Ethernet header on). Runs in the caller's network namespace, which is
/// what the program's FIB lookups see.
pub fn test_run(prog: &OwnedFd, pkt: &[u8], repeat: u32) -> Result<TestRun> {
    test_run_on(prog, pkt, repeat, None)
}

/// [`test_run`] with the packet arriving on interface `ifindex` (the
/// `__sk_buff` context's `ifindex`, which the kernel turns into the skb's
/// device), as a pod's packet arrives on its host-side interface.
pub fn test_run_on(
    prog: &OwnedFd,
    pkt: &[u8],
    repeat: u32,
    ifindex: Option<u32>,
) -> Result<TestRun> {
    let mut out = vec![0u8; pkt.len() + 256];
    // The context up to and including `ifindex` (offset 40 of `__sk_buff`);
    // the kernel zero-fills the rest.
    let mut ctx = [0u8; 44];
    let mut a = Attr::new();
    a.put_u32(0, prog.as_raw_fd() as u32)
        .put_u32(8, pkt.len() as u32)
        .put_u32(12, out.len() as u32)
        .put_u64(16, pkt.as_ptr() as u64)
        .put_u64(24, out.as_mut_ptr() as u64)
        .put_u32(32, repeat);
    if let Some(ifindex) = ifindex {
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        a.put_u32(40, ctx.len() as u32)
            .put_u64(48, ctx.as_ptr() as u64);
    }
    sys_bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok(TestRun {
        retval: a.get_u32(4),
        duration_ns: a.get_u32(36),
    })
}

pub fn possible_cpus() -> Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>()?, b.parse::<usize>()?),
            None => (part.parse::<usize>()?, part.parse::<usize>()?),
        };
        n += hi - lo + 1;
    }
    if n == 0 {
        bail!("no possible CPUs in /sys/devices/system/cpu/possible");
    }
    Ok(n)
}
