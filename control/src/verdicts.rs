//! Offline policy verdicts: "would this connection be allowed?", answered by the compiled
//! [`PolicyTable`], the same table the dataplane loads.
//!
//! Inputs: [`Manifests`] and probes, one JSON object per line:
//! `{"src": "ns/pod" | IP, "dst": "ns/pod" | IP, "port": N, "protocol": "TCP"|"UDP"|"SCTP"}`
//! (protocol defaults to TCP; blank lines and lines starting with `#` are skipped; other
//! fields are carried through untouched).
//!
//! Outputs: one [`ProbeResult`] per probe, printed as the probe's own object, fields in input
//! order, plus `"verdict": "allow" | "deny"`; or, without probes, a [`Matrix`] per declared
//! (port, protocol): every pod to every pod.
//!
//! Invariant: this module never looks at policy rules. It resolves names to addresses and
//! asks `PolicyTable::check`, so a bug in the compiler shows here rather than being masked by
//! a second evaluator.

use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;

use classifier::policy::compile::CompileOptions;
use classifier::policy::model::Protocol;
use classifier::policy::{CompileError, EndpointId, PolicyDecision, PolicyTable};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;
use crate::manifests::Manifests;

/// A JSON object that remembers its field order, so output lines read like their input lines.
/// (serde_json's own map sorts keys unless a crate-wide feature is enabled; this keeps the
/// feature, and the rebuild of everything that uses serde_json, out of the workspace.)
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderedObject(pub Vec<(String, serde_json::Value)>);

impl OrderedObject {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    fields.push(entry);
                }
                Ok(OrderedObject(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for OrderedObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One parsed probe line.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    /// 1-based line number in the probe input.
    pub line: usize,
    /// `src` as written: `namespace/pod` or an IP address.
    pub src: String,
    /// `dst` as written.
    pub dst: String,
    /// Destination port.
    pub port: u16,
    /// Protocol (TCP when absent).
    pub protocol: Protocol,
    /// The input object, for echoing.
    pub fields: OrderedObject,
}

/// Parses probes from JSON lines. Errors name the 1-based line.
pub fn parse_probes(text: &str) -> Result<Vec<Probe>, Error> {
    let mut probes = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let err = |why: String| Error::Probe { line, why };
        let fields: OrderedObject =
            serde_json::from_str(trimmed).map_err(|e| err(format!("not a JSON object: {e}")))?;
        let text_field = |key: &str| match fields.get(key) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(err(format!("{key:?} must be a string"))),
            None => Err(err(format!("missing {key:?}"))),
        };
        let src = text_field("src")?;
        let dst = text_field("dst")?;
        let port = match fields.get("port") {
            Some(v) => v
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|&n| n != 0)
                .ok_or_else(|| err(format!("port {v} is not in 1..=65535")))?,
            None => return Err(err("missing \"port\"".to_owned())),
        };
        let protocol = match fields.get("protocol") {
            None => Protocol::Tcp,
            Some(serde_json::Value::String(s)) => Protocol::parse(s).ok_or_else(|| {
                err(format!(
                    "protocol {s:?} is not one of \"TCP\", \"UDP\", \"SCTP\""
                ))
            })?,
            Some(v) => return Err(err(format!("protocol {v} must be a string"))),
        };
        probes.push(Probe {
            line,
            src,
            dst,
            port,
            protocol,
            fields,
        });
    }
    Ok(probes)
}

/// A verdict as the CLI prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The connection would be allowed.
    Allow,
    /// The source's egress or the destination's ingress policy refuses it.
    Deny,
}

impl Verdict {
    /// `allow` or `deny`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }

    fn from_decision(d: PolicyDecision) -> Verdict {
        match d {
            PolicyDecision::Allow => Verdict::Allow,
            PolicyDecision::DenyEgress | PolicyDecision::DenyIngress => Verdict::Deny,
        }
    }
}

/// The answer to one probe.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    /// The probe asked.
    pub probe: Probe,
    /// The source address checked.
    pub src_ip: IpAddr,
    /// The destination address checked.
    pub dst_ip: IpAddr,
    /// The table's decision (which side refused, if any).
    pub decision: PolicyDecision,
    /// `allow` / `deny`.
    pub verdict: Verdict,
}

impl ProbeResult {
    /// The probe's object with `"verdict"` appended (replacing one already present).
    pub fn to_json_line(&self) -> String {
        let mut fields = self.probe.fields.clone();
        fields.0.retain(|(k, _)| k != "verdict");
        fields.0.push((
            "verdict".to_owned(),
            serde_json::Value::String(self.verdict.as_str().to_owned()),
        ));
        // Serializing a map of strings and JSON values cannot fail.
        serde_json::to_string(&fields).unwrap_or_default()
    }
}

/// A compiled cluster, ready to answer probes.
#[derive(Debug)]
pub struct Evaluator<'m> {
    manifests: &'m Manifests,
    table: PolicyTable,
    /// What the compiler could not express (the pods concerned fail closed).
    pub compile_errors: Vec<CompileError>,
}

