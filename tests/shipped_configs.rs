//! Ship-safe defaults for calls: nothing shipped (deploy/, k8s/) lets the TURN relay reach
//! loopback or private peers, turns its TLS off, or serves the browser client without its
//! Content-Security-Policy; the broker's defaults mint no TURN credentials and serve no page.

use std::path::{Path, PathBuf};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Lines that are not comments (`#` for coturn, TOML, YAML, nginx and shell).
fn active_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn shipped() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = files_under(&root.join("deploy"));
    files.extend(files_under(&root.join("k8s")));
    files
}

#[test]
fn no_shipped_config_lets_the_relay_reach_loopback_or_drops_tls() {
    for path in shipped() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in active_lines(&text) {
            for forbidden in [
                "allow-loopback-peers",
                "no-tls",
                "no-dtls",
                "no-auth",
                "lt-cred-mech",
            ] {
                assert!(
                    !line.split(['=', ' ']).any(|w| w == forbidden),
                    "{} ships `{line}`",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_shipped_coturn_config_uses_the_broker_secret_and_denies_private_peers() {
    let conf = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/turnserver.conf"),
    )
    .expect("deploy/turnserver.conf");
    let lines: Vec<&str> = active_lines(&conf).collect();
    assert!(lines.contains(&"use-auth-secret"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("static-auth-secret=CHANGE_ME"))
    );
    for range in [
        "127.0.0.0-127.255.255.255",
        "10.0.0.0-10.255.255.255",
        "172.16.0.0-172.31.255.255",
        "192.168.0.0-192.168.255.255",
        "169.254.0.0-169.254.255.255",
        "::1",
        "fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::ffff:0.0.0.0-::ffff:255.255.255.255",
    ] {
        assert!(
            lines.contains(&format!("denied-peer-ip={range}").as_str()),
            "deploy/turnserver.conf must deny {range}"
        );
    }
    assert!(lines.iter().any(|l| l.starts_with("tls-listening-port=")));
}

#[test]
fn the_broker_mints_no_credentials_and_serves_no_page_by_default() {
    let s = sealpost::config::Settings::default();
    assert!(s.turn_urls.is_empty() && s.turn_secret.is_empty() && s.web_root.is_empty());
    // The shipped broker configs do not serve the page from the broker (the TLS proxy does).
    for path in shipped() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        assert!(
            !active_lines(&text).any(|l| l.starts_with("web_root") || l.contains("WEB_ROOT")),
            "{} sets web_root",
            path.display()
        );
    }
    // Where the page is served, it is served with its policy.
    let nginx = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx-sealpost.conf"),
    )
    .expect("nginx config");
    assert!(nginx.contains(sealpost::gateway::web::CONTENT_SECURITY_POLICY));
}
