//! The browser client: the client engine (`sealpost_client::engine`) behind a wasm-bindgen
//! API for the page. The engine makes every protocol decision, exactly as for the Rust SDK;
//! this crate only converts between it and what JavaScript handles (JSON text, `Uint8Array`
//! frames, base64 strings).
//!
//! The page (`web/dist/app.js`) does the networking — `fetch` for the HTTP API, WebSockets
//! for `/v1/ws` and `/v1/sealed`, WebRTC for media — and asks the [`Engine`] for everything
//! that touches a key or a plaintext: it never sees a secret key, and every byte it sends to
//! the broker was encrypted and sealed here.
//!
//! # The page's side of the protocol
//!
//! ```text
//! register:  PendingAccount::create(handle) → POST /v1/accounts {identity_keys}
//!            → pending.finish(device, token) = Engine → PUT keys (engine.key_upload()),
//!            PUT device-list (engine.own_device_list(), then confirm_own_list), PUT
//!            delivery-token
//! send:      GET device-list (anonymous) → engine.accept_device_list()
//!            → for engine.devices_without_session(): POST …/keys/claim (engine.claim_headers())
//!              → engine.create_session()
//!            → engine.encrypt(to, payload) → engine.take_notices() (devices not in the
//!              signed list, to show once) → frame on /v1/sealed or /v1/ws → send_result
//!              (stale_devices: refetch the list, encrypt again with the same id)
//!            a "master key changed" error: show engine.key_change(to) (old and new safety
//!            numbers) until the user compares and accepts (engine.accept_key_change)
//! receive:   engine.receive(frame) → events, or "need_list" (only our own or a first
//!            contact's: fetch it, accept it, receive the same frame again) → save →
//!            engine.ack_frame(seqs). A device not in the sender's list held → "held"; the
//!            page then asks lists_refresh_due_ms() again (brought forward).
//! timed:     at lists_refresh_due_ms(): lists_to_refresh() → GET each on the anonymous
//!            channel → refresh_list()/refresh_failed() → read_held() → events. At
//!            next_transcript_due_ms(): due_transcript() → send to our own account (over
//!            /v1/ws) → transcript_sent(). Our own list: at connect and on a timer
//!            (authenticated), never right after a send.
//!
//! Two channels, never mixed (see `sealpost_client::engine::schedule`): what names no sender
//! (contacts' lists, key claims with a delivery token, sealed sends) goes without
//! credentials (`fetch` with `credentials: "omit"`, which Chromium serves from a separate
//! socket pool, and `/v1/sealed`); what concerns this account goes with its bearer token and
//! over `/v1/ws`.
//! link:      existing device: POST …/link-codes → engine.link_code() shown to the user; on
//!            "need_broker_keys", engine.receive_link_request() with GET …/devices → publish
//!            the new signed list (if any) → send {kind: "link_grant"} to the own account.
//!            new device: POST …/devices {link_code} → pending.finish_link() → PUT keys →
//!            accept the own list → send {kind: "link_request"} → the grant ("linked").
//! ```
//!
//! Methods that return structured data return JSON text; binary frames are `Uint8Array`s.
//! Errors are thrown as `Error`s whose message never holds a key or a plaintext.
//!
//! # Persistence
//!
//! [`Engine::save`] returns the state (keys, ratchets, pins, contacts, conversations)
//! encrypted under a 32-byte local key: the same state format as the SDK's state file.
//! [`Engine::load`] also reads what this page saved before it shared the engine with the SDK
//! (the engine migrates the older record). The page keeps both in the origin's storage. That
//! protects nothing against a script running in the origin — which is why the page is served
//! with a strict Content-Security-Policy — but keeps the blob useless on its own.

mod files;

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use rand::RngCore as _;
use sealpost_client::{
    ClientError, EnvelopeError,
    crypto::{CallId, LocalKey, Payload, ReceiptKind, group::GroupWire},
    engine::{
        self, BrokerDevice, ClaimWith, Engine as Core, Event, Failure, MessageState, Need,
        NewDevice, Outgoing, SendStep, SenderList, Unread, link_secret,
    },
    http,
};
use sealpost_proto::{
    ClientFrame, DeviceId, EnvelopeId, ErrorCode, Notice, RecipientRefusal, SendOutcome,
    ServerFrame,
};
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;
use zeroize::Zeroizing;

/// The domain of a handle (`""` if it has none).
fn domain_of(user: &str) -> &str {
    user.rsplit_once('@').map_or("", |(_, d)| d)
}

fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        // f64 milliseconds since the epoch: exact far beyond our lifetimes.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return js_sys::Date::now() as u64;
    }
    #[cfg(not(target_arch = "wasm32"))]
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn err(message: impl std::fmt::Display) -> JsError {
    JsError::new(&message.to_string())
}

