//! The agent's status file: what it applied and what its workers counted.
//!
//! Written as JSON, atomically (a temporary file renamed over the old one), every second and
//! right after a new snapshot is published, and once more when the agent stops. `ocelot lab`
//! reads it to know when a change to the manifests is in force; operators read it with
//! `ocelotctl status --file FILE`. Fields:
//!
//! - `node`, `epoch` (the snapshot generation in force), `manifests_digest` (of the
//!   directory contents that epoch was built from, see [`dir_digest`]), `load_errors` and
//!   `last_error` (manifest directories that failed to load: the previous epoch stayed);
//! - `ports`: interface → worker; `report`: what the last build could not wire;
//! - `unknown_pods`: attached pod interfaces that match no pod of the datastore, pending
//!   their pod object: interface, port, treatment (`isolate` | `allow`), the addresses
//!   learned from the kernel's host routes, the pod's MAC, seconds pending;
//! - `workers`: per worker its core, I/O counters and classifier counters, with drops by
//!   reason name; `stopped` once the agent has stopped.

use std::collections::BTreeMap;
use std::path::Path;

use classifier::{Counters, DropReason};
use control::node::BuildReport;
use dataplane::worker::WorkerCounters;
use serde_json::{Value, json};

/// `reason=count …` for the non-zero drop counters of one worker.
pub fn drops_line(io: &WorkerCounters, class: &Counters) -> String {
    pairs_text(drops_map(io, class))
}

/// `key=value …` of `pairs`, or `none` when there are none (drop counters, as the agent logs
/// them and `ocelotctl status` prints them).
pub fn pairs_text<K: std::fmt::Display, V: std::fmt::Display>(
    pairs: impl IntoIterator<Item = (K, V)>,
) -> String {
    let parts: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(" ")
    }
}

/// Non-zero drops of one worker by reason name, including the dataplane's own (`not_local`,
/// `to_host_unsupported`, `handoff_full`).
pub fn drops_map(io: &WorkerCounters, class: &Counters) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for reason in DropReason::ALL {
        let n = io.dropped(*reason) + class.drops.get(reason.index()).copied().unwrap_or(0);
        if n > 0 {
            out.insert(reason.name(), n);
        }
    }
    if io.not_local > 0 {
        out.insert("not_local", io.not_local);
    }
    if io.to_host_dropped > 0 {
        out.insert("to_host_dropped", io.to_host_dropped);
    }
    if io.handoff_dropped > 0 {
        out.insert("handoff_full", io.handoff_dropped);
    }
    // Dropped by the kernel before the worker saw them (AF_XDP socket statistics).
    if io.xsk_rx_dropped > 0 {
        out.insert("xsk_rx_dropped", io.xsk_rx_dropped);
    }
    if io.xsk_rx_ring_full > 0 {
        out.insert("xsk_rx_ring_full", io.xsk_rx_ring_full);
    }
    out
}

/// The status the control thread maintains.
#[derive(Debug, Clone)]
pub struct Status {
    node: String,
    ports: Vec<(String, usize)>,
    epoch: u32,
    digest: u64,
    report: Value,
    /// Manifest directories that failed to load.
    pub load_errors: u64,
    /// The last load error.
    pub last_error: Option<String>,
    /// Per worker: core and counters.
    pub workers: Vec<(usize, (WorkerCounters, Counters))>,
    /// Whether the agent has stopped.
    pub stopped: bool,
    /// The datastore's own status (see `source::Source::status`).
    pub datastore: Value,
    /// The uplink program's counters, if there is an uplink.
    pub uplink: Option<Value>,
    /// The host path: its tap's name, the host thread's counters and the route changes the
    /// kernel refused.
    pub host: Option<(String, (WorkerCounters, Counters), u64)>,
    /// Attached pod interfaces that match no pod of the datastore (pending their pod).
    pub unknown_pods: Value,
}

fn report_json(r: &BuildReport) -> Value {
    json!({
        "orphan_ports": r.orphan_ports,
        "pods_without_mac": r.pods_without_mac,
        "pods_without_port": r.pods_without_port,
        "unresolved_next_hops": r.unresolved_next_hops.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        "compile_errors": r.compile_errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    })
}

impl Status {
    /// The status after start-up.
    pub fn new(
        node: &str,
        ports: &[(String, usize)],
        epoch: u32,
        digest: u64,
        report: &BuildReport,
    ) -> Status {
        Status {
            node: node.to_owned(),
            ports: ports.to_vec(),
            epoch,
            digest,
            report: report_json(report),
            load_errors: 0,
            last_error: None,
            workers: Vec::new(),
            stopped: false,
            datastore: Value::Null,
            uplink: None,
            host: None,
            unknown_pods: Value::Array(Vec::new()),
        }
    }

    /// Replaces the interface → worker list.
    pub fn set_ports(&mut self, ports: &[(String, usize)]) {
        self.ports = ports.to_vec();
    }

    /// Records a published snapshot.
    pub fn applied(&mut self, epoch: u32, digest: u64, report: &BuildReport) {
        self.epoch = epoch;
        self.digest = digest;
        self.report = report_json(report);
    }

    /// The JSON document.
    pub fn to_json(&self) -> Value {
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|(core, (io, class))| {
                json!({
                    "core": core,
                    "rx": io.rx,
                    "tx": io.tx,
                    "forwarded": class.forwarded,
                    "replied": class.replied,
                    "to_host": class.to_host,
                    "ct_hits": class.ct_hits,
                    "ct_created": class.ct_created,
                    "handoff_out": io.handoff_out,
                    "handoff_in": io.handoff_in,
                    "to_host_path": io.to_host,
                    "xsk_fill_ring_empty": io.xsk_fill_ring_empty,
                    "xsk_invalid_descs": io.xsk_invalid_descs,
                    "drops": drops_map(io, class),
                })
            })
            .collect();
        // Its rx are the kernel's frames for pods, `handoff_out` those it passed to workers,
        // `handoff_in` the pods' frames for the node and `tx` what it wrote into the tap.
        let host = self.host.as_ref().map(|(name, (io, class), route_errors)| {
            json!({
                "interface": name,
                "rx": io.rx,
                "tx": io.tx,
                "forwarded": class.forwarded,
                "replied": class.replied,
                "ct_created": class.ct_created,
                "handoff_out": io.handoff_out,
                "handoff_in": io.handoff_in,
                "route_errors": route_errors,
                "drops": drops_map(io, class),
            })
        });
        json!({
            "node": self.node,
            "epoch": self.epoch,
            "manifests_digest": format!("{:016x}", self.digest),
            "load_errors": self.load_errors,
            "last_error": self.last_error,
            "ports": self.ports.iter().map(|(n, w)| json!({"interface": n, "worker": w})).collect::<Vec<_>>(),
            "report": self.report,
            "workers": workers,
            "stopped": self.stopped,
            "datastore": self.datastore,
            "uplink": self.uplink,
            "host_path": host,
            "unknown_pods": self.unknown_pods,
        })
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.to_json())?)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_line_names_reasons() {
        let mut io = WorkerCounters::default();
        let mut class = Counters::default();
        assert_eq!(drops_line(&io, &class), "none");
        class.drops[DropReason::PolicyIngress.index()] = 3;
        io.drops[DropReason::TxFull.index()] = 1;
        io.not_local = 2;
        let line = drops_line(&io, &class);
        assert!(line.contains("policy_ingress=3"), "{line}");
        assert!(line.contains("tx_full=1"), "{line}");
        assert!(line.contains("not_local=2"), "{line}");
    }
}
