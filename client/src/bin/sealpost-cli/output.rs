//! What the CLI says: lines for standard output (messages, answers) and standard error
//! (warnings, status), built the same way whether a command ran here or in the daemon.

use sealpost_client::{Event, KeyChange, engine::GroupEvent, sdk::HoldReason};
use serde::{Deserialize, Serialize};

/// One line of output, and where it goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "stream", content = "text", rename_all = "lowercase")]
pub(crate) enum Line {
    /// Standard output: what was asked for.
    Out(String),
    /// Standard error: warnings and status.
    Err(String),
}

impl Line {
    /// Prints the line where it belongs, with no terminal control sequence in it.
    pub(crate) fn print(&self) {
        match self {
            Line::Out(text) => println!("{}", printable(text)),
            Line::Err(text) => eprintln!("{}", printable(text)),
        }
    }
}

/// `text` without control characters but line breaks and tabs: a contact's message, a file
/// name or a broker's words cannot move the cursor, retitle the terminal or write the
/// clipboard (escape sequences), whatever they hold.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Text from someone else, for one printed entry: its line breaks continue indented, so that
/// it cannot pass for lines of its own (another message, a "(verified)").
pub(crate) fn theirs(text: &str) -> String {
    printable(text).replace('\n', "\n    ")
}

/// Text for a single line (an error): line breaks become spaces.
pub(crate) fn one_line(text: &str) -> String {
    printable(text).replace(['\n', '\t'], " ")
}

