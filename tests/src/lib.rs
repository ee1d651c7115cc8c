//! Shared helpers for ocelot's end-to-end tests.
//!
//! [`netpol`] is the upstream Kubernetes e2e "netpol" model: namespaces `x`, `y`, `z`
//! (labelled `ns: x` …), pods `a`, `b`, `c` in each (labelled `pod: a` …), every pod serving
//! TCP and UDP on ports 80 and 81 under the names `serve-80-tcp`, `serve-80-udp`,
//! `serve-81-tcp`, `serve-81-udp`. Pod `ns/p` has the address `10.1.N.P` with N = 1, 2, 3 for
//! x, y, z and P = 1, 2, 3 for a, b, c, so ipBlocks can name namespaces (`10.1.2.0/24` is y).
#![forbid(unsafe_code)]

pub mod apiserver;
pub use dataplane::netns;
pub mod xdp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch directory under the system temp dir, removed on drop (also when a test panics).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh, uniquely named directory.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `file` inside the directory.
    pub fn write(&self, file: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(self.0.join(file), text)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The e2e netpol model and its truth tables.
pub mod netpol {
    use std::fmt::Write as _;

    use classifier::policy::model::Protocol;
    use control::manifests::load_dir;
    use control::verdicts::{Verdict, evaluate, parse_probes};

    use crate::TempDir;

    /// Namespaces of the model.
    pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
    /// Pods in every namespace.
    pub const PODS: [&str; 3] = ["a", "b", "c"];

    /// Short names `xa` … `zc`, in row/column order.
    pub fn short_names() -> Vec<String> {
        NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}{p}")))
            .collect()
    }

    /// The model's namespaces and pods as manifests.
    pub fn model_yaml() -> String {
        let mut out = String::new();
        for (n, ns) in NAMESPACES.iter().enumerate() {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    \
                 ns: {ns}\n"
            );
            for (p, pod) in PODS.iter().enumerate() {
                let _ = write!(
                    out,
                    "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\n  \
                     labels:\n    pod: {pod}\nspec:\n  containers:\n"
                );
                for port in [80, 81] {
                    for proto in ["TCP", "UDP"] {
                        let lower = proto.to_lowercase();
                        let _ = write!(
                            out,
                            "    - name: cont-{port}-{lower}\n      image: agnhost\n      ports:\n        \
                             - name: serve-{port}-{lower}\n          containerPort: {port}\n          \
                             protocol: {proto}\n"
                        );
                    }
                }
                let _ = write!(
                    out,
                    "status:\n  podIP: 10.1.{}.{}\n  podIPs:\n    - ip: 10.1.{}.{}\n",
                    n + 1,
                    p + 1,
                    n + 1,
                    p + 1
                );
            }
        }
        out
    }

    /// A NetworkPolicy document; `spec` is block YAML written at column 0.
    pub fn policy(namespace: &str, name: &str, spec: &str) -> String {
        let mut out = format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  \
             namespace: {namespace}\nspec:\n"
        );
        for line in spec.lines().filter(|l| !l.trim().is_empty()) {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    /// Who reaches whom on one port: `allowed[from][to]`, indexed like [`short_names`].
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Reachability {
        /// `allowed[from][to]`.
        pub allowed: [[bool; 9]; 9],
    }

    impl Reachability {
        /// Parses a grid: one row per source pod, in order `xa` … `zc`, each the pod's short
        /// name followed by nine cells (spaces ignored), `.` for allowed and `X` for denied,
        /// columns in the same order as the rows. Panics on a malformed grid: it is test data.
        pub fn parse(grid: &str) -> Reachability {
            let names = short_names();
            let rows: Vec<&str> = grid
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            assert_eq!(rows.len(), 9, "a grid has nine rows:\n{grid}");
            let mut allowed = [[false; 9]; 9];
            for (i, row) in rows.iter().enumerate() {
                let (label, cells) = row.split_once(' ').unwrap_or((row, ""));
                assert_eq!(label, names[i], "row {i} of:\n{grid}");
                let cells: Vec<char> = cells.chars().filter(|c| !c.is_whitespace()).collect();
                assert_eq!(cells.len(), 9, "row {label} needs nine cells:\n{grid}");
                for (j, c) in cells.iter().enumerate() {
                    allowed[i][j] = match c {
                        '.' => true,
                        'X' => false,
                        other => panic!("row {label}: cell {other:?} is neither '.' nor 'X'"),
                    };
                }
            }
            Reachability { allowed }
        }

        /// The grid in [`Reachability::parse`]'s format.
        pub fn render(&self) -> String {
            let mut out = String::from("to:    xa  ya  za (then b, c)\n");
            for (name, row) in short_names().iter().zip(&self.allowed) {
                let _ = write!(out, "{name}    ");
                for (j, ok) in row.iter().enumerate() {
                    if j % 3 == 0 {
                        out.push(' ');
                    }
                    out.push(if *ok { '.' } else { 'X' });
                }
                out.push('\n');
            }
            out
        }
    }

    /// Runs `ocelotctl policy verdicts` (the library behind it) on the model plus
    /// `policies`, probing every pod pair on `port`/`protocol`.
    pub fn observe(policies: &str, port: u16, protocol: Protocol) -> Reachability {
        let dir = TempDir::new("ocelot-netpol").expect("temp dir");
        dir.write("model.yaml", &model_yaml()).expect("write model");
        dir.write("policies.yaml", policies)
            .expect("write policies");
        let manifests = load_dir(dir.path()).unwrap_or_else(|e| panic!("manifests: {e}"));
        let mut probes = String::new();
        let pods: Vec<String> = NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
            .collect();
        for src in &pods {
            for dst in &pods {
                let _ = writeln!(
                    probes,
                    "{{\"src\":\"{src}\",\"dst\":\"{dst}\",\"port\":{port},\"protocol\":\"{}\"}}",
                    protocol.as_str()
                );
            }
        }
        let probes = parse_probes(&probes).unwrap_or_else(|e| panic!("probes: {e}"));
        let results = evaluate(&manifests, &probes).unwrap_or_else(|e| panic!("verdicts: {e}"));
        let mut allowed = [[false; 9]; 9];
        for (k, r) in results.iter().enumerate() {
            allowed[k / 9][k % 9] = r.verdict == Verdict::Allow;
        }
        Reachability { allowed }
    }

    /// Checks every (port, protocol, expected grid) against what the compiled policy says;
    /// on mismatch, panics with both grids and the differing cells of every table.
    pub fn check(policies: &str, tables: &[(u16, Protocol, &str)]) {
        let names = short_names();
        let mut report = String::new();
        for (port, protocol, grid) in tables {
            let expected = Reachability::parse(grid);
            let observed = observe(policies, *port, *protocol);
            if expected == observed {
                continue;
            }
            let _ = writeln!(report, "== {port}/{} ==", protocol.as_str());
            let _ = writeln!(report, "expected:\n{}", expected.render());
            let _ = writeln!(report, "observed:\n{}", observed.render());
            for i in 0..9 {
                for j in 0..9 {
                    if expected.allowed[i][j] != observed.allowed[i][j] {
                        let _ = writeln!(
                            report,
                            "  {} -> {}: expected {}, observed {}",
                            names[i],
                            names[j],
                            if expected.allowed[i][j] {
                                "allow"
                            } else {
                                "deny"
                            },
                            if observed.allowed[i][j] {
                                "allow"
                            } else {
                                "deny"
                            },
                        );
                    }
                }
            }
        }
        assert!(report.is_empty(), "policies:\n{policies}\n{report}");
    }
}

/// Helpers of the tests that run the workspace's binaries (`ocelot`, `ocelotctl`).
pub mod bins {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    /// One lab at a time in a test binary: each runs agents that busy-poll while traffic
    /// flows, and several at once on a two-core machine starve each other's probes.
    pub fn serial() -> std::sync::MutexGuard<'static, ()> {
        static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LAB.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A binary of the workspace, next to the running test's own `deps/` directory
    /// (`scripts/test.sh` builds every target before running the tests).
    pub fn binary(name: &str) -> PathBuf {
        let exe = std::env::current_exe().expect("test executable");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps/<test>");
        let bin = dir.join(name);
        assert!(
            bin.is_file(),
            "{} is missing: build it first (cargo build -p tools)",
            bin.display()
        );
        bin
    }

    /// Runs a workspace binary to completion.
    pub fn run(bin: &str, args: &[&str]) -> Output {
        Command::new(binary(bin))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("binary runs")
    }

    /// A path in the repository.
    pub fn repo(path: &str) -> String {
        format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
    }

    /// Writes a manifest file so that an agent polling the directory never reads half of it.
    pub fn write_atomic(dir: &Path, file: &str, text: &str) {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(file)).expect("rename");
    }
}
