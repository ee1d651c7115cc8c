//! Smoke test of `ocelot-bench pipeline --quick` (in memory, no privileges): every scenario
//! runs, the JSON report has the fields the issue names, and with several rounds the figure
//! reported is the median round's. Nothing here checks a speed.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ocelot-bench");

#[test]
fn quick_run_reports_every_scenario_as_the_median_of_its_rounds() {
    let json = std::env::temp_dir().join(format!("pipeline-smoke-{}.json", std::process::id()));
    let out = Command::new(BIN)
        .args(["pipeline", "--quick", "--rounds", "3", "--json"])
        .arg(&json)
        .output()
        .expect("ocelot-bench starts");
    assert!(
        out.status.success(),
        "exit {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report was written");
    let _ = std::fs::remove_file(&json);
    let report: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let results = report["results"].as_array().expect("a results array");
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["scenario"].as_str().expect("a scenario name"))
        .collect();
    assert_eq!(names, ["established", "new", "denied", "established-1m"]);
    for r in results {
        for field in ["ns_per_packet", "mpps", "p50_ns", "p99_ns"] {
            assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field} in {r}");
        }
        let mut rounds: Vec<f64> = r["rounds_ns_per_packet"]
            .as_array()
            .expect("the rounds")
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect();
        assert_eq!(rounds.len(), 3, "{r}");
        rounds.sort_by(f64::total_cmp);
        assert_eq!(r["ns_per_packet"].as_f64(), Some(rounds[1]), "{r}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("the median of 3 rounds").count(),
        4,
        "{stdout}"
    );
}
