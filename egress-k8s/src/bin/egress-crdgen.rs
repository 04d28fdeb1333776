//! Prints the EgressIP CRD manifest (`deploy/crd.yaml`).
//!
//! `egress-crdgen [--max-policies N]`: `status.ips[].policyId` is bounded by
//! what the nodes' policy arrays hold; give the `[datapath] max_policies` of
//! your configuration when it is not the default.

fn main() {
    let mut args = std::env::args().skip(1);
    let max_policies = match (args.next().as_deref(), args.next()) {
        (None, _) => egress_common::maps::DEFAULT_MAX_POLICIES,
        (Some("--max-policies"), Some(n)) => match n.parse::<u32>() {
            Ok(n) if (2..=egress_model::MAX_POLICY_ID + 1).contains(&n) => n,
            _ => {
                eprintln!(
                    "--max-policies {n:?}: must be within 2..={}",
                    egress_model::MAX_POLICY_ID + 1
                );
                std::process::exit(2);
            }
        },
        _ => {
            eprintln!("usage: egress-crdgen [--max-policies N]");
            std::process::exit(2);
        }
    };
    print!("{}", egress_k8s::crd_yaml_for(max_policies));
}