/// An engine error as the page shows it (and recognises: "master key changed").
fn client_err(e: ClientError) -> JsError {
    match e {
        ClientError::MasterKeyChanged {
            user,
            new_safety_number,
            ..
        } => err(format!(
            "master key changed: the master key of {user} is not the one this browser knew \
             (new safety number {new_safety_number}). Nothing was sent; compare the new number \
             with {user} before accepting it."
        )),
        e => err(e),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Result<[u8; N], JsError> {
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or_else(|| err("not hex"))?;
    bytes
        .try_into()
        .map_err(|_| err(format!("expected {N} hex bytes")))
}

fn token_of(token: &str) -> Result<Zeroizing<Vec<u8>>, JsError> {
    http::decode_token(token).ok_or_else(|| err("the broker's token is not base64url"))
}

/// A new account's keys, before the broker has assigned the device id.
#[wasm_bindgen]
pub struct PendingAccount {
    handle: String,
    device: NewDevice,
}

#[wasm_bindgen]
impl PendingAccount {
    /// Generates the master key, the device keys and its one-time keys for `handle`.
    pub fn create(handle: &str) -> Result<PendingAccount, JsError> {
        engine::check_handle(handle).map_err(client_err)?;
        Ok(PendingAccount {
            handle: handle.to_owned(),
            device: NewDevice::generate(),
        })
    }

    /// The device's public keys, base64, for `POST /v1/accounts`.
    pub fn identity_keys(&self) -> String {
        http::identity_keys(&self.device.identity_keys())
    }

    /// This browser was added to an existing account with a link code (`POST …/devices` with
    /// its broker part): `device` and `token` from the broker's answer, `secret` the code's
    /// secret part. The engine then sends a link request and waits for the grant.
    pub fn finish_link(self, device: u32, token: &str, secret: &str) -> Result<Engine, JsError> {
        let token = token_of(token)?;
        let secret = link_secret(secret).map_err(|_| {
            err("malformed link code: type it exactly as the other device shows it")
        })?;
        let core = self.device.link(&self.handle, device, &token, &secret, "");
        Ok(Engine::wrap(core))
    }

    /// The account exists: `device` and `token` (base64url) from the broker's answer.
    pub fn finish(self, device: u32, token: &str) -> Result<Engine, JsError> {
        let token = token_of(token)?;
        let core = self.device.register(&self.handle, device, &token, "");
        Ok(Engine::wrap(core))
    }
}

/// One device of one account. See the module doc.
#[wasm_bindgen]
pub struct Engine {
    core: Core,
    /// What came of each list fetched in the running refresh of contacts' lists, for
    /// [`Engine::read_held`]; emptied there.
    refreshed: BTreeMap<String, Refreshed>,
    /// The key-transparency root of each domain whose co-signatures the page is to fetch
    /// next ([`Engine::check_transparency`], then [`Engine::check_cosignatures`]).
    roots: BTreeMap<String, sealpost_proto::transparency::SignedRoot>,
    /// Newer roots being verified with append-only proofs, by domain: (the last root verified
    /// so far, the root to reach).
    auditing: BTreeMap<String, ((u64, [u8; 32]), sealpost_proto::transparency::SignedRoot)>,
    /// The earliest root of each domain still awaiting auditors' co-signatures.
    awaited: BTreeMap<String, sealpost_proto::transparency::SignedRoot>,
}

/// What came of one list in a refresh of contacts' lists.
enum Refreshed {
    /// Fetched and accepted.
    Accepted,
    /// The broker did not answer: what is held stays held.
    Unavailable,
    /// Signed by another master key: held until the user accepts it.
    KeyChanged,
    /// No list, or one that does not verify.
    Failed(String),
}

/// The outgoing envelope a payload given as JSON by the page stands for.
fn outgoing(core: &Core, v: &Value) -> Result<Outgoing, JsError> {
    let str_of = |key: &str| {
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| err(format!("{key} missing")))
    };
    let call_id = || -> Result<CallId, JsError> { unhex::<16>(&str_of("call_id")?) };
    let call = |payload| Outgoing::call(payload).map_err(client_err);
    match v["kind"].as_str().unwrap_or_default() {
        "text" => Ok(Outgoing::text(&str_of("body")?)),
        "file" => Ok(Outgoing::file(files::file_from_json(&v["file"])?)),
        "history" => Ok(Outgoing::payload(Payload::History {
            device: v["device"]
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or_else(|| err("device missing"))?,
            file: files::file_from_json(&v["file"])?,
        })),
        "sent_file" => Ok(Outgoing::file_transcript(
            &str_of("to")?,
            &files::file_from_json(&v["file"])?,
        )),
        "sent" => Ok(Outgoing::transcript(&str_of("to")?, &str_of("body")?)),
        "delivery_token" => Ok(core.delivery_token_outgoing()),
        "link_request" => core.link_request_outgoing().map_err(client_err),
        "link_grant" => core.link_grant_outgoing().map_err(client_err),
        "answered_elsewhere" => Ok(core.answered_elsewhere(call_id()?)),
        "call_offer" => call(Payload::CallOffer {
            call_id: call_id()?,
            sdp: str_of("sdp")?,
            dtls_fingerprint: str_of("fingerprint")?,
            video: v["video"].as_bool().unwrap_or(false),
        }),
        "call_answer" => call(Payload::CallAnswer {
            call_id: call_id()?,
            sdp: str_of("sdp")?,
            dtls_fingerprint: str_of("fingerprint")?,
        }),
        "ice_candidate" => call(Payload::IceCandidate {
            call_id: call_id()?,
            candidate: str_of("candidate")?,
            sdp_mid: v["sdp_mid"].as_str().unwrap_or_default().to_owned(),
            sdp_m_line_index: v["sdp_m_line_index"]
                .as_u64()
                .and_then(|i| u16::try_from(i).ok())
                .unwrap_or(0),
        }),
        "hang_up" => call(Payload::HangUp {
            call_id: call_id()?,
        }),
        "busy" => call(Payload::Busy {
            call_id: call_id()?,
        }),
        "decline" => call(Payload::Decline {
            call_id: call_id()?,
        }),
        "typing" => Ok(Outgoing::typing(v["on"].as_bool().unwrap_or(false))),
        "receipt" => {
            let kind = match v["state"].as_str() {
                Some("delivered") => ReceiptKind::Delivered,
                Some("read") => ReceiptKind::Read,
                _ => return Err(err("state must be delivered or read")),
            };
            let ids = v["ids"]
                .as_array()
                .ok_or_else(|| err("ids missing"))?
                .iter()
                .map(|id| unhex::<16>(id.as_str().unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Outgoing::payload(Payload::Receipt { kind, ids }))
        }
        "disappearing" => Ok(Outgoing::payload(Payload::Disappearing {
            secs: v["secs"]
                .as_u64()
                .and_then(|s| u32::try_from(s).ok())
                .ok_or_else(|| err("secs missing"))?,
            with: v["with"].as_str().map(str::to_owned),
        })),
        other => Err(err(format!("unknown payload kind {other:?}"))),
    }
}

/// A call payload as the JSON the page gets (`kind` plus fields; call ids in hex).
fn payload_json(payload: &Payload) -> Value {
    match payload {
        Payload::CallOffer {
            call_id,
            sdp,
            dtls_fingerprint,
            video,
        } => json!({"kind": "call_offer", "call_id": hex(call_id), "sdp": sdp,
                     "fingerprint": dtls_fingerprint, "video": video}),
        Payload::CallAnswer {
            call_id,
            sdp,
            dtls_fingerprint,
        } => json!({"kind": "call_answer", "call_id": hex(call_id), "sdp": sdp,
                     "fingerprint": dtls_fingerprint}),
        Payload::IceCandidate {
            call_id,
            candidate,
            sdp_mid,
            sdp_m_line_index,
        } => json!({"kind": "ice_candidate", "call_id": hex(call_id), "candidate": candidate,
                     "sdp_mid": sdp_mid, "sdp_m_line_index": sdp_m_line_index}),
        Payload::HangUp { call_id } => json!({"kind": "hang_up", "call_id": hex(call_id)}),
        Payload::Busy { call_id } => json!({"kind": "busy", "call_id": hex(call_id)}),
        Payload::Decline { call_id } => json!({"kind": "decline", "call_id": hex(call_id)}),
        Payload::AnsweredElsewhere { call_id, device } => {
            json!({"kind": "answered_elsewhere", "call_id": hex(call_id), "device": device})
        }
        Payload::Receipt { kind, ids } => json!({"kind": "receipt",
            "state": match kind {
                ReceiptKind::Delivered => "delivered",
                _ => "read",
            },
            "ids": ids.iter().map(|id| hex(id)).collect::<Vec<_>>()}),
        Payload::Disappearing { secs, with } => {
            json!({"kind": "disappearing", "secs": secs, "with": with})
        }
        _ => json!({"kind": "other"}),
    }
}

/// Envelopes the engine wants sent, as the page gets them: `[{to, payload}]`, each payload
/// for [`Engine::encrypt`].
fn envelopes_json(envelopes: &[(String, Outgoing)]) -> Value {
    Value::Array(
        envelopes
            .iter()
            .map(|(to, o)| json!({"to": to, "payload": payload_json(o.contents())}))
            .collect(),
    )
}

/// Envelope ids as the page gets them.
fn ids_json(ids: &[EnvelopeId]) -> Value {
    json!(ids.iter().map(|id| hex(&id.0)).collect::<Vec<_>>())
}

/// A receipt, typing, timer or expiry event as the page gets it (`None` for other events).
fn conversation_event_json(event: &Event) -> Option<Value> {
    Some(match event {
        Event::Receipt { peer, ids, state } => {
            json!({"event": "receipt", "peer": peer, "ids": ids_json(ids), "state": state.as_str()})
        }
        Event::Typing { peer, device, on } => {
            json!({"event": "typing", "from": peer, "device": device, "on": on})
        }
        Event::Disappearing { peer, by, secs } => {
            json!({"event": "disappearing", "with": peer, "by": by, "secs": secs.unwrap_or(0)})
        }
        Event::Expired { peer, ids } => {
            json!({"event": "expired", "peer": peer, "ids": ids_json(ids)})
        }
        _ => return None,
    })
}

/// The page's view of what one envelope produced.
fn event_json(events: &[Event]) -> Value {
    match events.first() {
        Some(Event::Message(m)) => json!({"event": "message", "from": m.from,
            "device": m.device, "sent_ms": m.sent_ms, "text": m.text}),
        Some(Event::SentElsewhere {
            to, device, text, ..
        }) => json!({"event": "sent_elsewhere", "to": to, "device": device, "text": text}),
        Some(Event::File {
            from,
            device,
            sent_ms,
            file,
        }) => json!({"event": "file", "from": from, "device": device, "sent_ms": sent_ms,
                     "file": files::file_json(file)}),
        Some(Event::History { from_device, file }) => {
            json!({"event": "history", "from_device": from_device, "file": files::file_json(file)})
        }
        Some(Event::DeviceLinked { device }) => {
            json!({"event": "device_linked", "device": device})
        }
        Some(Event::Linked) => json!({"event": "linked"}),
        Some(Event::Call(signal)) => json!({"event": "call", "from": signal.from,
            "device": signal.device, "sent_ms": signal.sent_ms,
            "payload": payload_json(&signal.payload)}),
        Some(Event::Held { user, .. }) => json!({"event": "held", "from": user}),
        Some(Event::Rejected { error, .. }) => {
            json!({"event": "rejected", "reason": error.to_string()})
        }
        Some(other) => conversation_event_json(other).unwrap_or(json!({"event": "ignored"})),
        _ => json!({"event": "ignored"}),
    }
}

impl Engine {
    fn wrap(core: Core) -> Self {
        Self {
            core,
            refreshed: BTreeMap::new(),
            roots: BTreeMap::new(),
            auditing: BTreeMap::new(),
            awaited: BTreeMap::new(),
        }
    }

    /// Opens one delivered envelope: `{id, event}`, or `{id, need_list}` /
    /// `{id, need_broker_keys}`.
    fn deliver(&mut self, id: EnvelopeId, ciphertext: &[u8], refetched: bool) -> Value {
        if self.core.is_seen(id) {
            return json!({"id": hex(&id.0), "event": {"event": "duplicate"}});
        }
        if GroupWire::is_group(ciphertext) {
            let events = self.core.open_group(id, ciphertext);
            let events: Vec<Value> = events
                .iter()
                .map(|e| match e {
                    Event::Group(g) => group_event_json(g),
                    other => event_json(std::slice::from_ref(other)),
                })
                .collect();
            return json!({"id": hex(&id.0), "event": {"event": "group", "events": events}});
        }
        let list = if refetched {
            SenderList::Refetched
        } else {
            SenderList::Cached
        };
        let own = self.core.user().to_owned();
        let (result, contact) = match self.core.open(id, ciphertext, list, now_ms()) {
            Err(Unread::Need(Need::List(user))) => {
                return json!({"id": hex(&id.0), "need_list": user});
            }
            Err(Unread::Need(Need::BrokerKeys)) => {
                return json!({"id": hex(&id.0), "need_broker_keys": true});
            }
            Err(Unread::Failed(failure)) => (Err(failure), None),
            // Nothing to show but a delivery token: the sender is now a contact.
            Ok(opened) if opened.events.is_empty() && opened.from != own => {
                (Ok(Vec::new()), Some(opened.from))
            }
            Ok(opened) => (Ok(opened.events), None),
        };
        let events = self.core.settle(id, ciphertext, false, result);
        let event = match contact {
            Some(from) => json!({"event": "contact", "from": from}),
            None => event_json(&events),
        };
        json!({"id": hex(&id.0), "event": event})
    }

    /// Checks co-signatures (an answer of `GET /v1/transparency/cosignatures`) of `root`.
    fn cosigned(
        &mut self,
        user: &str,
        root: Option<sealpost_proto::transparency::SignedRoot>,
        answer: &str,
    ) -> Result<(), JsError> {
        let Some(root) = root else {
            return Ok(());
        };
        let v: Value = serde_json::from_str(answer).map_err(|_| err("not JSON"))?;
        let cosignatures = http::records(&v, "cosignatures").unwrap_or_default();
        self.core
            .check_cosignatures(user, &root, &cosignatures, now_ms())
            .map(drop)
            .map_err(client_err)
    }

    fn list_summary(&self, user: &str) -> Result<String, JsError> {
        let (list, fetched_ms) = self
            .core
            .known_list(user)
            .ok_or_else(|| err("no verified device list"))?;
        Ok(json!({
            "devices": list.devices.iter().map(|(d, _)| d).collect::<Vec<_>>(),
            "safety_number": self.core.safety_number_for(user, &list.master_key).to_string(),
            "verified": self.core.is_verified(user),
            "fetched_ms": fetched_ms,
        })
        .to_string())
    }
}

fn local_key_from(text: &str) -> Result<LocalKey, JsError> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(text)
            .map_err(|_| err("local key is not base64"))?,
    );
    let array: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| err("local key must be 32 bytes"))?;
    Ok(LocalKey::from_bytes(&array))
}

