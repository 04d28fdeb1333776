//! The reflectors (watch + cache) that feed the pure functions, and the
//! views of their stores those functions take.

use std::{collections::BTreeMap, fmt::Debug, hash::Hash, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::DynamicObject,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

use super::AbortOnDrop;
use crate::{claims, decode, facts::NodeInfo, pods::PodStore};

/// A reflector's store, and its task: dropping this stops the watch, so
/// that dropping [`run`]'s future stops everything it started.
pub(super) struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    _task: AbortOnDrop,
}

impl<K: Resource + Clone + 'static> std::ops::Deref for Reflected<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    type Target = Store<K>;
    fn deref(&self) -> &Store<K> {
        &self.store
    }
}

/// A reflector whose changes wake `notify`.
pub(super) fn reflect<K>(api: Api<K>, config: watcher::Config, notify: Arc<Notify>) -> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    reflect_with(api, config, notify, K::DynamicType::default())
}

/// [`reflect`] for objects whose type is known at run time.
fn reflect_with<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
    dyntype: K::DynamicType,
) -> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let kind = K::kind(&dyntype).to_string();
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        stream
            .for_each(|ev| {
                if let Err(e) = ev {
                    warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    Reflected {
        store: reader,
        _task: AbortOnDrop(Some(task)),
    }
}

pub(super) async fn ready<K>(store: &Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    // The writer lives as long as the reflector task, which outlives this wait.
    let _ = store.wait_until_ready().await;
}

pub(super) fn namespaces_by_name(
    store: &Store<Namespace>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    store
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect()
}

pub(super) fn nodes_info(store: &Store<Node>) -> Vec<NodeInfo> {
    node_infos(&store.state())
}

/// The facts of `nodes` (a store's snapshot), by name.
pub(super) fn node_infos(nodes: &[Arc<Node>]) -> Vec<NodeInfo> {
    let mut v: Vec<NodeInfo> = nodes
        .iter()
        .filter_map(|n| NodeInfo::from_node(n))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// EgressIPs as raw objects, each decoded on its own ([`decode`]): one that
/// does not deserialize must not keep the watch from syncing the others.
fn reflect_egressips(client: &Client, notify: Arc<Notify>) -> Reflected<DynamicObject> {
    let ar = decode::api_resource();
    reflect_with(
        Api::all_with(client.clone(), &ar),
        watcher::Config::default(),
        notify,
        ar,
    )
}

/// The watches both the assigner and a node's projection need: EgressIPs
/// (raw, see [`decode::snapshot`]), Nodes, Namespaces, the Pods `pods`
/// selects (kept as [`crate::facts::PodInfo`] only), and the claims Leases
/// in `namespace`; every change wakes `notify`.
pub(super) struct ClusterWatches {
    pub(super) eips: Reflected<DynamicObject>,
    pub(super) nodes: Reflected<Node>,
    pub(super) namespaces: Reflected<Namespace>,
    pub(super) pods: PodStore,
    pub(super) claims: Reflected<Lease>,
}

impl ClusterWatches {
    pub(super) fn start(
        client: &Client,
        namespace: &str,
        pods: watcher::Config,
        notify: &Arc<Notify>,
    ) -> Self {
        Self {
            eips: reflect_egressips(client, notify.clone()),
            nodes: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                notify.clone(),
            ),
            namespaces: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                notify.clone(),
            ),
            pods: PodStore::watch(client.clone(), pods, notify.clone()),
            claims: reflect(
                Api::namespaced(client.clone(), namespace),
                role(claims::ROLE_CLAIMS),
                notify.clone(),
            ),
        }
    }

    /// Waits until every one has listed its objects once.
    pub(super) async fn ready(&self) {
        ready(&self.eips).await;
        ready(&self.nodes).await;
        ready(&self.namespaces).await;
        self.pods.ready().await;
        ready(&self.claims).await;
    }
}

/// The Leases of one role (claims, IP locks).
pub(super) fn role(role: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!("{}={role}", claims::ROLE_LABEL))
}
