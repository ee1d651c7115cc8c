//! A small in-process Kubernetes API server for the datastore tests.
//!
//! No real API server can be installed on these machines, so the kube client code the agent
//! runs (its watchers) is tested over HTTP against this one. It serves, cluster-wide, what
//! the agent reads — `/api/v1/namespaces`, `/api/v1/pods`, `/api/v1/nodes` and
//! `/apis/networking.k8s.io/v1/networkpolicies` — following the API conventions kube's
//! watcher relies on:
//!
//! - **list**: `{Kind}List` with `metadata.resourceVersion`; `limit` and `continue` paginate
//!   (every page reports the first page's resourceVersion; a `continue` token older than the
//!   compaction point is `410 Gone`, reason `Expired`);
//! - **watch** (`watch=true` or `watch=1`): a stream of JSON lines `{"type", "object"}` with
//!   `ADDED`, `MODIFIED`, `DELETED` for every change after `resourceVersion` (or, without
//!   one or with `0`, synthetic `ADDED`s for the current objects first), `BOOKMARK`s every
//!   [`ApiServer::BOOKMARK_INTERVAL`] when `allowWatchBookmarks` is set, the stream closed
//!   after `timeoutSeconds`, and an `ERROR` event holding a `Status` with code 410 when the
//!   requested resourceVersion is older than the compaction point (as the real server does:
//!   HTTP 200, then the error event);
//! - one global, monotonically increasing resourceVersion, which survives restarts, also
//!   those that lose the objects (a lost-state restart moves the compaction point past every
//!   old version, so clients re-list).
//!
//! Tests drive it like a cluster: [`ApiServer::apply`], [`ApiServer::delete`],
//! [`ApiServer::compact`], [`ApiServer::drop_connections`], [`ApiServer::stop`],
//! [`ApiServer::restart`]. Changes made while stopped are kept and replayed to watches
//! resumed after the restart. Every request line is recorded ([`ApiServer::requests`]).
//!
//! Streaming lists (`sendInitialEvents=true`) are served too: the current objects as
//! `ADDED`, then a `BOOKMARK` annotated `k8s.io/initial-events-end`.
//!
//! Not served: namespaced paths, label and field selectors, `resourceVersionMatch=Exact`
//! (every list is of the latest version), get/create/update by the client (the agent only
//! lists and watches), authentication.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// A kind the server holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` `Namespace` (cluster-scoped).
    Namespace,
    /// `v1` `Pod`.
    Pod,
    /// `networking.k8s.io/v1` `NetworkPolicy`.
    NetworkPolicy,
    /// `v1` `Node` (cluster-scoped).
    Node,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy, Kind::Node];

    /// The kind for the `kind` field of an object.
    pub fn parse(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }

    /// The `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Kind::Namespace => "/api/v1/namespaces",
            Kind::Pod => "/api/v1/pods",
            Kind::NetworkPolicy => "/apis/networking.k8s.io/v1/networkpolicies",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy)
    }
}

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

/// The server's data: objects, the change history since the compaction point, versions.
#[derive(Debug, Default)]
struct Data {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Watches and `continue` tokens from a version below this are 410 Gone.
    compacted: u64,
    next_uid: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    requests: Vec<String>,
}

impl Data {
    fn record(&mut self, kind: Kind, type_: &'static str, object: Value) {
        self.history.push(Change {
            rv: self.rv,
            kind,
            type_,
            object,
        });
    }
}

/// What the serving tasks share.
#[derive(Debug)]
struct Shared {
    data: Mutex<Data>,
    /// Bumped on every change, so open watches wake up.
    changed: watch::Sender<u64>,
    /// The tasks of open connections, aborted by `drop_connections` and `stop`.
    connections: Mutex<Vec<AbortHandle>>,
    bookmark_interval: Duration,
}

impl Shared {
    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The test API server; see the module docs. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    acceptor: Option<AbortHandle>,
}

type Body = BoxBody<Bytes, Infallible>;

impl ApiServer {
    /// How often a watch that asked for bookmarks gets one.
    pub const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

