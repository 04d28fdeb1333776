//! TC egress of host-side pod interfaces: records connections that a
//! client outside the cluster opens to a selected pod, so that the pod's
//! answers are not translated (see `egress_ebpf::inbound`). Never drops.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use egress_ebpf::{action, inbound};

    #[classifier]
    pub fn pod_egress(ctx: TcContext) -> i32 {
        inbound::record(&ctx);
        action::PASS
    }
}

egress_ebpf::program_glue!();
