//! Prints the EgressIP CRD manifest (`deploy/crd.yaml`).

fn main() {
    print!("{}", egress_k8s::crd_yaml());
}
