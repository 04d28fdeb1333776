//! The few bpf(2) commands issued directly on the agent's pinned objects.
//! The benchmark needs them raw: control-plane timings must not include a
//! process start, and `BPF_PROG_TEST_RUN` with `repeat = 1` per distinct
//! packet is how first-packet cost is measured. The `BPF_PROG_TEST_RUN`
//! suite (egress-testrun) runs packets through the programs with the same
//! command (aya has no test-run API).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;

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
    let run = test_run_skb(prog, pkt, &SkbContext::default(), repeat)?;
    Ok(TestRun {
        retval: run.retval,
        duration_ns: run.duration_ns,
    })
}

/// Size of `struct __sk_buff` (linux/bpf.h) as of Linux 6.x.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;
const SK_BUFF_CB: usize = 48;

/// The `__sk_buff` fields `BPF_PROG_TEST_RUN` lets a caller set for a TC
/// program (the kernel rejects any other non-zero field with `EINVAL`).
/// Tunnel metadata is not among them: it lives in the skb's metadata dst,
/// which `__sk_buff` does not expose.
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbContext {
    /// `skb->dev`: the device the packet arrived on (0: the namespace's
    /// loopback). It must exist in the caller's network namespace.
    pub ifindex: u32,
    pub mark: u32,
    /// `skb->cb`: scratch space handed to the program (the tunnel injector's arguments).
    pub cb: [u32; 5],
}

/// The outcome of one `BPF_PROG_TEST_RUN` of a TC program.
#[derive(Clone, Debug)]
pub struct SkbRun {
    /// The program's return value (a TC action, as the kernel returned it).
    pub retval: u32,
    pub duration_ns: u32,
    /// The frame after the program's rewrites.
    pub packet: Vec<u8>,
    /// `skb->mark` after the run (0 when run without a context).
    pub mark: u32,
}

