//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/*`) through the same checks the
//! libFuzzer targets run, so a plain `cargo test` keeps every seed and every past crash input
//! passing without a nightly toolchain or libFuzzer.
//!
//! The hand-written seeds are produced by [`write_seed_corpora`], an ignored test:
//! `cargo test -p sealpost-proto --test fuzz_corpus -- --ignored` rewrites them.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::fs;
use std::panic;
use std::path::PathBuf;

use sealpost_proto::limits::{MAX_HANDLE_BYTES, MAX_HANDLE_NAME_BYTES, TOKEN_BYTES};
use sealpost_proto::{
    Class, ClientFrame, Copy as EnvelopeCopy, DecodeError, DeviceId, Envelope, EnvelopeId,
    ErrorCode, GroupRecipient, Handle, HandleError, Notice, Order, RecipientRefusal, SendOutcome,
    ServerFrame,
};
use serde::Serialize;
use serde_bytes::ByteBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `check` on every file of the target's corpus; fails if there is none, and names every
/// file whose check panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = corpus_dir(target);
    let entries =
        fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read corpus {}: {e}", dir.display()));
    let mut replayed = 0usize;
    let mut failed = Vec::new();
    for entry in entries {
        let path = entry.expect("corpus directory entry").path();
        if !path.is_file() {
            continue;
        }
        let data = fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read corpus file {}: {e}", path.display()));
        if panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
        replayed += 1;
    }
    assert!(
        replayed > 0,
        "no corpus files in {}: the corpus is missing or misplaced",
        dir.display()
    );
    assert!(
        failed.is_empty(),
        "{} of {replayed} {target} corpus files fail: {failed:#?}",
        failed.len()
    );
}

#[test]
fn client_frame_corpus() {
    replay("client_frame", checks::client_frame);
}

#[test]
fn server_frame_corpus() {
    replay("server_frame", checks::server_frame);
}

#[test]
fn handle_corpus() {
    replay("handle", checks::handle);
}

#[test]
fn federation_frame_corpus() {
    replay("federation_frame", checks::federation_frame);
}

// ---------------------------------------------------------------------------------------------
// Seed generation.

/// What a frame seed is meant to exercise: the decoder's verdict, by variant.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Decodes,
    Truncated,
    BadVersion,
    UnknownKind,
    Malformed,
    TrailingBytes,
}

fn verdict<T>(result: &Result<T, DecodeError>) -> Verdict {
    match result {
        Ok(_) => Verdict::Decodes,
        Err(DecodeError::Truncated) => Verdict::Truncated,
        Err(DecodeError::UnsupportedVersion(_)) => Verdict::BadVersion,
        Err(DecodeError::UnknownFrameType(_)) => Verdict::UnknownKind,
        Err(DecodeError::Malformed(_)) => Verdict::Malformed,
        Err(DecodeError::TrailingBytes(_)) => Verdict::TrailingBytes,
        Err(e @ DecodeError::TooLarge(_)) => panic!("seeds are small, got {e}"),
    }
}

/// A frame with an arbitrary body, for bodies the typed encoders cannot produce.
fn raw(kind: u8, body: &impl Serialize) -> Vec<u8> {
    let mut out = vec![1, kind];
    out.extend(rmp_serde::to_vec(body).expect("seed body serializes"));
    out
}

fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b].concat()
}

fn cut(bytes: &[u8], n: usize) -> Vec<u8> {
    bytes[..bytes.len() - n].to_vec()
}

fn write_seeds(target: &str, seeds: impl IntoIterator<Item = (&'static str, Vec<u8>)>) {
    let dir = corpus_dir(target);
    fs::create_dir_all(&dir).expect("create corpus directory");
    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes).expect("write seed");
    }
}

