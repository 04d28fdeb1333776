//! TC ingress of the node's uplink: replies to egress IPs held here are
//! translated back and delivered to the pod, locally or through the tunnel
//! to the pod's node. Everything else addressed to an egress IP is dropped
//! (`no_flow`) unless configured otherwise, and nothing of an egress IP is
//! answered, ARP included, once this node's claim on it has lapsed.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use egress_common::{DatapathConfig, DropReason, config_flags};
    use egress_ebpf::{
        Blame, Dropped, action, arp, conntrack,
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

    /// A packet to an egress IP that no flow claims: the host must not
    /// answer on an address that firewalls trust, unless told to.
    #[inline(always)]
    fn unmatched(cfg: &DatapathConfig, owner: u32, echo_request: bool) -> Result<i32, Dropped> {
        if cfg.flags & config_flags::PASS_UNMATCHED_TO_EGRESS_IPS != 0
            || (echo_request && cfg.flags & config_flags::ANSWER_PING_ON_EGRESS_IPS != 0)
        {
            return Ok(action::PASS);
        }
        Err(Dropped {
            policy_id: owner,
            reason: DropReason::NoFlow,
        })
    }

    #[inline(always)]
    fn try_uplink_ingress(ctx: &TcContext) -> Result<i32, Dropped> {
        // Everything the node receives passes here: leave quickly unless the
        // destination is an egress IP held by this node.
        let ip = match parse::ipv4(ctx) {
            Ok(Some(ip)) => ip,
            Ok(None) => return arp::check_request(ctx),
            Err(_) => return Ok(action::PASS),
        };
        let Some(owner) = EGRESS_ADDRS_V4.get_ptr(ip.dst) else {
            return Ok(action::PASS);
        };
        // SAFETY: pointer from a successful lookup.
        let owner = unsafe { *owner };
        let Some(cfg) = maps::config() else {
            return Ok(action::PASS);
        };
        let now = conntrack::now();
        if now >= cfg.claims_valid_until_ns {
            return Err(Dropped {
                policy_id: owner,
                reason: DropReason::ClaimExpired,
            });
        }
        if ip.fragment {
            return Err(Dropped {
                policy_id: owner,
                reason: DropReason::Fragment,
            });
        }
        ip.check_length(ctx).blame(owner)?;
        let l4 = match parse::l4(ctx, &ip) {
            Ok(l4) => l4,
            Err(DropReason::UnsupportedProtocol) => return unmatched(cfg, owner, false),
            Err(reason) => {
                if cfg.flags & config_flags::PASS_UNMATCHED_TO_EGRESS_IPS != 0 {
                    return Ok(action::PASS);
                }
                return Err(Dropped {
                    policy_id: owner,
                    reason,
                });
            }
        };
        // The reply's own translation, applied below together with the
        // forwarding edits; ICMP errors are translated by their module.
        let (rev, mut edit, cache) = match nat::reply_key(&ip, &l4) {
            Some(key) => {
                let Some((rev, cache)) = nat::reverse(&key, nat::tcp_flags(&l4), now) else {
                    return unmatched(cfg, owner, false);
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
                    None => return unmatched(cfg, owner, false),
                },
                L4::Echo { request, .. } => return unmatched(cfg, owner, request),
                _ => return unmatched(cfg, owner, false),
            },
        };
        let id = rev.policy_id;
        if rev.origin_node == [0; 4] {
            if ip.ttl <= 1 {
                // The last hop would be ours: answer the server as a router
                // would, from the address it sent to (never about an ICMP
                // error, which the ICMP module has translated already).
                let reason = DropReason::TtlExceeded;
                if matches!(l4, L4::IcmpError) {
                    return Err(Dropped {
                        policy_id: id,
                        reason,
                    });
                }
                let kind = icmp::ErrorKind::TimeExceeded;
                return nat::bounce(ctx, &ip, kind, ip.dst, [0; 4], id, cfg, reason).blame(id);
            }
            // SAFETY: reading a field of the context the kernel handed us.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            let hop = match cache {
                Some(cache) => fib::cached_lookup(ctx, &cache, ip.src, rev.orig_addr, ifindex),
                None => fib::lookup(ctx, ip.src, rev.orig_addr, ifindex),
            }
            .map_err(DropReason::from)
            .blame(id)?;
            edit.decrement_ttl = true;
            edit.macs = hop.macs;
            csum::apply(ctx, &ip, &edit).blame(id)?;
            stats::count_reply(id, ctx.len());
            inbound::mark_delivered(ctx);
            return Ok(fib::send(&hop));
        }
        csum::apply(ctx, &ip, &edit).blame(id)?;
        stats::count_reply(id, ctx.len());
        if cfg.tunnel_mss != 0 && nat::tcp_flags(&l4) & tcp_flags::SYN != 0 {
            // The server must not send segments that overflow the tunnel back.
            mss::clamp(ctx, ip.l4_off, cfg.tunnel_mss).blame(id)?;
        }
        tunnel::redirect(ctx, rev.origin_node, id, cfg.tunnel_ifindex).blame(id)
    }
}

egress_ebpf::program_glue!();