#[wasm_bindgen]
impl Engine {
    /// A new random local key (base64) for [`Engine::save`].
    pub fn new_local_key() -> String {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        STANDARD.encode(key.as_ref())
    }

    /// Restores a state saved with [`Engine::save`] (also one saved before the browser and
    /// the SDK shared one state format).
    pub fn load(bytes: &[u8], local_key: &str) -> Result<Engine, JsError> {
        let key = local_key_from(local_key)?;
        let core = Core::from_encrypted_bytes(bytes, &key).map_err(err)?;
        Ok(Engine::wrap(core))
    }

    /// The state, encrypted under `local_key` (base64).
    pub fn save(&mut self, local_key: &str) -> Result<Vec<u8>, JsError> {
        Ok(self.core.to_encrypted_bytes(&local_key_from(local_key)?))
    }

    /// This account's handle.
    pub fn handle(&self) -> String {
        self.core.user().to_owned()
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.core.device_id()
    }

    /// `Bearer <device>.<token>` for authenticated HTTP requests.
    pub fn bearer(&self) -> String {
        http::bearer(self.core.device_id(), self.core.device_token()).to_string()
    }

    /// The body of `PUT /v1/accounts/{h}/delivery-token`: this account's token; sealed
    /// envelopes only from contacts holding it.
    pub fn delivery_token_body(&self) -> String {
        http::delivery_token_body(Some(self.core.delivery_token()), false).to_string()
    }

    /// Generates one-time keys up to the target when the directory holds `have`.
    pub fn top_up_keys(&mut self, have: u32) {
        self.core.top_up_keys(u64::from(have), true);
    }

    /// The body of `PUT /v1/accounts/{h}/devices/{id}/keys` for the keys not yet published,
    /// or `""` if there are none; call [`Engine::mark_keys_published`] once it succeeded.
    pub fn key_upload(&mut self) -> String {
        self.core
            .key_upload()
            .map(|upload| http::key_upload_body(&upload).to_string())
            .unwrap_or_default()
    }

    /// The keys of [`Engine::key_upload`] are published.
    pub fn mark_keys_published(&mut self) {
        self.core.mark_keys_published();
    }

    /// The body of `PUT /v1/accounts/{h}/device-list`: this device, signed by the master key
    /// (a single-device account, version 1). Once the broker stored it, the page calls
    /// [`Engine::confirm_own_list`].
    pub fn own_device_list(&mut self) -> Result<String, JsError> {
        let signed = self.core.first_own_list().map_err(client_err)?;
        Ok(http::device_list_body(&signed.to_bytes()).to_string())
    }

    /// Records our own list (a `PUT …/device-list` body this engine made) as published, once
    /// the broker stored it: its version is pinned only then, so a refused PUT leaves the
    /// broker's list and ours in agreement.
    pub fn confirm_own_list(&mut self, body: &str) -> Result<(), JsError> {
        let body: Value = serde_json::from_str(body).map_err(err)?;
        let signed = http::signed_list(&body).ok_or_else(|| err("not a device-list body"))?;
        self.core
            .confirm_own_list(&signed, now_ms())
            .map_err(client_err)
    }

    /// Verifies `user`'s signed device list (the `signed` field of `GET …/device-list`, base64)
    /// against the pinned master key (pinned now if this is the first), the signature and
    /// version rollback, and keeps it. Returns `{devices, safety_number, verified}`.
    ///
    /// Throws `master key changed: …` if the list is signed by another master key than the
    /// pinned one: nothing may be sent to or accepted from `user` until the user compares the
    /// new safety number.
    pub fn accept_device_list(&mut self, user: &str, signed: &str) -> Result<String, JsError> {
        engine::check_handle(user).map_err(client_err)?;
        let signed = http::signed_list(&json!({ "signed": signed }))
            .ok_or_else(|| err("device list is not base64"))?;
        self.core
            .accept_device_list(user, &signed, now_ms())
            .map_err(client_err)?;
        self.list_summary(user)
    }

    /// Checks `user`'s fetched list (`signed`, base64) against its key-transparency evidence
    /// (`evidence` of `GET …/device-list`, base64; `""` if there is none) before
    /// [`Engine::accept_device_list`]. Throws if it does not verify (do not use the list).
    /// Returns `""`, or `{domain, epoch, audit?}`. With `audit: {from, to}` the root is newer
    /// than the newest seen: fetch `GET /v1/transparency/audit?domain=&from=&to=` in steps of
    /// at most 64 epochs, give each answer to [`Engine::verify_roots`], then call
    /// [`Engine::accept_verified_root`]. Then fetch
    /// `GET /v1/transparency/cosignatures?domain=&epoch=` and give the answer to
    /// [`Engine::check_cosignatures`]. A jump of more than 256 epochs is taken on the
    /// auditors' word (pending until one co-signs it), as the SDK does.
    pub fn check_transparency(
        &mut self,
        user: &str,
        signed: &str,
        evidence: &str,
    ) -> Result<String, JsError> {
        let signed = STANDARD
            .decode(signed)
            .map_err(|_| err("the list is not base64"))?;
        let evidence = if evidence.is_empty() {
            None
        } else {
            Some(
                STANDARD
                    .decode(evidence)
                    .map_err(|_| err("evidence is not base64"))?,
            )
        };
        let checked = self
            .core
            .check_transparency(user, &signed, evidence.as_deref())
            .map_err(client_err)?;
        let Some((root, step)) = checked else {
            return Ok(String::new());
        };
        use sealpost_client::crypto::transparency::Step;
        let mut answer = json!({ "domain": root.domain, "epoch": root.epoch });
        // The earliest root still awaiting auditors: its co-signatures are asked for too
        // ([`Engine::check_awaited_cosignatures`]).
        if let Some(awaited) = self.core.log_pins().awaited(&root.domain) {
            answer["awaited"] = json!(awaited.epoch);
            self.awaited.insert(root.domain.clone(), awaited);
        }
        match step {
            Step::None => self.core.accept_root(&root, now_ms()),
            Step::Advance { from, to } if to - from <= 256 => {
                let newest = self
                    .core
                    .log_pins()
                    .newest(&root.domain)
                    .ok_or_else(|| err("no root seen"))?;
                answer["audit"] = json!({ "from": from, "to": to });
                self.auditing
                    .insert(root.domain.clone(), (newest, root.clone()));
            }
            Step::Advance { .. } => self.core.accept_root_unproved(&root, now_ms()),
        }
        self.roots.insert(root.domain.clone(), root);
        Ok(answer.to_string())
    }

