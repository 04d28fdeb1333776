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
    eprintln!("pod_egress is an eBPF program: build it with `cargo xtask build-ebpf`");
    std::process::exit(1);
}
