//! The lab's traffic: servers in every pod and the probes.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use classifier::policy::Protocol;
use control::manifests::Manifests;
use control::verdicts::{Probe, ProbeResult, Verdict};
use dataplane::sys;

use super::topology::{Endpoint, Lab, stopped};

/// Probes run at once (denied ones wait for their timeout).
const PARALLEL: usize = 48;

/// What the traffic of one probe showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// `allow` when the destination answered (or, for SCTP, the INIT arrived).
    pub verdict: Verdict,
}

/// Every (protocol, port) the lab's pods must serve: the ports pods declare and the ports
/// the probes use.
pub fn ports_to_serve(manifests: &Manifests, probes: &[Probe]) -> BTreeSet<(Protocol, u16)> {
    let mut ports: BTreeSet<(Protocol, u16)> = manifests
        .cluster
        .pods
        .iter()
        .flat_map(|p| p.ports.iter().map(|c| (c.protocol, c.port)))
        .collect();
    ports.extend(probes.iter().map(|p| (p.protocol, p.port)));
    ports
}

/// The servers of every pod: one thread per pod, stopped on drop.
#[derive(Debug)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Binds a TCP listener and a UDP echo socket per port on every endpoint (SCTP needs
    /// none).
    pub fn start(pods: &[Endpoint], serve: &BTreeSet<(Protocol, u16)>) -> Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Servers {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for pod in pods {
            let netns = pod.netns.clone();
            let ip = pod.ip;
            let serve = serve.clone();
            let stop = Arc::clone(&stop);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                let bound = bind_all(&netns, ip, &serve);
                match bound {
                    Ok((tcp, udp)) => {
                        let _ = ready_tx.send(Ok(()));
                        serve_loop(&tcp, &udp, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
            servers.threads.push(thread);
            ready_rx
                .recv()
                .map_err(|_| anyhow!("server thread of {} died", pod.key))?
                .with_context(|| format!("servers of pod {}", pod.key))?;
        }
        Ok(servers)
    }

    /// Stops and joins the server threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_all(
    netns: &str,
    ip: Ipv4Addr,
    serve: &BTreeSet<(Protocol, u16)>,
) -> Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
    sys::enter_netns(netns)?;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for (protocol, port) in serve {
        let addr = SocketAddr::new(IpAddr::V4(ip), *port);
        match protocol {
            Protocol::Tcp => {
                let l = TcpListener::bind(addr).with_context(|| format!("TCP {addr}"))?;
                l.set_nonblocking(true)?;
                tcp.push(l);
            }
            Protocol::Udp => {
                let s = UdpSocket::bind(addr).with_context(|| format!("UDP {addr}"))?;
                s.set_nonblocking(true)?;
                udp.push(s);
            }
            Protocol::Sctp => {}
        }
    }
    Ok((tcp, udp))
}

/// Accepts connections (and closes them: a completed handshake is the answer) and echoes
/// datagrams until told to stop.
fn serve_loop(tcp: &[TcpListener], udp: &[UdpSocket], stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        for l in tcp {
            while let Ok((stream, _)) = l.accept() {
                busy = true;
                drop(stream);
            }
        }
        for s in udp {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                busy = true;
                let _ = s.send_to(buf.get(..n).unwrap_or_default(), from);
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Runs every probe; TCP and UDP in parallel, then SCTP one at a time (its arrival is judged
/// by a counter of the destination's kernel).
pub fn run_all(
    lab: &Lab,
    probes: &[ProbeResult],
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<Vec<ProbeOutcome>> {
    let results: Mutex<Vec<Option<Result<Verdict>>>> =
        Mutex::new((0..probes.len()).map(|_| None).collect());
    let jobs: Vec<usize> = (0..probes.len())
        .filter(|&i| {
            probes
                .get(i)
                .is_some_and(|p| p.probe.protocol != Protocol::Sctp)
        })
        .collect();
    run_parallel(lab, probes, &jobs, timeout, stop, &results);
    // A deny is confirmed by a second attempt: on a loaded machine a first SYN or datagram
    // can be lost in the kernel's queues (or wait on ARP), and an allowed path must not be
    // reported as denied. An allow needs no confirmation: an answer came back.
    let retry: Vec<usize> = {
        let r = results.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter()
            .copied()
            .filter(|&i| matches!(r.get(i), Some(Some(Ok(Verdict::Deny)))))
            .collect()
    };
    run_parallel(lab, probes, &retry, timeout, stop, &results);
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    for (i, p) in probes.iter().enumerate() {
        if p.probe.protocol == Protocol::Sctp
            && !stopped(stop)
            && let Some(slot) = results.get_mut(i)
        {
            *slot = Some(probe_sctp(lab, p, timeout));
        }
    }
    results
        .into_iter()
        .zip(probes)
        .map(|(r, p)| match r {
            Some(Ok(verdict)) => Ok(ProbeOutcome { verdict }),
            Some(Err(e)) => Err(e.context(format!("probe {}", p.to_json_line()))),
            None => Err(anyhow!("probe {} did not run", p.to_json_line())),
        })
        .collect()
}

/// Runs the probes `jobs` (indexes into `probes`) on up to [`PARALLEL`] threads, storing
/// each verdict in `results`.
fn run_parallel(
    lab: &Lab,
    probes: &[ProbeResult],
    jobs: &[usize],
    timeout: Duration,
    stop: &AtomicBool,
    results: &Mutex<Vec<Option<Result<Verdict>>>>,
) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(jobs.len()) {
            scope.spawn(|| {
                loop {
                    if stopped(stop) {
                        return;
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = jobs.get(k) else {
                        return;
                    };
                    let Some(p) = probes.get(i) else {
                        return;
                    };
                    let verdict = probe_one(lab, p, timeout);
                    if let Some(slot) = results.lock().unwrap_or_else(|e| e.into_inner()).get_mut(i)
                    {
                        *slot = Some(verdict);
                    }
                }
            });
        }
    });
}

fn source<'l>(lab: &'l Lab, p: &ProbeResult) -> Result<&'l Endpoint> {
    lab.endpoint(ipv4(p.src_ip)?).ok_or_else(|| {
        anyhow!(
            "probe source {:?} ({}) has no place in the lab",
            p.probe.src,
            p.src_ip
        )
    })
}

fn ipv4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => Err(anyhow!("{a}: the lab probes over IPv4 only")),
    }
}