    /// One answer of `GET /v1/transparency/audit` (JSON text) for the root
    /// [`Engine::check_transparency`] is verifying for `domain`: the roots must run on from
    /// the last one verified, signed by the domain's log key, with akd's append-only proof.
    /// Returns the epoch reached (ask from there next); throws on a fork.
    pub fn verify_roots(&mut self, domain: &str, answer: &str) -> Result<f64, JsError> {
        let (at, target) = self
            .auditing
            .get(domain)
            .cloned()
            .ok_or_else(|| err("no root is being verified for this domain"))?;
        let v: Value = serde_json::from_str(answer).map_err(|_| err("not JSON"))?;
        let roots = http::records(&v, "roots")
            .ok_or_else(|| err("no roots"))?
            .iter()
            .map(|r| sealpost_proto::transparency::SignedRoot::from_bytes(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| err("malformed root"))?;
        let proof = http::record(&v, "proof").ok_or_else(|| err("no proof"))?;
        let fork = |error| {
            client_err(ClientError::Transparency {
                user: domain.to_owned(),
                error,
            })
        };
        // akd's verifier spawns tasks: a runtime of this thread's own runs them.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| err(format!("no runtime: {e}")))?;
        let verified = runtime.block_on(
            self.core
                .log_pins()
                .verify_extension(domain, at, &roots, &proof),
        );
        if let Err(error) = verified {
            self.auditing.remove(domain);
            return Err(fork(error));
        }
        let last = roots.last().ok_or_else(|| err("no roots"))?;
        if last.epoch > target.epoch
            || (last.epoch == target.epoch && last.root_hash != target.root_hash)
        {
            self.auditing.remove(domain);
            return Err(fork(
                sealpost_client::crypto::transparency::TransparencyError::Fork {
                    domain: domain.to_owned(),
                    epoch: last.epoch,
                },
            ));
        }
        if let Some(entry) = self.auditing.get_mut(domain) {
            entry.0 = (last.epoch, last.root_hash);
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(last.epoch as f64)
    }

    /// Accepts the root [`Engine::verify_roots`] reached for `domain`; throws if it did not.
    pub fn accept_verified_root(&mut self, domain: &str) -> Result<(), JsError> {
        let (at, target) = self
            .auditing
            .remove(domain)
            .ok_or_else(|| err("no root is being verified for this domain"))?;
        if at != (target.epoch, target.root_hash) {
            return Err(err("the roots were not verified up to the one shown"));
        }
        self.core.accept_root(&target, now_ms());
        Ok(())
    }

    /// The answer of `GET /v1/transparency/cosignatures` (JSON text) for the root
    /// [`Engine::check_transparency`] named for `user`'s domain. Throws on a split view (the
    /// domain showed another root to an auditor): do not use the list.
    pub fn check_cosignatures(&mut self, user: &str, answer: &str) -> Result<(), JsError> {
        let root = self.roots.remove(domain_of(user));
        self.cosigned(user, root, answer)
    }

    /// The answer of `GET /v1/transparency/cosignatures` for the `awaited` epoch
    /// [`Engine::check_transparency`] named for `user`'s domain. Throws on a split view.
    pub fn check_awaited_cosignatures(&mut self, user: &str, answer: &str) -> Result<(), JsError> {
        let root = self.awaited.remove(domain_of(user));
        self.cosigned(user, root, answer)
    }

    /// Checks this account's own entry in its domain's log (the answer of
    /// `GET /v1/accounts/{h}/transparency-history`, JSON text). Returns the events, as
    /// [`Engine::receive`] does (`foreign_key_published`: a master key none of this account's
    /// devices made).
    pub fn check_own_history(&mut self, answer: &str) -> Result<String, JsError> {
        let v: Value = serde_json::from_str(answer).map_err(|_| err("not JSON"))?;
        let root = http::record(&v, "root").ok_or_else(|| err("no root"))?;
        let proof = http::record(&v, "proof").ok_or_else(|| err("no proof"))?;
        let root = sealpost_proto::transparency::SignedRoot::from_bytes(&root)
            .map_err(|_| err("malformed root"))?;
        let own = self.core.user().to_owned();
        let step = self.core.log_pins().place(&root).map_err(|error| {
            client_err(ClientError::Transparency {
                user: own.clone(),
                error,
            })
        })?;
        match step {
            sealpost_client::crypto::transparency::Step::None => {
                self.core.accept_root(&root, now_ms())
            }
            _ => self.core.accept_root_unproved(&root, now_ms()),
        }
        let events = self
            .core
            .check_own_history(&root, &proof)
            .map_err(client_err)?;
        let events: Vec<Value> = events
            .iter()
            .filter_map(|e| match e {
                Event::ForeignKeyPublished { epoch, version } => Some(json!({
                    "event": "foreign_key_published", "epoch": epoch, "version": version,
                })),
                _ => None,
            })
            .collect();
        Ok(Value::Array(events).to_string())
    }

    /// How far `user`'s domain's key-transparency log is audited: `{status: "none" |
    /// "cosigned" | "pending" | "unaudited", by: [auditor domains]}` (unaudited: no auditor
    /// co-signed a root of it within `grace_ms` of it being seen).
    pub fn log_status(&self, user: &str, grace_ms: f64) -> String {
        use sealpost_client::crypto::transparency::LogStatus;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let grace = grace_ms.max(0.0) as u64;
        match self.core.log_status(user, now_ms(), grace) {
            LogStatus::NoLog => json!({ "status": "none" }),
            LogStatus::CoSigned(by) => json!({ "status": "cosigned", "by": by }),
            LogStatus::Pending => json!({ "status": "pending" }),
            LogStatus::Unaudited => json!({ "status": "unaudited" }),
        }
        .to_string()
    }

    /// `{devices, safety_number, verified, fetched_ms}` for a list accepted before, or `""`.
    pub fn known_list(&self, user: &str) -> Result<String, JsError> {
        if self.core.known_list(user).is_none() {
            return Ok(String::new());
        }
        self.list_summary(user)
    }

    /// The safety number with `user` (whose list was accepted).
    pub fn safety_number(&self, user: &str) -> Result<String, JsError> {
        let number = self.core.safety_number(user).map_err(client_err)?;
        Ok(number.to_string())
    }

    /// The user compared the safety number with `user` and it matched.
    pub fn mark_verified(&mut self, user: &str) {
        self.core.mark_verified(user);
    }

    /// `user`'s master key changed and the new one is not accepted: JSON `{old_safety_number,
    /// new_safety_number, new_master_key (hex), was_verified}`, or `""` if no change is
    /// pending. Show it instead of the safety number, and accept with
    /// [`Engine::accept_key_change`] only once the user compared the new number.
    pub fn key_change(&self, user: &str) -> String {
        self.core.key_change(user).map_or_else(String::new, |c| {
            json!({
                "old_safety_number": c.old_safety_number.to_string(),
                "new_safety_number": c.new_safety_number.to_string(),
                "new_master_key": hex(&c.new_master_key),
                "was_verified": c.was_verified,
            })
            .to_string()
        })
    }

    /// The user compared the new safety number of [`Engine::key_change`] with `user` and it
    /// matched: `new_master_key` (hex, as `key_change` gave it) replaces the pinned key. The
    /// contact is not verified until the user marks it again; fetch its list again, then
    /// what waited is read.
    pub fn accept_key_change(&mut self, user: &str, new_master_key: &str) -> Result<(), JsError> {
        let key = unhex::<32>(new_master_key)?;
        self.core.accept_master_key_change(user, &key);
        Ok(())
    }

    /// What the last sends found to tell the user, each once (JSON array of `{user, devices,
    /// own_account}`: devices the broker has for `user` that its signed list does not contain;
    /// they got placeholders). Call after [`Engine::encrypt`]; save the state after.
    pub fn take_notices(&mut self) -> String {
        let out: Vec<Value> = self
            .core
            .take_notices()
            .into_iter()
            .filter_map(|e| match e {
                Event::UnlistedDevices {
                    user,
                    devices,
                    own_account,
                } => Some(json!({"user": user, "devices": devices, "own_account": own_account})),
                _ => None,
            })
            .collect();
        Value::Array(out).to_string()
    }

    /// Devices in `user`'s verified list this device has no Olm session with, for their
    /// current keys (JSON array).
    pub fn devices_without_session(&mut self, user: &str) -> String {
        json!(self.core.devices_without_session(user)).to_string()
    }

    /// Headers for claiming one of `user`'s keys (JSON object): its delivery token if we hold
    /// it (the claim then names nobody), else this device's credentials.
    pub fn claim_headers(&self, user: &str) -> String {
        match self.core.claim_with(user) {
            ClaimWith::DeliveryToken(token) => {
                json!({"sealpost-delivery-token": http::token(&token).as_str()}).to_string()
            }
            ClaimWith::Device => {
                json!({"authorization": self.bearer(), "sealpost-account": self.core.user()})
                    .to_string()
            }
        }
    }

    /// Starts an Olm session with `user`'s `device` from a claimed key (`key` of the claim's
    /// answer, base64), after checking the key's signature by that device.
    pub fn create_session(&mut self, user: &str, device: u32, key: &str) -> Result<(), JsError> {
        let key = http::claimed_key(&json!({ "key": key }))
            .ok_or_else(|| err("claimed key is not base64"))?;
        self.core
            .create_session(user, device, &key)
            .map_err(client_err)
    }

    /// Whether the delivery token was already sent to `user`.
    pub fn token_shared(&self, user: &str) -> bool {
        self.core.token_shared(user)
    }

    /// The delivery token reached `user`.
    pub fn mark_token_shared(&mut self, user: &str) {
        self.core.mark_token_shared(user);
    }

    /// Whether envelopes to `user` go over the anonymous `/v1/sealed` connection.
    pub fn sends_sealed_to(&self, user: &str) -> bool {
        self.core.sends_sealed_to(user)
    }

    /// Encrypts `payload` (JSON: `{kind, …}`) for every device of `devices` (JSON array; empty:
    /// the verified list) of `to` and seals each copy. Devices the broker has that the verified
    /// list does not vouch for get a random placeholder. Returns `{id, sealed, frame}`: the
    /// envelope id (hex; pass it back as `id` to retry after `stale_devices`), whether `frame`
    /// (base64) goes on `/v1/sealed` (else `/v1/ws`).
    pub fn encrypt(
        &mut self,
        to: &str,
        payload: &str,
        id: &str,
        devices: &str,
    ) -> Result<String, JsError> {
        let v: Value = serde_json::from_str(payload).map_err(|_| err("payload is not JSON"))?;
        let outgoing = outgoing(&self.core, &v)?;
        let devices: Option<Vec<u32>> = if devices.is_empty() {
            None
        } else {
            Some(serde_json::from_str(devices).map_err(|_| err("devices is not a JSON array"))?)
        };
        let retry_of = if id.is_empty() {
            None
        } else {
            Some(EnvelopeId(unhex::<16>(id)?))
        };
        let mut send = self
            .core
            .start_send(to, outgoing, devices, retry_of, now_ms())
            .map_err(client_err)?;
        match self
            .core
            .send_step(&mut send, now_ms())
            .map_err(client_err)?
        {
            SendStep::ClaimKey { device, .. } => Err(err(format!(
                "no session with device {device}; claim a key first"
            ))),
            SendStep::Transmit(frame) => Ok(json!({
                "id": hex(&send.id().0),
                "sealed": send.is_sealed(),
                "frame": STANDARD.encode(frame.encode()),
            })
            .to_string()),
        }
    }

    /// The send of envelope `id` (hex) to `to` is given up (refused, or no answer): what its
    /// text named of earlier messages goes with the next text instead (see the engine's
    /// `chain` module). Save after.
    pub fn send_given_up(&mut self, to: &str, id: &str) -> Result<(), JsError> {
        self.core.send_given_up(to, EnvelopeId(unhex::<16>(id)?));
        Ok(())
    }

    /// The group text whose first part is `id` (hex) was taken for every member device (no
    /// part refused, no stale device set): the next text names it (withheld-message
    /// detection). Save after.
    pub fn group_text_accepted(&mut self, id: &str) -> Result<(), JsError> {
        self.core.group_text_accepted(EnvelopeId(unhex::<16>(id)?));
        Ok(())
    }

    /// A link code to show on this device for linking a new one: `broker_code` from `POST
    /// /v1/accounts/{h}/link-codes`, plus a secret the broker never sees. Valid until
    /// `expires_ms` (from the same answer).
    pub fn link_code(&mut self, broker_code: &str, expires_ms: f64) -> String {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let expires = expires_ms as u64;
        let code = self.core.new_link_code(broker_code, expires, now_ms());
        code.code.to_string()
    }

    /// Whether this device is being linked (waiting for the grant).
    pub fn is_linking(&self) -> bool {
        self.core.is_linking()
    }

    /// After [`Engine::receive`] answered `need_broker_keys`: opens the envelope with the
    /// keys the broker lists for the sending device of our own account (`devices` of `GET
    /// /v1/accounts/{own}/devices`, JSON). Only a link request whose proof matches a code this
    /// device issued is accepted: the device is added to the account's signed list, returned
    /// as `{event: "link_request", device, signed}` — publish `signed` (`PUT …/device-list`;
    /// empty if the list has the device already), then send `{kind: "link_grant"}` to the own
    /// account. Anything else is rejected.
    pub fn receive_link_request(&mut self, frame: &[u8], devices: &str) -> Result<String, JsError> {
        let ServerFrame::Deliver { seq, envelope } = ServerFrame::decode(frame).map_err(err)?
        else {
            return Err(err("not a delivery"));
        };
        let broker: Vec<BrokerDevice> = serde_json::from_str::<Value>(devices)
            .ok()
            .and_then(|v| http::broker_devices(&v))
            .unwrap_or_default();
        let approved = self
            .core
            .open_link_request(&envelope.ciphertext, &broker, now_ms())
            .and_then(|(device, keys)| {
                let signed = self
                    .core
                    .approved_list(device, keys)
                    .map_err(|e| Failure::Rejected(EnvelopeError::LinkFailed(Box::new(e))))?;
                Ok((device, signed))
            });
        let (result, approved) = match approved {
            Ok(approved) => (Ok(Vec::new()), Some(approved)),
            Err(failure) => (Err(failure), None),
        };
        let events = self
            .core
            .settle(envelope.id, &envelope.ciphertext, false, result);
        let event = match approved {
            Some((device, signed)) => json!({
                "event": "link_request",
                "device": device,
                "signed": signed
                    .map(|s| http::device_list_body(&s.to_bytes()).to_string())
                    .unwrap_or_default(),
            }),
            None => event_json(&events),
        };
        Ok(
            json!({"type": "deliver", "seq": seq, "id": hex(&envelope.id.0), "event": event})
                .to_string(),
        )
    }

    /// The first frame on `/v1/ws`, with a one-time session ticket (the `ticket` of a
    /// `POST /v1/accounts/{h}/session-ticket` answer, base64url): the device token itself
    /// then never sits in the broker's buffers of a long-lived connection.
    pub fn auth_frame(&self, ticket: &str) -> Result<Vec<u8>, JsError> {
        let ticket = sealpost_client::http::decode_token(ticket)
            .ok_or_else(|| JsError::new("the session ticket is not base64url"))?;
        Ok(ClientFrame::Auth {
            user: self.core.user().to_owned(),
            device: DeviceId(self.core.device_id()),
            token: ticket.to_vec(),
        }
        .encode())
    }

    /// An `ack` frame for `seqs` (JSON array of numbers).
    pub fn ack_frame(&self, seqs: &str) -> Result<Vec<u8>, JsError> {
        let seqs: Vec<u64> =
            serde_json::from_str(seqs).map_err(|_| err("seqs is not a JSON array"))?;
        Ok(ClientFrame::Ack { seqs }.encode())
    }

    /// Handles one frame from the broker. Returns JSON `{type, …}`:
    ///
    /// - `deliver` / `deliver_ephemeral`: `{seq, id, event}` where `event` is `{event:
    ///   "message"|"call"|"contact"|"duplicate"|"ignored"|"rejected", …}`, or `{need_list:
    ///   user}`: fetch and accept that list, then call again with `refetched = true`.
    ///   Receipts, typing and timers come as `{event: "receipt", peer, ids: [hex], state:
    ///   "delivered"|"read"}`, `{event: "typing", from, device, on}` and `{event:
    ///   "disappearing", with, by, secs}` (0: off). A message or file received owes a
    ///   delivered receipt: call [`Engine::take_receipts`] after handling frames.
    /// - `send_result`: `{id, accepted, code, current_devices}`; when accepted and the envelope
    ///   carried a message this device stored, also `receipt: {event: "receipt", peer, ids,
    ///   state: "sent"}` (the message is now with the broker).
    /// - `group_send_result`: `{id, code, epoch, refused: [{to, code, current_devices}]}`.
    /// - `auth_ok`, `queue_empty`, `notice` (`{notice}`), `error` (`{code, message}`).
    pub fn receive(&mut self, frame: &[u8], refetched: bool) -> Result<String, JsError> {
        let frame = ServerFrame::decode(frame).map_err(err)?;
        let out = match frame {
            ServerFrame::Deliver { seq, envelope } => {
                let mut v = self.deliver(envelope.id, &envelope.ciphertext, refetched);
                v["type"] = json!("deliver");
                v["seq"] = json!(seq);
                v
            }
            ServerFrame::DeliverEphemeral { envelope } => {
                let mut v = self.deliver(envelope.id, &envelope.ciphertext, refetched);
                v["type"] = json!("deliver_ephemeral");
                v
            }
            ServerFrame::SendResult { id, outcome } => match outcome {
                SendOutcome::Accepted { duplicate } => {
                    let mut v = json!({"type": "send_result", "id": hex(&id.0), "accepted": true,
                           "duplicate": duplicate});
                    // A message this device stored is now with the broker.
                    if let Some(event) = self.core.message_accepted(id)
                        && let Some(receipt) = conversation_event_json(&event)
                    {
                        v["receipt"] = receipt;
                    }
                    v
                }
                SendOutcome::Rejected {
                    code,
                    current_devices,
                } => json!({"type": "send_result", "id": hex(&id.0), "accepted": false,
                        "code": code.as_str(),
                        "current_devices": current_devices.iter().map(|d| d.0).collect::<Vec<_>>()}),
            },
            ServerFrame::AuthOk { server_time_ms, .. } => {
                json!({"type": "auth_ok", "server_time_ms": server_time_ms})
            }
            ServerFrame::QueueEmpty => json!({"type": "queue_empty"}),
            ServerFrame::Notice { notice, .. } => json!({"type": "notice", "notice": match notice {
                Notice::KeysLow => "keys_low",
                Notice::KeyPackagesLow => "key_packages_low",
                Notice::MailboxFull => "mailbox_full",
            }}),
            ServerFrame::Error { code, message, .. } => {
                json!({"type": "error", "code": code.as_str(), "message": message})
            }
            ServerFrame::GroupSendResult {
                id,
                code,
                refused,
                epoch,
            } => json!({"type": "group_send_result", "id": hex(&id.0),
                    "code": code.map(|c| c.as_str()), "epoch": epoch,
                    "refused": refused.iter().map(|r| json!({"to": r.to, "code": r.code.as_str(),
                        "current_devices": r.current_devices.iter().map(|d| d.0).collect::<Vec<_>>()}))
                        .collect::<Vec<_>>()}),
        };
        Ok(out.to_string())
    }

    /// Sets the timing of transcripts and of the refresh of contacts' lists, in ms (see
    /// `sealpost_client::engine::schedule`): transcript delay range, mean refresh interval,
    /// and the delay range of a refresh brought forward by a held envelope.
    pub fn set_timing(
        &mut self,
        transcript_min: f64,
        transcript_max: f64,
        refresh: f64,
        held_min: f64,
        held_max: f64,
    ) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = |v: f64| v.max(0.0) as u64;
        self.core.set_timing(engine::Timing {
            transcript_delay_ms: (ms(transcript_min), ms(transcript_max)),
            list_refresh_ms: ms(refresh),
            held_refresh_ms: (ms(held_min), ms(held_max)),
            ..self.core.timing()
        });
    }

    /// This device's conversations as an archive, for a device just linked (sent as a file,
    /// then `{kind: "history", device, file}` to the account).
    pub fn history_archive(&self) -> Vec<u8> {
        self.core.history_archive()
    }

    /// Adds an archive another device of the account sent (the bytes of the `history`
    /// event's file, fetched and opened); answers how many messages were new. Save after.
    pub fn import_history(&mut self, archive: &[u8]) -> Result<u32, JsError> {
        let added = self.core.import_history(archive).map_err(client_err)?;
        Ok(u32::try_from(added).unwrap_or(u32::MAX))
    }

    /// Queues a transcript of a file (its JSON), just sent to `to`, for this account's other
    /// devices, as [`Engine::queue_transcript`] does for a text. Save afterwards.
    pub fn queue_file_transcript(&mut self, to: &str, file: &str) -> Result<(), JsError> {
        let v: Value = serde_json::from_str(file).map_err(|_| err("file is not JSON"))?;
        let file = files::file_from_json(&v)?;
        self.core.queue_file_transcript(to, &file, now_ms());
        Ok(())
    }

    /// Queues a transcript of `body`, just sent to `to`, for this account's other devices:
    /// the page sends it once due ([`Engine::due_transcript`]), authenticated, not in the
    /// same burst as the sealed send. Save afterwards.
    pub fn queue_transcript(&mut self, to: &str, body: &str) {
        self.core.queue_transcript(to, body, now_ms());
    }

    /// When the first queued transcript is due (ms since the epoch), or -1 if none is queued.
    pub fn next_transcript_due_ms(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        self.core
            .next_transcript_due_ms()
            .map_or(-1.0, |ms| ms as f64)
    }

    /// The first queued transcript if it is due, as a payload for [`Engine::encrypt`] to our
    /// own account (`{kind: "sent", to, body}`), or `""`. Once sent (or if the account has no
    /// other device), [`Engine::transcript_sent`].
    pub fn due_transcript(&self) -> String {
        if let Some((to, file)) = self.core.due_transcript_file(now_ms()) {
            return json!({"kind": "sent_file", "to": to, "file": files::file_json(file)})
                .to_string();
        }
        self.core
            .due_transcript_text(now_ms())
            .map_or_else(String::new, |(to, body)| {
                json!({"kind": "sent", "to": to, "body": body}).to_string()
            })
    }

    /// The first queued transcript was sent.
    pub fn transcript_sent(&mut self) {
        self.core.transcript_sent();
    }

    /// When contacts' lists are next refreshed (ms since the epoch): periodically, brought
    /// forward to a short random delay once an envelope is held for its sender's list.
    pub fn lists_refresh_due_ms(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let due = self.core.lists_refresh_due_ms(now_ms()) as f64;
        due
    }

    /// The lists to refresh now (JSON array, random order): fetch each on the anonymous
    /// channel and give it to [`Engine::refresh_list`] (or say why not with
    /// [`Engine::refresh_failed`]), then [`Engine::read_held`].
    pub fn lists_to_refresh(&mut self) -> String {
        self.refreshed.clear();
        json!(self.core.lists_to_refresh(now_ms())).to_string()
    }

    /// A list of the running refresh (`signed` of `GET …/device-list`, base64): verified
    /// and kept. A changed master key drops the list held, so that nothing of `user` is read
    /// until the user accepts the key. Returns `""`, or why it did not verify.
    pub fn refresh_list(&mut self, user: &str, signed: &str) -> String {
        let outcome = STANDARD
            .decode(signed)
            .map_err(|_| ClientError::Invalid("the list is not base64".into()))
            .and_then(|bytes| self.core.accept_device_list(user, &bytes, now_ms()));
        let (refreshed, answer) = match outcome {
            Ok(_) => (Refreshed::Accepted, String::new()),
            Err(e @ ClientError::MasterKeyChanged { .. }) => {
                self.core.forget_list(user);
                (Refreshed::KeyChanged, format!("master key changed: {e}"))
            }
            Err(e) => (Refreshed::Failed(e.to_string()), e.to_string()),
        };
        self.refreshed.insert(user.to_owned(), refreshed);
        answer
    }

    /// A list of the running refresh could not be had: `transient` (the broker did not
    /// answer; what is held for `user` stays held) or not (no such list).
    pub fn refresh_failed(&mut self, user: &str, transient: bool) {
        let refreshed = if transient {
            Refreshed::Unavailable
        } else {
            Refreshed::Failed(ClientError::NoDeviceList(user.to_owned()).to_string())
        };
        self.refreshed.insert(user.to_owned(), refreshed);
    }

    /// Reads the held envelopes again, each sender's in order, with what the refresh that
    /// just ran brought (after none: the lists held). Returns the page's events (JSON array);
    /// save afterwards.
    pub fn read_held(&mut self) -> String {
        let refreshed = std::mem::take(&mut self.refreshed);
        let mut out = Vec::new();
        for sender in self.core.held_senders(None) {
            let mut queue = self.core.take_held(&sender).into_iter();
            while let Some(held) = queue.next() {
                let list = match refreshed.get(&sender) {
                    None => SenderList::Cached,
                    Some(Refreshed::Accepted) => SenderList::Refetched,
                    Some(Refreshed::Unavailable) => SenderList::Unavailable(ClientError::Invalid(
                        "the broker did not answer".into(),
                    )),
                    Some(Refreshed::KeyChanged) => {
                        // Kept until the user accepts the new key.
                        out.push(json!({"event": "held", "from": sender, "why": "key_changed"}));
                        self.core.put_back_held(std::iter::once(held).chain(queue));
                        break;
                    }
                    Some(Refreshed::Failed(why)) => {
                        SenderList::Failed(ClientError::Invalid(why.clone()))
                    }
                };
                match self.core.open(held.id(), held.ciphertext(), list, now_ms()) {
                    Ok(opened) if opened.events.is_empty() => {
                        out.push(json!({"event": "contact", "from": opened.from}));
                    }
                    Ok(opened) => out.push(event_json(&opened.events)),
                    Err(Unread::Failed(Failure::Rejected(error))) => {
                        out.push(json!({"event": "rejected", "reason": error.to_string()}));
                    }
                    Err(_) => {
                        self.core.put_back_held(std::iter::once(held).chain(queue));
                        break;
                    }
                }
            }
        }
        Value::Array(out).to_string()
    }

    /// Conversations (JSON: `[{with, verified, key_changed, disappearing_secs, unread,
    /// messages: [{outgoing, device, time_ms, text, file, id, state, expires_ms,
    /// timer_secs}]}]`), most recent first. `verified` is false while `key_changed`.
    /// `disappearing_secs`: the conversation's timer (0: off); `unread`: incoming messages not
    /// yet marked read ([`Engine::mark_read`]). Per message: `id` its envelope id (hex; `""`
    /// for messages stored before ids were kept), `state` `"sending"`, `"sent"`,
    /// `"delivered"` or `"read"` for outgoing messages and `"received"` or `"read"` for
    /// incoming ones, `expires_ms` when it disappears (or null), `timer_secs` null for a
    /// message and a number for a line saying the timer changed (0: off; by this account if
    /// `outgoing`).
    pub fn conversations(&self) -> String {
        let out: Vec<Value> = self
            .core
            .conversations()
            .into_iter()
            .map(|c| {
                let messages: Vec<Value> = c
                    .messages
                    .iter()
                    .map(|m| {
                        let state = match (m.outgoing, m.state) {
                            (false, MessageState::Read) => "read",
                            (false, _) => "received",
                            (true, state) => state.as_str(),
                        };
                        json!({"outgoing": m.outgoing, "device": m.device,
                               "time_ms": m.time_ms, "text": m.text,
                               "file": m.file.as_ref().map(files::file_json),
                               "id": m.id.map(|id| hex(&id.0)).unwrap_or_default(),
                               "state": state, "expires_ms": m.expires_ms,
                               "timer_secs": m.timer_secs})
                    })
                    .collect();
                json!({"with": c.with, "verified": c.verified, "key_changed": c.key_changed,
                       "disappearing_secs": c.disappearing_secs.unwrap_or(0),
                       "unread": c.unread, "missing": c.missing, "messages": messages})
            })
            .collect();
        Value::Array(out).to_string()
    }

    /// Receipts due now, taken out of the engine: JSON `[{to, payload}]`. For each,
    /// [`Engine::encrypt`]`(to, JSON.stringify(payload), "", "")` and send it as usual (durable;
    /// `payload` is `{kind: "receipt", state: "delivered"|"read", ids: [hex]}`). Delivered
    /// receipts are owed for every message and file received; read receipts after
    /// [`Engine::mark_read`]. Call at [`Engine::next_receipts_due_ms`] (ask again after
    /// handling received frames and after `mark_read`); save after. Best effort: a receipt
    /// whose send fails is not owed again.
    pub fn take_receipts(&mut self) -> String {
        envelopes_json(&self.core.take_receipts(now_ms())).to_string()
    }

    /// When the owed receipts are next due (ms since the epoch), or -1 if none are owed: call
    /// [`Engine::take_receipts`] then. Receipts wait a random delay (default 2 to 15 s,
    /// [`Engine::set_receipt_delay`]) so that the broker cannot pair a delivery with the
    /// receipt that answers it.
    pub fn next_receipts_due_ms(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        self.core
            .next_receipts_due_ms()
            .map_or(-1.0, |ms| ms as f64)
    }

    /// Sets the random delay of receipts, ms (default 2000 to 15000).
    pub fn set_receipt_delay(&mut self, min: f64, max: f64) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ms = |v: f64| v.max(0.0) as u64;
        let mut timing = self.core.timing();
        timing.receipt_delay_ms = (ms(min), ms(max));
        self.core.set_timing(timing);
    }

