//! EgressIPs decoded one object at a time.
//!
//! A typed kube-rs watcher decodes a whole list page at once: one EgressIP
//! that does not deserialize (written before the CRD refused it, or by a
//! CRD without our schema, or a hand-edited status) fails the list, and the
//! watch never syncs, so no node programs anything. The agents therefore
//! watch EgressIPs as [`DynamicObject`]s and decode each here. A malformed
//! object is set aside with its error: the assigner writes it an `Invalid`
//! condition (a status patch on the raw object, see [`invalid_status_patch`])
//! and a Warning Event, every agent logs it once per version, and the
//! others are applied as usual. A spec that decodes with a status that does
//! not is taken with no status: the assigner rewrites the status.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder},
};
use serde_json::Value;
use tracing::warn;

use crate::crd::{EgressIP, condition};

/// Condition reason of an EgressIP that does not deserialize.
pub const MALFORMED: &str = "Malformed";

/// The API resource to watch EgressIPs as raw objects.
pub fn api_resource() -> ApiResource {
    ApiResource::erase::<EgressIP>(&())
}

/// An EgressIP that does not deserialize.
#[derive(Clone, Debug)]
pub struct Malformed {
    pub object: DynamicObject,
    /// The deserializer's message, with the path of the offending field.
    pub error: String,
}

impl Malformed {
    pub fn name(&self) -> String {
        self.object.metadata.name.clone().unwrap_or_default()
    }
}

/// The EgressIPs of one snapshot of the watch.
#[derive(Clone, Debug, Default)]
pub struct Decoded {
    pub good: Vec<EgressIP>,
    pub bad: Vec<Malformed>,
    /// Objects (good or bad) whose status did not deserialize and was set
    /// aside; `(name, error)`.
    pub bad_status: Vec<(String, String)>,
    /// Of `bad` and `bad_status`, the names not reported before at this
    /// resourceVersion: to log once.
    pub newly_bad: Vec<(String, String)>,
}

type Verdict = Result<(EgressIP, Option<String>), String>;

/// Decodes snapshots, remembering each object's verdict by UID and
/// resourceVersion, so that an unchanged object is decoded (and reported)
/// once.
#[derive(Default)]
pub struct Decoder {
    seen: BTreeMap<String, (Option<String>, Verdict)>,
}

impl Decoder {
    pub fn decode<'a>(&mut self, objects: impl IntoIterator<Item = &'a DynamicObject>) -> Decoded {
        let mut out = Decoded::default();
        let mut seen = BTreeMap::new();
        for obj in objects {
            let key = obj
                .metadata
                .uid
                .clone()
                .or_else(|| obj.metadata.name.clone())
                .unwrap_or_default();
            let rv = obj.metadata.resource_version.clone();
            let cached = self.seen.remove(&key).filter(|(v, _)| *v == rv);
            let fresh = cached.is_none();
            let verdict = cached.map(|(_, v)| v).unwrap_or_else(|| decode_one(obj));
            let name = obj.metadata.name.clone().unwrap_or_default();
            match &verdict {
                Ok((eip, status_error)) => {
                    out.good.push(eip.clone());
                    if let Some(e) = status_error {
                        out.bad_status.push((name.clone(), e.clone()));
                        if fresh {
                            out.newly_bad.push((name, format!("status ignored: {e}")));
                        }
                    }
                }
                Err(e) => {
                    out.bad.push(Malformed {
                        object: obj.clone(),
                        error: e.clone(),
                    });
                    if fresh {
                        out.newly_bad.push((name, e.clone()));
                    }
                }
            }
            seen.insert(key, (rv, verdict));
        }
        // Forget deleted objects.
        self.seen = seen;
        out
    }
}

fn decode_one(obj: &DynamicObject) -> Verdict {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    match serde_path_to_error(&value) {
        Ok(eip) => Ok((eip, None)),
        Err(full) => {
            // A spec that decodes with a status that does not: keep the spec.
            let mut without_status = value;
            let had_status = without_status
                .as_object_mut()
                .and_then(|o| o.remove("status"))
                .is_some();
            match serde_path_to_error(&without_status) {
                Ok(eip) if had_status => Ok((eip, Some(full))),
                _ => Err(full),
            }
        }
    }
}

