//! TC ingress of our external-mode VXLAN device: only cluster nodes may use
//! it, sending to this node's address. Replies for local pods are delivered;
//! steered traffic is translated when its inner source is a pod of the
//! sending node that the VNI's policy selects.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use egress_common::{DropReason, policy_flags};
    use egress_ebpf::{
        Blame, Dropped, classify, conntrack, fib, icmp, inbound,
        maps::{self, NODES_V4, POD_POLICY_V4},
        nat, parse, stats, steer, trust, tunnel, verdict,
    };

    #[classifier]
    pub fn tunnel_ingress(ctx: TcContext) -> i32 {
        verdict(try_tunnel_ingress(&ctx))
    }

    #[inline(always)]
    fn try_tunnel_ingress(ctx: &TcContext) -> Result<i32, Dropped> {
        let arrival = tunnel::arrival(ctx).ok_or(DropReason::Malformed).blame(0)?;
        let cfg = maps::config()
            .ok_or(DropReason::UnknownTunnelPeer)
            .blame(0)?;
        // Only another node's datapath, sending to this node's own address:
        // a packet sent to any other address of ours (an egress IP, a pod
        // gateway) reached the VXLAN socket some other way.
        if arrival.local != cfg.node_addr || NODES_V4.get_ptr(arrival.remote).is_none() {
            return Err(Dropped {
                policy_id: 0,
                reason: DropReason::UnknownTunnelPeer,
            });
        }
        let remote = arrival.remote;
        let ip = parse::ipv4(ctx)
            .blame(0)?
            .ok_or(DropReason::UnsupportedProtocol)
            .blame(0)?;
        // SAFETY: reading a field of the context the kernel handed us.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };

        if let Some(pod) = POD_POLICY_V4.get_ptr(ip.dst) {
            // A reply the egress node translated back for one of our pods:
            // only for a flow of the pod that this node steers to `remote`.
            // SAFETY: pointer from a successful lookup.
            let id = unsafe { (*pod).policy_id };
            ip.check_length(ctx).blame(id)?;
            steer::reply(ctx, &ip, remote, conntrack::now()).blame(id)?;
            stats::count_reply(id, ctx.len());
            inbound::mark_delivered(ctx);
            return fib::redirect(ctx, ip.src, ip.dst, ifindex).blame(id);
        }

        let sel = classify::by_vni(arrival.vni)
            .ok_or(DropReason::UnknownVni)
            .blame(0)?;
        let id = sel.id;
        if sel.policy.flags & policy_flags::LOCAL == 0 {
            // The sender's view is stale: the egress IP is not held here.
            return Err(Dropped {
                policy_id: id,
                reason: DropReason::NoEgressNode,
            });
        }
        trust::steered_from(&sel, ip.src, remote).blame(id)?;
        let now = conntrack::now();
        if now >= cfg.claims_valid_until_ns {
            return Err(Dropped {
                policy_id: id,
                reason: DropReason::ClaimExpired,
            });
        }
        ip.check_length(ctx).blame(id)?;
        if ip.fragment {
            return Err(Dropped {
                policy_id: id,
                reason: DropReason::Fragment,
            });
        }
        let l4 = parse::l4(ctx, &ip).blame(id)?;
        if ip.ttl <= 1 {
            // Forwarding would take the last hop: answer as a router would,
            // through the tunnel to the pod's node (never about an ICMP error).
            if matches!(l4, parse::L4::IcmpError) {
                return Err(Dropped {
                    policy_id: id,
                    reason: DropReason::TtlExceeded,
                });
            }
            let kind = icmp::ErrorKind::TimeExceeded;
            let reason = DropReason::TtlExceeded;
            return nat::bounce(ctx, &ip, kind, cfg.node_addr, remote, id, cfg, reason).blame(id);
        }
        // The source node already applied the exclusions.
        let forwarded =
            nat::snat_and_forward(ctx, &ip, &l4, &sel, remote, cfg, false, now).blame(id)?;
        forwarded.ok_or(DropReason::UnsupportedProtocol).blame(id)
    }
}

egress_ebpf::program_glue!();