    /// The user has seen the conversation with `peer`: its incoming messages become read.
    /// Returns the ids (hex) newly read, as a JSON array (possibly empty). Unless read
    /// receipts are off, a read receipt for them is owed: then [`Engine::take_receipts`].
    /// Save after.
    pub fn mark_read(&mut self, peer: &str) -> String {
        ids_json(&self.core.mark_read(peer, now_ms())).to_string()
    }

    /// Turns read receipts on or off (kept in the saved state; on by default). Off: none are
    /// sent, and others' are not shown either (their messages stay `"delivered"`). Delivered
    /// receipts always go. Save after.
    pub fn set_read_receipts(&mut self, on: bool) {
        self.core.set_read_receipts(on);
    }

    /// Whether read receipts are on.
    pub fn read_receipts(&self) -> bool {
        self.core.read_receipts()
    }

    /// Sets the disappearing-messages timer of the conversation with `peer`: `secs` 0 turns
    /// it off, else 30 to 2419200 (four weeks); anything else throws. The conversation gets a
    /// line for it (see [`Engine::conversations`]). Returns JSON `[{to, payload}]`: encrypt
    /// each with [`Engine::encrypt`] and send it (to `peer`, and to this account when it may
    /// have other devices). Save after.
    pub fn set_disappearing(&mut self, peer: &str, secs: u32) -> Result<String, JsError> {
        let envelopes = self
            .core
            .set_disappearing(peer, Some(secs), now_ms())
            .map_err(client_err)?;
        Ok(envelopes_json(&envelopes).to_string())
    }

