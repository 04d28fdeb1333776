//! Pods as the control plane needs them, not as the API server serves them.
//!
//! A Pod object is several kilobytes (managed fields, containers, volumes,
//! container statuses); the assigner watches every pod of the cluster and
//! needs a few dozen bytes of each. Pods are therefore read as [`SlimPod`]s
//! (the deserializer skips every other field without keeping it) and kept
//! as [`PodInfo`]s in a [`PodStore`]: name, namespace, labels, IPv4
//! address, node; finished and host-network pods are not kept at all.
//! Terminating pods are kept: they still send during their grace period.
//! `cargo xtask assigner-memory` measures the difference at 20,000 pods
//! (docs/architecture.md).
//!
//! The store serves any pod watch: the assigner's (every pod), a node
//! agent's (its own pods, by field selector), or a node agent's watch of
//! every pod.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::{
    NamespaceResourceScope, api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::{Deserialize, Deserializer};
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::facts::PodInfo;

/// A Pod with only the fields [`PodInfo`] is made of.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimPod {
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimSpec>,
    #[serde(default)]
    pub status: Option<SlimStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<SlimPodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlimPodIp {
    pub ip: String,
}

impl From<&Pod> for SlimPod {
    /// What the slim deserializer keeps of a full Pod (the metadata whole:
    /// only [`PodInfo`]'s fields of it are read).
    fn from(pod: &Pod) -> Self {
        Self {
            metadata: pod.metadata.clone(),
            spec: pod.spec.as_ref().map(|s| SlimSpec {
                node_name: s.node_name.clone(),
                host_network: s.host_network,
            }),
            status: pod.status.as_ref().map(|s| SlimStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s
                    .pod_ips
                    .as_ref()
                    .map(|ips| ips.iter().map(|p| SlimPodIp { ip: p.ip.clone() }).collect()),
            }),
        }
    }
}

/// Keeps name, namespace, uid, resourceVersion (the watch needs it),
/// labels and deletionTimestamp; managed fields, annotations and owner
/// references are skipped while parsing.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    }
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    })
}

impl Resource for SlimPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <Pod as Resource>::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        <Pod as Resource>::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        <Pod as Resource>::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <Pod as Resource>::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PodInfo {
    /// `None` for pods whose traffic we never translate: host-network pods
    /// (their source is the node's), finished pods and pods without an IPv4
    /// address yet. Terminating pods are kept: they still send during their
    /// grace period.
    pub fn from_slim(pod: &SlimPod) -> Option<Self> {
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let ip = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .find_map(|s| s.parse::<Ipv4Addr>().ok())?;
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ip,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

type Key = (String, String);

/// The pods of one watch, as [`PodInfo`]s. Dropping it stops the watch.
pub struct PodStore {
    pods: Arc<RwLock<HashMap<Key, Arc<PodInfo>>>>,
    ready: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodStore {
    /// Watches the pods `config` selects (all namespaces); every change
    /// wakes `notify`.
    pub fn watch(client: Client, config: watcher::Config, notify: Arc<Notify>) -> Self {
        let pods: Arc<RwLock<HashMap<Key, Arc<PodInfo>>>> = Arc::default();
        let (ready_tx, ready) = watch::channel(false);
        let api: Api<SlimPod> = Api::all(client);
        let shared = pods.clone();
        let task = tokio::spawn(async move {
            // A relist builds the new set aside and swaps it in whole.
            let mut relist: Option<HashMap<Key, Arc<PodInfo>>> = None;
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(p)) => {
                        if let (Some(set), Some(k), Some(info)) =
                            (relist.as_mut(), key(&p), PodInfo::from_slim(&p))
                        {
                            set.insert(k, Arc::new(info));
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(set) = relist.take() {
                            *shared.write().expect("pod store lock") = set;
                        }
                        ready_tx.send_replace(true);
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        if let Some(k) = key(&p) {
                            let mut map = shared.write().expect("pod store lock");
                            match PodInfo::from_slim(&p) {
                                Some(info) => map.insert(k, Arc::new(info)),
                                None => map.remove(&k),
                            };
                        }
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(k) = key(&p) {
                            shared.write().expect("pod store lock").remove(&k);
                        }
                    }
                    Err(e) => {
                        warn!(kind = "Pod", error = %e, "watch failed; retrying with backoff")
                    }
                }
                notify.notify_one();
            }
        });
        Self { pods, ready, task }
    }

    /// Waits until the first list has been stored.
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        // The sender lives as long as the task, which outlives this wait.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// The pods now.
    pub fn snapshot(&self) -> Vec<PodInfo> {
        self.pods
            .read()
            .expect("pod store lock")
            .values()
            .map(|p| (**p).clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.pods.read().expect("pod store lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key(p: &SlimPod) -> Option<Key> {
    Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::fixtures;

    #[test]
    fn the_slim_form_gives_the_same_facts_and_keeps_nothing_else() {
        let full = fixtures::pod("team-a", "web-1", "node1", "10.244.1.5", &[("app", "web")]);
        let mut json = serde_json::to_value(&full).unwrap();
        json["metadata"]["managedFields"] = serde_json::json!([{"manager": "kubelet", "operation": "Update",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:podIP": {}}}}]);
        json["metadata"]["annotations"] =
            serde_json::json!({"kubectl.kubernetes.io/restartedAt": "now"});
        let slim: SlimPod = serde_json::from_value(json).unwrap();
        assert_eq!(PodInfo::from_slim(&slim), PodInfo::from_pod(&full));
        assert!(slim.metadata.managed_fields.is_none());
        assert!(slim.metadata.annotations.is_none());
        assert_eq!(slim.metadata.resource_version.as_deref(), Some("2000"));

        for (field, value) in [
            ("/spec/hostNetwork", serde_json::json!(true)),
            ("/status/phase", serde_json::json!("Succeeded")),
        ] {
            let mut v = serde_json::to_value(&full).unwrap();
            let (parent, leaf) = field.rsplit_once('/').unwrap();
            v.pointer_mut(parent).unwrap()[leaf] = value;
            let slim: SlimPod = serde_json::from_value(v.clone()).unwrap();
            let full: Pod = serde_json::from_value(v).unwrap();
            assert_eq!(PodInfo::from_slim(&slim), None, "{field}");
            assert_eq!(PodInfo::from_pod(&full), None, "{field}");
        }
    }
}
