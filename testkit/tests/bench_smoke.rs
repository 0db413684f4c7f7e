//! Smoke test: `transport-bench --quick --json` runs end to end and reports every required key (no timing asserts).

use std::process::Command;

/// `"key": value` from the bench's flat JSON object; `None` if missing or null.
fn number(json: &str, key: &str) -> Option<f64> {
    let needle = format!("\"{key}\":");
    let rest = &json[json.find(&needle)? + needle.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

#[test]
fn quick_bench_reports_every_required_key() {
    let has_node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut bench = Command::new(env!("CARGO_BIN_EXE_transport-bench"));
    bench.args(["--quick", "--json"]);
    if !has_node {
        bench.arg("--skip-node");
    }
    let out = bench.output().expect("transport-bench should start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "transport-bench failed:\n{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("JSON output is UTF-8");
    let json = stdout.trim();
    assert!(
        json.starts_with('{') && json.ends_with('}') && json.lines().count() == 1,
        "expected one JSON object on stdout, got:\n{stdout}"
    );

    let mut required = vec![
        "rtt_p50_ns",
        "rtt_p99_ns",
        "rtt_p999_ns",
        "floor_p50_ns",
        "uds_p50_ns",
        "msgs_per_sec_64b",
        "msgs_per_sec_64b_run5",
        "msgs_per_sec_64b_per_message",
        "msgs_per_sec_64b_crc",
        "connect_first_tenth_avg_us",
        "connect_last_tenth_avg_us",
        "gbps_1mib",
        "memcpy_gbps",
        "connect_1000_ms",
        "rss_idle_kib",
        "rss_1000_kib",
        "memory_per_connection_kib",
        "memory_per_connection_shared_kib",
        "memory_per_connection_default_kib",
    ];
    if has_node {
        required.extend(["node_ipc_p50_ns", "node_net_p50_ns"]);
    } else {
        assert!(json.contains("\"node_ipc_p50_ns\":null"), "{json}");
    }
    for key in required {
        let value =
            number(json, key).unwrap_or_else(|| panic!("{key} missing or not a number in {json}"));
        assert!(value > 0.0, "{key} = {value} should be positive");
    }
    // Idle CPU is expected to be zero: present and non-negative.
    for key in ["idle_cpu_percent", "client_idle_cpu_ticks"] {
        let idle = number(json, key).unwrap_or_else(|| panic!("{key} missing"));
        assert!(idle >= 0.0, "{key} = {idle}");
    }
    assert_eq!(number(json, "connect_clients"), Some(1000.0));
    assert!(
        json.contains("\"cleanup\":\"ok"),
        "cleanup not confirmed: {json}"
    );
}
