//! Two users of the `sealpost-cli` binary (separate state directories) exchange messages
//! through a real broker process.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{Broker, WAIT};

/// The `sealpost-cli` binary of this build (another package's binary, so cargo does not hand
/// us its path): built on first use, next to this test's own profile directory.
fn cli() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("test path");
        // target/<profile>/deps/e2e_cli-HASH
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("profile dir")
            .to_owned();
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--quiet",
            "-p",
            "sealpost-client",
            "--bin",
            "sealpost-cli",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building sealpost-cli failed");
        let path = profile_dir.join("sealpost-cli");
        assert!(path.exists(), "{} missing", path.display());
        path
    })
}

/// Runs the CLI with `state` as its state directory; waits at most `WAIT`.
fn run(state: &Path, args: &[&str]) -> Output {
    run_with(state, args, "", &[])
}

/// [`run`] with `stdin` as its input and extra environment variables.
fn run_with(state: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(cli())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sealpost-cli");
    // Written whole, then closed: the CLI reads a line at most.
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "sealpost-cli {args:?} did not finish: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the CLI in the background with `state` as its state directory, its output piped.
fn spawn_cli(state: &Path, args: &[&str]) -> std::process::Child {
    Command::new(cli())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn sealpost-cli {args:?}: {e}"))
}

/// Runs and expects success; returns stdout.
fn ok(state: &Path, args: &[&str]) -> String {
    let out = run(state, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sealpost-cli {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn two_cli_users_exchange_messages() {
    let broker = Broker::start(&[]);
    let server = broker.http();
    let alice = tempfile::tempdir().expect("tempdir");
    let bob = tempfile::tempdir().expect("tempdir");
    let (a, b) = (alice.path(), bob.path());
    let (alice_h, bob_h) = ("alice@test.example", "bob@test.example");

    let out = ok(a, &["register", "--server", &server, "--handle", alice_h]);
    assert!(
        out.contains("Registered alice@test.example (device 1)"),
        "{out}"
    );
    ok(b, &["register", "--server", &server, "--handle", bob_h]);

    let out = ok(a, &["send", "--to", bob_h, "hello", "bob,", "from the CLI"]);
    assert!(out.contains("Sent to bob@test.example"), "{out}");
    let out = ok(b, &["listen", "--count", "1"]);
    let line = out.lines().next().expect("a line");
    assert!(
        line.starts_with('[') && line.ends_with("] alice@test.example: hello bob, from the CLI"),
        "{out}"
    );

    // Bob answers (sealed now: Alice's first message carried her delivery token).
    ok(b, &["send", "--to", alice_h, "hi alice"]);
    let out = ok(a, &["listen", "--count", "1"]);
    assert!(out.contains("] bob@test.example: hi alice"), "{out}");
    // Nothing else is waiting.
    let out = ok(a, &["listen", "--until-empty"]);
    assert!(out.trim().is_empty(), "{out}");

    let out = ok(a, &["conversations"]);
    assert!(out.contains("bob@test.example  2 messages"), "{out}");
    let out = ok(a, &["conversations", "--with", bob_h]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    // Alice's own message says how far it got: bob's device decrypted it (a delivered
    // receipt) at least.
    assert!(
        lines[0].contains("alice@test.example: hello bob, from the CLI  ("),
        "{out}"
    );
    assert!(lines[1].ends_with("bob@test.example: hi alice"), "{out}");

    // Both sides show the same safety number; verifying marks the contact.
    let number = |out: &str| out.lines().nth(1).expect("number line").to_owned();
    let ab = number(&ok(a, &["safety-number", "--with", bob_h]));
    let ba = number(&ok(b, &["safety-number", "--with", alice_h]));
    assert_eq!(ab, ba);
    assert_eq!(ab.split(' ').count(), 12);
    let out = ok(a, &["verify", "--with", bob_h, "--yes"]);
    assert!(out.contains("bob@test.example is verified"), "{out}");
    assert!(ok(a, &["conversations"]).contains("bob@test.example (verified)"));

    let out = ok(a, &["devices"]);
    assert!(out.starts_with("device 1 (this device)"), "{out}");

    // Linking a second device: `link-code` shows the code and waits; `link` uses it.
    let mut existing = spawn_cli(a, &["link-code", "--wait-secs", "20"]);
    let mut shown = BufReader::new(existing.stdout.take().expect("stdout"));
    let mut line = String::new();
    shown.read_line(&mut line).expect("code line");
    let code = line
        .trim()
        .strip_prefix("Link code: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let alice2 = tempfile::tempdir().expect("tempdir");
    let a2 = alice2.path();
    let out = ok(
        a2,
        &[
            "link", "--server", &server, "--handle", alice_h, "--code", &code,
        ],
    );
    assert!(
        out.contains("Linked: this is device 2 of alice@test.example"),
        "{out}"
    );
    let mut rest = String::new();
    shown.read_to_string(&mut rest).expect("link-code output");
    assert!(existing.wait().expect("link-code exit").success());
    assert!(rest.contains("Device 2 linked."), "{rest}");
    let out = ok(a2, &["devices"]);
    assert!(
        out.contains("device 1  ") && out.contains("device 2 (this device)"),
        "{out}"
    );
    // The new device receives what Bob sends now, sealed (it got his token in the grant).
    ok(b, &["send", "--to", alice_h, "to both of your devices"]);
    for dir in [a, a2] {
        let out = ok(dir, &["listen", "--count", "1"]);
        assert!(
            out.contains("] bob@test.example: to both of your devices"),
            "{out}"
        );
    }

    // A device removed from its account is told so, not "sent".
    let out = ok(a, &["remove-device", "2"]);
    assert!(out.contains("Device 2 removed."), "{out}");
    let out = run(a2, &["send", "--to", bob_h, "from a removed device"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("this device was removed from its account"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());

    // Errors are explained, not dumped.
    let out = run(a, &["send", "--to", "nobody@test.example", "x"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("there is no account nobody@test.example"),
        "{stderr}"
    );
    let out = run(a, &["register", "--server", &server, "--handle", alice_h]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a Sealpost account"));
    let empty = tempfile::tempdir().expect("tempdir");
    let out = run(empty.path(), &["listen"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run register or link first"));
}

#[test]
fn listen_keeps_listening_across_a_broker_restart() {
    let mut broker = Broker::start(&[]);
    let server = broker.http();
    let alice = tempfile::tempdir().expect("tempdir");
    let bob = tempfile::tempdir().expect("tempdir");
    let (a, b) = (alice.path(), bob.path());
    ok(
        a,
        &[
            "register",
            "--server",
            &server,
            "--handle",
            "alice@test.example",
        ],
    );
    ok(
        b,
        &[
            "register",
            "--server",
            &server,
            "--handle",
            "bob@test.example",
        ],
    );

    let mut listener = spawn_cli(b, &["listen", "--count", "1"]);
    let stderr = BufReader::new(listener.stderr.take().expect("stderr"));
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // The broker goes away under the listener, which says so and keeps trying.
    assert!(broker.terminate(), "graceful shutdown");
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("listen never noticed the broker going away");
        if line.starts_with("Connection to the broker lost") {
            assert!(
                line.contains("; reconnecting at ") && line.contains(" UTC (in "),
                "listen says when it tries next: {line}"
            );
            break;
        }
    }
    assert!(
        listener.try_wait().expect("wait").is_none(),
        "listen exited when the broker went away"
    );

    // Back up: a message sent now reaches the same listen process.
    broker.restart();
    ok(
        a,
        &["send", "--to", "bob@test.example", "after the restart"],
    );
    // Its next attempt may be up to one backoff (at most 30 s) away.
    let deadline = Instant::now() + WAIT + Duration::from_secs(30);
    while listener.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = listener.kill();
            panic!("listen did not get the message after the restart");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = listener.wait_with_output().expect("output");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("] alice@test.example: after the restart"),
        "{stdout}"
    );
    let said: Vec<String> = lines.iter().collect();
    assert!(
        said.iter().any(|l| l == "Reconnected."),
        "listen says it reconnected: {said:?}"
    );
}

/// The lines a child writes to `pipe`, as they come.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_cli_says_what_went_wrong_in_one_line_and_serves_commands_while_listening() {
    let broker = Broker::start(&[]);
    // A broker address without a scheme: http on this machine.
    let server = broker.addr.to_string();
    let alice = tempfile::tempdir().expect("tempdir");
    let bob = tempfile::tempdir().expect("tempdir");
    let (a, b) = (alice.path(), bob.path());
    let out = ok(
        a,
        &[
            "register",
            "--server",
            &server,
            "--handle",
            "alice@test.example",
        ],
    );
    assert!(out.contains("Registered alice@test.example"), "{out}");
    ok(
        b,
        &[
            "register",
            "--server",
            &server,
            "--handle",
            "bob@test.example",
        ],
    );

    // An https broker is reached with TLS (built in): here the broker speaks plain http, so
    // the handshake fails, and the error says more than "error sending request".
    let tls = tempfile::tempdir().expect("tempdir");
    let https = format!("https://{}", broker.addr);
    let out = run(
        tls.path(),
        &["register", "--server", &https, "--handle", "c@test.example"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("cannot reach the broker (error sending request: "),
        "{err}"
    );
    assert!(!err.contains("builder error"), "{err}");

    // User errors: one line, exit 1, no backtrace even when asked for one.
    let cases: [(&[&str], &str); 4] = [
        (
            &["remove-device", "9"],
            "there is no device 9 in your account",
        ),
        (
            &["send", "--to", "nobody@test.example", "x"],
            "there is no account nobody@test.example",
        ),
        (
            &["send", "--to", "x@elsewhere.example", "x"],
            "does not exchange messages with elsewhere.example",
        ),
        (
            &["disappearing", "--with", "bob@test.example", "1y"],
            "expected off, or a time",
        ),
    ];
    for (args, words) in cases {
        let out = run_with(a, args, "", &[("RUST_BACKTRACE", "1")]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr_of(&out);
        assert!(
            err.starts_with("error: ") && err.contains(words),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!err.contains("backtrace"), "{err}");
    }

    // `listen --until-empty` with nothing waiting says so.
    let out = run(b, &["listen", "--until-empty"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        stderr_of(&out).contains("No new messages."),
        "{}",
        stderr_of(&out)
    );

    // Bob listens; meanwhile his other commands go through the listener.
    let mut listener = spawn_cli(b, &["listen", "--count", "2"]);
    let mut status = BufReader::new(listener.stderr.take().expect("stderr"));
    let mut first = String::new();
    status.read_line(&mut first).expect("status line");
    assert!(
        first.starts_with("Connected to http://") && first.contains("as bob@test.example"),
        "{first}"
    );
    let printed = lines_of(listener.stdout.take().expect("stdout"));
    let wait_printed = |text: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = printed
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("listen never printed {text:?}"));
            if line.contains(text) {
                return;
            }
        }
    };
    ok(a, &["send", "--to", "bob@test.example", "are you there?"]);
    wait_printed("alice@test.example: are you there?");
    let out = ok(b, &["send", "--to", "alice@test.example", "yes, listening"]);
    assert!(out.contains("Sent to alice@test.example."), "{out}");
    let out = ok(b, &["conversations"]);
    assert!(out.contains("alice@test.example"), "{out}");
    // `y` is a yes.
    let out = run_with(b, &["verify", "--with", "alice@test.example"], "y\n", &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice@test.example is verified"));
    let out = ok(b, &["disappearing", "--with", "alice@test.example", "1h"]);
    assert!(out.contains("disappear after 1 hour"), "{out}");
    // What needs the state to itself says to stop the listener.
    let out = run(b, &["rotate-master-key", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("needs it stopped first"),
        "{}",
        stderr_of(&out)
    );

    // Scripts speak JSON-RPC 2.0 to the same socket.
    let mut socket =
        std::os::unix::net::UnixStream::connect(b.join("daemon.sock")).expect("socket");
    use std::io::Write as _;
    writeln!(
        socket,
        r#"{{"jsonrpc":"2.0","id":7,"method":"conversations","params":{{"with":"alice@test.example"}}}}"#
    )
    .expect("request");
    let mut answer = String::new();
    BufReader::new(&socket)
        .read_line(&mut answer)
        .expect("answer");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(answer["id"], 7);
    let text = answer["result"]["lines"].to_string();
    assert!(
        text.contains("are you there?") && text.contains("yes, listening"),
        "{answer}"
    );
    writeln!(socket, r#"{{"jsonrpc":"2.0","id":8,"method":"nope"}}"#).expect("request");
    let mut answer = String::new();
    BufReader::new(&socket)
        .read_line(&mut answer)
        .expect("answer");
    assert!(
        answer.contains("\"error\"") && answer.contains("unknown method"),
        "{answer}"
    );

    // The listener exits after its second message, and takes its socket with it.
    ok(a, &["send", "--to", "bob@test.example", "second"]);
    wait_printed("alice@test.example: second");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = listener.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "listen did not exit after two messages"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(
        !b.join("daemon.sock").exists(),
        "the socket is gone with the listener"
    );
}

#[test]
fn send_warns_once_of_an_unlisted_device_and_a_changed_master_key_is_explained() {
    let broker = Broker::start(&[]);
    let server = broker.http();
    let alice = tempfile::tempdir().expect("tempdir");
    let bob = tempfile::tempdir().expect("tempdir");
    let (a, b) = (alice.path(), bob.path());
    let (alice_h, bob_h) = ("alice@test.example", "bob@test.example");
    ok(a, &["register", "--server", &server, "--handle", alice_h]);
    ok(b, &["register", "--server", &server, "--handle", bob_h]);
    let out = run(a, &["send", "--to", bob_h, "first"]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "nothing to warn of yet");
    ok(a, &["verify", "--with", bob_h, "--yes"]);
    let number = |out: &str| out.lines().nth(1).expect("number line").trim().to_owned();
    let verified_number = number(&ok(a, &["safety-number", "--with", bob_h]));

    // A second device of bob's is being linked: the broker has it, bob's signed list does
    // not (nobody approves it: the device that showed the code is gone).
    let mut shows_code = spawn_cli(b, &["link-code", "--wait-secs", "20"]);
    let mut line = String::new();
    BufReader::new(shows_code.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("code line");
    shows_code.kill().expect("stop link-code");
    shows_code.wait().expect("link-code exit");
    let code = line.trim().strip_prefix("Link code: ").expect("a code");
    let bob2 = tempfile::tempdir().expect("tempdir");
    let out = run(
        bob2.path(),
        &[
            "link",
            "--server",
            &server,
            "--handle",
            bob_h,
            "--code",
            code,
            "--wait-secs",
            "1",
        ],
    );
    assert!(!out.status.success(), "nobody approved it");

    // Alice is told once, when she sends to bob, calmly and with what to do.
    let out = run(a, &["send", "--to", bob_h, "second"]);
    assert!(out.status.success());
    let warning = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        warning.contains(
            "bob@test.example has a device (device 2) that is not in their signed device list"
        ) && warning.contains("only a random placeholder, not your message")
            && warning.contains("bob@test.example is linking a new device")
            && warning.contains("tell them"),
        "{warning}"
    );
    let out = run(a, &["send", "--to", bob_h, "third"]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "told once, not on every send");

    // Bob's master key changes (say, he reset his keys).
    let out = ok(b, &["rotate-master-key", "--yes"]);
    assert!(
        out.contains("master key of bob@test.example is replaced"),
        "{out}"
    );
    let out = run(a, &["send", "--to", bob_h, "fourth"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not sent")
            && stderr.contains("sealpost-cli safety-number --with bob@test.example"),
        "{stderr}"
    );
    // Not "verified" any more: the change is shown instead.
    let out = ok(a, &["conversations"]);
    assert!(
        out.contains("bob@test.example (master key changed, not accepted: see safety-number)")
            && !out.contains("(verified)"),
        "{out}"
    );
    // The safety number explains the change: old and new numbers, what to compare, how to
    // accept.
    let out = ok(a, &["safety-number", "--with", bob_h]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        out.contains("The master key of bob@test.example changed")
            && out.contains("Safety number before the change (the one you verified):")
            && out.contains("Compare the NEW number with\nbob@test.example in person")
            && out.contains("sealpost-cli accept-key --with bob@test.example"),
        "{out}"
    );
    let at = |label: &str| {
        let i = lines
            .iter()
            .position(|l| l.starts_with(label))
            .expect(label);
        lines[i + 1].trim().to_owned()
    };
    let (old, new) = (at("Safety number before"), at("New safety number"));
    assert_eq!(old, verified_number);
    assert_ne!(new, verified_number);
    assert_eq!(new.split(' ').count(), 12);

    // Accepted: the new number is the safety number, not verified yet, no change pending.
    ok(a, &["accept-key", "--with", bob_h, "--yes"]);
    assert_eq!(number(&ok(a, &["safety-number", "--with", bob_h])), new);
    let out = ok(a, &["conversations"]);
    assert!(
        !out.contains("changed") && !out.contains("(verified)"),
        "{out}"
    );
    ok(a, &["send", "--to", bob_h, "fifth"]);
}

#[test]
fn a_group_is_created_written_to_and_listed_from_the_cli() {
    let broker = Broker::start(&[]);
    let server = broker.http();
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let handles = [
        "alice@test.example",
        "bob@test.example",
        "carol@test.example",
    ];
    for (dir, handle) in dirs.iter().zip(handles) {
        ok(
            dir.path(),
            &["register", "--server", &server, "--handle", handle],
        );
    }
    let (a, b, c) = (dirs[0].path(), dirs[1].path(), dirs[2].path());

    let out = ok(
        a,
        &[
            "group",
            "create",
            "--name",
            "Book club",
            handles[1],
            handles[2],
        ],
    );
    let id = out
        .strip_prefix("Created group ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert!(out.contains("\"Book club\""), "{out}");
    ok(a, &["group", "send", &id, "first", "chapter", "tonight?"]);

    let out = ok(b, &["listen", "--count", "1"]);
    assert!(
        out.contains("* alice@test.example added you to group"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "] alice@test.example in {id}: first chapter tonight?"
        )),
        "{out}"
    );
    ok(b, &["group", "send", &id, "yes"]);
    let out = ok(c, &["listen", "--count", "2"]);
    assert!(out.contains("alice@test.example in"), "{out}");
    assert!(out.contains("bob@test.example in"), "{out}");

    let out = ok(c, &["group", "list"]);
    assert!(
        out.contains(&format!("{id}  \"Book club\"  3 members")),
        "{out}"
    );
    let out = ok(c, &["group", "list", &id]);
    assert!(
        out.contains("alice@test.example device 1: verified device"),
        "{out}"
    );
    assert!(out.contains("bob@test.example (device 1): yes"), "{out}");

    // Alice removes carol, who is told; what follows is not for her.
    let out = ok(a, &["group", "remove", &id, handles[2]]);
    assert!(out.contains("Removed carol@test.example"), "{out}");
    ok(a, &["group", "send", &id, "just us now"]);
    let out = ok(c, &["listen", "--until-empty"]);
    assert!(out.contains("you were removed from group"), "{out}");
    assert!(!out.contains("just us now"), "{out}");
    let out = run(c, &["group", "send", &id, "hello?"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no longer in the group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

/// Bytes of the attachments the broker holds, whole or not.
fn attachment_bytes(broker: &Broker) -> u64 {
    std::fs::read_dir(broker.data_dir().join("attachments"))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().ends_with(".meta"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A real image: a `width`×`height` RGB PNG (deflate in stored blocks, so its pixels are in
/// the file as they are), its pixels a deterministic noise over a gradient, so that every
/// 16-byte run of it is distinctive. Any PNG reader opens it.
fn png(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend(
            u32::try_from(data.len())
                .expect("a small chunk")
                .to_be_bytes(),
        );
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    // Scanlines: filter byte 0, then RGB.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut raw = Vec::new();
    for y in 0..height {
        raw.push(0);
        for x in 0..width {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let noise = seed.to_le_bytes();
            raw.push(x.to_le_bytes()[0].wrapping_add(noise[0] >> 2));
            raw.push(y.to_le_bytes()[0].wrapping_add(noise[1] >> 2));
            raw.push(noise[2]);
        }
    }
    // zlib: header, stored blocks of at most 65,535 bytes, Adler-32.
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = u16::try_from(block.len()).expect("at most 65,535");
        zlib.extend(len.to_le_bytes());
        zlib.extend((!len).to_le_bytes());
        zlib.extend(*block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend(((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter method, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Where a run of 32 bytes of `secret` is in the files under `dir`: (file, offset in it).
/// Every 32-byte window of `secret` holds one of its 16-byte blocks at offsets divisible by
/// 16, so it is enough (and stricter) to look for those blocks, all at once.
fn windows_of_in(secret: &[u8], dir: &Path) -> Option<(PathBuf, usize)> {
    let blocks: Vec<&[u8]> = secret.chunks_exact(16).collect();
    let finder = aho_corasick::AhoCorasick::new(&blocks).expect("patterns");
    files_under(dir)
        .into_iter()
        .find_map(|(path, bytes)| finder.find(&bytes).map(|m| (path, m.start())))
}

#[test]
fn a_file_resumes_after_the_sender_is_killed_arrives_whole_and_a_changed_one_is_refused() {
    let broker = Broker::start(&[]);
    let server = broker.http();
    let alice = tempfile::tempdir().expect("tempdir");
    let bob = tempfile::tempdir().expect("tempdir");
    let (a, b) = (alice.path(), bob.path());
    let (alice_h, bob_h) = ("alice@test.example", "bob@test.example");
    ok(a, &["register", "--server", &server, "--handle", alice_h]);
    ok(b, &["register", "--server", &server, "--handle", bob_h]);

    // 24 MiB with a canary the broker must never hold in the clear.
    let canary = b"CANARY-PHOTO-OF-THE-CAT-0123456789";
    let mut photo: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| (i % 253).to_le_bytes()[0])
        .collect();
    for at in (0..photo.len() - canary.len()).step_by(1024 * 1024) {
        photo[at..at + canary.len()].copy_from_slice(canary);
    }
    let source = tempfile::tempdir().expect("tempdir");
    let path = source.path().join("cat.jpg");
    std::fs::write(&path, &photo).expect("write");
    let path_arg = path.to_str().expect("utf-8 path");

    // The sender is killed once part of it is up; run again, it goes on from there.
    let mut sending = spawn_cli(a, &["send-file", "--to", bob_h, path_arg]);
    let deadline = Instant::now() + WAIT;
    while attachment_bytes(&broker) < 8 * 1024 * 1024 {
        assert!(Instant::now() < deadline, "the upload never got going");
        assert!(
            sending.try_wait().expect("wait").is_none(),
            "finished too soon to be cut"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    sending.kill().expect("kill -9");
    sending.wait().expect("reaped");
    let before = attachment_bytes(&broker);
    let out = ok(a, &["send-file", "--to", bob_h, path_arg]);
    assert!(out.contains("Sent"), "{out}");
    let uploads = std::fs::read_dir(broker.data_dir().join("attachments"))
        .expect("attachments")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".meta"))
        .count();
    assert_eq!(uploads, 1, "the second run went on with the first's upload");
    assert!(attachment_bytes(&broker) < before + photo.len() as u64);

    let files = b.join("received");
    let files_arg = files.to_str().expect("utf-8 path");
    let out = ok(b, &["listen", "--count", "1", "--files-dir", files_arg]);
    assert!(
        out.contains("alice@test.example sent a file: cat.jpg"),
        "{out}"
    );
    let saved = std::fs::read(files.join("cat.jpg")).expect("saved");
    assert_eq!(blake3::hash(&saved), blake3::hash(&photo), "the same bytes");
    for (file, bytes) in files_under(&broker.data_dir()) {
        assert!(
            memchr::memmem::find(&bytes, canary).is_none(),
            "the file's plaintext is in {}",
            file.display()
        );
    }

    // A real image: no 32 bytes of it anywhere in the broker's data directory, while its
    // attachment and its message are stored there; it arrives the same.
    let image = png(256, 256);
    let image_path = source.path().join("photo.png");
    std::fs::write(&image_path, &image).expect("write");
    let out = ok(
        a,
        &[
            "send-file",
            "--to",
            bob_h,
            image_path.to_str().expect("utf-8"),
        ],
    );
    assert!(out.contains("Sent"), "{out}");
    assert_eq!(
        windows_of_in(&image, &broker.data_dir()),
        None,
        "32 bytes of the image in the data directory"
    );
    let out = ok(b, &["listen", "--count", "1", "--files-dir", files_arg]);
    assert!(out.contains("sent a file: photo.png"), "{out}");
    assert_eq!(
        std::fs::read(files.join("photo.png")).expect("saved"),
        image
    );
    assert_eq!(windows_of_in(&image, &broker.data_dir()), None);
    // The audit finds what it looks for: the image's bytes in a file of the data directory.
    let planted = broker.data_dir().join("planted");
    std::fs::write(&planted, [&b"xx"[..], &image[1000..1032]].concat()).expect("plant");
    assert_eq!(
        windows_of_in(&image, &broker.data_dir()).map(|(p, _)| p),
        Some(planted.clone())
    );
    std::fs::remove_file(&planted).expect("unplant");

    // A file changed at the broker is refused, with a clear reason, and not saved.
    let note = source.path().join("note.txt");
    std::fs::write(&note, vec![b'n'; 300_000]).expect("write");
    ok(
        a,
        &["send-file", "--to", bob_h, note.to_str().expect("utf-8")],
    );
    let (blob, mut bytes) = files_under(&broker.data_dir().join("attachments"))
        .into_iter()
        .find(|(p, b)| {
            p.extension().is_some_and(|e| e == "blob") && (300_000..1024 * 1024).contains(&b.len())
        })
        .expect("the note's blob");
    bytes[100_000] ^= 1;
    std::fs::write(&blob, &bytes).expect("change it");
    let out = run(b, &["listen", "--count", "1", "--files-dir", files_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note.txt") && stderr.contains("does not open: it was changed"),
        "{stderr}"
    );
    assert!(!files.join("note.txt").exists(), "nothing saved");
}
