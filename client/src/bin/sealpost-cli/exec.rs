//! The commands that work while this device listens: each is a [`Request`], run by [`exec`]
//! on the open client, here (no daemon) or in the daemon that holds the state (then the
//! request travels as JSON-RPC over the state directory's socket). Either way the answer is
//! the same lines.

use std::path::PathBuf;

use sealpost_client::{
    Client,
    crypto::transparency::LogStatus,
    sdk::{MessageState, PushService},
};
use serde::{Deserialize, Serialize};

use crate::{
    errors::CliError,
    output::{
        Line, event_lines, format_duration, format_time, key_change_lines, progress_bar, theirs,
    },
};

/// A command for the device's client. Serialized as a JSON-RPC `method` and its `params`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Send a text.
    Send {
        /// The recipient.
        to: String,
        /// The text.
        message: String,
    },
    /// Send a file.
    SendFile {
        /// The recipient.
        to: String,
        /// The file (absolute: the daemon's working directory is not the caller's).
        path: PathBuf,
    },
    /// List conversations, or show one.
    Conversations {
        /// The contact whose conversation to show.
        with: Option<String>,
    },
    /// The safety number with a contact.
    SafetyNumber {
        /// The contact.
        with: String,
    },
    /// Mark a contact verified (after the caller compared numbers).
    Verify {
        /// The contact.
        with: String,
    },
    /// List this account's devices.
    Devices,
    /// Remove another device of this account.
    RemoveDevice {
        /// The device.
        id: u32,
    },
    /// Send a text to a group.
    GroupSend {
        /// The group.
        group: String,
        /// The text.
        message: String,
    },
    /// Set (or turn off) disappearing messages with a contact.
    Disappearing {
        /// The contact.
        with: String,
        /// Seconds; `None`: off.
        secs: Option<u64>,
    },
    /// Turn read receipts on or off for this device.
    ReadReceipts {
        /// On.
        on: bool,
    },
    /// Register (`Some`) or stop (`None`) push wake-ups for this device.
    Push {
        /// The subscription.
        subscription: Option<PushParams>,
    },
    /// The broker's push (VAPID) key.
    PushKey,
    /// Mark the conversation with a contact read (sends a read receipt if they are on).
    MarkRead {
        /// The contact.
        with: String,
    },
}

/// A push subscription as the user gives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PushParams {
    /// The endpoint URL.
    pub(crate) endpoint: String,
    /// The P-256 key wake-ups are encrypted to, base64url.
    pub(crate) p256dh: String,
    /// The authentication secret, base64url.
    pub(crate) auth: String,
    /// A browser's push service rather than UnifiedPush.
    pub(crate) webpush: bool,
}

/// What a request answers: lines to print, and for `safety_number` what `verify` must know.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Answer {
    /// What to print.
    pub(crate) lines: Vec<Line>,
    /// For `safety_number`: the contact is verified already.
    #[serde(default)]
    pub(crate) verified: bool,
    /// For `safety_number`: the contact's master key changed and is not accepted yet.
    #[serde(default)]
    pub(crate) key_changed: bool,
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// In this process, for this command only: progress bars, and transcripts go before it
    /// exits.
    Local,
    /// In the daemon, which keeps running: no progress bars, and transcripts go on the
    /// daemon's own schedule (waiting for them would hold every caller up).
    Daemon,
}

impl Answer {
    fn out(mut self, text: impl Into<String>) -> Self {
        self.lines.push(Line::Out(text.into()));
        self
    }
}

