//! `sealpost-cli`: end-to-end encrypted messaging from the command line.
//!
//! ```text
//! sealpost-cli register --server URL --handle alice@example.com [--registration-token T]
//! sealpost-cli send --to bob@example.com hello there
//! sealpost-cli listen [--count N] [--until-empty]
//! sealpost-cli conversations [--with bob@example.com]
//! sealpost-cli safety-number --with bob@example.com
//! sealpost-cli verify --with bob@example.com [--yes]
//! sealpost-cli accept-key --with bob@example.com [--yes]
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
//! `$XDG_DATA_HOME/sealpost-cli` or `~/.local/share/sealpost-cli`. One process at a time may
//! use it.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::{
    io::{BufRead as _, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sealpost_client::{Client, ClientError, Event, KeyChange, engine::GroupEvent, sdk::HoldReason};

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
    /// Print incoming messages as they arrive; received files are saved.
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

fn default_state_dir() -> Result<PathBuf> {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(data).join("sealpost-cli"));
    }
    let home = std::env::var_os("HOME").context("set --state-dir (no HOME to default to)")?;
    Ok(PathBuf::from(home).join(".local/share/sealpost-cli"))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for milliseconds since the Unix epoch.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn confirm(question: &str) -> Result<bool> {
    print!("{question} [yes/no] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim().eq_ignore_ascii_case("yes"))
}

/// Explains errors the user can act on.
/// First and longest wait before `listen` reconnects to a broker it lost.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Whether an error means the broker cannot be reached for now (restarting, network down), as
/// opposed to refusing this device or a fault in the local state.
fn transient(error: &ClientError) -> bool {
    use sealpost_client::{api::ApiError, conn::ConnError};
    match error {
        ClientError::Api(ApiError::Transport(_)) => true,
        ClientError::Conn(ConnError::Transport(_) | ConnError::Timeout) => true,
        // Closed for any reason but bad credentials, a revoked device or another connection
        // of this device taking over (going away for a restart, idle timeout, ...).
        ClientError::Conn(e @ ConnError::Closed { code, .. }) => {
            !e.is_device_revoked() && !matches!(code, Some(4000 | 4001))
        }
        _ => false,
    }
}

fn explain(error: ClientError) -> anyhow::Error {
    match &error {
        ClientError::MasterKeyChanged { user, .. } => {
            let user = user.clone();
            anyhow::Error::new(error).context(format!(
                "the master key of {user} changed: nothing is sent to them until you accept \
                 the new one. See what changed with: sealpost-cli safety-number --with {user}"
            ))
        }
        _ => error.into(),
    }
}

/// What the user should know about a contact's changed master key, and what to do.
fn print_key_change(with: &str, change: &KeyChange) {
    println!("The master key of {with} changed, and you have not accepted the new one.");
    println!("Until you do, nothing is sent to {with} and messages from them wait unread.");
    println!();
    println!(
        "Safety number before the change{}:",
        if change.was_verified {
            " (the one you verified)"
        } else {
            ""
        }
    );
    println!("  {}", change.old_safety_number);
    println!("New safety number:");
    println!("  {}", change.new_safety_number);
    println!();
    println!(
        "This happens when {with} reinstalls Sealpost or resets their keys, but it is also\n\
         what someone intercepting your messages would cause. Compare the NEW number with\n\
         {with} in person or on a call (not by a message here). If it matches, run:"
    );
    println!("  sealpost-cli accept-key --with {with}");
}

/// What a send found: devices the broker has for `user` that its signed device list does not
/// contain. Calm for the usual case (a device being linked), clear on what to do otherwise.
fn unlisted_warning(user: &str, devices: &[u32], own_account: bool) -> String {
    let ids = devices
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let one = devices.len() == 1;
    let (a_device, it, it_got) = if one {
        (format!("a device (device {ids})"), "it", "It got")
    } else {
        (format!("devices ({ids})"), "them", "They got")
    };
    if own_account {
        let remove = if one {
            format!("sealpost-cli remove-device {ids}")
        } else {
            "sealpost-cli remove-device ID, for each".to_owned()
        };
        format!(
            "! Your account has {a_device} that is not in its signed device list.\n  \
             {it_got} no copy of your message. If you are linking a new device right now,\n  \
             that is {it}: finish linking and all is well.\n  \
             If you are not, someone may have added {it} with a stolen device token.\n  \
             Remove {it} with: {remove}"
        )
    } else {
        format!(
            "! {user} has {a_device} that is not in their signed device list.\n  \
             {it_got} only a random placeholder, not your message. Usually this means\n  \
             {user} is linking a new device; once it is linked, it gets your next messages.\n  \
             If they are not linking one, tell them: someone may have added {it} to their\n  \
             account (`sealpost-cli devices` on their side shows {it} as NOT in the signed list)."
        )
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = match cli.state_dir {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    match cli.command {
        Command::Register {
            server,
            handle,
            registration_token,
        } => {
            let client = Client::register(&server, &handle, &dir, registration_token.as_deref())
                .await
                .with_context(|| format!("registering {handle}"))?;
            println!(
                "Registered {} (device {}). State: {}",
                client.handle(),
                client.device_id(),
                dir.display()
            );
        }
        Command::LinkCode {
            wait_secs,
            send_history,
        } => {
            let mut client = Client::open(&dir).await?;
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
                    .context("no device was linked in time")??;
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
                                .map_err(|e| explain(e).context("the history was not sent"))?;
                            bar.finish_and_clear();
                            println!("History sent to device {device} ({sent} bytes).");
                        }
                        break;
                    }
                    other => print_event(&other),
                }
            }
        }
        Command::Link {
            server,
            handle,
            code,
            wait_secs,
        } => {
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
            .context("linking this device")?;
            println!(
                "Linked: this is device {} of {}.",
                client.device_id(),
                client.handle()
            );
        }
        Command::Send { to, message } => {
            let mut client = Client::open(&dir).await?;
            client
                .send_text(&to, &message.join(" "))
                .await
                .map_err(|e| explain(e).context("not sent"))?;
            println!("Sent to {to}.");
            for notice in client.take_notices() {
                print_event(&notice);
            }
            // The transcript for this account's other devices goes a moment later, not in
            // the same burst as the sealed send.
            client.flush_transcripts().await.map_err(explain)?;
        }
        Command::SendFile { to, path } => {
            let mut client = Client::open(&dir).await?;
            let bar = progress_bar(&format!("Sending {}", path.display()));
            client
                .send_file(&to, &path, |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .await
                .map_err(|e| explain(e).context("not sent"))?;
            bar.finish_and_clear();
            println!("Sent {} to {to}.", path.display());
            client.flush_transcripts().await.map_err(explain)?;
        }
        Command::Listen {
            count,
            until_empty,
            files_dir,
        } => {
            let files_dir = files_dir.unwrap_or_else(|| dir.join("files"));
            let mut client = Client::open(&dir).await?;
            let mut messages = 0;
            let mut backoff = RECONNECT_MIN;
            loop {
                if count.is_some_and(|c| messages >= c) {
                    break;
                }
                let event = match client.next_event().await {
                    Ok(event) => {
                        backoff = RECONNECT_MIN;
                        event
                    }
                    // The broker is restarting or out of reach: keep listening. Reopen the
                    // state, so that whatever the failed call had decrypted without saving
                    // comes again from the broker (nothing is acknowledged before it is saved).
                    Err(e) if transient(&e) => {
                        eprintln!(
                            "Connection to the broker lost ({e}); reconnecting in {} s.",
                            backoff.as_secs()
                        );
                        drop(client);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                        client = Client::open(&dir).await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                match &event {
                    Event::Message(_)
                    | Event::Group(GroupEvent::Message { .. })
                    | Event::File { .. } => messages += 1,
                    Event::QueueEmpty if until_empty => break,
                    _ => {}
                }
                print_event(&event);
                if let Event::History { from_device, file } = &event {
                    match client.import_history(file).await {
                        Ok(n) => {
                            println!("* history from device {from_device}: {n} messages added")
                        }
                        Err(e) => eprintln!(
                            "! the history from device {from_device} was not imported: {e}"
                        ),
                    }
                }
                if let Event::File { from, file, .. } = &event {
                    let bar = progress_bar(&format!("Receiving {}", file.name));
                    let saved = client
                        .save_file(file, &files_dir, |done, total| {
                            bar.set_length(total);
                            bar.set_position(done);
                        })
                        .await;
                    bar.finish_and_clear();
                    match saved {
                        Ok(path) => println!("Saved {}'s file to {}.", from, path.display()),
                        Err(e) => {
                            eprintln!("The file {} from {from} was not saved: {e}", file.name)
                        }
                    }
                }
            }
        }
        Command::Conversations { with } => {
            let client = Client::open(&dir).await?;
            let conversations = client.conversations();
            match with {
                Some(with) => {
                    let Some(c) = conversations.iter().find(|c| c.with == with) else {
                        bail!("no conversation with {with}");
                    };
                    for m in &c.messages {
                        let who = if m.outgoing { client.handle() } else { &c.with };
                        println!("[{}] {who}: {}", format_time(m.time_ms), m.text);
                    }
                }
                None if conversations.is_empty() => println!("No conversations yet."),
                None => {
                    for c in &conversations {
                        let last = c.messages.last();
                        println!(
                            "{}{}  {} messages, last {}",
                            c.with,
                            if c.key_changed {
                                " (master key changed, not accepted: see safety-number)"
                            } else if c.verified {
                                " (verified)"
                            } else {
                                ""
                            },
                            c.messages.len(),
                            last.map_or_else(String::new, |m| format_time(m.time_ms))
                        );
                    }
                }
            }
        }
        Command::SafetyNumber { with } => {
            let mut client = Client::open(&dir).await?;
            let number = client.safety_number(&with).await;
            // A changed master key seen (now or by an earlier command) and not accepted.
            if let Some(change) = client.key_change(&with) {
                print_key_change(&with, &change);
                return Ok(());
            }
            let number = number.map_err(explain)?;
            println!("Safety number with {with}:\n{number}");
            if client.is_verified(&with) {
                println!("(verified)");
            }
        }
        Command::Verify { with, yes } => {
            let mut client = Client::open(&dir).await?;
            let number = client.safety_number(&with).await.map_err(explain)?;
            println!("Safety number with {with}:\n{number}");
            if !yes && !confirm("Does it match the number on their device?")? {
                bail!("not verified");
            }
            client.mark_verified(&with).await?;
            println!("{with} is verified.");
        }
        Command::AcceptKey { with, yes } => {
            let mut client = Client::open(&dir).await?;
            let (key, number) = client.fetch_master_key(&with).await?;
            println!("New safety number with {with}:\n{number}");
            if !yes && !confirm("Does it match the number on their device?")? {
                bail!("not accepted");
            }
            client.accept_master_key_change(&with, &key).await?;
            println!("Accepted the new master key of {with}.");
        }
        Command::Devices => {
            let mut client = Client::open(&dir).await?;
            for d in client.devices().await? {
                println!(
                    "device {}{}{}  {}",
                    d.device,
                    if d.this_device { " (this device)" } else { "" },
                    if d.signed {
                        ""
                    } else {
                        " (NOT in the signed list)"
                    },
                    d.fingerprint
                );
            }
        }
        Command::RemoveDevice { id } => {
            let mut client = Client::open(&dir).await?;
            client.remove_device(id).await?;
            println!("Device {id} removed.");
        }
        Command::Group(command) => group(&dir, command).await?,
        Command::RotateMasterKey { yes } => {
            let mut client = Client::open(&dir).await?;
            if !yes
                && !confirm(
                    "Your contacts will see a changed safety number and must compare it with \
                     you again. Replace the master key?",
                )?
            {
                bail!("not replaced");
            }
            client.rotate_master_key().await?;
            println!(
                "The master key of {} is replaced. Compare the new safety number with your \
                 contacts.",
                client.handle()
            );
        }
    }
    Ok(())
}

/// Runs a `group` subcommand.
async fn group(dir: &std::path::Path, command: GroupCommand) -> Result<()> {
    let mut client = Client::open(dir).await?;
    match command {
        GroupCommand::Create { name, members } => {
            let members: Vec<&str> = members.iter().map(String::as_str).collect();
            let id = client
                .create_group(&name, &members)
                .await
                .map_err(|e| explain(e).context("the group was not created"))?;
            println!("Created group {id} \"{name}\".");
        }
        GroupCommand::Add { group, members } => {
            let members: Vec<&str> = members.iter().map(String::as_str).collect();
            client
                .add_to_group(&group, &members)
                .await
                .map_err(|e| explain(e).context("nobody was added"))?;
            println!("Added {} to group {group}.", members.join(", "));
        }
        GroupCommand::Remove { group, member } => {
            client
                .remove_from_group(&group, &member)
                .await
                .map_err(|e| explain(e).context("nobody was removed"))?;
            println!("Removed {member} from group {group}.");
        }
        GroupCommand::Leave { group } => {
            client
                .leave_group(&group)
                .await
                .map_err(|e| explain(e).context("could not leave"))?;
            println!("Asked to leave group {group}; a member will remove you.");
        }
        GroupCommand::Send { group, message } => {
            client
                .send_group_text(&group, &message.join(" "))
                .await
                .map_err(|e| explain(e).context("not sent"))?;
            println!("Sent to group {group}.");
        }
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
            let info = client.group_info(&id).await.map_err(explain)?;
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
            for (from, device, time, text) in client.group_messages(&id).map_err(explain)? {
                println!("[{}] {from} (device {device}): {text}", format_time(time));
            }
        }
    }
    Ok(())
}

fn print_group_event(event: &GroupEvent) {
    match event {
        GroupEvent::Message {
            group,
            from,
            text,
            sent_ms,
            ..
        } => println!("[{}] {from} in {group}: {text}", format_time(*sent_ms)),
        GroupEvent::Joined { group, by } => println!("* {by} added you to group {group}"),
        GroupEvent::Changed {
            group,
            by,
            added,
            removed,
        } => {
            let names = |v: &[(String, u32)]| {
                v.iter()
                    .map(|(u, d)| format!("{u} (device {d})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !added.is_empty() {
                println!("* {by} added {} to group {group}", names(added));
            }
            if !removed.is_empty() {
                println!("* {by} removed {} from group {group}", names(removed));
            }
        }
        GroupEvent::Removed { group } => println!("* you were removed from group {group}"),
        GroupEvent::Unverified {
            group,
            user,
            device,
        } => eprintln!(
            "! in group {group}, {user}'s device {device} is not in {user}'s verified device \
             list: do not trust it until it is"
        ),
        GroupEvent::LeaveRequested { group, user } => {
            println!("* {user} is leaving group {group}");
        }
    }
}

/// A progress bar on standard error (hidden when it is not a terminal).
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    bar
}

fn print_event(event: &Event) {
    match event {
        Event::Message(m) => println!("[{}] {}: {}", format_time(m.sent_ms), m.from, m.text),
        Event::File {
            from,
            file,
            sent_ms,
            ..
        } => println!(
            "[{}] {from} sent a file: {} ({} bytes, {})",
            format_time(*sent_ms),
            file.name,
            file.plain_size().unwrap_or(file.size),
            file.media_type
        ),
        Event::SentElsewhere {
            to,
            device,
            text,
            sent_ms,
        } => println!(
            "[{}] (you, device {device}) -> {to}: {text}",
            format_time(*sent_ms)
        ),
        Event::DeviceLinked { device } => println!("* device {device} was linked"),
        Event::Linked => println!("* this device is linked"),
        Event::Rejected { error, .. } => eprintln!("! rejected an envelope: {error}"),
        Event::Held { user, why, .. } => match why {
            HoldReason::KeyChanged => eprintln!(
                "! a message from {user} waits: their master key changed; compare safety \
                 numbers, then accept the new key (accept-key)"
            ),
            _ => eprintln!("! a message from {user} waits: it cannot be verified now; kept"),
        },
        Event::MailboxFull => eprintln!("! your mailbox is full; keep listening to drain it"),
        Event::UnlistedDevices {
            user,
            devices,
            own_account,
        } => eprintln!("{}", unlisted_warning(user, devices, *own_account)),
        Event::Group(g) => print_group_event(g),
        Event::QueueEmpty => {}
        _ => {}
    }
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
    fn unlisted_devices_are_explained_with_what_to_do() {
        let own = unlisted_warning("a@x.y", &[3], true);
        assert!(
            own.contains("Your account has a device (device 3)"),
            "{own}"
        );
        assert!(own.contains("finish linking"), "{own}");
        assert!(own.contains("sealpost-cli remove-device 3"), "{own}");
        let contact = unlisted_warning("b@x.y", &[2, 5], false);
        assert!(contact.contains("b@x.y has devices (2, 5)"), "{contact}");
        assert!(
            contact.contains("They got only a random placeholder"),
            "{contact}"
        );
    }

    #[test]
    fn formats_time() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
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
}
