//! TC ingress of the node's uplink: replies to egress IPs held here are
//! translated back and delivered to the pod, locally or through the tunnel
//! to the pod's node.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use egress_common::DropReason;
    use egress_ebpf::{
        Blame, Dropped, action,
        csum::{self, HeaderEdit},
        fib, icmp, inbound,
        maps::{self, EGRESS_ADDRS_V4},
        mss, nat,
        parse::{self, IP_DST, L4, tcp_flags},
        stats, tunnel, verdict,
    };

    #[classifier]
    pub fn uplink_ingress(ctx: TcContext) -> i32 {
        verdict(try_uplink_ingress(&ctx))
    }

    #[inline(always)]
    fn try_uplink_ingress(ctx: &TcContext) -> Result<i32, Dropped> {
        // Everything the node receives passes here: leave quickly unless the
        // destination is an egress IP held by this node.
        let Ok(Some(ip)) = parse::ipv4(ctx) else {
            return Ok(action::OK);
        };
        let Some(owner) = EGRESS_ADDRS_V4.get_ptr(ip.dst) else {
            return Ok(action::OK);
        };
        // SAFETY: pointer from a successful lookup.
        let owner = unsafe { *owner };
        if ip.fragment {
            return Err(Dropped {
                policy_id: owner,
                reason: DropReason::Fragment,
            });
        }
        // Anything we cannot parse or did not translate is the node's own
        // business (the kernel answers pings to the egress IP, resets strays).
        let Ok(l4) = parse::l4(ctx, &ip) else {
            return Ok(action::OK);
        };
        // The reply's own translation, applied below together with the
        // forwarding edits; ICMP errors are translated by their module.
        let (rev, mut edit, cache) = match nat::reply_key(&ip, &l4) {
            Some(key) => {
                let Some((rev, cache)) = nat::reverse(&key, nat::tcp_flags(&l4)) else {
                    return Ok(action::OK);
                };
                (rev, nat::destination_edit(&ip, &l4, &rev), Some(cache))
            }
            None => match l4 {
                L4::IcmpError => match icmp::translate_inbound(ctx, &ip).blame(owner)? {
                    Some(rev) => (
                        rev,
                        HeaderEdit {
                            addr_field: IP_DST,
                            old_addr: ip.dst,
                            new_addr: ip.dst,
                            port_off: 0,
                            old_port: 0,
                            new_port: 0,
                            decrement_ttl: false,
                            macs: None,
                        },
                        None,
                    ),
                    None => return Ok(action::OK),
                },
                _ => return Ok(action::OK),
            },
        };
        let id = rev.policy_id;
        if rev.origin_node == [0; 4] {
            if ip.ttl <= 1 {
                stats::count_reply(id, ctx.len());
                return Err(Dropped {
                    policy_id: id,
                    reason: DropReason::Malformed,
                });
            }
            // SAFETY: reading a field of the context the kernel handed us.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            let hop = match cache {
                Some(cache) => fib::cached_lookup(ctx, &cache, ip.src, rev.orig_addr, ifindex),
                None => fib::lookup(ctx, ip.src, rev.orig_addr, ifindex),
            };
            edit.decrement_ttl = true;
            edit.macs = match &hop {
                Ok(hop) => hop.macs,
                Err(_) => None,
            };
            csum::apply(ctx, &ip, &edit).blame(id)?;
            stats::count_reply(id, ctx.len());
            inbound::mark_delivered(ctx);
            return hop.map(|hop| fib::send(&hop)).blame(id);
        }
        csum::apply(ctx, &ip, &edit).blame(id)?;
        stats::count_reply(id, ctx.len());
        let cfg = maps::config().ok_or(DropReason::NoEgressNode).blame(id)?;
        if cfg.tunnel_mss != 0 && nat::tcp_flags(&l4) & tcp_flags::SYN != 0 {
            // The server must not send segments that overflow the tunnel back.
            mss::clamp(ctx, ip.l4_off, cfg.tunnel_mss).blame(id)?;
        }
        tunnel::redirect(ctx, rev.origin_node, id, cfg.tunnel_ifindex).blame(id)
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("uplink_ingress is an eBPF program: build it with `cargo xtask build-ebpf`");
    std::process::exit(1);
}
