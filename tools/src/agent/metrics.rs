//! `ocelot run --metrics ADDR`: the agent's counters for Prometheus, at `GET /metrics`.
//!
//! The control thread copies what the workers publish ([`dataplane::live`]) and what the
//! datastore reports into the metrics once a second (with the status file); a scrape only
//! encodes them. Nothing here touches the packet path. The text is the Prometheus exposition
//! format (0.0.4), encoded by `prometheus-client`, the Prometheus project's own Rust client.
//!
//! Metrics (counters are totals since the agent started):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `ocelot_worker_rx_frames_total`, `ocelot_worker_tx_frames_total`, `ocelot_worker_forwarded_total` | counter | `worker`, `core` (the host path's thread is worker `host`, core `none`: its rx are the kernel's frames for pods, its tx what it wrote into the tap) |
//! | `ocelot_drops_total` | counter | `worker`, `core`, `reason` (the status file's drop names) |
//! | `ocelot_snapshot_epoch` | gauge | |
//! | `ocelot_datastore_connected` | gauge (0/1) | `datastore` |
//! | `ocelot_datastore_stale_seconds` | gauge | `datastore` |
//! | `ocelot_manifest_load_errors_total` | counter | |
//! | `ocelot_unknown_pod_interfaces` | gauge | `treatment` |
//!
//! The server is a plain blocking HTTP/1.1 responder on its own thread: one request per
//! connection, `Connection: close`, two seconds to send the request. It is bound before the
//! agent attaches anything, so a bad address stops the start-up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use classifier::Counters;
use dataplane::worker::WorkerCounters;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// What the control thread publishes once a second.
#[derive(Debug, Default)]
pub struct Sample<'a> {
    /// Per worker: core and counters.
    pub workers: &'a [(usize, (WorkerCounters, Counters))],
    /// The snapshot generation in force.
    pub epoch: u32,
    /// `kubernetes` or `manifests`.
    pub datastore: &'a str,
    /// Whether every watch is up (always true for manifests).
    pub connected: bool,
    /// How stale the view is.
    pub stale_seconds: f64,
    /// Manifest directories that failed to load.
    pub load_errors: u64,
    /// Unknown pod interfaces attached, and their treatment.
    pub unknown_pods: usize,
    /// `isolate` or `allow`.
    pub treatment: &'a str,
    /// The host path's counters, if it runs (as worker `host`, core `none`).
    pub host_path: Option<&'a (WorkerCounters, Counters)>,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rx: Family<Labels, Counter>,
    tx: Family<Labels, Counter>,
    forwarded: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    epoch: Gauge,
    connected: Family<Labels, Gauge>,
    stale: Family<Labels, Gauge<f64, AtomicU64>>,
    load_errors: Counter,
    unknown: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ocelot");
        let rx = Family::<Labels, Counter>::default();
        let tx = Family::<Labels, Counter>::default();
        let forwarded = Family::<Labels, Counter>::default();
        let drops = Family::<Labels, Counter>::default();
        let epoch = Gauge::default();
        let connected = Family::<Labels, Gauge>::default();
        let stale = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let load_errors = Counter::default();
        let unknown = Family::<Labels, Gauge>::default();
        registry.register("worker_rx_frames", "Frames a worker received", rx.clone());
        registry.register(
            "worker_tx_frames",
            "Frames a worker transmitted",
            tx.clone(),
        );
        registry.register(
            "worker_forwarded",
            "Frames the classifier forwarded",
            forwarded.clone(),
        );
        registry.register("drops", "Frames dropped, by reason", drops.clone());
        registry.register(
            "snapshot_epoch",
            "The snapshot generation the workers use",
            epoch.clone(),
        );
        registry.register(
            "datastore_connected",
            "1 while every watch of the datastore is up",
            connected.clone(),
        );
        registry.register(
            "datastore_stale_seconds",
            "How long the datastore's view has not been known to be current",
            stale.clone(),
        );
        registry.register(
            "manifest_load_errors",
            "Manifest directories that failed to load (the previous snapshot stayed)",
            load_errors.clone(),
        );
        registry.register(
            "unknown_pod_interfaces",
            "Attached pod interfaces that match no pod of the datastore",
            unknown.clone(),
        );
        Metrics {
            registry,
            rx,
            tx,
            forwarded,
            drops,
            epoch,
            connected,
            stale,
            load_errors,
            unknown,
        }
    }

    /// Copies a sample in.
    pub fn update(&self, s: &Sample<'_>) {
        let workers = s
            .workers
            .iter()
            .enumerate()
            .map(|(w, (core, counters))| (w.to_string(), core.to_string(), counters));
        let host = s
            .host_path
            .map(|counters| ("host".to_owned(), "none".to_owned(), counters));
        for (worker, core, (io, class)) in workers.chain(host) {
            let labels = vec![("worker".to_owned(), worker), ("core".to_owned(), core)];
            set(&self.rx.get_or_create(&labels), io.rx);
            set(&self.tx.get_or_create(&labels), io.tx);
            set(&self.forwarded.get_or_create(&labels), class.forwarded);
            for (reason, n) in super::status::drops_map(io, class) {
                let mut l = labels.clone();
                l.push(("reason".to_owned(), reason.to_owned()));
                set(&self.drops.get_or_create(&l), n);
            }
        }
        self.epoch.set(i64::from(s.epoch));
        let ds = vec![("datastore".to_owned(), s.datastore.to_owned())];
        self.connected
            .get_or_create(&ds)
            .set(i64::from(s.connected));
        self.stale.get_or_create(&ds).set(s.stale_seconds);
        set(&self.load_errors, s.load_errors);
        let t = vec![("treatment".to_owned(), s.treatment.to_owned())];
        self.unknown
            .get_or_create(&t)
            .set(i64::try_from(s.unknown_pods).unwrap_or(i64::MAX));
    }

    /// The Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Sets a counter to a total the workers counted (they only grow).
