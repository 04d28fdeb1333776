//! TC ingress of host-side pod interfaces (and of upstream devices such as
//! OVS `tun0` whose packets carry openshift-sdn's mark): classify, then steer
//! to the egress node or translate here.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use egress_common::{DropReason, policy_flags};
    use egress_ebpf::{
        Blame, Dropped, action, classify, csum, fib, icmp, maps, mss, nat,
        parse::{self, L4, tcp_flags},
        stats, tunnel, verdict,
    };

    #[classifier]
    pub fn pod_ingress(ctx: TcContext) -> i32 {
        verdict(try_pod_ingress(&ctx))
    }

    #[inline(always)]
    fn try_pod_ingress(ctx: &TcContext) -> Result<i32, Dropped> {
        // Malformed or non-IPv4 traffic is not ours to judge until it is selected.
        let Ok(Some(ip)) = parse::ipv4(ctx) else {
            return Ok(action::OK);
        };
        let Some(sel) = classify::by_source(ctx, ip.src) else {
            return Ok(action::OK);
        };
        let Some(cfg) = maps::config() else {
            return Ok(action::OK);
        };
        let id = sel.id;
        if ip.ttl <= 1 {
            // Let the stack answer with time-exceeded, as the router it is.
            return Ok(action::OK);
        }
        let l4 = match parse::l4(ctx, &ip) {
            Ok(l4) if !ip.fragment => l4,
            outcome => {
                if classify::is_excluded(id, ip.dst) {
                    return Ok(action::OK);
                }
                let reason = if ip.fragment {
                    DropReason::Fragment
                } else {
                    outcome.err().unwrap_or(DropReason::Malformed)
                };
                return Err(Dropped {
                    policy_id: id,
                    reason,
                });
            }
        };

        if sel.policy.flags & policy_flags::LOCAL == 0 {
            if classify::is_excluded(id, ip.dst) {
                return Ok(action::OK);
            }
            if sel.policy.egress_node == [0; 4] {
                if sel.policy.flags & policy_flags::FAIL_OPEN != 0 {
                    return Ok(action::OK);
                }
                return Err(Dropped {
                    policy_id: id,
                    reason: DropReason::NoEgressNode,
                });
            }
            let flags = nat::tcp_flags(&l4);
            if sel.policy.flags & policy_flags::CLAMP_MSS != 0
                && cfg.tunnel_mss != 0
                && flags & tcp_flags::SYN != 0
            {
                mss::clamp(ctx, ip.l4_off, cfg.tunnel_mss).blame(id)?;
            }
            stats::count_steered(id, ctx.len());
            return tunnel::redirect(ctx, sel.policy.egress_node, id, cfg.tunnel_ifindex).blame(id);
        }

        let nat_addr = match nat::forward_key(&ip, &l4) {
            Some(key) => {
                let Some(entry) =
                    nat::translation(&key, &sel, [0; 4], nat::tcp_flags(&l4), cfg, true)
                        .blame(id)?
                else {
                    return Ok(action::OK);
                };
                nat::rewrite_source(ctx, &ip, &l4, &entry).blame(id)?;
                entry.nat_addr
            }
            None => {
                if classify::is_excluded(id, ip.dst) {
                    return Ok(action::OK);
                }
                let translated = match l4 {
                    L4::IcmpError => icmp::translate_outbound(ctx, &ip).blame(id)?,
                    _ => None,
                };
                let Some(entry) = translated else {
                    return Err(Dropped {
                        policy_id: id,
                        reason: DropReason::UnsupportedProtocol,
                    });
                };
                entry.nat_addr
            }
        };
        csum::decrement_ttl(ctx, ip.ttl, ip.proto).blame(id)?;
        stats::count_egress(id, ctx.len());
        // SAFETY: reading a field of the context the kernel handed us.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        fib::redirect(ctx, nat_addr, ip.dst, ifindex).blame(id)
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
    eprintln!("pod_ingress is an eBPF program: build it with `cargo xtask build-ebpf`");
    std::process::exit(1);
}
