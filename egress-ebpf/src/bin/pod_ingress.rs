//! TC ingress of host-side pod interfaces (and of upstream devices such as
//! OVS `tun0` whose packets carry openshift-sdn's mark): classify, then steer
//! to the egress node or translate here.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use egress_common::{DropReason, policy_flags};
    use egress_ebpf::{
        Blame, Dropped, action, classify, conntrack, hold, maps, nat, parse,
        steer::{self, Way},
        trust, verdict,
    };

    #[classifier]
    pub fn pod_ingress(ctx: TcContext) -> i32 {
        verdict(try_pod_ingress(&ctx))
    }

    #[inline(always)]
    fn try_pod_ingress(ctx: &TcContext) -> Result<i32, Dropped> {
        // Malformed or non-IPv4 traffic is not ours to judge until it is selected.
        let Ok(Some(ip)) = parse::ipv4(ctx) else {
            return Ok(action::PASS);
        };
        let Some(cfg) = maps::config() else {
            return Ok(action::PASS);
        };
        // Before classification: these hold for every pod, selected or not.
        trust::not_to_tunnel(ctx, &ip, cfg).blame(0)?;
        let Some(sel) = classify::by_source(ctx, ip.src).blame(0)? else {
            hold::unknown_source(ctx, &ip).blame(0)?;
            return Ok(action::PASS);
        };
        let id = sel.id;
        if ip.ttl <= 1 {
            // Let the stack answer with time-exceeded, as the router it is.
            return Ok(action::PASS);
        }
        ip.check_length(ctx).blame(id)?;
        let l4 = match parse::l4(ctx, &ip) {
            Ok(l4) if !ip.fragment => l4,
            outcome => {
                if classify::is_excluded(id, ip.dst) {
                    return Ok(action::PASS);
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

        let now = conntrack::now();
        let mut sel = sel;
        if sel.policy.flags & policy_flags::LOCAL == 0 {
            if classify::is_excluded(id, ip.dst) {
                return Ok(action::PASS);
            }
            match steer::flow(&ip, &l4, &sel, cfg, now).blame(id)? {
                Way::Steer(via) => return steer::send(ctx, &ip, &l4, &via, cfg).blame(via.id),
                // The kernel reverses the client's DNAT; the pod answers
                // from the address the client used.
                Way::Pass => return Ok(action::PASS),
                Way::Unheld => {
                    if sel.policy.flags & policy_flags::FAIL_OPEN != 0 {
                        return Ok(action::PASS);
                    }
                    return Err(Dropped {
                        policy_id: id,
                        reason: DropReason::NoEgressNode,
                    });
                }
                // The flow started on a policy held here: it stays on it.
                Way::Translate(then) => sel = then,
            }
        }
        let id = sel.id;

        if now >= cfg.claims_valid_until_ns {
            // This node's claim on the egress IP lapsed: it may no longer
            // send with it. Cluster destinations never needed it.
            if classify::is_excluded(id, ip.dst) || sel.policy.flags & policy_flags::FAIL_OPEN != 0
            {
                return Ok(action::PASS);
            }
            return Err(Dropped {
                policy_id: id,
                reason: DropReason::ClaimExpired,
            });
        }
        let forwarded =
            nat::snat_and_forward(ctx, &ip, &l4, &sel, [0; 4], cfg, true, now).blame(id)?;
        Ok(forwarded.unwrap_or(action::PASS))
    }
}

egress_ebpf::program_glue!();