    /// The disappearing-messages timer of the conversation with `peer`, seconds (0: off).
    pub fn disappearing(&self, peer: &str) -> u32 {
        self.core.disappearing(peer).unwrap_or(0)
    }

    /// Deletes the messages whose timer ran out: JSON `[{event: "expired", peer, ids: [hex]}]`
    /// (drop those ids from the screen; may be empty). Call at [`Engine::next_expiry_ms`];
    /// save after if anything went.
    pub fn expire_messages(&mut self) -> String {
        let out: Vec<Value> = self
            .core
            .expire_messages(now_ms())
            .iter()
            .filter_map(conversation_event_json)
            .collect();
        Value::Array(out).to_string()
    }

    /// When the next stored message disappears (ms since the epoch), or -1 if none will.
    pub fn next_expiry_ms(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        self.core.next_expiry_ms().map_or(-1.0, |ms| ms as f64)
    }

    /// A new random call id (hex).
    pub fn new_call_id() -> String {
        hex(&rand::random::<[u8; 16]>())
    }

    // --------------------------------------------------------------------------------------
    // Groups (MLS; see `sealpost_client::engine::groups`). A group message is sent as
    // "parts": `[{id, sealed, frame}]`, each `frame` (base64) a `group_send` for `/v1/sealed`
    // when `sealed`, else for `/v1/ws`; each answered by a `group_send_result`.

