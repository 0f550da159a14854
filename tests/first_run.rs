//! The broker as an operator first meets it: `serve --help`, the logs in a file, a taken
//! address, a wrong path, and a wrong key in the config file.

mod common;

use std::process::{Command, Stdio};

use common::Broker;
use sealpost_proto::SendOutcome;

fn sealpost(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sealpost")
}

#[test]
fn serve_help_shows_every_default_and_no_test_only_setting() {
    let out = sealpost(&["serve", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8 help");
    // Each flag's block runs from its `--name` line to the next one.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        if line.starts_with("      --") || line.starts_with("  -h") {
            let name = line.split_whitespace().next().unwrap_or("").to_owned();
            blocks.push((name, String::new()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    let flags: Vec<&(String, String)> = blocks
        .iter()
        .filter(|(name, _)| !["--config", "-h,", "--help"].contains(&name.as_str()))
        .collect();
    assert!(
        flags.len() > 60,
        "found only {} flags:\n{help}",
        flags.len()
    );
    for (name, text) in &flags {
        assert!(
            text.contains("[default: "),
            "{name} shows no default:\n{text}"
        );
    }
    assert!(help.contains("--listen") && help.contains("[default: 127.0.0.1:8080]"));
    assert!(!help.to_lowercase().contains("failpoint"), "{help}");
}

#[test]
fn an_unknown_config_key_is_named_and_test_only_settings_are_not_offered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sealpost.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nfailpoint = \"x\"\n").expect("write");
    let out = sealpost(&["serve", "--config", config.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `failpoint`"), "{err}");
    assert!(
        err.contains("listen"),
        "the error lists the valid keys: {err}"
    );
    assert!(!err.contains("failpoint_sync"), "{err}");
}

#[test]
fn a_taken_address_is_named_in_the_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = sealpost(&[
        "serve",
        "--listen",
        &addr,
        "--data-dir",
        data.to_str().expect("path"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}")),
        "the error names {addr}: {err}"
    );
}

#[tokio::test]
async fn logs_written_to_a_file_carry_no_colour_codes_and_unknown_paths_get_json() {
    let broker = Broker::start(&["--log-level", "info"]);
    let answer = reqwest::get(format!("{}/no/such/path", broker.http()))
        .await
        .expect("request");
    assert_eq!(answer.status(), reqwest::StatusCode::NOT_FOUND);
    let body: serde_json::Value = answer.json().await.expect("a JSON body");
    assert_eq!(body["error"], "not_found", "{body}");
    assert!(body["message"].is_string(), "{body}");
    let logs = broker.read_logs();
    assert!(
        !logs.contains(&0x1b),
        "ANSI escape codes in a log file: {}",
        String::from_utf8_lossy(&logs)
    );
}

/// The scheduling policy of every thread of process `pid` (field 41 of its `stat`).
fn thread_policies(pid: u32) -> Vec<u32> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let stat = std::fs::read_to_string(task.expect("task").path().join("stat")).expect("stat");
        // The name (field 2) is in parentheses and may hold spaces: count from after it.
        let after_name = &stat[stat.rfind(')').expect("name") + 2..];
        let policy = after_name.split(' ').nth(41 - 3).expect("policy field");
        policies.push(policy.parse().expect("number"));
    }
    policies
}

#[tokio::test]
async fn every_thread_runs_batched_unless_configured_otherwise() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let broker = Broker::start(&[]);
    // The store's threads (commit, sled's I/O pool) start with the first durable write.
    let creds = common::register(&broker, "policy@test.example").await;
    let mut device = common::Device::connect(&broker, &creds).await;
    let outcome = device
        .send_and_wait(common::eid(), &creds.user, &[creds.device], b"x")
        .await;
    assert!(
        matches!(outcome, SendOutcome::Accepted { .. }),
        "{outcome:?}"
    );
    let policies = thread_policies(broker.pid());
    assert!(policies.len() > 3, "{policies:?}");
    assert!(policies.iter().all(|&p| p == SCHED_BATCH), "{policies:?}");

    let normal = Broker::start(&["--cpu-policy", "normal"]);
    let policies = thread_policies(normal.pid());
    assert!(policies.iter().all(|&p| p == SCHED_OTHER), "{policies:?}");
}
