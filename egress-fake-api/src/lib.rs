//! An in-memory Kubernetes API server for kube-rs end-to-end tests: it serves
//! list, chunked watch streams, get, create, replace (with resourceVersion
//! preconditions), JSON merge patch (main resource and `/status`) and delete,
//! answering with the API server's JSON shapes (lists, watch events, `Status`
//! errors).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{Method, StatusCode, Uri, header},
    response::Response,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub collection: String,
    pub type_: &'static str,
    pub object: Value,
    pub rv: u64,
    /// When the server stored it.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// collection path -> (namespace, name) -> object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<WatchEvent>,
}

impl State {
    fn object(&self, collection: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(collection)?
            .get(&(namespace.to_string(), name.to_string()))
    }
}

fn not_found(collection: &str, name: &str) -> Response {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{collection} \"{name}\" not found"),
    )
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Requests whose path contains one of these fail with 503, as when a
    /// node loses its connection to the API server.
    unavailable: Arc<Mutex<Vec<String>>>,
    events: broadcast::Sender<WatchEvent>,
    pub addr: SocketAddr,
}

struct Target {
    /// e.g. `/api/v1/pods`, `/apis/coordination.k8s.io/v1/leases`.
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segs.first()? {
        "api" => (format!("/api/{}", segs.get(1)?), &segs[2..]),
        "apis" => (
            format!("/apis/{}/{}", segs.get(1)?, segs.get(2)?),
            &segs[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    Some(Target {
        collection: format!("{prefix}/{}", rest.first()?),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        status: rest.get(2) == Some(&"status"),
    })
}

fn kind_of(collection: &str) -> (&'static str, &'static str) {
    match collection.rsplit('/').next().unwrap() {
        "pods" => ("v1", "Pod"),
        "nodes" => ("v1", "Node"),
        "namespaces" => ("v1", "Namespace"),
        "leases" => ("coordination.k8s.io/v1", "Lease"),
        "events" => ("events.k8s.io/v1", "Event"),
        "egressips" => ("egress.example.dev/v1", "EgressIP"),
        other => panic!("fake API server: unknown resource {other}"),
    }
}

fn status_error(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn ok(v: Value) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), urlencoding_decode(v)))
        })
        .collect()
}

fn urlencoding_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Equality-based selectors (`a=b,c=d`) over a JSON path.
fn selected(obj: &Value, q: &BTreeMap<String, String>) -> bool {
    let labels_ok = q.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|req| {
            let (k, v) = req.split_once('=').expect("equality label selector");
            obj["metadata"]["labels"][k].as_str() == Some(v)
        })
    });
    let fields_ok = q.get("fieldSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|req| {
            let (k, v) = req.split_once('=').expect("equality field selector");
            let mut cur = obj;
            for part in k.split('.') {
                cur = &cur[part];
            }
            cur.as_str() == Some(v)
        })
    });
    labels_ok && fields_ok
}

