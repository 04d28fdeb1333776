//! Which address is this node's: the first of the candidates, in order of
//! authority, that an interface of this node actually holds.

use std::{fmt, net::Ipv4Addr};

/// Where a candidate node address came from, most authoritative first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `NODE_IP` (the DaemonSet sets it from `status.hostIP`), `--node-address`
    /// or `node.address`: the operator said so.
    Explicit,
    /// The Node object's `InternalIP` (then `ExternalIP`).
    NodeObject,
    /// What the host name resolves to.
    Hostname,
    /// The address of the interface carrying the default route.
    DefaultRoute,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Explicit => "NODE_IP / --node-address / node.address",
            Self::NodeObject => "the Node object's address",
            Self::Hostname => "the host name's address",
            Self::DefaultRoute => "the default-route interface's address",
        })
    }
}

/// One source's answer: an address, or why it has none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub source: Source,
    pub found: Result<Ipv4Addr, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "the node address {addr} given by {given_by} is not an address of this node (local: {})",
        list(local)
    )]
    ExplicitNotLocal {
        addr: Ipv4Addr,
        given_by: Source,
        local: Vec<Ipv4Addr>,
    },
    #[error("cannot tell this node's address: {}; set NODE_IP or node.address", tried.join("; "))]
    NoneFound { tried: Vec<String> },
}

fn list(addrs: &[Ipv4Addr]) -> String {
    if addrs.is_empty() {
        return "none".into();
    }
    addrs
        .iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The chosen address, its source, and why the better sources were passed
/// over (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub addr: Ipv4Addr,
    pub source: Source,
    pub passed_over: Vec<String>,
}

/// Takes the first candidate held by a local interface. An explicit address
/// that is not local is an error rather than something to route around: the
/// operator's setting is wrong and guessing past it would hide that.
pub fn choose(candidates: &[Candidate], local: &[Ipv4Addr]) -> Result<Choice, IdentityError> {
    let mut passed_over = Vec::new();
    for c in candidates {
        match &c.found {
            Ok(addr) if local.contains(addr) => {
                return Ok(Choice {
                    addr: *addr,
                    source: c.source,
                    passed_over,
                });
            }
            Ok(addr) if c.source == Source::Explicit => {
                return Err(IdentityError::ExplicitNotLocal {
                    addr: *addr,
                    given_by: c.source,
                    local: local.to_vec(),
                });
            }
            Ok(addr) => passed_over.push(format!("{}: {addr} is not local", c.source)),
            Err(why) => passed_over.push(format!("{}: {why}", c.source)),
        }
    }
    Err(IdentityError::NoneFound { tried: passed_over })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn c(source: Source, found: Result<&str, &str>) -> Candidate {
        Candidate {
            source,
            found: found.map(ip).map_err(str::to_string),
        }
    }

    const LOCAL: [&str; 2] = ["172.18.0.11", "10.244.1.1"];

    fn local() -> Vec<Ipv4Addr> {
        LOCAL.iter().map(|s| ip(s)).collect()
    }

    #[test]
    fn the_first_local_candidate_wins_and_the_others_are_explained() {
        let got = choose(
            &[
                c(Source::Explicit, Err("not set")),
                c(Source::NodeObject, Ok("192.0.2.7")),
                c(Source::Hostname, Ok("172.18.0.11")),
                c(Source::DefaultRoute, Ok("10.244.1.1")),
            ],
            &local(),
        )
        .unwrap();
        assert_eq!(
            (got.addr, got.source),
            (ip("172.18.0.11"), Source::Hostname)
        );
        assert_eq!(
            got.passed_over,
            [
                "NODE_IP / --node-address / node.address: not set",
                "the Node object's address: 192.0.2.7 is not local",
            ]
        );
    }

    #[test]
    fn an_explicit_address_must_be_local() {
        let err = choose(
            &[
                c(Source::Explicit, Ok("192.0.2.7")),
                c(Source::DefaultRoute, Ok("172.18.0.11")),
            ],
            &local(),
        )
        .unwrap_err();
        assert!(matches!(err, IdentityError::ExplicitNotLocal { .. }));
        assert!(
            err.to_string()
                .contains("192.0.2.7 given by NODE_IP / --node-address / node.address is not an address of this node (local: 172.18.0.11, 10.244.1.1)"),
            "{err}"
        );
        let ok = choose(&[c(Source::Explicit, Ok("10.244.1.1"))], &local()).unwrap();
        assert_eq!((ok.addr, ok.source), (ip("10.244.1.1"), Source::Explicit));
    }

    #[test]
    fn nothing_found_lists_every_attempt() {
        let err = choose(
            &[
                c(Source::NodeObject, Err("Node \"n1\" has no InternalIP")),
                c(Source::Hostname, Err("\"n1\" does not resolve")),
                c(Source::DefaultRoute, Err("no default route")),
            ],
            &local(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot tell this node's address: the Node object's address: Node \"n1\" has no InternalIP; \
             the host name's address: \"n1\" does not resolve; the default-route interface's address: \
             no default route; set NODE_IP or node.address"
        );
    }
}
