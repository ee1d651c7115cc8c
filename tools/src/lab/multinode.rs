//! `ocelot lab --nodes N` (N ≥ 2): the founding talk's plain-L3 fabric in namespaces.
//!
//! ```text
//!   pods ─veth─ node lab-1 (ocelot) ─uplink0─┐
//!   pods ─veth─ node lab-2 (ocelot) ─uplink0─┼─ br0 in "router" (192.168.0.1/24)
//!   …                                        ┘   + outside addresses on its loopback
//! ```
//!
//! Each node has its own namespace, its own `ocelot run` and an uplink with the node's
//! address (192.168.0.(10+k)/24, the kernel's default route via the router). The router
//! forwards, holds a /32 route per pod via its node (what BGP would have taught it), and
//! plays the outside world: addresses that belong to no pod are put on its loopback. The lab
//! writes a `Node` object per node (its InternalIP and a /32 podCIDR per pod placed on it)
//! into a directory of its own, which every agent reads beside the user's manifests, so
//! each agent routes other nodes' pods via those nodes' addresses on the shared segment.
//!
//! Pods go to nodes by their `spec.nodeName` (distinct names in sorted order take the lab's
//! nodes in turn, and name them), the rest round robin. Probes may use `node:NAME` for a
//! node's own address.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use dataplane::netns::{Netns, VethPair};

use super::probe::Servers;
use super::topology::{
    Endpoint, Lab, LabOptions, LabPod, TempDir, UPLINK, agent_config, build_pod, first_ipv4,
    start_agent,
};

/// The router's address on the shared segment.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

/// Node `k`'s (0-based) address.
pub fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 0, 11 + k as u8)
}

/// Where everything goes: node names, each pod's node, and the lab's Node objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Node names, by index.
    pub names: Vec<String>,
    /// `namespace/name` → node index, for every IPv4 pod.
    pub pod_node: BTreeMap<String, usize>,
    /// The lab's Node objects (YAML).
    pub yaml: String,
}

/// Places the pods of `manifests` on `nodes` nodes. Deterministic: the lab and its
/// evaluation of expected verdicts compute the same plan.
pub fn plan(manifests: &control::Manifests, nodes: usize) -> Result<Plan> {
    if !(2..=200).contains(&nodes) {
        bail!("--nodes {nodes}: between 2 and 200");
    }
    if !manifests.nodes.is_empty() {
        bail!(
            "the manifests hold Node objects; the lab makes its own nodes (remove them, or run \
             without --nodes)"
        );
    }
    // Node names: the pods' nodeNames first, then lab-K.
    let named: BTreeSet<&str> = manifests
        .cluster
        .pods
        .iter()
        .filter_map(|p| p.node.as_deref())
        .collect();
    let mut names: Vec<String> = named.iter().take(nodes).map(|s| s.to_string()).collect();
    for k in names.len()..nodes {
        names.push(format!("lab-{}", k + 1));
    }
    let index_of: BTreeMap<&str, usize> = named
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i % nodes))
        .collect();
    let mut pod_node = BTreeMap::new();
    let mut per_node: Vec<Vec<Ipv4Addr>> = vec![Vec::new(); nodes];
    let mut round_robin = 0;
    for p in &manifests.cluster.pods {
        if p.host_network {
            continue;
        }
        let Some(ip) = first_ipv4(p) else {
            continue;
        };
        let k = match p.node.as_deref().and_then(|n| index_of.get(n)) {
            Some(k) => *k,
            None => {
                round_robin += 1;
                (round_robin - 1) % nodes
            }
        };
        pod_node.insert(format!("{}/{}", p.namespace, p.name), k);
        if let Some(list) = per_node.get_mut(k) {
            list.push(ip);
        }
    }
    let mut yaml = String::new();
    for (k, name) in names.iter().enumerate() {
        let cidrs: Vec<String> = per_node
            .get(k)
            .into_iter()
            .flatten()
            .map(|ip| format!("\"{ip}/32\""))
            .collect();
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDRs: [{}]\n\
             status:\n  addresses:\n  - type: InternalIP\n    address: {}\n",
            cidrs.join(", "),
            node_ip(k)
        );
    }
    Ok(Plan {
        names,
        pod_node,
        yaml,
    })
}