fn client_seeds() -> Vec<(&'static str, Vec<u8>, Verdict)> {
    use Verdict::*;
    let id = EnvelopeId(*b"0123456789abcdef");
    let copy = |d, ct: &[u8]| EnvelopeCopy {
        device: DeviceId(d),
        ciphertext: ct.to_vec(),
    };
    let send = |class, ttl_secs, copies| {
        ClientFrame::Send {
            id,
            to: "bob@example.com".into(),
            class,
            ttl_secs,
            copies,
        }
        .encode()
    };
    let auth = ClientFrame::Auth {
        user: "alice@example.com".into(),
        device: DeviceId(1),
        token: vec![0x5a; TOKEN_BYTES],
    }
    .encode();
    let send_one = send(
        Class::Durable,
        86_400,
        vec![copy(1, b"sealed for device 1")],
    );
    let ack = ClientFrame::Ack { seqs: vec![1] }.encode();
    let bad_user = (
        ByteBuf::from(vec![0xff, 0xfe]),
        1u32,
        ByteBuf::from(vec![0; TOKEN_BYTES]),
    );
    let bad_class = (
        id,
        "bob@example.com",
        3u8,
        60u32,
        Vec::<EnvelopeCopy>::new(),
    );
    let short_id = (
        ByteBuf::from(vec![0; 15]),
        "bob@example.com",
        0u8,
        60u32,
        Vec::<EnvelopeCopy>::new(),
    );
    vec![
        ("auth", auth.clone(), Decodes),
        (
            "auth_empty_token",
            ClientFrame::Auth {
                user: "a@b".into(),
                device: DeviceId(7),
                token: vec![],
            }
            .encode(),
            Decodes,
        ),
        ("send_one_copy", send_one.clone(), Decodes),
        (
            "send_two_copies",
            send(
                Class::Durable,
                3600,
                vec![copy(1, b"first"), copy(2, b"second")],
            ),
            Decodes,
        ),
        ("send_no_copies", send(Class::Durable, 60, vec![]), Decodes),
        (
            "sealed_send_with_token",
            ClientFrame::SealedSend {
                id,
                to: "bob@example.com".into(),
                class: Class::Durable,
                ttl_secs: 60,
                copies: vec![copy(1, b"sealed")],
                delivery_token: Some(vec![7; 32]),
            }
            .encode(),
            Decodes,
        ),
        (
            "sealed_send_no_token",
            ClientFrame::SealedSend {
                id,
                to: "bob@example.com".into(),
                class: Class::Urgent,
                ttl_secs: 30,
                copies: vec![copy(1, b"ring")],
                delivery_token: None,
            }
            .encode(),
            Decodes,
        ),
        (
            "group_send_sealed",
            ClientFrame::GroupSend {
                id,
                class: Class::Durable,
                ttl_secs: 60,
                ciphertext: b"mls private message".to_vec(),
                recipients: vec![
                    GroupRecipient {
                        to: "bob@example.com".into(),
                        devices: vec![DeviceId(1), DeviceId(2)],
                        delivery_token: Some(vec![7; 32]),
                    },
                    GroupRecipient {
                        to: "carol@example.org".into(),
                        devices: vec![DeviceId(4)],
                        delivery_token: None,
                    },
                ],
                order: None,
            }
            .encode(),
            Decodes,
        ),
        (
            "group_send_ordered",
            ClientFrame::GroupSend {
                id,
                class: Class::Durable,
                ttl_secs: 60,
                ciphertext: b"mls commit".to_vec(),
                recipients: vec![GroupRecipient {
                    to: "bob@example.com".into(),
                    devices: vec![DeviceId(1)],
                    delivery_token: None,
                }],
                order: Some(Order {
                    group: vec![9; 16],
                    epoch: 3,
                    hub: "example.com".into(),
                }),
            }
            .encode(),
            Decodes,
        ),
        (
            "group_send_short_group_id",
            ClientFrame::GroupSend {
                id,
                class: Class::Durable,
                ttl_secs: 60,
                ciphertext: b"mls commit".to_vec(),
                recipients: vec![],
                order: Some(Order {
                    group: vec![9; 8],
                    epoch: 3,
                    hub: "example.com".into(),
                }),
            }
            .encode(),
            Malformed,
        ),
        (
            "send_ephemeral",
            send(Class::Ephemeral, 10, vec![copy(3, b"typing")]),
            Decodes,
        ),
        (
            "send_urgent",
            send(Class::Urgent, 30, vec![copy(1, b"ring"), copy(2, b"ring")]),
            Decodes,
        ),
        ("ack_one", ack.clone(), Decodes),
        (
            "ack_empty",
            ClientFrame::Ack { seqs: vec![] }.encode(),
            Decodes,
        ),
        (
            "ack_every_int_width",
            ClientFrame::Ack {
                seqs: vec![0, 127, 128, 255, 256, 65_535, 65_536, 1 << 32, u64::MAX],
            }
            .encode(),
            Decodes,
        ),
        // Non-canonical but valid MessagePack: 1 as a uint64.
        (
            "ack_wide_int",
            vec![1, 0x03, 0x91, 0x91, 0xcf, 0, 0, 0, 0, 0, 0, 0, 1],
            Decodes,
        ),
        // Non-canonical: the body struct as a map keyed by field name.
        (
            "ack_body_as_map",
            vec![1, 0x03, 0x81, 0xa4, b's', b'e', b'q', b's', 0x91, 0x01],
            Decodes,
        ),
        ("empty", vec![], Truncated),
        ("version_only", vec![1], Truncated),
        ("wrong_version", cat(&[2], &ack[1..]), BadVersion),
        ("unknown_kind", vec![1, 0x7e, 0x90], UnknownKind),
        ("server_kind", vec![1, 0x85, 0x90], UnknownKind),
        ("ack_trailing_byte", cat(&ack, &[0x00]), TrailingBytes),
        ("auth_trailing_byte", cat(&auth, &[0xc0]), TrailingBytes),
        ("send_truncated", cut(&send_one, 3), Malformed),
        ("send_unknown_class", raw(0x02, &bad_class), Malformed),
        ("send_short_id", raw(0x02, &short_id), Malformed),
        ("auth_user_not_utf8", raw(0x01, &bad_user), Malformed),
        (
            "ack_negative_seq",
            vec![1, 0x03, 0x91, 0x91, 0xff],
            Malformed,
        ),
        ("never_used_marker", vec![1, 0x01, 0xc1], Malformed),
    ]
}

