//! Interface-name patterns of the configuration (`pod_interfaces`,
//! `upstream_interfaces`, `egress_interfaces`): a name, or a prefix ending
//! in `*`.

/// Whether `name` matches one of `patterns` (`eth0`, `bond*`).
pub fn interface_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns_match_names_or_prefixes() {
        let p = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(interface_matches(&p(&["veth*"]), "veth1"));
        assert!(interface_matches(&p(&["veth*"]), "veth"));
        assert!(!interface_matches(&p(&["veth*"]), "eth0"));
        assert!(interface_matches(&p(&["eth0", "tun0"]), "tun0"));
        assert!(!interface_matches(&p(&["tun0"]), "tun01"));
        assert!(!interface_matches(&[], "eth0"));
    }
}