    /// Starts a server on a free port of 127.0.0.1, with no objects.
    pub fn start() -> ApiServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("apiserver")
            .enable_all()
            .build()
            .expect("apiserver runtime");
        let listener = rt
            .block_on(bind(SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("bind the apiserver");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            data: Mutex::new(Data::default()),
            changed: watch::channel(0).0,
            connections: Mutex::new(Vec::new()),
            bookmark_interval: Self::BOOKMARK_INTERVAL,
        });
        let acceptor = rt
            .spawn(accept(listener, Arc::clone(&shared)))
            .abort_handle();
        ApiServer {
            shared,
            addr,
            rt: Some(rt),
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration pointing at this server.
    pub fn config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("server URL"))
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.data().rv
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.data().requests.clone()
    }

    /// Creates or replaces an object (a k8s-openapi value, or YAML/JSON of one): `ADDED` if
    /// new, else `MODIFIED`. Sets `metadata.resourceVersion`, `uid`, `creationTimestamp`, and
    /// the namespace `default` for a namespaced object without one. Returns the new version.
    /// Works while the server is stopped too. Panics on an object of another kind or without
    /// a name: that is a mistake in the test.
    pub fn apply(&self, obj: &impl serde::Serialize) -> u64 {
        let mut obj = serde_json::to_value(obj).expect("object as JSON");
        let kind_name = obj["kind"].as_str().unwrap_or("").to_owned();
        let kind = Kind::parse(&kind_name)
            .unwrap_or_else(|| panic!("the test API server does not hold kind {kind_name:?}"));
        assert_eq!(
            obj["apiVersion"].as_str(),
            Some(kind.api_version()),
            "apiVersion of a {kind_name}"
        );
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("a {kind_name} without metadata.name"))
            .to_owned();
        let key = if kind.namespaced() {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            obj["metadata"]["namespace"] = json!(ns);
            format!("{ns}/{name}")
        } else {
            name
        };
        let mut data = self.shared.data();
        data.rv += 1;
        let rv = data.rv;
        let old = data.objects.get(&(kind, key.clone()));
        let (type_, uid) = match old {
            Some(o) => ("MODIFIED", o["metadata"]["uid"].clone()),
            None => {
                data.next_uid += 1;
                ("ADDED", json!(format!("uid-{}", data.next_uid)))
            }
        };
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = uid;
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        data.objects.insert((kind, key), obj.clone());
        data.record(kind, type_, obj);
        drop(data);
        self.shared.changed.send_replace(rv);
        rv
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds); the `DELETED`
    /// event carries its last state with the deletion's version. Returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let kind = Kind::parse(kind).unwrap_or_else(|| panic!("unknown kind {kind:?}"));
        let key = if kind.namespaced() {
            format!("{namespace}/{name}")
        } else {
            name.to_owned()
        };
        let mut data = self.shared.data();
        let Some(mut obj) = data.objects.remove(&(kind, key)) else {
            return false;
        };
        data.rv += 1;
        let rv = data.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        data.record(kind, "DELETED", obj);
        drop(data);
        self.shared.changed.send_replace(rv);
        true
    }

    /// Forgets the change history: a watch or `continue` from any version before now gets
    /// `410 Gone`, as after an etcd compaction.
    pub fn compact(&self) {
        let mut data = self.shared.data();
        data.compacted = data.rv;
        data.history.clear();
        drop(data);
        // Wake open watches so those behind the compaction point get their 410 now.
        self.shared.changed.send_modify(|_| {});
    }

    /// Closes every open connection (watches included); the server keeps accepting.
    pub fn drop_connections(&self) {
        let handles = std::mem::take(
            &mut *self
                .shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for h in handles {
            h.abort();
        }
    }

    /// Stops listening and closes every connection; the objects stay.
    pub fn stop(&mut self) {
        if let Some(a) = self.acceptor.take() {
            a.abort();
        }
        self.drop_connections();
        // Wait until the listener is really closed, so a client connecting next sees a
        // refusal rather than a half-dead socket.
        if let Some(rt) = &self.rt {
            rt.block_on(async {
                for _ in 0..100 {
                    if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    }

    /// Starts listening again on the same port. With `keep_state` the objects and the
    /// history stay (a clean API server restart: watches resume where they were); without,
    /// every object is gone and old versions are compacted away (clients must re-list).
    pub fn restart(&mut self, keep_state: bool) {
        self.stop();
        if !keep_state {
            let mut data = self.shared.data();
            data.objects.clear();
            data.history.clear();
            data.rv += 1;
            data.compacted = data.rv;
        }
        let rt = self.rt.as_ref().expect("runtime");
        let listener = rt.block_on(async {
            // The old socket may linger for a moment; retry briefly.
            let mut last = None;
            for _ in 0..100 {
                match bind(self.addr).await {
                    Ok(l) => return l,
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("re-bind {}: {last:?}", self.addr)
        });
        self.acceptor = Some(
            rt.spawn(accept(listener, Arc::clone(&self.shared)))
                .abort_handle(),
        );
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(a) = self.acceptor.take() {
            a.abort();
        }
        self.drop_connections();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(64)
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As the real API server: Go's net package turns Nagle's algorithm off on every TCP
        // connection. With it on, a watch event written while the previous one is not yet
        // acknowledged waits for the client's delayed ACK (~40 ms on Linux).
        let _ = stream.set_nodelay(true);
        let conn_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&conn_shared);
                async move { Ok::<_, Infallible>(handle(&shared, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let mut conns = shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        conns.retain(|h| !h.is_finished());
        conns.push(task.abort_handle());
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `Status` object, as the API server reports failures.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, &status(code.as_u16(), reason, message))
}

/// Decodes `application/x-www-form-urlencoded` query pairs.
fn query_pairs(query: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    if let Some(v) = hex {
                        out.push(v);
                        i += 2;
                    } else {
                        out.push(b'%');
                    }
                }
                _ => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A `continue` token: the list's version and the last key served, hex-encoded so it needs
/// no escaping.
fn encode_continue(rv: u64, last_key: &str) -> String {
    let mut out = format!("{rv}-");
    for b in last_key.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let (rv, hex) = token.split_once('-')?;
    let rv = rv.parse().ok()?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    Some((rv, String::from_utf8(bytes?).ok()?))
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    shared
        .data()
        .requests
        .push(format!("{} {path}?{query}", req.method()));
    let Some(kind) = Kind::ALL.into_iter().find(|k| k.path() == path) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource {path}"),
        );
    };
    if req.method() != hyper::Method::GET {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server only lists and watches",
        );
    }
    let q = query_pairs(&query);
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch_response(shared, kind, &q)
    } else {
        list(shared, kind, &q)
    }
}

fn list(shared: &Shared, kind: Kind, q: &BTreeMap<String, String>) -> Response<Body> {
    let data = shared.data();
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match decode_continue(token) {
            Some((rv, _)) if rv < data.compacted => {
                return failure(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                );
            }
            Some((rv, key)) => (rv, Some(key)),
            None => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                );
            }
        },
        None => (data.rv, None),
    };
    let mut items = Vec::new();
    let mut next = None;
    let candidates = data
        .objects
        .iter()
        .filter(|((k, key), _)| *k == kind && after.as_ref().is_none_or(|a| key > a));
    for ((_, key), obj) in candidates {
        if limit.is_some_and(|l| items.len() == l) {
            next = Some(encode_continue(rv, items_last_key(&items, key)));
            break;
        }
        // List items carry no `kind` and `apiVersion`: the list's own say what they are.
        let mut item = obj.clone();
        if let Some(fields) = item.as_object_mut() {
            fields.remove("kind");
            fields.remove("apiVersion");
        }
        items.push((key.clone(), item));
    }
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let Some(token) = next {
        metadata["continue"] = json!(token);
    }
    full(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items.into_iter().map(|(_, o)| o).collect::<Vec<_>>(),
        }),
    )
}