/// Runs `request` on `client`.
pub(crate) async fn exec(
    client: &mut Client,
    request: Request,
    mode: Mode,
) -> Result<Answer, CliError> {
    let answer = Answer::default();
    Ok(match request {
        Request::Send { to, message } => {
            // A removed device is refused here, with words, rather than "sent" and then
            // rejected by every recipient.
            client.connect().await?;
            client
                .send_text(&to, &message)
                .await
                .map_err(|e| CliError::from(e).context("not sent"))?;
            let mut answer = answer.out(format!("Sent to {to}."));
            for notice in client.take_notices() {
                answer.lines.extend(event_lines(&notice));
            }
            // The transcript for this account's other devices goes a moment later, not in
            // the same burst as the sealed send.
            if mode == Mode::Local {
                client.flush_transcripts().await?;
            }
            answer
        }
        Request::SendFile { to, path } => {
            client.connect().await?;
            let bar =
                (mode == Mode::Local).then(|| progress_bar(&format!("Sending {}", path.display())));
            client
                .send_file(&to, &path, |done, total| {
                    if let Some(bar) = &bar {
                        bar.set_length(total);
                        bar.set_position(done);
                    }
                })
                .await
                .map_err(|e| CliError::from(e).context("not sent"))?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if mode == Mode::Local {
                client.flush_transcripts().await?;
            }
            answer.out(format!("Sent {} to {to}.", path.display()))
        }
        Request::Conversations { with } => {
            let answer = conversations(client, with.as_deref(), answer)?;
            // Showing a conversation is reading it: its messages are marked read (a read
            // receipt goes to the contact unless read receipts are off).
            if let Some(with) = with {
                client.mark_read(&with).await?;
            }
            answer
        }
        Request::SafetyNumber { with } => {
            let number = client.safety_number(&with).await;
            // A changed master key seen (now or by an earlier command) and not accepted.
            if let Some(change) = client.key_change(&with) {
                return Ok(Answer {
                    lines: key_change_lines(&with, &change),
                    verified: false,
                    key_changed: true,
                });
            }
            let number = number?;
            let verified = client.is_verified(&with);
            let mut answer = answer.out(format!("Safety number with {with}:\n{number}"));
            if verified {
                answer = answer.out("(verified)");
            }
            answer = answer.out(log_line(&with, client.log_status(&with)));
            answer.verified = verified;
            answer
        }
        Request::Verify { with } => {
            client.mark_verified(&with).await?;
            answer.out(format!("{with} is verified."))
        }
        Request::Devices => {
            let mut answer = answer;
            for d in client.devices().await? {
                answer = answer.out(format!(
                    "device {}{}{}  {}",
                    d.device,
                    if d.this_device { " (this device)" } else { "" },
                    if d.signed {
                        ""
                    } else {
                        " (NOT in the signed list)"
                    },
                    d.fingerprint
                ));
            }
            answer
        }
        Request::RemoveDevice { id } => {
            let devices = client.devices().await?;
            match devices.iter().find(|d| d.device == id) {
                None => {
                    return Err(CliError::msg(format!(
                        "there is no device {id} in your account (see: sealpost-cli devices)"
                    )));
                }
                Some(d) if d.this_device => {
                    return Err(CliError::msg(format!(
                        "device {id} is this device; remove it from another of your devices"
                    )));
                }
                Some(_) => {}
            }
            client.remove_device(id).await?;
            answer.out(format!("Device {id} removed."))
        }
        Request::GroupSend { group, message } => {
            client
                .send_group_text(&group, &message)
                .await
                .map_err(|e| CliError::from(e).context("not sent"))?;
            answer.out(format!("Sent to group {group}."))
        }
        Request::Disappearing { with, secs } => {
            let timer = secs.map(std::time::Duration::from_secs);
            client
                .set_disappearing(&with, timer)
                .await
                .map_err(|e| CliError::from(e).context("the timer was not set"))?;
            answer.out(match secs {
                Some(s) => format!(
                    "Messages with {with} now disappear after {}.",
                    format_duration(s)
                ),
                None => format!("Disappearing messages with {with} are off."),
            })
        }
        Request::ReadReceipts { on } => {
            client.set_read_receipts(on)?;
            answer.out(if on {
                "Read receipts are on: contacts see when you have read their messages."
            } else {
                "Read receipts are off: contacts do not see when you have read their messages."
            })
        }
        Request::Push { subscription } => {
            match subscription {
                Some(p) => {
                    let service = if p.webpush {
                        PushService::WebPush
                    } else {
                        PushService::UnifiedPush
                    };
                    client
                        .register_push(&p.endpoint, &p.p256dh, &p.auth, service)
                        .await
                        .map_err(|e| CliError::from(e).context("not registered"))?;
                    answer.out("Registered: this device is woken when a message arrives while it is offline.")
                }
                None => {
                    client.unregister_push().await?;
                    answer.out("Push wake-ups for this device are off.")
                }
            }
        }
        Request::PushKey => match client.push_key().await? {
            Some(key) => answer.out(key),
            None => return Err(CliError::msg("this broker sends no push wake-ups")),
        },
        Request::MarkRead { with } => {
            let read = client.mark_read(&with).await?;
            answer.out(format!(
                "Marked {} message{} from {with} read.",
                read.len(),
                if read.len() == 1 { "" } else { "s" }
            ))
        }
    })
}

fn conversations(
    client: &Client,
    with: Option<&str>,
    mut answer: Answer,
) -> Result<Answer, CliError> {
    let conversations = client.conversations();
    match with {
        Some(with) => {
            let Some(c) = conversations.iter().find(|c| c.with == with) else {
                return Err(CliError::msg(format!("no conversation with {with}")));
            };
            if let Some(secs) = c.disappearing_secs {
                answer = answer.out(format!(
                    "(messages disappear after {})",
                    format_duration(u64::from(secs))
                ));
            }
            for m in &c.messages {
                let who = if m.outgoing { client.handle() } else { &c.with };
                let state = match (m.outgoing, m.state) {
                    (false, _) => "",
                    (true, MessageState::Sending) => "  (not sent yet)",
                    (true, MessageState::Sent) => "  (sent)",
                    (true, MessageState::Delivered) => "  (delivered)",
                    (true, MessageState::Read) => "  (read)",
                };
                answer = answer.out(format!(
                    "[{}] {who}: {}{state}",
                    format_time(m.time_ms),
                    theirs(&m.text)
                ));
            }
        }
        None if conversations.is_empty() => answer = answer.out("No conversations yet."),
        None => {
            for c in &conversations {
                let last = c.messages.last();
                answer = answer.out(format!(
                    "{}{}  {} messages{}, last {}",
                    c.with,
                    if c.key_changed {
                        " (master key changed, not accepted: see safety-number)"
                    } else if c.verified {
                        " (verified)"
                    } else {
                        ""
                    },
                    c.messages.len(),
                    match (c.unread, c.missing) {
                        (0, 0) => String::new(),
                        (u, 0) => format!(" ({u} unread)"),
                        (0, m) => format!(" ({m} may be missing)"),
                        (u, m) => format!(" ({u} unread, {m} may be missing)"),
                    },
                    last.map_or_else(String::new, |m| format_time(m.time_ms))
                ));
            }
        }
    }
    Ok(answer)
}

/// What the key-transparency log says of `with`'s keys, in a line.
fn log_line(with: &str, status: LogStatus) -> String {
    let domain = with.rsplit_once('@').map_or(with, |(_, d)| d);
    match status {
        LogStatus::NoLog => format!("Key transparency: {domain} keeps no log."),
        LogStatus::CoSigned(by) => format!(
            "Key transparency: the key is in {domain}'s log, audited by {}.",
            by.join(", ")
        ),
        LogStatus::Pending => {
            format!("Key transparency: the key is in {domain}'s log (not audited yet).")
        }
        LogStatus::Unaudited => format!(
            "Key transparency: the key is in {domain}'s log, but no other domain has audited \
             that log lately: treat it as unverified."
        ),
    }
}
