//! Read-only views of a running (or stopped, still pinned) datapath.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use egress_common::{
    CtState, DropReason, PolicyStats, config_flags, ct_flags, policy_flags, proto,
};
use serde_json::{Value, json};

use crate::{
    gc::monotonic_ns,
    loader::pinned_links,
    maps::{Maps, PinLayout, exclusions_by_policy},
};

fn open(instance: &str) -> anyhow::Result<(PinLayout, Maps)> {
    let layout = PinLayout::for_instance(instance);
    let maps = Maps::open(&layout).with_context(|| {
        format!(
            "no datapath pinned at {} (is the agent running?)",
            layout.root.display()
        )
    })?;
    Ok((layout, maps))
}

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMP => "icmp",
        _ => "other",
    }
}

fn stats_json(id: u32, s: &PolicyStats) -> Value {
    let drops: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.name().to_owned(), json!(s.drops.get(*r))))
        .collect();
    json!({
        "id": id,
        "egress_packets": s.egress_packets,
        "egress_bytes": s.egress_bytes,
        "reply_packets": s.reply_packets,
        "reply_bytes": s.reply_bytes,
        "steered_packets": s.steered_packets,
        "new_flows": s.new_flows,
        "drops": drops,
    })
}

/// Counters of index 0 (unattributed drops), of every active policy, and of
/// any inactive slot that still has counts.
pub fn stats(instance: &str, as_json: bool) -> anyhow::Result<()> {
    let (_, maps) = open(instance)?;
    let image = maps.read_image()?;
    let mut rows = Vec::new();
    for id in 0..maps.stats_len() {
        let s = maps.policy_stats(id)?;
        if id == 0 || image.policies.contains_key(&id) || s != PolicyStats::default() {
            rows.push((id, s));
        }
    }
    if as_json {
        let policies: Vec<Value> = rows.iter().map(|(id, s)| stats_json(*id, s)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "policies": policies }))?
        );
        return Ok(());
    }
    println!(
        "{:>6} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10}  drops",
        "policy",
        "egress_pkts",
        "egress_bytes",
        "reply_pkts",
        "reply_bytes",
        "steered",
        "new_flows"
    );
    for (id, s) in rows {
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| s.drops.get(**r) > 0)
            .map(|r| format!("{}={}", r.name(), s.drops.get(*r)))
            .collect();
        println!(
            "{:>6} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10}  {}",
            if id == 0 {
                "-".to_owned()
            } else {
                id.to_string()
            },
            s.egress_packets,
            s.egress_bytes,
            s.reply_packets,
            s.reply_bytes,
            s.steered_packets,
            s.new_flows,
            if drops.is_empty() {
                "none".to_owned()
            } else {
                drops.join(" ")
            }
        );
    }
    Ok(())
}

pub fn nat_list(instance: &str, as_json: bool) -> anyhow::Result<()> {
    let (_, maps) = open(instance)?;
    let now = monotonic_ns();
    let mut flows = Vec::new();
    for item in maps.nat_fwd.iter() {
        let (key, e) = item?;
        let reverse_present = maps
            .nat_rev
            .get(&key.reply_after_nat(e.nat_addr, e.nat_port), 0)
            .is_ok();
        flows.push(json!({
            "proto": proto_name(key.proto),
            "pod": format!("{}:{}", ip(key.src_addr), key.src_port),
            "server": format!("{}:{}", ip(key.dst_addr), key.dst_port),
            "nat": format!("{}:{}", ip(e.nat_addr), e.nat_port),
            "policy_id": e.policy_id,
            "state": format!("{:?}", CtState::from_u8(e.state)),
            "replied": e.flags & ct_flags::SEEN_REPLY != 0,
            "origin_node": if e.flags & ct_flags::REMOTE_ORIGIN != 0 { Some(ip(e.origin_node).to_string()) } else { None },
            // A flow of a local pod steered to that egress node (no reverse entry here).
            "steered_to": if e.flags & ct_flags::STEERED != 0 { Some(ip(e.origin_node).to_string()) } else { None },
            "idle_secs": now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
            "age_secs": now.saturating_sub(e.created_ns) / 1_000_000_000,
            "reverse_entry": reverse_present,
        }));
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "flows": flows }))?
        );
        return Ok(());
    }
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:>6} {:<12} {:>6}",
        "proto", "pod", "server", "nat", "policy", "state", "idle"
    );
    for f in &flows {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:>6} {:<12} {:>5}s",
            f["proto"].as_str().unwrap_or_default(),
            f["pod"].as_str().unwrap_or_default(),
            f["server"].as_str().unwrap_or_default(),
            f["nat"].as_str().unwrap_or_default(),
            f["policy_id"],
            f["state"].as_str().unwrap_or_default(),
            f["idle_secs"],
        );
    }
    println!("{} flows", flows.len());
    Ok(())
}

