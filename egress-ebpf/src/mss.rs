//! TCP MSS clamping for flows that cross the tunnel, whose 50 bytes of
//! encapsulation the endpoints do not know about.

use aya_ebpf::programs::TcContext;
use egress_common::{DropReason, proto};

use crate::csum::{L4Csum, set_l4_u16};

const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
/// Linux puts MSS first; a few NOPs or a timestamp before it are the most
/// other stacks do. Bounded for the verifier.
const MAX_OPTIONS_WALKED: usize = 8;

/// Lowers the MSS option of a SYN (or SYN-ACK) at `l4_off` to `max_mss`.
#[inline(always)]
pub fn clamp(ctx: &TcContext, l4_off: usize, max_mss: u16) -> Result<(), DropReason> {
    let doff: u8 = ctx.load(l4_off + 12).map_err(|_| DropReason::Malformed)?;
    let end = l4_off + ((doff >> 4) as usize) * 4;
    let mut off = l4_off + 20;
    for _ in 0..MAX_OPTIONS_WALKED {
        if off >= end {
            return Ok(());
        }
        let kind: u8 = ctx.load(off).map_err(|_| DropReason::Malformed)?;
        match kind {
            OPT_END => return Ok(()),
            OPT_NOP => off += 1,
            _ => {
                let len: u8 = ctx.load(off + 1).map_err(|_| DropReason::Malformed)?;
                if kind == OPT_MSS && len == 4 {
                    let raw: [u8; 2] = ctx.load(off + 2).map_err(|_| DropReason::Malformed)?;
                    let mss = u16::from_be_bytes(raw);
                    if mss > max_mss {
                        set_l4_u16(
                            ctx,
                            off + 2,
                            mss,
                            max_mss,
                            L4Csum::for_proto(proto::TCP, l4_off),
                        )?;
                    }
                    return Ok(());
                }
                if len < 2 {
                    return Ok(());
                }
                off += len as usize;
            }
        }
    }
    Ok(())
}