fn set(c: &Counter, v: u64) {
    c.inner().store(v, Ordering::Relaxed);
}

/// Binds `addr` and serves `GET /metrics` from `metrics` until `stop`.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
    listener.set_nonblocking(true).context("metrics listener")?;
    std::thread::Builder::new()
        .name("ocelot-metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Err(e) = answer(stream, &metrics) {
                            tracing::debug!("metrics request: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        tracing::warn!("metrics listener: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
        .context("spawning the metrics thread")
}

/// The response to one request: `(status line, content type, body)`.
pub fn respond(request: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    match (method, path) {
        (Some("GET"), Some("/metrics")) => {
            ("200 OK", prometheus_text::CONTENT_TYPE, metrics.encode())
        }
        (Some("GET"), _) => ("404 Not Found", "text/plain", "GET /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_owned(),
        ),
    }
}

fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    // Up to the end of the headers (or a full buffer: only the request line matters).
    while len < buf.len() {
        let n = stream.read(buf.get_mut(len..).unwrap_or_default())?;
        if n == 0 {
            break;
        }
        len += n;
        if buf
            .get(..len)
            .is_some_and(|b| b.windows(4).any(|w| w == b"\r\n\r\n"))
        {
            break;
        }
    }
    let request = String::from_utf8_lossy(buf.get(..len).unwrap_or_default());
    let (status, content_type, body) = respond(&request, metrics);
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_encoded_with_labels() {
        let m = Metrics::new();
        let mut io = WorkerCounters {
            rx: 10,
            tx: 7,
            ..WorkerCounters::default()
        };
        io.drops[classifier::DropReason::TxFull.index()] = 1;
        let mut class = Counters {
            forwarded: 7,
            ..Counters::default()
        };
        class.drops[classifier::DropReason::UnknownPod.index()] = 2;
        let workers = [(3, (io, class))];
        let mut host_class = Counters::default();
        host_class.drops[classifier::DropReason::SpoofedHostSource.index()] = 4;
        let host = (
            WorkerCounters {
                rx: 6,
                ..WorkerCounters::default()
            },
            host_class,
        );
        m.update(&Sample {
            workers: &workers,
            epoch: 5,
            datastore: "kubernetes",
            connected: false,
            stale_seconds: 12.5,
            load_errors: 0,
            unknown_pods: 1,
            treatment: "isolate",
            host_path: Some(&host),
        });
        let text = m.encode();
        for line in [
            "ocelot_worker_rx_frames_total{worker=\"0\",core=\"3\"} 10",
            "ocelot_worker_tx_frames_total{worker=\"0\",core=\"3\"} 7",
            "ocelot_worker_forwarded_total{worker=\"0\",core=\"3\"} 7",
            "ocelot_drops_total{worker=\"0\",core=\"3\",reason=\"unknown_pod\"} 2",
            "ocelot_drops_total{worker=\"0\",core=\"3\",reason=\"tx_full\"} 1",
            "ocelot_snapshot_epoch 5",
            "ocelot_datastore_connected{datastore=\"kubernetes\"} 0",
            "ocelot_datastore_stale_seconds{datastore=\"kubernetes\"} 12.5",
            "ocelot_unknown_pod_interfaces{treatment=\"isolate\"} 1",
            "ocelot_worker_rx_frames_total{worker=\"host\",core=\"none\"} 6",
            "ocelot_drops_total{worker=\"host\",core=\"none\",reason=\"spoofed_host_source\"} 4",
            "# TYPE ocelot_drops_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        let m = Metrics::new();
        for (request, status) in [
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK"),
            ("GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
            ("POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
            ("", "405 Method Not Allowed"),
        ] {
            assert_eq!(respond(request, &m).0, status, "{request:?}");
        }
    }
}