fn server_seeds() -> Vec<(&'static str, Vec<u8>, Verdict)> {
    use Verdict::*;
    let id = EnvelopeId(*b"0123456789abcdef");
    let envelope = Envelope {
        id,
        class: Class::Durable,
        accepted_ms: 1_700_000_000_000,
        expires_ms: 1_702_592_000_000,
        ciphertext: b"sealed".to_vec(),
    };
    let result = |outcome| ServerFrame::SendResult { id, outcome }.encode();
    let rejected = |code, devices: &[u32]| {
        result(SendOutcome::Rejected {
            code,
            current_devices: devices.iter().copied().map(DeviceId).collect(),
        })
    };
    let deliver = ServerFrame::Deliver {
        seq: 42,
        envelope: envelope.clone(),
    }
    .encode();
    let queue_empty = ServerFrame::QueueEmpty.encode();
    let bad_envelope = (42u64, (id, 7u8, 1u64, 2u64, ByteBuf::from(b"x".to_vec())));
    vec![
        (
            "auth_ok",
            ServerFrame::AuthOk {
                user: "alice@example.com".into(),
                device: DeviceId(1),
                server_time_ms: 1_700_000_000_000,
            }
            .encode(),
            Decodes,
        ),
        (
            "send_result_accepted",
            result(SendOutcome::Accepted { duplicate: false }),
            Decodes,
        ),
        (
            "send_result_duplicate",
            result(SendOutcome::Accepted { duplicate: true }),
            Decodes,
        ),
        (
            "send_result_stale_devices",
            rejected(ErrorCode::StaleDevices, &[1, 2, 5]),
            Decodes,
        ),
        (
            "send_result_mailbox_full",
            rejected(ErrorCode::MailboxFull, &[]),
            Decodes,
        ),
        // Non-canonical: fields the outcome ignores are set, and vanish on re-encoding.
        (
            "send_result_accepted_with_devices",
            raw(0x82, &(id, 0u16, false, [1u32, 2])),
            Decodes,
        ),
        (
            "send_result_rejected_duplicate_flag",
            raw(0x82, &(id, 9u16, true, [1u32])),
            Decodes,
        ),
        ("deliver", deliver.clone(), Decodes),
        (
            "deliver_ephemeral",
            ServerFrame::DeliverEphemeral {
                envelope: Envelope {
                    class: Class::Ephemeral,
                    ..envelope.clone()
                },
            }
            .encode(),
            Decodes,
        ),
        ("queue_empty", queue_empty.clone(), Decodes),
        (
            "notice_mailbox_full",
            ServerFrame::Notice {
                notice: Notice::MailboxFull,
                device: DeviceId(2),
            }
            .encode(),
            Decodes,
        ),
        (
            "group_send_result_refused_one",
            ServerFrame::GroupSendResult {
                id: EnvelopeId([4; 16]),
                code: None,
                refused: vec![RecipientRefusal {
                    to: "bob@example.com".into(),
                    code: ErrorCode::StaleDevices,
                    current_devices: vec![DeviceId(1), DeviceId(3)],
                }],
                epoch: None,
            }
            .encode(),
            Decodes,
        ),
        (
            "group_send_result_stale_epoch",
            ServerFrame::GroupSendResult {
                id: EnvelopeId([4; 16]),
                code: Some(ErrorCode::StaleEpoch),
                refused: vec![],
                epoch: Some(7),
            }
            .encode(),
            Decodes,
        ),
        (
            "notice_key_packages_low",
            ServerFrame::Notice {
                notice: Notice::KeyPackagesLow,
                device: DeviceId(2),
            }
            .encode(),
            Decodes,
        ),
        (
            "error_with_seq",
            ServerFrame::Error {
                code: ErrorCode::UnknownSeq,
                message: "seq 9 is not outstanding".into(),
                seq: Some(9),
            }
            .encode(),
            Decodes,
        ),
        (
            "error_without_seq",
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: String::new(),
                seq: None,
            }
            .encode(),
            Decodes,
        ),
        ("truncated_header", vec![1], Truncated),
        ("wrong_version", cat(&[0], &queue_empty[1..]), BadVersion),
        ("client_kind", vec![1, 0x03, 0x91, 0x90], UnknownKind),
        (
            "queue_empty_trailing_byte",
            cat(&queue_empty, &[0x00]),
            TrailingBytes,
        ),
        ("deliver_truncated", cut(&deliver, 2), Malformed),
        ("deliver_unknown_class", raw(0x83, &bad_envelope), Malformed),
        (
            "send_result_unknown_code",
            raw(0x82, &(id, 999u16, false, [0u32; 0])),
            Malformed,
        ),
        ("notice_keys_low", raw(0x86, &(2u16, 1u32)), Decodes),
        ("notice_unknown", raw(0x86, &(99u16, 1u32)), Malformed),
        (
            "error_code_zero",
            raw(0x87, &(0u16, "x", None::<u64>)),
            Malformed,
        ),
    ]
}

