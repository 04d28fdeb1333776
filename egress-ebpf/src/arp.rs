//! ARP on the uplink: a node whose claim on its egress IPs has lapsed must
//! stop answering for them at once, even while the kernel still has the
//! address (address lifetimes have one-second granularity and are enforced
//! by a periodic sweep). Dropping the requests here is what makes the claim
//! lapse at the moment the datapath's fence stamp says.

use aya_ebpf::programs::TcContext;
use egress_common::DropReason;

use crate::{
    Dropped, action, conntrack,
    maps::{self, EGRESS_ADDRS_V4},
};

const ETH_P_ARP: u16 = 0x0806;
const ARPOP_REQUEST: u16 = 1;
/// Offsets in an Ethernet/IPv4 ARP frame.
const ETH_TYPE_AT: usize = 12;
const ARP_OP_AT: usize = 14 + 6;
const ARP_TARGET_IP_AT: usize = 14 + 24;

/// Passes everything but ARP requests for an egress IP held here whose
/// claim has lapsed; those are dropped (`claim_expired`).
#[inline(always)]
pub fn check_request(ctx: &TcContext) -> Result<i32, Dropped> {
    let Ok(ether_type) = ctx.load::<[u8; 2]>(ETH_TYPE_AT) else {
        return Ok(action::PASS);
    };
    if u16::from_be_bytes(ether_type) != ETH_P_ARP {
        return Ok(action::PASS);
    }
    let (Ok(op), Ok(target)) = (
        ctx.load::<[u8; 2]>(ARP_OP_AT),
        ctx.load::<[u8; 4]>(ARP_TARGET_IP_AT),
    ) else {
        return Ok(action::PASS);
    };
    if u16::from_be_bytes(op) != ARPOP_REQUEST {
        return Ok(action::PASS);
    }
    let Some(owner) = EGRESS_ADDRS_V4.get_ptr(target) else {
        return Ok(action::PASS);
    };
    let Some(cfg) = maps::config() else {
        return Ok(action::PASS);
    };
    if conntrack::now() < cfg.claims_valid_until_ns {
        return Ok(action::PASS);
    }
    Err(Dropped {
        // SAFETY: pointer from a successful lookup.
        policy_id: unsafe { *owner },
        reason: DropReason::ClaimExpired,
    })
}