/// One TCP or UDP probe, from a thread that enters the source pod's namespace.
fn probe_one(lab: &Lab, p: &ProbeResult, timeout: Duration) -> Result<Verdict> {
    let src = source(lab, p)?;
    let dst = SocketAddr::new(IpAddr::V4(ipv4(p.dst_ip)?), p.probe.port);
    sys::enter_netns(&src.netns)?;
    let from = SocketAddr::new(IpAddr::V4(src.ip), 0);
    match p.probe.protocol {
        Protocol::Tcp => tcp_probe(from, dst, timeout),
        Protocol::Udp => udp_probe(from, dst, timeout),
        Protocol::Sctp => bail!("SCTP probes run separately"),
    }
}

/// A TCP connect from `from` (the outside host has several addresses, so the source is
/// bound explicitly).
fn tcp_probe(from: SocketAddr, dst: SocketAddr, timeout: Duration) -> Result<Verdict> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .context("TCP probe socket")?;
    sock.bind(&from.into())
        .with_context(|| format!("binding {from}"))?;
    Ok(match sock.connect_timeout(&dst.into(), timeout) {
        Ok(()) => Verdict::Allow,
        // A refusal comes from the destination's kernel: the path is open.
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Verdict::Allow,
        Err(_) => Verdict::Deny,
    })
}

fn udp_probe(from: SocketAddr, dst: SocketAddr, timeout: Duration) -> Result<Verdict> {
    let sock = UdpSocket::bind(from).context("UDP probe socket")?;
    sock.connect(dst).context("UDP probe connect")?;
    let tries = 3;
    sock.set_read_timeout(Some(timeout / tries))?;
    let nonce = format!("ocelot-lab {dst} {:?}", Instant::now());
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        sock.send(nonce.as_bytes()).context("UDP probe send")?;
        match sock.recv(&mut buf) {
            Ok(n) if buf.get(..n) == Some(nonce.as_bytes()) => return Ok(Verdict::Allow),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(Verdict::Allow),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("UDP probe receive"),
        }
    }
    Ok(Verdict::Deny)
}