/// `BPF_PROG_TEST_RUN` of a TC program with `pkt` (from the Ethernet header
/// on) and the given `__sk_buff` fields; returns the rewritten frame.
pub fn test_run_skb(prog: &OwnedFd, pkt: &[u8], ctx: &SkbContext, repeat: u32) -> Result<SkbRun> {
    // Room for programs that grow the packet (encapsulation, options).
    let mut out = vec![0u8; pkt.len() + 256];
    let mut ctx_in = [0u8; SK_BUFF_SIZE];
    ctx_in[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&ctx.mark.to_ne_bytes());
    ctx_in[SK_BUFF_INGRESS_IFINDEX..SK_BUFF_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ctx.ifindex.to_ne_bytes());
    ctx_in[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ctx.ifindex.to_ne_bytes());
    for (i, word) in ctx.cb.iter().enumerate() {
        let at = SK_BUFF_CB + 4 * i;
        ctx_in[at..at + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let mut ctx_out = [0u8; SK_BUFF_SIZE];
    let mut a = Attr::new();
    a.put_u32(0, prog.as_raw_fd() as u32)
        .put_u32(8, pkt.len() as u32)
        .put_u32(12, out.len() as u32)
        .put_u64(16, pkt.as_ptr() as u64)
        .put_u64(24, out.as_mut_ptr() as u64)
        .put_u32(32, repeat);
    // Without a context the run is exactly the benchmark's historical one.
    let with_ctx = ctx.ifindex != 0 || ctx.mark != 0 || ctx.cb != [0; 5];
    if with_ctx {
        a.put_u32(40, SK_BUFF_SIZE as u32)
            .put_u32(44, SK_BUFF_SIZE as u32)
            .put_u64(48, ctx_in.as_ptr() as u64)
            .put_u64(56, ctx_out.as_mut_ptr() as u64);
    }
    sys_bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    out.truncate(a.get_u32(12) as usize);
    Ok(SkbRun {
        retval: a.get_u32(4),
        duration_ns: a.get_u32(36),
        packet: out,
        mark: u32::from_ne_bytes(
            ctx_out[SK_BUFF_MARK..SK_BUFF_MARK + 4]
                .try_into()
                .expect("4 bytes"),
        ),
    })
}

/// A TC program that gives a packet tunnel metadata and tail-calls the
/// program under test, as the VXLAN device's receive path would have set it:
/// `BPF_PROG_TEST_RUN` cannot pass tunnel metadata itself (`__sk_buff` has no
/// field for the skb's metadata dst), but a program can set it with
/// `bpf_skb_set_tunnel_key` before a tail call, which keeps the skb. Its
/// arguments come in `skb->cb`: see [`TunnelInjector::context`].
pub struct TunnelInjector {
    pub prog: OwnedFd,
    _prog_array: OwnedFd,
}

/// Return values of the injector itself (the target's otherwise).
pub const INJECTOR_SET_KEY_FAILED: u32 = 99;
pub const INJECTOR_TAIL_CALL_FAILED: u32 = 98;

impl TunnelInjector {
    /// Loads the injector with `target` (a TC program) as its tail call.
    pub fn load(target: &OwnedFd) -> Result<Self> {
        let prog_array = map_create(3 /* BPF_MAP_TYPE_PROG_ARRAY */, 4, 4, 1)?;
        let prog = load_sched_cls(&injector_insns(prog_array.as_raw_fd()))?;
        update(
            &prog_array,
            &0u32.to_ne_bytes(),
            &(target.as_raw_fd() as u32).to_ne_bytes(),
        )
        .context("putting the target program in the injector's prog array")?;
        Ok(Self {
            prog,
            _prog_array: prog_array,
        })
    }

    /// The `skb->cb` words that make the injector set VNI `vni`, outer
    /// source `remote` and outer destination `local` (what
    /// `bpf_skb_get_tunnel_key` then reports as the remote and local ends).
    pub fn context(ifindex: u32, vni: u32, remote: [u8; 4], local: [u8; 4]) -> SkbContext {
        SkbContext {
            ifindex,
            mark: 0,
            cb: [
                vni,
                u32::from_be_bytes(remote),
                u32::from_be_bytes(local),
                0,
                0,
            ],
        }
    }
}

/// One BPF instruction: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | dst;
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}

/// r6 = ctx; key = {tunnel_id: cb[0], local_ipv4: cb[1], remote_ipv4:
/// cb[2], ttl 64} on the stack; bpf_skb_set_tunnel_key(ctx, &key, 44, 0);
/// tail call prog_array[0]. (The kernel stores `local_ipv4` as the key's
/// source address and `remote_ipv4` as its destination, which the receiving
/// side's `bpf_skb_get_tunnel_key` returns as `remote_ipv4` and
/// `local_ipv4`.)
fn injector_insns(prog_array_fd: i32) -> Vec<u8> {
    const KEY: i16 = -48;
    const KEY_SIZE: i32 = 44;
    const SKB_SET_TUNNEL_KEY: i32 = 21;
    const TAIL_CALL: i32 = 12;
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),                     // r6 = r1
        insn(0x61, 2, 1, SK_BUFF_CB as i16, 0),     // r2 = cb[0]
        insn(0x61, 3, 1, SK_BUFF_CB as i16 + 4, 0), // r3 = cb[1]
        insn(0x61, 4, 1, SK_BUFF_CB as i16 + 8, 0), // r4 = cb[2]
    ];
    for word in 0..KEY_SIZE as i16 / 4 {
        p.push(insn(0x62, 10, 0, KEY + 4 * word, 0)); // *(u32 *)(r10 + off) = 0
    }
    p.push(insn(0x63, 10, 2, KEY, 0)); // tunnel_id
    p.push(insn(0x63, 10, 3, KEY + 28, 0)); // local_ipv4
    p.push(insn(0x63, 10, 4, KEY + 4, 0)); // remote_ipv4
    p.push(insn(0x62, 10, 0, KEY + 20, 64 << 8)); // tunnel_tos 0, tunnel_ttl 64
    p.push(insn(0xbf, 1, 6, 0, 0)); // r1 = ctx
    p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
    p.push(insn(0x07, 2, 0, 0, KEY as i32)); // r2 += KEY
    p.push(insn(0xb7, 3, 0, 0, KEY_SIZE)); // r3 = 44
    p.push(insn(0xb7, 4, 0, 0, 0)); // r4 = 0
    p.push(insn(0x85, 0, 0, 0, SKB_SET_TUNNEL_KEY));
    p.push(insn(0x15, 0, 0, 2, 0)); // if r0 == 0 goto +2
    p.push(insn(0xb7, 0, 0, 0, INJECTOR_SET_KEY_FAILED as i32));
    p.push(insn(0x95, 0, 0, 0, 0));
    p.push(insn(0xbf, 1, 6, 0, 0)); // r1 = ctx
    p.push(insn(0x18, 2, 1, 0, prog_array_fd)); // r2 = map (BPF_PSEUDO_MAP_FD)
    p.push(insn(0, 0, 0, 0, 0));
    p.push(insn(0xb7, 3, 0, 0, 0)); // r3 = 0
    p.push(insn(0x85, 0, 0, 0, TAIL_CALL));
    p.push(insn(0xb7, 0, 0, 0, INJECTOR_TAIL_CALL_FAILED as i32));
    p.push(insn(0x95, 0, 0, 0, 0));
    p.concat()
}

fn map_create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.put_u32(0, map_type)
        .put_u32(4, key_size)
        .put_u32(8, value_size)
        .put_u32(12, max_entries);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE")?;
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads raw instructions as a TC (`BPF_PROG_TYPE_SCHED_CLS`) program; the
/// verifier's log is in the error.
fn load_sched_cls(insns: &[u8]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.put_u32(0, 3)
        .put_u32(4, (insns.len() / 8) as u32)
        .put_u64(8, insns.as_ptr() as u64)
        .put_u64(16, license.as_ptr() as u64)
        .put_u32(24, 1)
        .put_u32(28, log.len() as u32)
        .put_u64(32, log.as_mut_ptr() as u64);
    match sys_bpf(BPF_PROG_LOAD, &mut a) {
        // SAFETY: the kernel just returned this fd to us and nobody else owns it.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "BPF_PROG_LOAD: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
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
