//! Programs: loading a raw TC program, and `BPF_PROG_TEST_RUN` of TC
//! programs, with an injector for the tunnel metadata a test run cannot
//! pass itself.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::{
    map::{MapType, map_create, update},
    sys::{Attr, Cmd, Error, Result, command, sys_bpf_fd},
};

/// `BPF_PROG_TYPE_SCHED_CLS` (linux/bpf.h): a TC program.
const PROG_TYPE_SCHED_CLS: u32 = 3;

#[derive(Clone, Copy, Debug)]
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
        .put_ptr(16, pkt.as_ptr())
        .put_ptr(24, out.as_mut_ptr())
        .put_u32(32, repeat);
    // Without a context the run is exactly the benchmark's historical one.
    let with_ctx = ctx.ifindex != 0 || ctx.mark != 0 || ctx.cb != [0; 5];
    if with_ctx {
        a.put_u32(40, SK_BUFF_SIZE as u32)
            .put_u32(44, SK_BUFF_SIZE as u32)
            .put_ptr(48, ctx_in.as_ptr())
            .put_ptr(56, ctx_out.as_mut_ptr());
    }
    command(Cmd::ProgTestRun, &mut a)?;
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
        let prog_array = map_create(MapType::ProgArray, 4, 4, 1)?;
        let prog = load_sched_cls(&injector_insns(prog_array.as_raw_fd()))?;
        update(
            &prog_array,
            &0u32.to_ne_bytes(),
            &(target.as_raw_fd() as u32).to_ne_bytes(),
        )?;
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

/// Loads raw instructions as a TC (`BPF_PROG_TYPE_SCHED_CLS`) program; the
/// verifier's log is in the error.
pub fn load_sched_cls(insns: &[u8]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.put_u32(0, PROG_TYPE_SCHED_CLS)
        .put_u32(4, (insns.len() / 8) as u32)
        .put_ptr(8, insns.as_ptr())
        .put_ptr(16, license.as_ptr())
        .put_u32(24, 1)
        .put_u32(28, log.len() as u32)
        .put_ptr(32, log.as_mut_ptr());
    sys_bpf_fd(Cmd::ProgLoad, &mut a).map_err(|source| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        Error::Verifier {
            source,
            log: String::from_utf8_lossy(&log[..end]).into_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `r0 = TC_ACT_OK (0); exit`.
    fn pass() -> Vec<u8> {
        [insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)].concat()
    }

    #[test]
    fn a_loaded_program_test_runs_on_a_frame() {
        let prog = load_sched_cls(&pass()).expect("BPF_PROG_LOAD (needs root)");
        // An Ethernet header and a few bytes: the kernel wants at least 14.
        let frame = [0x5au8; 64];
        let run = test_run_skb(&prog, &frame, &SkbContext::default(), 3).unwrap();
        assert_eq!(run.retval, 0);
        assert_eq!(run.packet, frame);
        assert_eq!(test_run(&prog, &frame, 1).unwrap().retval, 0);
    }

    #[test]
    fn a_refused_program_carries_the_verifier_log() {
        // `exit` with r0 never written.
        let e = load_sched_cls(&insn(0x95, 0, 0, 0, 0)).unwrap_err();
        match &e {
            Error::Verifier { log, .. } => assert!(log.contains("R0 !read_ok"), "{log}"),
            other => panic!("not a verifier error: {other}"),
        }
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn a_test_run_of_a_map_descriptor_names_the_command() {
        let not_a_prog = map_create(MapType::Hash, 4, 4, 1).unwrap();
        let e = test_run(&not_a_prog, &[0u8; 64], 1).unwrap_err();
        assert!(e.to_string().starts_with("BPF_PROG_TEST_RUN: "), "{e}");
    }
}