/// The key the next page starts after: the last item served (`fallback` only when the page
/// is empty, which a positive limit rules out).
fn items_last_key<'a>(items: &'a [(String, Value)], fallback: &'a str) -> &'a str {
    items.last().map_or(fallback, |(k, _)| k.as_str())
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": type_, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resourceVersion {v:?}"),
                );
            }
        },
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    // Streaming lists (`sendInitialEvents=true`): the current objects, then a bookmark
    // annotated `k8s.io/initial-events-end`, then changes.
    let initial_events = q.get("sendInitialEvents").is_some_and(|b| b == "true");
    let from = if initial_events { None } else { from };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _ = stream_events(&shared, kind, from, timeout, bookmarks, initial_events, &tx).await;
    });
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Why a watch stream ended early: the client went away.
struct Closed;

/// Feeds one watch: the changes after `from` (or the current objects as `ADDED` when
/// `from` is `None`, followed by the initial-events-end bookmark for a streaming list), then
/// every new change, bookmarks, until the timeout.
async fn stream_events(
    shared: &Shared,
    kind: Kind,
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    initial_events: bool,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), Closed> {
    let send = |b: Bytes| async move { tx.send(b).await.map_err(|_| Closed) };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changed = shared.changed.subscribe();
    let mut sent = match from {
        Some(rv) => rv,
        None => {
            let (rv, objects) = {
                let data = shared.data();
                let objects: Vec<Value> = data
                    .objects
                    .iter()
                    .filter(|((k, _), _)| *k == kind)
                    .map(|(_, o)| o.clone())
                    .collect();
                (data.rv, objects)
            };
            for o in &objects {
                send(event_line("ADDED", o)).await?;
            }
            if initial_events {
                let end = json!({
                    "kind": kind.name(),
                    "apiVersion": kind.api_version(),
                    "metadata": {
                        "resourceVersion": rv.to_string(),
                        "annotations": { "k8s.io/initial-events-end": "true" },
                    },
                });
                send(event_line("BOOKMARK", &end)).await?;
            }
            rv
        }
    };
    let mut ticker = tokio::time::interval(shared.bookmark_interval);
    ticker.reset();
    loop {
        // Everything of this kind up to `upto` is taken under one lock, so `sent` can move
        // to `upto` without missing a change.
        let (events, upto, gone) = {
            let data = shared.data();
            if sent < data.compacted {
                (Vec::new(), data.rv, Some(data.compacted))
            } else {
                let events: Vec<Change> = data
                    .history
                    .iter()
                    .filter(|c| c.kind == kind && c.rv > sent)
                    .cloned()
                    .collect();
                (events, data.rv, None)
            }
        };
        if let Some(compacted) = gone {
            let message = format!("too old resource version: {sent} ({compacted})");
            send(event_line("ERROR", &status(410, "Expired", &message))).await?;
            return Ok(());
        }
        for c in &events {
            send(event_line(c.type_, &c.object)).await?;
        }
        sent = sent.max(upto);
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
            _ = ticker.tick(), if bookmarks => {
                let bookmark = json!({
                    "kind": kind.name(),
                    "apiVersion": kind.api_version(),
                    "metadata": { "resourceVersion": sent.to_string() },
                });
                send(event_line("BOOKMARK", &bookmark)).await?;
            }
            () = tokio::time::sleep_until(deadline) => return Ok(()),
            () = tx.closed() => return Err(Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};

    use super::*;

    fn pod(ns: &str, name: &str, app: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "labels": { "app": app } },
        })
    }

    /// Runs `f` with a kube client for `server` on a runtime of its own.
    fn with_client<T>(server: &ApiServer, f: impl AsyncFnOnce(Api<Pod>) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = kube::Client::try_from(server.config()).expect("client");
            f(Api::<Pod>::all(client)).await
        })
    }

    /// Lists every page with `limit`; returns the names and the versions of the pages.
    fn list_pages(server: &ApiServer, limit: u32) -> (Vec<String>, Vec<String>) {
        with_client(server, async |api| {
            let mut names = Vec::new();
            let mut versions = Vec::new();
            let mut lp = ListParams::default().limit(limit);
            loop {
                let page = api.list(&lp).await.expect("list");
                versions.push(page.metadata.resource_version.clone().unwrap_or_default());
                names.extend(page.items.iter().filter_map(|p| p.metadata.name.clone()));
                match page.metadata.continue_.filter(|c| !c.is_empty()) {
                    Some(c) => lp.continue_token = Some(c),
                    None => break,
                }
            }
            (names, versions)
        })
    }

    fn check_pages(pods: usize, limit: u32, pages: usize) {
        let server = ApiServer::start();
        for i in 0..pods {
            server.apply(&pod("default", &format!("p{i:02}"), "x"));
        }
        let (names, versions) = list_pages(&server, limit);
        let expected: Vec<String> = (0..pods).map(|i| format!("p{i:02}")).collect();
        assert_eq!(names, expected, "{pods} pods, limit {limit}");
        assert_eq!(versions.len(), pages, "{pods} pods, limit {limit}");
        let rv = server.resource_version().to_string();
        assert!(versions.iter().all(|v| *v == rv), "{versions:?} vs {rv}");
    }

    #[test]
    fn list_paginates_with_one_version() {
        check_pages(0, 2, 1);
        check_pages(1, 2, 1);
        check_pages(4, 2, 2);
        check_pages(5, 2, 3);
        check_pages(5, 500, 1);
    }

    #[test]
    fn versions_grow_and_objects_get_metadata() {
        let server = ApiServer::start();
        let a = server.apply(&pod("a", "p", "x"));
        let b = server.apply(&pod("a", "p", "y"));
        assert!(b > a);
        assert!(server.delete("Pod", "a", "p"));
        assert!(!server.delete("Pod", "a", "p"));
        server.apply(&pod("a", "q", "x"));
        let listed = with_client(&server, async |api| {
            api.list(&ListParams::default()).await.expect("list")
        });
        let p = listed.items.first().expect("one pod");
        assert_eq!(p.metadata.namespace.as_deref(), Some("a"));
        assert_eq!(p.metadata.uid.as_deref(), Some("uid-2"));
        assert_eq!(
            p.metadata.resource_version.as_deref(),
            Some(server.resource_version().to_string().as_str())
        );
    }

    /// Watches from `from` until `count` events arrived; returns them as `TYPE name`.
    fn watch_events(server: &ApiServer, from: &str, count: usize) -> Vec<String> {
        with_client(server, async |api| {
            let stream = api
                .watch(&WatchParams::default().timeout(5), from)
                .await
                .expect("watch");
            stream
                .take(count)
                .map(|e| match e.expect("event") {
                    WatchEvent::Added(p) => {
                        format!("ADDED {}", p.metadata.name.unwrap_or_default())
                    }
                    WatchEvent::Modified(p) => {
                        format!("MODIFIED {}", p.metadata.name.unwrap_or_default())
                    }
                    WatchEvent::Deleted(p) => {
                        format!("DELETED {}", p.metadata.name.unwrap_or_default())
                    }
                    WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
                    WatchEvent::Error(s) => format!("ERROR {} {}", s.code, s.reason),
                })
                .collect()
                .await
        })
    }

    #[test]
    fn watch_replays_changes_after_a_version_then_bookmarks() {
        let server = ApiServer::start();
        let start = server.apply(&pod("a", "p", "x"));
        server.apply(&pod("a", "p", "y"));
        server.apply(&pod("a", "q", "x"));
        server.delete("Pod", "a", "p");
        let rv = server.resource_version();
        assert_eq!(
            watch_events(&server, &start.to_string(), 4),
            [
                "MODIFIED p".to_owned(),
                "ADDED q".to_owned(),
                "DELETED p".to_owned(),
                format!("BOOKMARK {rv}"),
            ]
        );
        // Without a version: the current objects as ADDED.
        assert_eq!(watch_events(&server, "0", 1), ["ADDED q"]);
    }

    #[test]
    fn watch_sees_changes_made_while_it_is_open() {
        let server = ApiServer::start();
        // Version 0 would mean "any version"; start from a real one.
        let rv = server.apply(&pod("b", "other", "x"));
        let events = std::thread::scope(|s| {
            let watcher = s.spawn(|| watch_events(&server, &rv.to_string(), 2));
            // The watch may open before or after these; either way it must see both.
            server.apply(&pod("a", "p", "x"));
            server.delete("Pod", "a", "p");
            watcher.join().expect("watcher")
        });
        assert_eq!(events, ["ADDED p", "DELETED p"]);
    }

    #[test]
    fn compaction_makes_old_versions_gone() {
        let server = ApiServer::start();
        let old = server.apply(&pod("a", "p", "x"));
        server.apply(&pod("a", "q", "x"));
        server.compact();
        assert_eq!(
            watch_events(&server, &old.to_string(), 1),
            ["ERROR 410 Expired"]
        );
        // From the compaction point itself nothing is missing.
        server.apply(&pod("a", "r", "x"));
        let now = (server.resource_version() - 1).to_string();
        assert_eq!(watch_events(&server, &now, 1), ["ADDED r"]);
        // A continue token from before the compaction is 410 too.
        let token = encode_continue(old, "a/p");
        let err = with_client(&server, async |api| {
            let mut lp = ListParams::default().limit(1);
            lp.continue_token = Some(token);
            api.list(&lp)
                .await
                .map(|_| ())
                .expect_err("expired continue")
        });
        match err {
            kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
            other => panic!("expected a 410 status, got {other:?}"),
        }
    }

    #[test]
    fn stop_refuses_and_restart_keeps_or_loses_state() {
        let mut server = ApiServer::start();
        server.apply(&pod("a", "p", "x"));
        server.stop();
        let err = with_client(&server, async |api| {
            api.list(&ListParams::default()).await.map(|_| ())
        });
        assert!(err.is_err(), "a stopped server answers nothing");
        // Changes made while stopped are there after the restart.
        server.apply(&pod("a", "q", "x"));
        server.restart(true);
        assert_eq!(list_pages(&server, 10).0, ["p", "q"]);
        let before = server.resource_version();
        server.restart(false);
        assert_eq!(list_pages(&server, 10).0, Vec::<String>::new());
        assert!(server.resource_version() > before);
        assert_eq!(
            watch_events(&server, &before.to_string(), 1),
            ["ERROR 410 Expired"]
        );
    }

    #[test]
    fn dropped_connections_end_open_watches() {
        let server = ApiServer::start();
        let rv = server.resource_version().to_string();
        let ended = with_client(&server, async |api| {
            let stream = api
                .watch(&WatchParams::default().disable_bookmarks().timeout(60), &rv)
                .await
                .expect("watch");
            server.drop_connections();
            // The stream ends (or errors) long before its 60 s timeout.
            tokio::time::timeout(Duration::from_secs(20), stream.try_collect::<Vec<_>>())
                .await
                .is_ok()
        });
        assert!(ended, "the watch outlived drop_connections");
    }

    #[test]
    fn kube_watcher_lists_both_ways() {
        use kube::runtime::watcher;
        let server = ApiServer::start();
        server.apply(&pod("a", "p", "x"));
        server.apply(&pod("a", "q", "x"));
        for config in [
            watcher::Config::default().page_size(1),
            watcher::Config::default().streaming_lists(),
        ] {
            let events = with_client(&server, async |api| {
                watcher::watcher(api, config.clone())
                    .take(4)
                    .map(|e| match e.expect("event") {
                        watcher::Event::Init => "Init".to_owned(),
                        watcher::Event::InitApply(p) => {
                            format!("InitApply {}", p.metadata.name.unwrap_or_default())
                        }
                        watcher::Event::InitDone => "InitDone".to_owned(),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .await
            });
            assert_eq!(
                events,
                ["Init", "InitApply p", "InitApply q", "InitDone"],
                "{config:?}"
            );
        }
    }

    #[test]
    fn query_and_continue_round_trip() {
        let q = query_pairs("watch=true&continue=1-2f%2F&labelSelector=a%3Db+c");
        assert_eq!(q.get("watch").map(String::as_str), Some("true"));
        assert_eq!(q.get("continue").map(String::as_str), Some("1-2f/"));
        assert_eq!(q.get("labelSelector").map(String::as_str), Some("a=b c"));
        for (rv, key) in [(0, ""), (7, "ns/name"), (u64::MAX, "é/x")] {
            assert_eq!(
                decode_continue(&encode_continue(rv, key)),
                Some((rv, key.to_owned()))
            );
        }
        assert_eq!(decode_continue("x-00"), None);
        assert_eq!(decode_continue("1-0"), None);
    }
}