fn federation_seeds() -> Vec<(&'static str, Vec<u8>, Verdict)> {
    use Verdict::*;
    use sealpost_proto::federation::{
        Admission, FedEnvelope, FedGroupEnvelope, FedRecipient, HandshakeFrame, LinkFrame,
        RemoteDevice,
    };
    let id = EnvelopeId(*b"0123456789abcdef");
    let envelope = |admission| FedEnvelope {
        id,
        to: "bob@b.example".into(),
        class: Class::Durable,
        ttl_secs: 86_400,
        copies: vec![EnvelopeCopy {
            device: DeviceId(1),
            ciphertext: b"sealed for device 1".to_vec(),
        }],
        admission,
    };
    let txn = LinkFrame::Txn {
        txn_id: 1,
        envelopes: vec![
            envelope(Admission::Origin),
            envelope(Admission::Token(vec![7; 32])),
            envelope(Admission::Open),
        ],
    }
    .encode();
    let ack = LinkFrame::TxnAck {
        txn_id: 1,
        codes: vec![
            None,
            Some(ErrorCode::StaleDevices),
            Some(ErrorCode::MailboxFull),
        ],
    }
    .encode();
    let hello = HandshakeFrame::Hello {
        origin: "a.example".into(),
        target: "b.example".into(),
        noise: vec![0x11; 48],
    }
    .encode();
    // Admission 1 (token) without a token.
    let tokenless = (
        1u64,
        [(
            id,
            "bob@b.example",
            0u8,
            60u32,
            Vec::<EnvelopeCopy>::new(),
            1u8,
            None::<ByteBuf>,
        )],
    );
    vec![
        ("txn_three_admissions", txn.clone(), Decodes),
        (
            "txn_empty",
            LinkFrame::Txn {
                txn_id: 2,
                envelopes: vec![],
            }
            .encode(),
            Decodes,
        ),
        ("txn_ack", ack.clone(), Decodes),
        (
            "get_devices",
            LinkFrame::GetDevices {
                req_id: 3,
                user: "bob@b.example".into(),
            }
            .encode(),
            Decodes,
        ),
        (
            "get_device_list",
            LinkFrame::GetDeviceList {
                req_id: 4,
                user: "bob@b.example".into(),
            }
            .encode(),
            Decodes,
        ),
        (
            "claim_key_token",
            LinkFrame::ClaimKey {
                req_id: 5,
                user: "bob@b.example".into(),
                device: 2,
                admission: Admission::Token(vec![1; 32]),
                key_package: false,
            }
            .encode(),
            Decodes,
        ),
        (
            "group_txn",
            LinkFrame::GroupTxn {
                txn_id: 3,
                entries: vec![FedGroupEnvelope {
                    id,
                    class: Class::Durable,
                    ttl_secs: 86_400,
                    ciphertext: b"one MLS message for all".to_vec(),
                    recipients: vec![
                        FedRecipient {
                            to: "bob@b.example".into(),
                            devices: vec![DeviceId(1), DeviceId(2)],
                            admission: Admission::Origin,
                        },
                        FedRecipient {
                            to: "carol@b.example".into(),
                            devices: vec![DeviceId(1)],
                            admission: Admission::Token(vec![7; 32]),
                        },
                    ],
                }],
            }
            .encode(),
            Decodes,
        ),
        (
            "take_epoch",
            LinkFrame::TakeEpoch {
                req_id: 7,
                group: vec![3; 16],
                epoch: 9,
                id: EnvelopeId([2; 16]),
            }
            .encode(),
            Decodes,
        ),
        (
            "epoch_stale",
            LinkFrame::Epoch {
                req_id: 7,
                taken: false,
                current: 10,
            }
            .encode(),
            Decodes,
        ),
        (
            "claim_key_package",
            LinkFrame::ClaimKey {
                req_id: 6,
                user: "bob@b.example".into(),
                device: 2,
                admission: Admission::Open,
                key_package: true,
            }
            .encode(),
            Decodes,
        ),
        (
            "devices",
            LinkFrame::Devices {
                req_id: 3,
                devices: vec![RemoteDevice {
                    device: 1,
                    identity_keys: b"keys".to_vec(),
                }],
            }
            .encode(),
            Decodes,
        ),
        (
            "device_list",
            LinkFrame::DeviceList {
                req_id: 4,
                signed: b"signed".to_vec(),
                evidence: Vec::new(),
            }
            .encode(),
            Decodes,
        ),
        (
            "claimed",
            LinkFrame::Claimed {
                req_id: 5,
                key_id: 9,
                key: b"otk".to_vec(),
                fallback: false,
            }
            .encode(),
            Decodes,
        ),
        (
            "refused",
            LinkFrame::Refused {
                req_id: 5,
                code: ErrorCode::NotFound,
            }
            .encode(),
            Decodes,
        ),
        (
            "link_error",
            LinkFrame::LinkError {
                code: ErrorCode::MalformedFrame,
                message: "x".into(),
            }
            .encode(),
            Decodes,
        ),
        ("hello", hello.clone(), UnknownKind),
        ("txn_truncated", cut(&txn, 5), Malformed),
        ("txn_trailing_byte", cat(&ack, &[0]), TrailingBytes),
        ("txn_token_missing", raw(0x01, &tokenless), Malformed),
        ("ack_unknown_code", raw(0x81, &(1u64, [999u16])), Malformed),
        ("wrong_version", cat(&[2], &ack[1..]), BadVersion),
        ("empty", vec![], Truncated),
    ]
}

