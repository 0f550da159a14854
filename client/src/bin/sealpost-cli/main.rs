//! `sealpost-cli`: end-to-end encrypted messaging from the command line.
//!
//! ```text
//! sealpost-cli register --server URL --handle alice@example.com [--registration-token T]
//! sealpost-cli send --to bob@example.com hello there
//! sealpost-cli send-file --to bob@example.com photo.jpg
//! sealpost-cli listen [--count N] [--until-empty]      # also serves the commands below
//! sealpost-cli daemon                                  # the same, until stopped
//! sealpost-cli conversations [--with bob@example.com]
//! sealpost-cli safety-number --with bob@example.com
//! sealpost-cli verify --with bob@example.com [--yes]
//! sealpost-cli accept-key --with bob@example.com [--yes]
//! sealpost-cli disappearing --with bob@example.com 1h | off
//! sealpost-cli read-receipts on | off
//! sealpost-cli link-code                      # on an existing device
//! sealpost-cli link --server URL --handle alice@example.com --code CODE   # on the new one
//! sealpost-cli devices
//! sealpost-cli remove-device ID
//! sealpost-cli rotate-master-key [--yes]
//! sealpost-cli group create --name "Trip" bob@example.com carol@example.org
//! sealpost-cli group add GROUP dave@example.net
//! sealpost-cli group remove GROUP carol@example.org
//! sealpost-cli group leave GROUP
//! sealpost-cli group send GROUP hello everyone
//! sealpost-cli group list [GROUP]
//! ```
//!
//! The state directory is `--state-dir`, else `$SEALPOST_CLI_STATE`, else
//! `$XDG_DATA_HOME/sealpost-cli` or `~/.local/share/sealpost-cli`. One process at a time
//! holds it; while `listen` or `daemon` does, the everyday commands (marked in `--help`) go
//! through it over `daemon.sock` ([`daemon`]), the others say to stop it first.
//!
//! Errors are one line on standard error (`error: …`), in words, never a backtrace. Exit
//! codes: 0 done, 1 the command failed, 2 it was used wrong.
//!
//! Modules: [`exec`] runs the everyday commands (here or in the daemon), [`daemon`] listens
//! and serves them, [`output`] is what is printed, [`errors`] what failures say.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod daemon;
mod errors;
mod exec;
mod output;

use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use sealpost_client::{Client, Event};

use crate::{
    errors::CliError,
    exec::{Answer, Mode, Request, exec},
    output::{event_lines, print_all, progress_bar},
};