    /// Whether this device has made KeyPackages yet (if not: [`Engine::key_package_upload`]).
    pub fn has_key_packages(&self) -> bool {
        self.core.has_key_packages()
    }

    /// The body of `PUT /v1/accounts/{h}/devices/{id}/key-packages` with `count` new
    /// KeyPackages (and a last-resort one the first time). Save before sending it.
    pub fn key_package_upload(&mut self, count: u32) -> Result<String, JsError> {
        let upload = self.core.key_packages(count as usize).map_err(client_err)?;
        Ok(http::key_upload_body(&upload).to_string())
    }

    /// Creates a group named `name` of this device alone; returns its id (hex).
    pub fn create_group(&mut self, name: &str) -> Result<String, JsError> {
        self.core.create_group(name).map_err(client_err)
    }

    /// The groups (JSON: `[{id, name, hub, epoch, left, members: [{user, device, verified}],
    /// last: {from, text, sent_ms} | null}]`).
    pub fn groups(&mut self) -> String {
        let groups: Vec<Value> = self
            .core
            .groups()
            .into_iter()
            .map(|g| {
                let last = self
                    .core
                    .group_messages(&g.id)
                    .ok()
                    .and_then(|m| m.last().cloned())
                    .map(|(from, _, sent_ms, text)| json!({"from": from, "text": text, "sent_ms": sent_ms}));
                json!({"id": g.id, "name": g.name, "hub": g.hub, "epoch": g.epoch,
                       "left": g.left, "last": last,
                       "members": g.members.iter().map(|(user, device, verified)|
                           json!({"user": user, "device": device, "verified": verified}))
                           .collect::<Vec<_>>()})
            })
            .collect();
        Value::Array(groups).to_string()
    }

    /// A group's messages (JSON: `[{from, device, sent_ms, text, outgoing}]`).
    pub fn group_messages(&self, group: &str) -> Result<String, JsError> {
        let own = self.core.user();
        let messages: Vec<Value> = self
            .core
            .group_messages(group)
            .map_err(client_err)?
            .into_iter()
            .map(|(from, device, sent_ms, text)| {
                json!({"from": from, "device": device, "sent_ms": sent_ms, "text": text,
                       "outgoing": from == own})
            })
            .collect();
        Ok(Value::Array(messages).to_string())
    }