fn handle_seeds() -> Vec<(&'static str, String, Result<(), HandleError>)> {
    use HandleError::*;
    let name_max = "n".repeat(MAX_HANDLE_NAME_BYTES);
    let label_max = "l".repeat(63);
    // name@label.label.label, exactly MAX_HANDLE_BYTES long.
    let last = MAX_HANDLE_BYTES - name_max.len() - 1 - 2 * (label_max.len() + 1);
    let longest = format!("{name_max}@{label_max}.{label_max}.{}", "d".repeat(last));
    vec![
        ("simple", "alice@example.com".into(), Ok(())),
        ("all_name_chars", "a.b_c-d@localhost".into(), Ok(())),
        ("single_label", "x@y".into(), Ok(())),
        ("digits", "0@1.2".into(), Ok(())),
        ("hyphen_inside_label", "a@x-y.example".into(), Ok(())),
        ("longest_name", format!("{name_max}@x.y"), Ok(())),
        ("longest_label", format!("a@{label_max}.com"), Ok(())),
        ("longest_handle", longest.clone(), Ok(())),
        ("one_byte_too_long", longest + "d", Err(TooLong)),
        ("empty", String::new(), Err(Shape)),
        ("no_at", "alice".into(), Err(Shape)),
        ("two_ats", "a@b@c".into(), Err(Shape)),
        ("upper_case_name", "Alice@x.y".into(), Err(Name)),
        ("empty_name", "@x.y".into(), Err(Name)),
        ("name_too_long", format!("{name_max}n@x.y"), Err(Name)),
        ("phone_number", "+15551234@x.y".into(), Err(Name)),
        ("non_ascii_name", "j\u{f6}rg@x.y".into(), Err(Name)),
        ("nul_in_name", "a\0b@x.y".into(), Err(Name)),
        ("empty_domain", "a@".into(), Err(Domain)),
        ("empty_label", "a@x..y".into(), Err(Domain)),
        ("trailing_dot", "a@x.y.".into(), Err(Domain)),
        ("leading_hyphen", "a@-x.y".into(), Err(Domain)),
        ("trailing_hyphen", "a@x-.y".into(), Err(Domain)),
        ("upper_case_domain", "a@Example.com".into(), Err(Domain)),
        ("label_too_long", format!("a@{label_max}l.com"), Err(Domain)),
    ]
}