/// SCTP: a crafted INIT from the source pod; `allow` when the destination's kernel counts
/// its arrival.
fn probe_sctp(lab: &Lab, p: &ProbeResult, timeout: Duration) -> Result<Verdict> {
    let src = source(lab, p)?;
    let dst_ip = ipv4(p.dst_ip)?;
    if src.ip == dst_ip {
        // A pod's packets to its own address stay on its loopback, where no dataplane sees
        // them (and the raw socket itself takes the INIT, so no counter moves): the answer
        // is `allow`, as `ocelotctl policy verdicts` gives it.
        return Ok(Verdict::Allow);
    }
    let dst = lab
        .endpoint(dst_ip)
        .ok_or_else(|| anyhow!("SCTP probe destination {dst_ip} has no place in the lab"))?;
    let before = sctp_arrivals(dst)?;
    let deadline = Instant::now() + timeout;
    let sport = 40000 + (std::process::id() % 20000) as u16;
    let init = sctp_init(sport, p.probe.port, 0x0c_e1_07_01);
    let netns = src.netns.clone();
    while Instant::now() < deadline {
        let ns = netns.clone();
        let packet = init.clone();
        std::thread::spawn(move || -> Result<()> {
            sys::enter_netns(&ns)?;
            sys::send_raw_ipv4(Protocol::Sctp.ip_number(), dst_ip, &packet)?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("SCTP sender panicked"))??;
        std::thread::sleep(Duration::from_millis(100));
        if sctp_arrivals(dst)? > before {
            return Ok(Verdict::Allow);
        }
        std::thread::sleep(timeout / 4);
    }
    Ok(if sctp_arrivals(dst)? > before {
        Verdict::Allow
    } else {
        Verdict::Deny
    })
}

/// SCTP packets the pod's kernel has received: `Ip: InUnknownProtos` (no SCTP module) plus
/// `SctpInSCTPPacks` where the module exists.
fn sctp_arrivals(at: &Endpoint) -> Result<u64> {
    let read = |file: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &at.netns, "cat", file])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let snmp = read("/proc/net/snmp")
        .ok_or_else(|| anyhow!("cannot read /proc/net/snmp in {}", at.netns))?;
    let mut total = snmp_field(&snmp, "Ip:", "InUnknownProtos").unwrap_or(0);
    if let Some(sctp) = read("/proc/net/sctp/snmp") {
        total += sctp
            .lines()
            .find_map(|l| l.strip_prefix("SctpInSCTPPacks"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// A field of `/proc/net/snmp` (a header line of names, then a line of values).
fn snmp_field(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// An SCTP packet with one INIT chunk (RFC 9260 §3.3.2), checksummed with CRC32c.
pub fn sctp_init(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag: 0 in an INIT
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    p.push(1); // chunk type INIT
    p.push(0); // flags
    p.extend_from_slice(&20u16.to_be_bytes()); // chunk length
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.wrapping_add(1).to_be_bytes()); // initial TSN
    let crc = crc32c(&p);
    // The checksum is stored in little-endian byte order (RFC 9260 appendix A).
    if let Some(field) = p.get_mut(8..12) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
    p
}

/// CRC32c (Castagnoli), bit by bit: a few dozen bytes per probe.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn sctp_init_parses_as_sctp() {
        let p = sctp_init(40000, 80, 7);
        assert_eq!(p.len(), 32);
        assert_eq!(&p[..4], &[0x9c, 0x40, 0, 80]);
        let mut zeroed = p.clone();
        zeroed[8..12].fill(0);
        assert_eq!(
            u32::from_le_bytes(p[8..12].try_into().unwrap()),
            crc32c(&zeroed)
        );
    }

    #[test]
    fn snmp_field_table() {
        let text = "Ip: Forwarding DefaultTTL InReceives InUnknownProtos\nIp: 1 64 10 3\n\
                    Icmp: InMsgs\nIcmp: 5\n";
        assert_eq!(snmp_field(text, "Ip:", "InUnknownProtos"), Some(3));
        assert_eq!(snmp_field(text, "Icmp:", "InMsgs"), Some(5));
        assert_eq!(snmp_field(text, "Ip:", "Nope"), None);
    }
}