/// Decodes, naming the field at fault (`spec.egressIPs: invalid type ...`).
fn serde_path_to_error(value: &Value) -> Result<EgressIP, String> {
    serde_path_to_error::deserialize::<_, EgressIP>(value).map_err(|e| {
        let path = e.path().to_string();
        if path.is_empty() || path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

/// The status the assigner writes on a malformed EgressIP: `Invalid`
/// (reason [`MALFORMED`], the decoding error), nothing assigned. `None`
/// when the object already says so.
pub fn invalid_status_patch(m: &Malformed, now: Timestamp) -> Option<Value> {
    let status = m.object.data.get("status");
    let current = status
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value::<Vec<Condition>>(c.clone()).ok())
        .unwrap_or_default();
    let generation = m.object.metadata.generation;
    let already = current.iter().any(|c| {
        c.type_ == condition::INVALID
            && c.status == "True"
            && c.reason == MALFORMED
            && c.message == m.error
            && c.observed_generation == generation
    });
    if already {
        return None;
    }
    let since = current
        .iter()
        .find(|c| c.type_ == condition::INVALID && c.status == "True")
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let invalid = Condition {
        type_: condition::INVALID.into(),
        status: "True".into(),
        reason: MALFORMED.into(),
        message: m.error.clone(),
        observed_generation: generation,
        last_transition_time: since,
    };
    Some(serde_json::json!({
        "status": {
            "items": [],
            "ips": null,
            "conditions": [invalid],
            "observedGeneration": generation,
        }
    }))
}

/// The object reference Events about `m` point at.
pub fn object_ref(m: &Malformed) -> k8s_openapi::api::core::v1::ObjectReference {
    m.object.object_ref(&api_resource())
}

/// Decodes a snapshot of the raw watch and logs each malformed object once
/// per version.
pub fn snapshot(decoder: &mut Decoder, objects: &[Arc<DynamicObject>]) -> Decoded {
    let out = decoder.decode(objects.iter().map(|o| &**o));
    for (name, error) in &out.newly_bad {
        warn!(egressip = %name, %error, "EgressIP does not deserialize: ignored, the others are applied");
    }
    out
}

/// The assigner's part: an `Invalid` condition on each malformed EgressIP
/// (a status patch on the raw object) and a Warning Event when it is new.
pub async fn report_malformed(api: &Api<DynamicObject>, recorder: &Recorder, bad: &[Malformed]) {
    for m in bad {
        let Some(patch) = invalid_status_patch(m, Timestamp::now()) else {
            continue;
        };
        let name = m.name();
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                let event = Event {
                    type_: EventType::Warning,
                    reason: MALFORMED.into(),
                    note: Some(m.error.clone()),
                    action: "Validate".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &object_ref(m)).await {
                    warn!(egressip = %name, error = %e, "cannot publish event");
                }
            }
            Err(e) => warn!(egressip = %name, error = %e, "cannot write the Invalid status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, rv: &str, body: Value) -> DynamicObject {
        let mut v = serde_json::json!({
            "apiVersion": "egress.example.dev/v1", "kind": "EgressIP",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": rv, "generation": 2},
        });
        v.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn one_malformed_object_is_set_aside_and_the_others_decode() {
        let good = raw(
            "team-a",
            "10",
            serde_json::json!({"spec": {"egressIPs": ["172.18.0.100"], "namespaceSelector": {}}}),
        );
        let bad = raw(
            "team-b",
            "11",
            serde_json::json!({"spec": {"egressIPs": "172.18.0.101", "namespaceSelector": {}}}),
        );
        let bad_status = raw(
            "team-c",
            "12",
            serde_json::json!({"spec": {"egressIPs": ["172.18.0.102"], "namespaceSelector": {}},
                               "status": {"ips": [{"egressIP": "172.18.0.102", "policyId": -3}]}}),
        );
        let mut d = Decoder::default();
        let out = d.decode([&good, &bad, &bad_status]);
        let names: Vec<String> = out
            .good
            .iter()
            .map(|e| e.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["team-a", "team-c"]);
        assert!(out.good[1].status.is_none(), "the bad status is set aside");
        assert_eq!(out.bad.len(), 1);
        assert_eq!(out.bad[0].name(), "team-b");
        assert!(
            out.bad[0].error.starts_with("spec.egressIPs: "),
            "{}",
            out.bad[0].error
        );
        assert!(
            out.bad[0].error.contains("expected a sequence"),
            "{}",
            out.bad[0].error
        );
        assert_eq!(out.bad_status[0].0, "team-c");
        assert!(
            out.bad_status[0].1.starts_with("status.ips[0].policyId: "),
            "{}",
            out.bad_status[0].1
        );
        assert_eq!(out.newly_bad.len(), 2);

        // Unchanged: not reported again; changed: reported again.
        let again = d.decode([&good, &bad, &bad_status]);
        assert!(again.newly_bad.is_empty());
        assert_eq!(again.bad.len(), 1);
        let bad2 = raw(
            "team-b",
            "13",
            serde_json::json!({"spec": {"egressIPs": 7, "namespaceSelector": {}}}),
        );
        assert_eq!(d.decode([&good, &bad2]).newly_bad.len(), 1);
    }

    #[test]
    fn the_invalid_status_is_written_once_per_error() {
        let bad = raw(
            "team-b",
            "11",
            serde_json::json!({"spec": {"egressIPs": ["172.18.0.101"], "failurePolicy": "Sometimes", "namespaceSelector": {}}}),
        );
        let m = Decoder::default().decode([&bad]).bad.remove(0);
        assert!(m.error.starts_with("spec.failurePolicy: "), "{}", m.error);
        let now: Timestamp = "2026-05-01T12:00:00Z".parse().unwrap();
        let patch = invalid_status_patch(&m, now).unwrap();
        let cond = &patch["status"]["conditions"][0];
        assert_eq!(cond["type"], "Invalid");
        assert_eq!(cond["reason"], MALFORMED);
        assert_eq!(cond["observedGeneration"], 2);
        assert_eq!(patch["status"]["items"], serde_json::json!([]));
        // Once the object carries it, nothing more to write.
        let mut written = m.clone();
        written
            .object
            .data
            .as_object_mut()
            .unwrap()
            .insert("status".into(), patch["status"].clone());
        assert!(invalid_status_patch(&written, now).is_none());
    }
}