pub fn status(instance: &str, as_json: bool) -> anyhow::Result<()> {
    let (layout, maps) = open(instance)?;
    let image = maps.read_image()?;
    let counts = maps.flow_counts()?;
    let live_entries = maps.nat_fwd.keys().count() as u64;
    let now = monotonic_ns();
    let claims = image.config.claims_valid_until_ns;
    let links: Vec<String> = pinned_links(&layout)?
        .into_iter()
        .map(|(p, i)| format!("{p}@{i}"))
        .collect();
    let exclusions = exclusions_by_policy(&image);
    let policies: Vec<Value> = image
        .policies
        .iter()
        .map(|(id, p)| {
            json!({
                "id": id,
                "egress_ip": ip(p.egress_addr).to_string(),
                "egress_node": if p.egress_node == [0; 4] { None } else { Some(ip(p.egress_node).to_string()) },
                "local": p.flags & policy_flags::LOCAL != 0,
                "failure_policy": if p.flags & policy_flags::FAIL_OPEN != 0 { "fail-open" } else { "fail-closed" },
                "pods": image.pods.iter().filter(|(_, v)| v.policy_id == *id).map(|(k, _)| ip(*k).to_string()).collect::<Vec<_>>(),
                "marks": image.marks.iter().filter(|(_, v)| **v == *id).map(|(k, _)| format!("{k:#x}")).collect::<Vec<_>>(),
                "excluded": exclusions.get(id).cloned().unwrap_or_default(),
            })
        })
        .collect();
    let view = json!({
        "instance": instance,
        "pins": layout.root.display().to_string(),
        "node": ip(image.config.node_addr).to_string(),
        "tunnel_ifindex": image.config.tunnel_ifindex,
        "tunnel_mss": image.config.tunnel_mss,
        "links": links,
        "nodes": image.nodes.keys().map(|k| ip(*k).to_string()).collect::<Vec<_>>(),
        "global_excluded": exclusions.get(&0).cloned().unwrap_or_default(),
        "policies": policies,
        "flows": {
            "max": image.config.max_flows,
            "max_per_pod": image.config.max_flows_per_pod,
            "created": counts.created,
            "released": counts.released,
            "reclaimed": counts.reclaimed,
            "live": counts.live(),
            "entries": live_entries,
        },
        "egress_ips": {
            "pass_unmatched": image.config.flags & config_flags::PASS_UNMATCHED_TO_EGRESS_IPS != 0,
            "answer_ping": image.config.flags & config_flags::ANSWER_PING_ON_EGRESS_IPS != 0,
            // Seconds the claims stay valid; null: forever (static configuration).
            "claims_valid_for_secs": if claims == u64::MAX { None } else { Some((claims as f64 - now as f64) / 1e9) },
        },
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!(
        "instance {instance}: node {}, pins {}",
        view["node"].as_str().unwrap_or("?"),
        layout.root.display()
    );
    println!(
        "attached: {}",
        if links.is_empty() {
            "nothing".to_owned()
        } else {
            links.join(", ")
        }
    );
    println!(
        "flows: {} live of {} max, {} per pod ({} created, {} reclaimed unreplied, {} released, {} entries in nat_fwd_v4)",
        counts.live(),
        image.config.max_flows,
        image.config.max_flows_per_pod,
        counts.created,
        counts.reclaimed,
        counts.released,
        live_entries
    );
    println!(
        "claims: {}",
        if claims == u64::MAX {
            "valid (not leased)".to_owned()
        } else if claims > now {
            format!("valid for {:.1} s", (claims - now) as f64 / 1e9)
        } else {
            format!("LAPSED {:.1} s ago", (now - claims) as f64 / 1e9)
        }
    );
    println!("tunnel MSS clamp: {}", image.config.tunnel_mss);
    for p in &policies {
        println!(
            "policy {}: egress IP {} on {} ({}, {}), pods {}, marks {}, excluded {}",
            p["id"],
            p["egress_ip"].as_str().unwrap_or("?"),
            p["egress_node"].as_str().unwrap_or("no live node"),
            if p["local"].as_bool() == Some(true) {
                "translated here"
            } else {
                "steered"
            },
            p["failure_policy"].as_str().unwrap_or("?"),
            p["pods"],
            p["marks"],
            p["excluded"],
        );
    }
    Ok(())
}