/// Rewrites the hand-written seeds, after checking that each is decoded the way its name says.
/// Files the fuzzer added to the corpora are left alone.
#[test]
#[ignore = "writes fuzz/corpus; run with --ignored to regenerate the seeds"]
fn write_seed_corpora() {
    let client = client_seeds();
    for (name, bytes, want) in &client {
        assert_eq!(
            &verdict(&ClientFrame::decode(bytes)),
            want,
            "client seed {name}"
        );
    }
    let server = server_seeds();
    for (name, bytes, want) in &server {
        assert_eq!(
            &verdict(&ServerFrame::decode(bytes)),
            want,
            "server seed {name}"
        );
    }
    let handles = handle_seeds();
    for (name, text, want) in &handles {
        assert_eq!(&Handle::parse(text).map(drop), want, "handle seed {name}");
    }
    let federation = federation_seeds();
    for (name, bytes, want) in &federation {
        assert_eq!(
            &verdict(&sealpost_proto::federation::LinkFrame::decode(bytes)),
            want,
            "federation seed {name}"
        );
    }
    write_seeds(
        "federation_frame",
        federation.into_iter().map(|(n, b, _)| (n, b)),
    );
    write_seeds("client_frame", client.into_iter().map(|(n, b, _)| (n, b)));
    write_seeds("server_frame", server.into_iter().map(|(n, b, _)| (n, b)));
    // Not UTF-8: never reaches the parser, a seed for the target's UTF-8 filter.
    let not_utf8 = ("not_utf8", vec![b'a', b'@', 0xff, 0xfe]);
    write_seeds(
        "handle",
        handles
            .into_iter()
            .map(|(n, t, _)| (n, t.into_bytes()))
            .chain([not_utf8]),
    );
}