/// Prints every line.
pub(crate) fn print_all(lines: &[Line]) {
    for line in lines {
        line.print();
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for milliseconds since the Unix epoch.
pub(crate) fn format_time(ms: u64) -> String {
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

/// A duration as people say it: "30 seconds", "1 hour", "4 weeks".
pub(crate) fn format_duration(secs: u64) -> String {
    let units = [
        (7 * 86_400, "week"),
        (86_400, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    for (size, name) in units {
        if secs >= size && secs.is_multiple_of(size) {
            let n = secs / size;
            return format!("{n} {name}{}", if n == 1 { "" } else { "s" });
        }
    }
    format!("{secs} seconds")
}

/// What the user should know about a contact's changed master key, and what to do.
pub(crate) fn key_change_lines(with: &str, change: &KeyChange) -> Vec<Line> {
    let verified = if change.was_verified {
        " (the one you verified)"
    } else {
        ""
    };
    [
        format!("The master key of {with} changed, and you have not accepted the new one."),
        format!("Until you do, nothing is sent to {with} and messages from them wait unread."),
        String::new(),
        format!("Safety number before the change{verified}:"),
        format!("  {}", change.old_safety_number),
        "New safety number:".to_owned(),
        format!("  {}", change.new_safety_number),
        String::new(),
        format!(
            "This happens when {with} reinstalls Sealpost or resets their keys, but it is also\n\
             what someone intercepting your messages would cause. Compare the NEW number with\n\
             {with} in person or on a call (not by a message here). If it matches, run:"
        ),
        format!("  sealpost-cli accept-key --with {with}"),
    ]
    .into_iter()
    .map(Line::Out)
    .collect()
}

/// What a send found: devices the broker has for `user` that its signed device list does not
/// contain. Calm for the usual case (a device being linked), clear on what to do otherwise.
pub(crate) fn unlisted_warning(user: &str, devices: &[u32], own_account: bool) -> String {
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

/// A progress bar on standard error (hidden when it is not a terminal).
pub(crate) fn progress_bar(what: &str) -> indicatif::ProgressBar {
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

/// What `listen` shows of an event (nothing for some).
pub(crate) fn event_lines(event: &Event) -> Vec<Line> {
    let line = match event {
        Event::Message(m) => Line::Out(format!(
            "[{}] {}: {}",
            format_time(m.sent_ms),
            m.from,
            theirs(&m.text)
        )),
        Event::File {
            from,
            file,
            sent_ms,
            ..
        } => Line::Out(format!(
            "[{}] {from} sent a file: {} ({} bytes, {})",
            format_time(*sent_ms),
            one_line(&file.name),
            file.plain_size().unwrap_or(file.size),
            one_line(&file.media_type)
        )),
        Event::SentElsewhere {
            to,
            device,
            text,
            sent_ms,
        } => Line::Out(format!(
            "[{}] (you, device {device}) -> {to}: {}",
            format_time(*sent_ms),
            theirs(text)
        )),
        Event::DeviceLinked { device } => Line::Out(format!("* device {device} was linked")),
        Event::Linked => Line::Out("* this device is linked".to_owned()),
        Event::Rejected { error, .. } => Line::Err(format!("! rejected an envelope: {error}")),
        Event::Held { user, why, .. } => Line::Err(match why {
            HoldReason::KeyChanged => format!(
                "! a message from {user} waits: their master key changed; compare safety \
                 numbers, then accept the new key (accept-key)"
            ),
            _ => format!("! a message from {user} waits: it cannot be verified now; kept"),
        }),
        Event::MailboxFull => {
            Line::Err("! your mailbox is full; keep listening to drain it".to_owned())
        }
        Event::UnlistedDevices {
            user,
            devices,
            own_account,
        } => Line::Err(unlisted_warning(user, devices, *own_account)),
        Event::Disappearing { peer, by, secs } => Line::Out(match secs {
            Some(s) => format!(
                "* {by} set messages with {peer} to disappear after {}",
                format_duration(u64::from(*s))
            ),
            None => format!("* {by} turned disappearing messages with {peer} off"),
        }),
        Event::MaybeMissing { peer, count: 0 } => {
            Line::Out(format!("* the missing messages from {peer} arrived"))
        }
        Event::MaybeMissing { peer, count } => Line::Err(format!(
            "! {count} message{} from {peer} may be missing: a later one names {}; if {} does \
             not arrive, the broker may be withholding {}",
            if *count == 1 { "" } else { "s" },
            if *count == 1 { "it" } else { "them" },
            if *count == 1 { "it" } else { "they" },
            if *count == 1 { "it" } else { "them" },
        )),
        Event::ForeignKeyPublished { epoch, version } => Line::Err(format!(
            "! a new key for your account was published in your domain's key-transparency log \
             (epoch {epoch}, version {version}) that none of your devices made: if it was not \
             you (a new device, a key rotation), someone with access to the broker may be \
             impersonating you; compare safety numbers with your contacts"
        )),
        Event::Group(g) => return group_event_lines(g),
        _ => return Vec::new(),
    };
    vec![line]
}

fn group_event_lines(event: &GroupEvent) -> Vec<Line> {
    let names = |v: &[(String, u32)]| {
        v.iter()
            .map(|(u, d)| format!("{u} (device {d})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match event {
        GroupEvent::Message {
            group,
            from,
            text,
            sent_ms,
            ..
        } => vec![Line::Out(format!(
            "[{}] {from} in {group}: {}",
            format_time(*sent_ms),
            theirs(text)
        ))],
        GroupEvent::Joined { group, by } => {
            vec![Line::Out(format!("* {by} added you to group {group}"))]
        }
        GroupEvent::Changed {
            group,
            by,
            added,
            removed,
        } => {
            let mut lines = Vec::new();
            if !added.is_empty() {
                lines.push(Line::Out(format!(
                    "* {by} added {} to group {group}",
                    names(added)
                )));
            }
            if !removed.is_empty() {
                lines.push(Line::Out(format!(
                    "* {by} removed {} from group {group}",
                    names(removed)
                )));
            }
            lines
        }
        GroupEvent::Removed { group } => {
            vec![Line::Out(format!("* you were removed from group {group}"))]
        }
        GroupEvent::Unverified {
            group,
            user,
            device,
        } => vec![Line::Err(format!(
            "! in group {group}, {user}'s device {device} is not in {user}'s verified device \
             list: do not trust it until it is"
        ))],
        GroupEvent::LeaveRequested { group, user } => {
            vec![Line::Out(format!("* {user} is leaving group {group}"))]
        }
        GroupEvent::KeyChanged { group, user } => vec![Line::Err(format!(
            "! in group {group}, the master key of {user} changed: nothing is sent to the \
             group until you accept the new key (compare: sealpost-cli safety-number --with \
             {user}, then accept-key --with {user}) or remove them (sealpost-cli group remove \
             {group} {user})"
        ))],
        GroupEvent::MaybeMissing {
            group,
            from,
            count: 0,
        } => vec![Line::Out(format!(
            "* the missing messages from {from} in group {group} arrived"
        ))],
        GroupEvent::MaybeMissing { group, from, count } => vec![Line::Err(format!(
            "! {count} message{} from {from} in group {group} may be missing: a later one names \
             {}; if {} does not arrive, the broker may be withholding {}",
            if *count == 1 { "" } else { "s" },
            if *count == 1 { "it" } else { "them" },
            if *count == 1 { "it" } else { "they" },
            if *count == 1 { "it" } else { "them" },
        ))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_members_key_change_in_a_group_is_a_warning_with_what_to_do() {
        let event = Event::Group(GroupEvent::KeyChanged {
            group: "ab12".into(),
            user: "bob@x.y".into(),
        });
        let [Line::Err(line)] = &event_lines(&event)[..] else {
            panic!("one warning on stderr");
        };
        assert!(
            line.contains("in group ab12, the master key of bob@x.y changed"),
            "{line}"
        );
        assert!(line.contains("safety-number --with bob@x.y"), "{line}");
        assert!(line.contains("group remove ab12 bob@x.y"), "{line}");
    }

    #[test]
    fn formats_time() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn what_others_wrote_cannot_drive_the_terminal_or_fake_lines() {
        let evil = "hi\x1b]52;c;Zm9v\x07\n[2026-01-01 00:00:00] bob: (verified)";
        let shown = theirs(evil);
        assert!(
            !shown.contains('\x1b') && !shown.contains('\x07'),
            "{shown:?}"
        );
        assert!(shown.contains("\n    [2026"), "{shown:?}");
        assert_eq!(one_line("a\nb\x1b"), "a b\u{fffd}");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(30), "30 seconds");
        assert_eq!(format_duration(3600), "1 hour");
        assert_eq!(format_duration(4 * 7 * 86_400), "4 weeks");
        assert_eq!(format_duration(90), "90 seconds");
    }
}