impl FakeApi {
    /// Serves on an ephemeral loopback port.
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener)
    }

    /// Serves on `listener`, which may have been bound inside another network
    /// namespace (the lab binds one on its router so node agents reach it).
    /// Must be called within a tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (events, _) = broadcast::channel(4096);
        let addr = listener.local_addr().unwrap();
        let api = Self {
            state: Arc::new(Mutex::new(State::default())),
            unavailable: Arc::new(Mutex::new(Vec::new())),
            events,
            addr,
        };
        let served = api.clone();
        let app = Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let api = served.clone();
            async move { api.handle(method, uri, body) }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        api
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Stores an object as if created through the API.
    pub fn create(&self, collection: &str, object: Value) -> Value {
        let mut st = self.state.lock().unwrap();
        self.insert(&mut st, collection, object, "ADDED")
    }

    pub fn get(&self, collection: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.object(collection, namespace.unwrap_or_default(), name)
            .cloned()
    }

    pub fn list(&self, collection: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies a merge patch as a client would.
    pub fn patch(
        &self,
        collection: &str,
        namespace: Option<&str>,
        name: &str,
        patch: Value,
    ) -> Value {
        let mut st = self.state.lock().unwrap();
        let mut obj = st
            .object(collection, namespace.unwrap_or_default(), name)
            .unwrap_or_else(|| panic!("patch: {collection} {name:?} does not exist"))
            .clone();
        merge_patch(&mut obj, &patch);
        self.store(&mut st, collection, obj, "MODIFIED")
    }

    /// Deletes an object as a client would; `None` if there was none.
    pub fn delete(&self, collection: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let mut st = self.state.lock().unwrap();
        let obj = st
            .object(collection, namespace.unwrap_or_default(), name)?
            .clone();
        Some(self.store(&mut st, collection, obj, "DELETED"))
    }

    /// Makes requests whose path contains `fragment` fail (503) until
    /// [`Self::restore`].
    pub fn cut(&self, fragment: &str) {
        self.unavailable.lock().unwrap().push(fragment.to_string());
    }

    pub fn restore(&self) {
        self.unavailable.lock().unwrap().clear();
    }

    /// Every change so far, in order.
    pub fn history(&self) -> Vec<WatchEvent> {
        self.state.lock().unwrap().history.clone()
    }

    fn insert(
        &self,
        st: &mut State,
        collection: &str,
        mut object: Value,
        type_: &'static str,
    ) -> Value {
        let (api_version, kind) = kind_of(collection);
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        object["metadata"]["uid"] = json!(format!("uid-{}-{name}", kind.to_lowercase()));
        if object["metadata"]["creationTimestamp"].is_null() {
            object["metadata"]["creationTimestamp"] = json!(
                k8s_openapi::jiff::Timestamp::now()
                    .round(k8s_openapi::jiff::Unit::Second)
                    .unwrap()
                    .to_string()
            );
        }
        if collection.ends_with("/egressips") {
            object["metadata"]["generation"] = json!(1);
        }
        self.store(st, collection, object, type_)
    }

    fn store(
        &self,
        st: &mut State,
        collection: &str,
        mut object: Value,
        type_: &'static str,
    ) -> Value {
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let objects = st.objects.entry(collection.to_string()).or_default();
        if type_ == "DELETED" {
            objects.remove(&(ns, name));
        } else {
            objects.insert((ns, name), object.clone());
        }
        let ev = WatchEvent {
            collection: collection.to_string(),
            type_,
            object: object.clone(),
            rv,
            at: std::time::Instant::now(),
        };
        st.history.push(ev.clone());
        let _ = self.events.send(ev);
        object
    }

    fn handle(&self, method: Method, uri: Uri, body: Bytes) -> Response {
        let Some(t) = parse_path(uri.path()) else {
            return status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no route {}", uri.path()),
            );
        };
        if self
            .unavailable
            .lock()
            .unwrap()
            .iter()
            .any(|f| uri.path().contains(f.as_str()))
        {
            return status_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "cut off by the test".into(),
            );
        }
        let q = query(&uri);
        let mut st = self.state.lock().unwrap();
        let ns = t.namespace.clone().unwrap_or_default();
        let in_scope = |o: &Value| {
            t.namespace.is_none() || o["metadata"]["namespace"].as_str() == t.namespace.as_deref()
        };
        match (method, &t.name) {
            (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                let from: u64 = q
                    .get("resourceVersion")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                let timeout = q
                    .get("timeoutSeconds")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(290u64);
                let live = self.events.subscribe();
                let replay: Vec<WatchEvent> = st
                    .history
                    .iter()
                    .filter(|e| e.rv > from && e.collection == t.collection)
                    .cloned()
                    .collect();
                let last = st.rv;
                drop(st);
                let (coll, nsf, q2) = (t.collection.clone(), t.namespace.clone(), q.clone());
                let keep = move |e: &WatchEvent| {
                    e.collection == coll
                        && (nsf.is_none()
                            || e.object["metadata"]["namespace"].as_str() == nsf.as_deref())
                        && selected(&e.object, &q2)
                };
                let stream = watch_body(replay, last, keep, live, timeout);
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::TRANSFER_ENCODING, "chunked")
                    .body(Body::from_stream(stream))
                    .unwrap()
            }
            (Method::GET, None) => {
                let (api_version, kind) = kind_of(&t.collection);
                let items: Vec<Value> = st
                    .objects
                    .get(&t.collection)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| in_scope(o) && selected(o, &q))
                    .cloned()
                    .collect();
                ok(json!({
                    "apiVersion": api_version, "kind": format!("{kind}List"),
                    "metadata": {"resourceVersion": st.rv.to_string()},
                    "items": items
                }))
            }
            (Method::GET, Some(name)) => match st.object(&t.collection, &ns, name) {
                Some(o) => ok(o.clone()),
                None => not_found(&t.collection, name),
            },
            (Method::POST, None) => {
                let mut obj: Value = serde_json::from_slice(&body).unwrap();
                if let Some(n) = &t.namespace {
                    obj["metadata"]["namespace"] = json!(n);
                }
                let name = obj["metadata"]["name"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        let prefix = obj["metadata"]["generateName"]
                            .as_str()
                            .unwrap_or("obj-")
                            .to_string();
                        format!("{prefix}{}", st.rv + 1)
                    });
                obj["metadata"]["name"] = json!(name);
                if st.object(&t.collection, &ns, &name).is_some() {
                    return status_error(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("\"{name}\" already exists"),
                    );
                }
                let created = self.insert(&mut st, &t.collection, obj, "ADDED");
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(created.to_string()))
                    .unwrap()
            }
            (Method::PUT, Some(name)) => {
                let Some(cur) = st.object(&t.collection, &ns, name).cloned() else {
                    return not_found(&t.collection, name);
                };
                let mut obj: Value = serde_json::from_slice(&body).unwrap();
                if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != cur["metadata"]["resourceVersion"].as_str()
                {
                    return status_error(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                obj["metadata"]["uid"] = cur["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = cur["metadata"]["creationTimestamp"].clone();
                let stored = self.store(&mut st, &t.collection, obj, "MODIFIED");
                ok(stored)
            }
            (Method::PATCH, Some(name)) => {
                let Some(mut obj) = st.object(&t.collection, &ns, name).cloned() else {
                    return not_found(&t.collection, name);
                };
                let mut patch: Value = serde_json::from_slice(&body).unwrap();
                if t.status {
                    // The status subresource ignores everything but status.
                    patch = json!({"status": patch["status"].clone()});
                } else if t.collection.ends_with("/egressips") {
                    if let Some(p) = patch.as_object_mut() {
                        p.remove("status");
                    }
                    let before = obj["spec"].clone();
                    merge_patch(&mut obj, &patch);
                    if obj["spec"] != before {
                        let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                        obj["metadata"]["generation"] = json!(g + 1);
                    }
                    return ok(self.store(&mut st, &t.collection, obj, "MODIFIED"));
                }
                merge_patch(&mut obj, &patch);
                ok(self.store(&mut st, &t.collection, obj, "MODIFIED"))
            }
            (Method::DELETE, Some(name)) => {
                let Some(obj) = st.object(&t.collection, &ns, name).cloned() else {
                    return not_found(&t.collection, name);
                };
                ok(self.store(&mut st, &t.collection, obj, "DELETED"))
            }
            (m, _) => status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{m} {}", uri.path()),
            ),
        }
    }
}