    /// Adds devices from their claimed KeyPackages (JSON: `[{user, device, key}]`, `key` as
    /// the claim answered it). Returns `{commit: parts, welcome: parts}`: send the Commit; if
    /// accepted, call [`Engine::group_commit_answer`] with true, then send the Welcome and
    /// [`Engine::group_name_parts`]; on `stale_epoch`, with false, and try again once the
    /// group reached the epoch the answer names.
    pub fn group_add(&mut self, group: &str, claimed: &str) -> Result<String, JsError> {
        let claimed: Vec<Value> =
            serde_json::from_str(claimed).map_err(|_| err("claimed is not a JSON array"))?;
        let claimed = claimed
            .iter()
            .map(|c| {
                let user = c["user"].as_str().ok_or_else(|| err("user missing"))?;
                let device = c["device"]
                    .as_u64()
                    .and_then(|d| u32::try_from(d).ok())
                    .ok_or_else(|| err("device missing"))?;
                let key = http::claimed_key(c).ok_or_else(|| err("key missing"))?;
                Ok((user.to_owned(), device, key))
            })
            .collect::<Result<Vec<_>, JsError>>()?;
        let change = self
            .core
            .add_to_group(group, &claimed)
            .map_err(client_err)?;
        Ok(json!({"commit": parts(&change.commit), "welcome": parts(&change.welcome)}).to_string())
    }

    /// Removes every device of `user` from a group: `{commit: parts, welcome: []}`.
    pub fn group_remove(&mut self, group: &str, user: &str) -> Result<String, JsError> {
        let change = self
            .core
            .remove_from_group(group, user, None)
            .map_err(client_err)?;
        Ok(json!({"commit": parts(&change.commit), "welcome": []}).to_string())
    }

    /// Removes some devices of `user` (JSON array of ids) from a group, as
    /// [`Engine::group_remove`] does all of them.
    pub fn group_remove_devices(
        &mut self,
        group: &str,
        user: &str,
        devices: &str,
    ) -> Result<String, JsError> {
        let devices: Vec<u32> =
            serde_json::from_str(devices).map_err(|_| err("devices is not a JSON array of ids"))?;
        let change = self
            .core
            .remove_from_group(group, user, Some(&devices))
            .map_err(client_err)?;
        Ok(json!({"commit": parts(&change.commit), "welcome": []}).to_string())
    }

    /// How `user`'s devices in a group differ from its verified device list (`listed`, JSON
    /// array of ids): `{gone: [ids in the group, not listed], new: [listed, not in the group]}`.
    pub fn group_device_drift(
        &mut self,
        group: &str,
        user: &str,
        listed: &str,
    ) -> Result<String, JsError> {
        let listed: Vec<u32> =
            serde_json::from_str(listed).map_err(|_| err("listed is not a JSON array of ids"))?;
        let (gone, new) = self
            .core
            .group_device_drift(group, user, &listed)
            .map_err(client_err)?;
        Ok(json!({"gone": gone, "new": new}).to_string())
    }

    /// Leaving a group: parts telling its members (one of them commits the removal).
    pub fn group_leave(&mut self, group: &str) -> Result<String, JsError> {
        let sends = self.core.leave_group(group).map_err(client_err)?;
        Ok(Value::Array(parts(&sends)).to_string())
    }

    /// Whether this device commits the removal of `user`, who asked to leave `group`.
    pub fn is_group_remover(&mut self, group: &str, user: &str) -> bool {
        self.core.is_group_remover(group, user).unwrap_or(false)
    }

    /// The hub's answer to this device's Commit (see [`Engine::group_add`]).
    pub fn group_commit_answer(&mut self, group: &str, accepted: bool) -> Result<(), JsError> {
        self.core.commit_answer(group, accepted).map_err(client_err)
    }

    /// The group's name for its members, after a Welcome: parts.
    pub fn group_name_parts(&mut self, group: &str) -> Result<String, JsError> {
        let sends = self
            .core
            .group_name_for_members(group)
            .map_err(client_err)?;
        Ok(Value::Array(parts(&sends)).to_string())
    }

    /// A text for a group: parts.
    pub fn group_text(&mut self, group: &str, text: &str) -> Result<String, JsError> {
        let sends = self
            .core
            .group_text(group, text, now_ms())
            .map_err(client_err)?;
        Ok(Value::Array(parts(&sends)).to_string())
    }

    /// This account's delivery token for a group just joined or created: parts.
    pub fn group_token_share(&mut self, group: &str) -> Result<String, JsError> {
        let sends = self.core.group_token_share(group).map_err(client_err)?;
        Ok(Value::Array(parts(&sends)).to_string())
    }

    /// Whether this account's delivery token went to the group already (share it with
    /// [`Engine::group_token_share`] before this device first writes to it).
    pub fn group_token_shared(&self, group: &str) -> bool {
        self.core.group_token_shared(group)
    }

    /// A part sent again to the recipients its `group_send_result` (JSON) answered
    /// `stale_devices`, on their current devices; `""` if none was.
    pub fn group_resend(&self, part: &str, result: &str) -> Result<String, JsError> {
        let part: Value = serde_json::from_str(part).map_err(|_| err("part is not JSON"))?;
        let result: Value = serde_json::from_str(result).map_err(|_| err("result is not JSON"))?;
        let frame = part["frame"]
            .as_str()
            .and_then(|f| STANDARD.decode(f).ok())
            .ok_or_else(|| err("part without a frame"))?;
        let frame = ClientFrame::decode(&frame).map_err(err)?;
        let id = match &frame {
            ClientFrame::GroupSend { id, .. } => *id,
            _ => return Err(err("not a group send")),
        };
        let send = engine::GroupSend {
            id,
            frame,
            sealed: part["sealed"].as_bool().unwrap_or(false),
        };
        let stale: Vec<RecipientRefusal> = result["refused"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter(|r| r["code"] == "stale_devices")
                    .map(|r| RecipientRefusal {
                        to: r["to"].as_str().unwrap_or_default().to_owned(),
                        code: ErrorCode::StaleDevices,
                        current_devices: r["current_devices"]
                            .as_array()
                            .map(|d| {
                                d.iter()
                                    .filter_map(|d| d.as_u64().and_then(|d| u32::try_from(d).ok()))
                                    .map(DeviceId)
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(send
            .resend_to_current(&stale)
            .map(|s| parts(std::slice::from_ref(&s))[0].to_string())
            .unwrap_or_default())
    }
}

/// Group sends as the page gets them: `[{id, sealed, frame}]`.
fn parts(sends: &[engine::GroupSend]) -> Vec<Value> {
    sends
        .iter()
        .map(|s| {
            json!({"id": hex(&s.id.0), "sealed": s.sealed,
                        "frame": STANDARD.encode(s.frame.encode())})
        })
        .collect()
}

/// Group events as the page gets them.
fn group_event_json(event: &engine::GroupEvent) -> Value {
    use engine::GroupEvent as G;
    match event {
        G::Message {
            group,
            from,
            device,
            text,
            sent_ms,
        } => json!({"event": "group_message", "group": group, "from": from, "device": device,
                    "text": text, "sent_ms": sent_ms}),
        G::Joined { group, by } => json!({"event": "group_joined", "group": group, "by": by}),
        G::Changed {
            group,
            by,
            added,
            removed,
        } => json!({"event": "group_changed", "group": group, "by": by,
                    "added": added, "removed": removed}),
        G::Removed { group } => json!({"event": "group_removed", "group": group}),
        G::Unverified {
            group,
            user,
            device,
        } => json!({"event": "group_unverified", "group": group, "user": user, "device": device}),
        G::LeaveRequested { group, user } => {
            json!({"event": "group_leave", "group": group, "user": user})
        }
        G::KeyChanged { group, user } => {
            json!({"event": "group_key_changed", "group": group, "user": user})
        }
        G::MaybeMissing { group, from, count } => {
            json!({"event": "group_maybe_missing", "group": group, "from": from, "count": count})
        }
    }
}

/// The frames of a message from `/v1/ws` (the page asks for `batch` messages: a backlog or a
/// burst comes as one), each to give to [`Engine::receive`] in order. (The page's alone: the
/// host build, for tests, has no JS arrays.)
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen]
pub fn unbatch(message: &[u8]) -> Result<Vec<js_sys::Uint8Array>, JsError> {
    Ok(ServerFrame::unbatch(message)
        .map_err(err)?
        .iter()
        .map(|frame| js_sys::Uint8Array::from(&frame[..]))
        .collect())
}

/// The DTLS fingerprint (`"sha-256 AB:CD:…"`) of an SDP's `a=fingerprint` line, normalised
/// (lower-case algorithm, upper-case hex), or `""` if it has none or several different ones.
#[wasm_bindgen]
pub fn sdp_fingerprint(sdp: &str) -> String {
    let mut found: Option<String> = None;
    for line in sdp.lines() {
        let Some(rest) = line.trim().strip_prefix("a=fingerprint:") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(alg), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            return String::new();
        };
        let normal = format!(
            "{} {}",
            alg.to_ascii_lowercase(),
            value.to_ascii_uppercase()
        );
        match &found {
            Some(f) if *f != normal => return String::new(),
            _ => found = Some(normal),
        }
    }
    found.unwrap_or_default()
}

/// Whether two fingerprints (as [`sdp_fingerprint`] gives them) are the same certificate.
/// Constant-time is not needed (fingerprints are public), exactness is.
#[wasm_bindgen]
pub fn fingerprints_match(a: &str, b: &str) -> bool {
    !a.is_empty() && a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests;