/// Builds the nodes, the router and the pods, and starts an agent per node.
pub fn start(opts: &LabOptions) -> Result<Lab> {
    let manifests = super::load(&opts.manifests)?;
    let plan = plan(&manifests, opts.nodes)?;
    let names = &plan.names;

    let router = Netns::new("router")?;
    router.disable_ipv6()?;
    router.ip(&["link", "add", "br0", "type", "bridge"])?;
    router.addr_add("br0", &format!("{ROUTER}/24"))?;
    router.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    let mut veths = Vec::new();
    let mut nodes = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let ns = Netns::new(&format!("node{}", k + 1))?;
        ns.disable_ipv6()?;
        let port = format!("n{}", k + 1);
        veths.push(VethPair::with_queues(
            &ns,
            UPLINK,
            &router,
            &port,
            opts.uplink_queues,
        )?);
        router.ip(&["link", "set", &port, "master", "br0"])?;
        // Locally generated TCP/UDP leaves checksums to "hardware"; frames that cross an
        // AF_XDP dataplane must carry real ones (see the README's troubleshooting).
        router.tx_checksum_off(&port)?;
        ns.tx_checksum_off(UPLINK)?;
        ns.addr_add(UPLINK, &format!("{}/24", node_ip(k)))?;
        ns.route_add(&["default", "via", &ROUTER.to_string(), "dev", UPLINK])?;
        tracing::debug!("node {name} is {}", ns.name());
        nodes.push(ns);
    }
    router.tx_checksum_off("br0")?;

    let mut pods = Vec::new();
    for p in &manifests.cluster.pods {
        let key = format!("{}/{}", p.namespace, p.name);
        let Some(&k) = plan.pod_node.get(&key) else {
            continue;
        };
        let Some(ip) = first_ipv4(p) else {
            continue;
        };
        let Some(node) = nodes.get(k) else {
            bail!("node index {k} out of range");
        };
        let (veth, pod) = build_pod(p, ip, node)?;
        veths.push(veth);
        router.route_add(&[&format!("{ip}/32"), "via", &node_ip(k).to_string()])?;
        pods.push(LabPod {
            node: k,
            key,
            ip,
            pod,
        });
    }
    if pods.is_empty() {
        bail!(
            "no pod of {} has an IPv4 address (status.podIPs): nothing to build",
            opts.manifests.display()
        );
    }

    // The lab's own manifests: a Node per node.
    let dir = std::env::temp_dir().join(format!(
        "ocelot-lab-{}-{}",
        std::process::id(),
        router.name()
    ));
    let node_dir = dir.join("nodes");
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    let workdir = TempDir(dir.clone());
    std::fs::write(node_dir.join("lab-nodes.yaml"), &plan.yaml)
        .context("writing the lab's Node objects")?;
    let dirs: Vec<PathBuf> = vec![opts.manifests.clone(), node_dir];

    let mut endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint {
            key: p.key.clone(),
            ip: p.ip,
            netns: p.pod.ns.name().to_owned(),
        })
        .collect();
    for (k, ns) in nodes.iter().enumerate() {
        endpoints.push(Endpoint {
            key: format!("node:{}", names.get(k).map_or("?", String::as_str)),
            ip: node_ip(k),
            netns: ns.name().to_owned(),
        });
    }
    for ip in &opts.outside {
        if endpoints.iter().any(|e| e.ip == *ip) {
            continue;
        }
        router.addr_add("lo", &format!("{ip}/32"))?;
        endpoints.push(Endpoint {
            key: ip.to_string(),
            ip: *ip,
            netns: router.name().to_owned(),
        });
    }
    let servers = Servers::start(&endpoints, &opts.serve)?;
    let mut agents = Vec::new();
    let mut status_paths = Vec::new();
    for (k, ns) in nodes.iter().enumerate() {
        let name = names.get(k).map_or("lab", String::as_str);
        let config = dir.join(format!("ocelot-{}.toml", k + 1));
        let mut text = agent_config(opts, None)?;
        text = text.replacen("name = \"lab\"", &format!("name = \"{name}\""), 1);
        text.push_str(&format!("\n[uplink]\ninterface = \"{UPLINK}\"\n"));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let status = dir.join(format!("status-{}.json", k + 1));
        agents.push(start_agent(opts, ns, &config, &dirs, &status)?);
        status_paths.push(status);
    }
    let mut nodes = nodes.into_iter();
    let Some(first) = nodes.next() else {
        bail!("no nodes");
    };
    let lab = Lab {
        servers,
        agents,
        status_paths,
        dirs,
        workdir,
        pods,
        endpoints,
        veths,
        outside: Some(router),
        more_nodes: nodes.collect(),
        node: first,
    };
    // Traffic between nodes needs each agent to have resolved the others' MACs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for k in 0..lab.agents.len() {
        loop {
            let resolved = lab.status_of(k).is_ok_and(|s| {
                s["report"]["unresolved_next_hops"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            });
            if resolved {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "node {} did not resolve its next hops within 20 s; the agents' log:\n{}",
                    k + 1,
                    lab.agent_log()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(lab)
}