async fn recv(rx: &mut broadcast::Receiver<WatchEvent>) -> Option<WatchEvent> {
    loop {
        match rx.recv().await {
            Ok(e) => return Some(e),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// The body of a watch response: replayed events, then live ones, one JSON
/// object per line, until the timeout ends the request as the API server does.
fn watch_body<F>(
    replay: Vec<WatchEvent>,
    last: u64,
    keep: F,
    rx: broadcast::Receiver<WatchEvent>,
    timeout_secs: u64,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send
where
    F: Fn(&WatchEvent) -> bool + Send + Sync + 'static,
{
    let line = |e: &WatchEvent| {
        Bytes::from(format!(
            "{}\n",
            json!({"type": e.type_, "object": e.object})
        ))
    };
    let first: Vec<Result<Bytes, Infallible>> = replay
        .iter()
        .filter(|e| keep(e))
        .map(|e| Ok(line(e)))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
    let keep = Arc::new(keep);
    let live = futures::stream::unfold(rx, move |mut rx| async move {
        tokio::select! {
            e = recv(&mut rx) => e.map(|e| (e, rx)),
            _ = tokio::time::sleep_until(deadline) => None,
        }
    });
    let live = futures::StreamExt::filter_map(live, move |e| {
        let out = (e.rv > last && keep(&e)).then(|| Ok(line(&e)));
        async move { out }
    });
    futures::StreamExt::chain(futures::stream::iter(first), live)
}