/// Picks the address pair to check: the first of each side, unless that mixes IPv4 and IPv6
/// while a same-family pair exists (a dual-stack pod talks to a peer in the peer's family).
fn pick_pair(src: &[IpAddr], dst: &[IpAddr]) -> Option<(IpAddr, IpAddr)> {
    src.iter()
        .flat_map(|s| dst.iter().map(move |d| (*s, *d)))
        .find(|(s, d)| s.is_ipv4() == d.is_ipv4())
        .or_else(|| Some((*src.first()?, *dst.first()?)))
}

impl<'m> Evaluator<'m> {
    /// Compiles every pod of the cluster (no node filter).
    pub fn new(manifests: &'m Manifests) -> Evaluator<'m> {
        let (table, compile_errors) =
            PolicyTable::compile(&manifests.cluster, &CompileOptions { local_node: None });
        Evaluator {
            manifests,
            table,
            compile_errors,
        }
    }

    /// The compiled endpoint owning `ip`, if the table has one.
    pub fn endpoint(&self, ip: IpAddr) -> Option<EndpointId> {
        self.table.endpoint(ip)
    }

    /// Checks one connection between addresses.
    ///
    /// A pod's traffic to its own address never leaves its network namespace (the kernel
    /// delivers it over loopback), so no dataplane — ocelot's, Calico's or Cilium's — can see,
    /// let alone refuse, it. The answer for such a probe is therefore always `Allow`, which is
    /// also what real traffic shows in `ocelot lab`.
    pub fn check(&self, src: IpAddr, dst: IpAddr, port: u16, protocol: Protocol) -> PolicyDecision {
        if src == dst && self.table.endpoint(src).is_some() {
            return PolicyDecision::Allow;
        }
        self.table.check(src, dst, protocol.ip_number(), Some(port))
    }

    /// Answers one probe; unknown pods and pods without addresses are errors naming the line.
    pub fn probe(&self, probe: &Probe) -> Result<ProbeResult, Error> {
        let resolve = |which: &str, name: &str| {
            self.manifests.resolve(name).map_err(|why| Error::Probe {
                line: probe.line,
                why: format!("{which}: {why}"),
            })
        };
        let src = resolve("src", &probe.src)?;
        let dst = resolve("dst", &probe.dst)?;
        let (src_ip, dst_ip) = pick_pair(&src, &dst).ok_or_else(|| Error::Probe {
            line: probe.line,
            why: "no address to check".to_owned(),
        })?;
        let decision = self.check(src_ip, dst_ip, probe.port, probe.protocol);
        Ok(ProbeResult {
            probe: probe.clone(),
            src_ip,
            dst_ip,
            decision,
            verdict: Verdict::from_decision(decision),
        })
    }

    /// The pod-to-pod matrix for one port and protocol, over every pod with an address.
    pub fn matrix(&self, port: u16, protocol: Protocol) -> Matrix {
        let pods: Vec<_> = self
            .manifests
            .cluster
            .pods
            .iter()
            .filter(|p| !p.ips.is_empty())
            .collect();
        let allowed = pods
            .iter()
            .map(|src| {
                pods.iter()
                    .map(|dst| {
                        pick_pair(&src.ips, &dst.ips).is_some_and(|(s, d)| {
                            self.check(s, d, port, protocol) == PolicyDecision::Allow
                        })
                    })
                    .collect()
            })
            .collect();
        Matrix {
            port,
            protocol,
            pods: pods
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
            allowed,
        }
    }

    /// One matrix per (port, protocol) any pod declares, sorted by protocol then port.
    pub fn matrices(&self) -> Vec<Matrix> {
        let mut ports: Vec<(Protocol, u16)> = self
            .manifests
            .cluster
            .pods
            .iter()
            .flat_map(|p| p.ports.iter().map(|c| (c.protocol, c.port)))
            .collect();
        ports.sort();
        ports.dedup();
        ports
            .into_iter()
            .map(|(protocol, port)| self.matrix(port, protocol))
            .collect()
    }
}

/// Answers every probe, compiling the cluster once.
pub fn evaluate(manifests: &Manifests, probes: &[Probe]) -> Result<Vec<ProbeResult>, Error> {
    let evaluator = Evaluator::new(manifests);
    probes.iter().map(|p| evaluator.probe(p)).collect()
}

/// Reachability between every pair of pods for one port and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// `namespace/pod` of every pod with an address, in manifest order.
    pub pods: Vec<String>,
    /// `allowed[src][dst]`, indexed like `pods`.
    pub allowed: Vec<Vec<bool>>,
}

impl Matrix {
    /// A table: a header naming port and protocol, one row per source pod, one column per
    /// destination pod; columns carry the row numbers of the pods, so ten pods still fit a
    /// terminal.
    pub fn render(&self, ascii: bool) -> String {
        let (yes, no) = if ascii { (".", "X") } else { ("✓", "✗") };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}/{}: rows = source, columns = destination ({} allowed, {} denied)",
            self.port,
            self.protocol.as_str(),
            yes,
            no
        );
        let width = self.pods.iter().map(|p| p.len()).max().unwrap_or(0);
        let _ = write!(out, "   {:width$}", "");
        for j in 1..=self.pods.len() {
            let _ = write!(out, " {j:>2}");
        }
        out.push('\n');
        for (i, src) in self.pods.iter().enumerate() {
            let _ = write!(out, "{:>2} {src:width$}", i + 1);
            for ok in self.allowed.get(i).into_iter().flatten() {
                let _ = write!(out, "  {}", if *ok { yes } else { no });
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests;