/// End-to-end encrypted messages through a Sealpost broker.
#[derive(Parser)]
#[command(name = "sealpost-cli", version)]
struct Cli {
    /// Where this device's keys and messages are kept (encrypted).
    #[arg(long, global = true, env = "SEALPOST_CLI_STATE")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account with this as its first device.
    Register {
        /// The broker, e.g. https://chat.example.com or http://127.0.0.1:8080.
        #[arg(long)]
        server: String,
        /// The account handle, name@domain.
        #[arg(long)]
        handle: String,
        /// A platform attestation token, if the broker requires one.
        #[arg(long)]
        registration_token: Option<String>,
    },
    /// Show a code for linking a new device, and wait until it is linked.
    LinkCode {
        /// How long to wait for the new device.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
        /// Send the new device this device's conversation history (encrypted end to end; it
        /// imports it when it next listens).
        #[arg(long)]
        send_history: bool,
    },
    /// Link this (new) device to an existing account with a code from an existing device.
    Link {
        /// The broker.
        #[arg(long)]
        server: String,
        /// The account handle.
        #[arg(long)]
        handle: String,
        /// The code shown by `sealpost-cli link-code` on the existing device. Codes are
        /// base64url and may start with `-`: taken as the value, not as a flag.
        #[arg(long, allow_hyphen_values = true)]
        code: String,
        /// How long to wait for the existing device to accept.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// Send a text message.
    Send {
        /// The recipient handle.
        #[arg(long)]
        to: String,
        /// The message (several words are joined with spaces).
        #[arg(required = true)]
        message: Vec<String>,
    },
    /// Send a file: encrypted on this device, uploaded (an interrupted upload of the same file
    /// resumes when this is run again), then announced to the recipient.
    SendFile {
        /// The recipient handle.
        #[arg(long)]
        to: String,
        /// The file.
        path: PathBuf,
    },
    /// Print incoming messages as they arrive; received files are saved. While it runs, the
    /// everyday commands (send, send-file, conversations, safety-number, verify, devices,
    /// remove-device, group send, disappearing, read-receipts) of other sealpost-cli
    /// processes go through it.
    Listen {
        /// Exit after this many messages (files count as messages).
        #[arg(long)]
        count: Option<usize>,
        /// Exit once everything queued has been received.
        #[arg(long)]
        until_empty: bool,
        /// Where received files are saved (default: `files` in the state directory).
        #[arg(long)]
        files_dir: Option<PathBuf>,
    },
    /// Hold this device's state and serve the everyday commands of other sealpost-cli
    /// processes over STATE_DIR/daemon.sock (JSON-RPC 2.0, one request per line), printing
    /// what arrives as `listen` does. Runs until stopped (Ctrl-C, SIGTERM).
    Daemon {
        /// Where received files are saved (default: `files` in the state directory).
        #[arg(long)]
        files_dir: Option<PathBuf>,
    },
    /// Make messages with a contact disappear after a time (both sides, all devices), or stop.
    Disappearing {
        /// The contact.
        #[arg(long)]
        with: String,
        /// `off`, or a time such as 30s, 5m, 1h, 1d, 1w (30 seconds to 4 weeks).
        timer: String,
    },
    /// Send contacts read receipts (on) or not (off).
    ReadReceipts {
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Register this device for push wake-ups (an endpoint from a UnifiedPush distributor,
    /// with the keys it encrypts to), or stop them. A wake-up says only "you have mail".
    Push {
        /// The endpoint URL the distributor gave.
        #[arg(long, required_unless_present_any = ["off", "show_key"], requires_all = ["p256dh", "auth"])]
        endpoint: Option<String>,
        /// The P-256 public key wake-ups are encrypted to (uncompressed, base64url).
        #[arg(long)]
        p256dh: Option<String>,
        /// The 16-byte authentication secret (base64url).
        #[arg(long)]
        auth: Option<String>,
        /// The endpoint is a browser's push service, not UnifiedPush.
        #[arg(long)]
        webpush: bool,
        /// Stop wake-ups for this device.
        #[arg(long, conflicts_with = "endpoint")]
        off: bool,
        /// Print the broker's push (VAPID) key, for distributors that ask for it.
        #[arg(long, conflicts_with_all = ["endpoint", "off"])]
        show_key: bool,
    },
    /// List conversations (or show one).
    Conversations {
        /// Show the whole conversation with this contact.
        #[arg(long)]
        with: Option<String>,
    },
    /// Show the safety number with a contact, to compare with them in person.
    SafetyNumber {
        /// The contact.
        #[arg(long)]
        with: String,
    },
    /// Mark a contact verified, after comparing safety numbers.
    Verify {
        /// The contact.
        #[arg(long)]
        with: String,
        /// Do not ask; the numbers were compared already.
        #[arg(long)]
        yes: bool,
    },
    /// Accept a contact's changed master key, after comparing the new safety number.
    AcceptKey {
        /// The contact.
        #[arg(long)]
        with: String,
        /// Do not ask; the new number was compared already.
        #[arg(long)]
        yes: bool,
    },
    /// List this account's devices.
    Devices,
    /// Remove another device of this account.
    RemoveDevice {
        /// The device id (see `devices`).
        id: u32,
    },
    /// Replace this account's master key (after a suspected compromise; only with one
    /// device). Contacts then see a changed safety number until they accept the new key.
    RotateMasterKey {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Group conversations (end-to-end encrypted with MLS).
    #[command(subcommand)]
    Group(GroupCommand),
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group of this account and the given accounts (all their devices).
    Create {
        /// The group's name (only members see it).
        #[arg(long)]
        name: String,
        /// Its other members.
        members: Vec<String>,
    },
    /// Add accounts (all their devices) to a group.
    Add {
        /// The group's id (see `group list`).
        group: String,
        /// The accounts to add.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove an account (all its devices) from a group: it reads nothing sent after.
    Remove {
        /// The group's id.
        group: String,
        /// The account to remove.
        member: String,
    },
    /// Leave a group (another member commits the removal).
    Leave {
        /// The group's id.
        group: String,
    },
    /// Send a message to a group.
    Send {
        /// The group's id.
        group: String,
        /// The message (the remaining words).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        message: Vec<String>,
    },
    /// List groups, or show one: its members (verified or not) and its messages.
    List {
        /// The group's id.
        group: Option<String>,
    },
}

fn default_state_dir() -> Result<PathBuf, CliError> {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(data).join("sealpost-cli"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| CliError::msg("set --state-dir (no HOME to default to)"))?;
    Ok(PathBuf::from(home).join(".local/share/sealpost-cli"))
}

/// Asks a yes/no question on the terminal; `y` and `yes` (any case) say yes.
fn confirm(question: &str) -> Result<bool, CliError> {
    print!("{question} [y/n] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(is_yes(&answer))
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// The broker's URL from what the user typed: `https://` when no scheme is given, `http://`
/// for this machine (`localhost`, `127.x.x.x`, `[::1]`), where a broker runs without TLS.
fn server_url(raw: &str) -> Result<String, CliError> {
    let raw = raw.trim();
    let url = if raw.contains("://") {
        raw.to_owned()
    } else {
        // Plain http only for this machine itself (never `127.evil.example`).
        let host = raw.split('/').next().unwrap_or_default();
        let host = host
            .rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .map_or(host, |(h, _)| h)
            .trim_matches(['[', ']']);
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        format!("{}://{raw}", if local { "http" } else { "https" })
    };
    let url = url.trim_end_matches('/').to_owned();
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.split("://").nth(1).is_some_and(|rest| !rest.is_empty());
    if !ok {
        return Err(CliError::msg(format!(
            "--server {raw}: expected the broker's address, e.g. https://chat.example.com or \
             127.0.0.1:8080"
        )));
    }
    Ok(url)
}

/// `30s`, `5m`, `1h`, `1d`, `1w` (or plain seconds) → seconds; `off` → `None`.
fn parse_timer(raw: &str) -> Result<Option<u64>, CliError> {
    let raw = raw.trim().to_ascii_lowercase();
    if raw == "off" {
        return Ok(None);
    }
    let bad = || {
        CliError::msg(format!(
            "timer {raw:?}: expected off, or a time from 30s to 4w such as 30s, 5m, 1h, 1d, 1w"
        ))
    };
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(scale).ok_or_else(bad)?;
    if !(30..=28 * 86_400).contains(&secs) {
        return Err(bad());
    }
    Ok(Some(secs))
}

/// Runs an everyday command: through the daemon (or `listen`) that holds the state, if one
/// runs, else here.
async fn everyday(dir: &Path, request: Request) -> Result<Answer, CliError> {
    if let Some(answer) = daemon::call(dir, &request).await {
        return answer;
    }
    let mut client = Client::open(dir).await?;
    exec(&mut client, request, Mode::Local).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let dir = match cli.state_dir {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    let answer = match cli.command {
        Command::Register {
            server,
            handle,
            registration_token,
        } => {
            let server = server_url(&server)?;
            let client = Client::register(&server, &handle, &dir, registration_token.as_deref())
                .await
                .map_err(|e| CliError::from(e).context(&format!("{handle} was not registered")))?;
            println!(
                "Registered {} (device {}). State: {}",
                client.handle(),
                client.device_id(),
                dir.display()
            );
            return Ok(());
        }
        Command::LinkCode {
            wait_secs,
            send_history,
        } => return link_code(&dir, wait_secs, send_history).await,
        Command::Link {
            server,
            handle,
            code,
            wait_secs,
        } => {
            let server = server_url(&server)?;
            println!(
                "Waiting for an existing device to accept (it must be running `listen` or `link-code`)..."
            );
            let client = Client::link(
                &server,
                &handle,
                &code,
                &dir,
                Duration::from_secs(wait_secs),
            )
            .await
            .map_err(|e| CliError::from(e).context("this device was not linked"))?;
            println!(
                "Linked: this is device {} of {}.",
                client.device_id(),
                client.handle()
            );
            return Ok(());
        }
        Command::Send { to, message } => {
            everyday(
                &dir,
                Request::Send {
                    to,
                    message: message.join(" "),
                },
            )
            .await?
        }
        Command::SendFile { to, path } => {
            // The daemon's working directory is not ours.
            let path = std::path::absolute(&path)?;
            everyday(&dir, Request::SendFile { to, path }).await?
        }
        Command::Listen {
            count,
            until_empty,
            files_dir,
        } => {
            let until = daemon::Until {
                count,
                empty: until_empty,
                files_dir: files_dir.unwrap_or_else(|| dir.join("files")),
            };
            return daemon::listen(&dir, until).await;
        }
        Command::Daemon { files_dir } => {
            let until = daemon::Until {
                count: None,
                empty: false,
                files_dir: files_dir.unwrap_or_else(|| dir.join("files")),
            };
            return daemon::listen(&dir, until).await;
        }
        Command::Conversations { with } => everyday(&dir, Request::Conversations { with }).await?,
        Command::SafetyNumber { with } => everyday(&dir, Request::SafetyNumber { with }).await?,
        Command::Verify { with, yes } => {
            let number = everyday(&dir, Request::SafetyNumber { with: with.clone() }).await?;
            print_all(&number.lines);
            if number.key_changed {
                return Err(CliError::msg(format!(
                    "not verified: accept the new master key of {with} first (accept-key)"
                )));
            }
            if number.verified {
                return Ok(());
            }
            if !yes && !confirm("Does it match the number on their device?")? {
                return Err(CliError::msg("not verified"));
            }
            everyday(&dir, Request::Verify { with }).await?
        }
        Command::AcceptKey { with, yes } => {
            let mut client = Client::open(&dir).await?;
            let (key, number) = client.fetch_master_key(&with).await?;
            println!("New safety number with {with}:\n{number}");
            if !yes && !confirm("Does it match the number on their device?")? {
                return Err(CliError::msg("not accepted"));
            }
            client.accept_master_key_change(&with, &key).await?;
            println!("Accepted the new master key of {with}.");
            return Ok(());
        }
        Command::Disappearing { with, timer } => {
            let secs = parse_timer(&timer)?;
            everyday(&dir, Request::Disappearing { with, secs }).await?
        }
        Command::ReadReceipts { state } => {
            everyday(&dir, Request::ReadReceipts { on: state == "on" }).await?
        }
        Command::Push {
            endpoint,
            p256dh,
            auth,
            webpush,
            off: _,
            show_key,
        } => {
            let request = if show_key {
                Request::PushKey
            } else {
                Request::Push {
                    subscription: endpoint.map(|endpoint| exec::PushParams {
                        endpoint,
                        p256dh: p256dh.unwrap_or_default(),
                        auth: auth.unwrap_or_default(),
                        webpush,
                    }),
                }
            };
            everyday(&dir, request).await?
        }
        Command::Devices => everyday(&dir, Request::Devices).await?,
        Command::RemoveDevice { id } => everyday(&dir, Request::RemoveDevice { id }).await?,
        Command::Group(GroupCommand::Send { group, message }) => {
            everyday(
                &dir,
                Request::GroupSend {
                    group,
                    message: message.join(" "),
                },
            )
            .await?
        }
        Command::Group(command) => return group(&dir, command).await,
        Command::RotateMasterKey { yes } => {
            let mut client = Client::open(&dir).await?;
            if !yes
                && !confirm(
                    "Your contacts will see a changed safety number and must compare it with \
                     you again. Replace the master key?",
                )?
            {
                return Err(CliError::msg("not replaced"));
            }
            client.rotate_master_key().await?;
            println!(
                "The master key of {} is replaced. Compare the new safety number with your \
                 contacts.",
                client.handle()
            );
            return Ok(());
        }
    };
    print_all(&answer.lines);
    Ok(())
}

/// `link-code`: shows a code and waits until the new device is linked.
async fn link_code(dir: &Path, wait_secs: u64, send_history: bool) -> Result<(), CliError> {
    let mut client = Client::open(dir).await?;
    let code = client.create_link_code().await?;
    println!("Link code: {}", code.code.as_str());
    println!(
        "On the new device run: sealpost-cli link --server {} --handle {} --code {}",
        client.server(),
        client.handle(),
        code.code.as_str()
    );
    println!("Waiting for the new device...");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .map_err(|_| CliError::msg("no device was linked in time"))??;
        match event {
            Event::DeviceLinked { device } => {
                println!("Device {device} linked.");
                if send_history {
                    let bar = progress_bar("Sending the history");
                    let sent = client
                        .send_history(device, |done, total| {
                            bar.set_length(total);
                            bar.set_position(done);
                        })
                        .await
                        .map_err(|e| CliError::from(e).context("the history was not sent"))?;
                    bar.finish_and_clear();
                    println!("History sent to device {device} ({sent} bytes).");
                }
                return Ok(());
            }
            other => print_all(&event_lines(&other)),
        }
    }
}

/// Runs a `group` subcommand.
async fn group(dir: &Path, command: GroupCommand) -> Result<(), CliError> {
    let mut client = Client::open(dir).await?;
    match command {
        GroupCommand::Create { name, members } => {
            let members: Vec<&str> = members.iter().map(String::as_str).collect();
            let id = client
                .create_group(&name, &members)
                .await
                .map_err(|e| CliError::from(e).context("the group was not created"))?;
            println!("Created group {id} \"{name}\".");
        }
        GroupCommand::Add { group, members } => {
            let members: Vec<&str> = members.iter().map(String::as_str).collect();
            client
                .add_to_group(&group, &members)
                .await
                .map_err(|e| CliError::from(e).context("nobody was added"))?;
            println!("Added {} to group {group}.", members.join(", "));
        }
        GroupCommand::Remove { group, member } => {
            client
                .remove_from_group(&group, &member)
                .await
                .map_err(|e| CliError::from(e).context("nobody was removed"))?;
            println!("Removed {member} from group {group}.");
        }
        GroupCommand::Leave { group } => {
            client
                .leave_group(&group)
                .await
                .map_err(|e| CliError::from(e).context("could not leave"))?;
            println!("Asked to leave group {group}; a member will remove you.");
        }
        GroupCommand::Send { .. } => unreachable!("group send goes through everyday()"),
        GroupCommand::List { group: None } => {
            let groups = client.groups();
            if groups.is_empty() {
                println!("No groups yet (group create --name NAME MEMBER...).");
            }
            for g in groups {
                let accounts: std::collections::BTreeSet<&str> =
                    g.members.iter().map(|(u, _, _)| u.as_str()).collect();
                let state = if g.left { " (you left)" } else { "" };
                println!(
                    "{}  \"{}\"  {} members{state}",
                    g.id,
                    g.name,
                    accounts.len()
                );
            }
        }
        GroupCommand::List { group: Some(id) } => {
            let info = client.group_info(&id).await.map_err(CliError::from)?;
            println!(
                "Group {} \"{}\" (hub {}, epoch {})",
                info.id, info.name, info.hub, info.epoch
            );
            for (user, device, verified) in &info.members {
                let mark = if *verified {
                    "verified device"
                } else {
                    "NOT VERIFIED: not in their device list"
                };
                println!("  {user} device {device}: {mark}");
            }
            for (from, device, time, text) in client.group_messages(&id).map_err(CliError::from)? {
                println!(
                    "[{}] {from} (device {device}): {text}",
                    output::format_time(time)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_link_code_may_start_with_a_hyphen() {
        // base64url: one code in 64 starts with `-` (a CI run failed on one).
        let cli = Cli::try_parse_from([
            "sealpost-cli",
            "link",
            "--server",
            "http://127.0.0.1:1",
            "--handle",
            "b@x.y",
            "--code",
            "-Xk3.abc",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Link { ref code, .. } if code == "-Xk3.abc"));
    }

    #[test]
    fn parses_send() {
        let cli = Cli::try_parse_from(["sealpost-cli", "send", "--to", "b@x.y", "hello", "there"])
            .unwrap();
        assert!(matches!(cli.command, Command::Send { ref message, .. } if message.len() == 2));
    }

    #[test]
    fn servers_without_a_scheme_get_one() {
        assert_eq!(
            server_url("127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            server_url("localhost:8080/").unwrap(),
            "http://localhost:8080"
        );
        assert_eq!(
            server_url("chat.example.com").unwrap(),
            "https://chat.example.com"
        );
        assert_eq!(
            server_url("https://chat.example.com").unwrap(),
            "https://chat.example.com"
        );
        assert_eq!(server_url("[::1]:8080").unwrap(), "http://[::1]:8080");
        assert_eq!(
            server_url("127.evil.example").unwrap(),
            "https://127.evil.example"
        );
        assert!(server_url("ftp://x").is_err());
        assert!(server_url("https://").is_err());
    }

    #[test]
    fn yes_is_y_or_yes() {
        for yes in ["y", "Y", "yes", " YES\n"] {
            assert!(is_yes(yes), "{yes:?}");
        }
        for no in ["n", "no", "", "yep"] {
            assert!(!is_yes(no), "{no:?}");
        }
    }

    #[test]
    fn timers() {
        assert_eq!(parse_timer("off").unwrap(), None);
        assert_eq!(parse_timer("1h").unwrap(), Some(3600));
        assert_eq!(parse_timer("30s").unwrap(), Some(30));
        assert_eq!(parse_timer("4w").unwrap(), Some(28 * 86_400));
        assert!(parse_timer("5s").is_err());
        assert!(parse_timer("5w").is_err());
        assert!(parse_timer("1y").is_err());
    }
}
