//! The browser client's engine: the client's cryptographic core (`sealpost_client::crypto`)
//! and the wire codec (`sealpost_proto`), compiled to wasm with wasm-bindgen.
//!
//! The page (`web/static/app.js`) does the networking — `fetch` for the HTTP API, WebSockets
//! for `/v1/ws` and `/v1/sealed`, WebRTC for media — and asks the [`Engine`] for everything that
//! touches a key or a plaintext: it never sees a secret key, and every byte it sends to the
//! broker was encrypted and sealed here. The protocol is the Rust SDK's (see
//! `client/src/sdk.rs`): signed device lists pinned on first use, one Olm session per device,
//! sealed sender, the delivery token shared before the first message so that everything after
//! it travels on the anonymous `/v1/sealed` connection.
//!
//! # The page's side of the protocol
//!
//! ```text
//! register:  PendingAccount::create(handle) → POST /v1/accounts {identity_keys}
//!            → pending.finish(device, token) = Engine → PUT keys (engine.key_upload()),
//!            PUT device-list (engine.own_device_list()), PUT delivery-token
//! send:      GET device-list → engine.accept_device_list()
//!            → for engine.devices_without_session(): POST …/keys/claim (engine.claim_headers())
//!              → engine.create_session()
//!            → engine.encrypt(to, payload) → frame on /v1/sealed or /v1/ws → send_result
//!              (stale_devices: refetch the list, encrypt again with the same id)
//! receive:   engine.receive(frame) → events, or "need_list" (fetch it, accept it, receive the
//!            same frame again) → save → engine.ack_frame(seqs)
//! link:      existing device: POST …/link-codes → engine.link_code() shown to the user; on
//!            "need_broker_keys", engine.receive_link_request() with GET …/devices → publish
//!            the new signed list → send {kind: "link_grant"} to the own account.
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
//! encrypted under a 32-byte local key (XChaCha20-Poly1305, the client's state-file format);
//! the page keeps both in the origin's storage. That protects nothing against a script running
//! in the origin — which is why the page is served with a strict Content-Security-Policy —
//! but keeps the blob useless on its own.

use std::collections::{BTreeMap, VecDeque};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rand::RngCore as _;
use sealpost_client::crypto::{
    CallId, ClientState, DeviceKeys, DeviceList, DeviceListError, GrantContact, LocalKey,
    MasterKey, PLACEHOLDER_BYTES, Payload, PinResult, PublicDeviceKeys, SeenIds, SenderInfo,
    SignedDeviceList, SignedOneTimeKey,
    link::{LINK_SECRET_BYTES, link_proof, proof_matches},
    open, placeholder, safety_number, seal,
};
use sealpost_proto::{
    Class, ClientFrame, Copy, DeviceId, EnvelopeId, Handle, Notice, SendOutcome, ServerFrame,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;
use zeroize::Zeroizing;

/// One-time keys a device keeps published.
const ONE_TIME_KEYS: usize = 50;
/// Time-to-live of messages (durable class).
const MESSAGE_TTL_SECS: u32 = 30 * 24 * 3600;
/// Time-to-live of call signaling (urgent class): the ring time.
pub const CALL_TTL_SECS: u32 = 60;
/// Delivery token length.
const DELIVERY_TOKEN_BYTES: usize = 32;
/// Messages kept per conversation.
const MESSAGES_PER_CONVERSATION: usize = 500;
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

fn check_handle(handle: &str) -> Result<(), JsError> {
    Handle::parse(handle)
        .map(|_| ())
        .map_err(|e| err(format!("invalid handle: {e}")))
}

/// A verified device list as last accepted.
#[derive(Clone, Serialize, Deserialize)]
struct CachedList {
    version: u64,
    devices: Vec<(u32, ByteBuf)>,
    master_key: ByteBuf,
    fetched_ms: u64,
}

impl CachedList {
    fn from_list(list: &DeviceList) -> Self {
        CachedList {
            version: list.version,
            devices: list
                .devices
                .iter()
                .map(|(id, k)| (*id, ByteBuf::from(k.to_bytes().to_vec())))
                .collect(),
            master_key: ByteBuf::from(list.master_key.to_vec()),
            fetched_ms: now_ms(),
        }
    }

    fn device(&self, id: u32) -> Option<PublicDeviceKeys> {
        self.devices
            .iter()
            .find(|(d, _)| *d == id)
            .and_then(|(_, k)| PublicDeviceKeys::from_bytes(k).ok())
    }

    fn ids(&self) -> Vec<u32> {
        self.devices.iter().map(|(d, _)| *d).collect()
    }

    fn master(&self) -> [u8; 32] {
        self.master_key.as_slice().try_into().unwrap_or([0; 32])
    }
}

/// One message of a conversation.
#[derive(Clone, Serialize, Deserialize)]
struct StoredMessage {
    outgoing: bool,
    device: u32,
    time_ms: u64,
    body: String,
}

/// What this device knows about one contact.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Contact {
    delivery_token: Option<ByteBuf>,
    token_shared: bool,
    verified: bool,
    list: Option<CachedList>,
    messages: VecDeque<StoredMessage>,
}

/// The page's record, kept inside the encrypted state next to the ratchets (MessagePack,
/// positional; new fields at the end with `#[serde(default)]`).
#[derive(Default, Serialize, Deserialize)]
struct Record {
    device_token: ByteBuf,
    delivery_token: ByteBuf,
    next_key_id: u64,
    contacts: BTreeMap<String, Contact>,
    seen: SeenIds,
    /// Link codes this device issued: (secret, expiry ms).
    #[serde(default)]
    pending_links: Vec<(ByteBuf, u64)>,
    /// While this device is being linked: the link code's secret.
    #[serde(default)]
    linking: Option<ByteBuf>,
    /// A device this one just accepted, waiting for its grant: (device, secret).
    #[serde(default)]
    approving: Option<(u32, ByteBuf)>,
}

impl Record {
    fn decode(bytes: &[u8]) -> Option<Self> {
        rmp_serde::from_slice(bytes).ok()
    }

    fn add_message(&mut self, with: &str, message: StoredMessage) {
        let c = self.contacts.entry(with.to_owned()).or_default();
        c.messages.push_back(message);
        while c.messages.len() > MESSAGES_PER_CONVERSATION {
            c.messages.pop_front();
        }
    }
}

/// A new account's keys, before the broker has assigned the device id.
#[wasm_bindgen]
pub struct PendingAccount {
    handle: String,
    master: MasterKey,
    device: DeviceKeys,
}

#[wasm_bindgen]
impl PendingAccount {
    /// Generates the master key, the device keys and its one-time keys for `handle`.
    pub fn create(handle: &str) -> Result<PendingAccount, JsError> {
        check_handle(handle)?;
        let mut device = DeviceKeys::generate();
        device.generate_one_time_keys(ONE_TIME_KEYS);
        Ok(PendingAccount {
            handle: handle.to_owned(),
            master: MasterKey::generate(),
            device,
        })
    }

    /// The device's public keys, base64, for `POST /v1/accounts`.
    pub fn identity_keys(&self) -> String {
        STANDARD.encode(self.device.public_keys().to_bytes())
    }

    /// This browser was added to an existing account with a link code (`POST …/devices` with
    /// its broker part): `device` and `token` from the broker's answer, `secret` the code's
    /// secret part. The engine then sends a link request and waits for the grant.
    pub fn finish_link(self, device: u32, token: &str, secret: &str) -> Result<Engine, JsError> {
        let token = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| err("the broker's token is not base64url"))?;
        let secret = URL_SAFE_NO_PAD
            .decode(secret)
            .ok()
            .filter(|s| s.len() == LINK_SECRET_BYTES)
            .ok_or_else(|| {
                err("malformed link code: type it exactly as the other device shows it")
            })?;
        // The master key is replaced by the grant; this one is never used.
        let state = ClientState::new(self.handle, device, self.master, self.device);
        Ok(Engine {
            state,
            record: Record {
                device_token: ByteBuf::from(token),
                linking: Some(ByteBuf::from(secret)),
                ..Record::default()
            },
        })
    }

    /// The account exists: `device` and `token` (base64url) from the broker's answer.
    pub fn finish(self, device: u32, token: &str) -> Result<Engine, JsError> {
        let token = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| err("the broker's token is not base64url"))?;
        let mut delivery_token = [0u8; DELIVERY_TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut delivery_token);
        let state = ClientState::new(self.handle, device, self.master, self.device);
        Ok(Engine {
            state,
            record: Record {
                device_token: ByteBuf::from(token),
                delivery_token: ByteBuf::from(delivery_token.to_vec()),
                ..Record::default()
            },
        })
    }
}

/// One device of one account. See the module doc.
#[wasm_bindgen]
pub struct Engine {
    state: ClientState,
    record: Record,
}

/// What a payload given as JSON by the page is, and how it travels.
struct Outgoing {
    payload: Payload,
    class: Class,
    ttl_secs: u32,
    /// Text to add to the conversation once encrypted.
    text: Option<String>,
    /// `payload` goes to this device only; the others get `others` (link grants).
    only_for: Option<(u32, Payload)>,
}

fn call_id_of(v: &Value) -> Result<CallId, JsError> {
    unhex::<16>(
        v["call_id"]
            .as_str()
            .ok_or_else(|| err("call_id missing"))?,
    )
}

fn str_of(v: &Value, key: &str) -> Result<String, JsError> {
    v[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| err(format!("{key} missing")))
}

/// A payload as the JSON the page gets (`kind` plus fields; call ids in hex).
fn payload_json(payload: &Payload) -> Value {
    match payload {
        Payload::Text { body } => json!({"kind": "text", "body": body}),
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
        _ => json!({"kind": "other"}),
    }
}

/// What the page must fetch before an envelope can be opened.
enum Need {
    /// The signed device list of this user.
    List(String),
    /// The broker's (unsigned) device keys of our own account: a device being linked.
    BrokerKeys,
}

impl Engine {
    fn has_pending_link(&self) -> bool {
        let now = now_ms();
        self.record.pending_links.iter().any(|(_, exp)| *exp > now)
    }

    /// On a device being linked: checks the grant (proof of the code's secret, and the master
    /// key that signs the list we pinned) and becomes a full device of the account.
    fn accept_grant(
        &mut self,
        master_key: &[u8; 32],
        delivery_token: &[u8],
        contacts: Vec<GrantContact>,
        proof: &[u8; 32],
    ) -> Result<Value, String> {
        let own = self.state.user().to_owned();
        let secret = self
            .record
            .linking
            .clone()
            .ok_or("a link grant, but this device is not being linked")?;
        let master = MasterKey::from_bytes(master_key);
        let master_public = master.public_key();
        let keys = self.state.device.public_keys().to_bytes();
        let expected = link_proof(
            &secret,
            b"grant",
            &own,
            self.state.device_id(),
            &[&keys, &master_public],
        );
        if !proof_matches(proof, &expected) || self.state.pins.pinned(&own) != Some(master_public) {
            return Err("link grant with a wrong proof or master key".into());
        }
        self.state.master_key = master;
        self.record.delivery_token = ByteBuf::from(delivery_token.to_vec());
        self.record.linking = None;
        for c in contacts {
            // The grant comes from our own account: it overrides anything pinned meanwhile.
            if let PinResult::Changed { .. } = self.state.pins.check(&c.handle, &c.master_key) {
                self.state.pins.accept_change(&c.handle, &c.master_key);
                if let Some(contact) = self.record.contacts.get_mut(&c.handle) {
                    contact.list = None;
                }
            }
            let contact = self.record.contacts.entry(c.handle).or_default();
            contact.delivery_token = c.delivery_token.map(|t| ByteBuf::from(t.to_vec()));
            contact.verified = c.verified;
            contact.token_shared = true;
        }
        if let Some(list) = self
            .record
            .contacts
            .get_mut(&own)
            .and_then(|c| c.list.as_mut())
        {
            list.fetched_ms = 0;
        }
        Ok(json!({"event": "linked"}))
    }

    fn parse_outgoing(&self, v: &Value) -> Result<Outgoing, JsError> {
        let call = |payload| Outgoing {
            payload,
            class: Class::Urgent,
            ttl_secs: CALL_TTL_SECS,
            text: None,
            only_for: None,
        };
        let durable = |payload| Outgoing {
            payload,
            class: Class::Durable,
            ttl_secs: MESSAGE_TTL_SECS,
            text: None,
            only_for: None,
        };
        Ok(match v["kind"].as_str().unwrap_or_default() {
            "text" => {
                let body = str_of(v, "body")?;
                Outgoing {
                    text: Some(body.clone()),
                    ..durable(Payload::Text { body })
                }
            }
            "sent" => durable(Payload::Sent {
                to: str_of(v, "to")?,
                body: str_of(v, "body")?,
            }),
            "delivery_token" => durable(Payload::DeliveryToken {
                token: Zeroizing::new(self.record.delivery_token.to_vec()),
            }),
            "link_request" => {
                let secret = self
                    .record
                    .linking
                    .as_ref()
                    .ok_or_else(|| err("this device is not being linked"))?;
                let keys = self.state.device.public_keys().to_bytes();
                durable(Payload::LinkRequest {
                    keys: keys.to_vec(),
                    proof: link_proof(
                        secret,
                        b"request",
                        self.state.user(),
                        self.state.device_id(),
                        &[&keys],
                    ),
                })
            }
            "link_grant" => {
                let (device, secret) = self
                    .record
                    .approving
                    .clone()
                    .ok_or_else(|| err("no device is waiting for a grant"))?;
                let keys = self
                    .list_of(self.state.user())
                    .and_then(|l| l.device(device))
                    .ok_or_else(|| err("the new device is not in the signed list"))?;
                let master_public = self.state.master_key.public_key();
                let grant = Payload::LinkGrant {
                    master_key: self.state.master_key.to_bytes(),
                    delivery_token: Zeroizing::new(self.record.delivery_token.to_vec()),
                    contacts: self
                        .record
                        .contacts
                        .iter()
                        .filter(|(h, _)| *h != self.state.user())
                        .filter_map(|(handle, c)| {
                            Some(GrantContact {
                                handle: handle.clone(),
                                master_key: self.state.pins.pinned(handle)?,
                                delivery_token: c
                                    .delivery_token
                                    .as_ref()
                                    .map(|t| Zeroizing::new(t.to_vec())),
                                verified: c.verified,
                            })
                        })
                        .collect(),
                    proof: link_proof(
                        &secret,
                        b"grant",
                        self.state.user(),
                        device,
                        &[&keys.to_bytes(), &master_public],
                    ),
                };
                Outgoing {
                    only_for: Some((device, grant)),
                    ..durable(Payload::DeviceLinked { device })
                }
            }
            "call_offer" => call(Payload::CallOffer {
                call_id: call_id_of(v)?,
                sdp: str_of(v, "sdp")?,
                dtls_fingerprint: str_of(v, "fingerprint")?,
                video: v["video"].as_bool().unwrap_or(false),
            }),
            "call_answer" => call(Payload::CallAnswer {
                call_id: call_id_of(v)?,
                sdp: str_of(v, "sdp")?,
                dtls_fingerprint: str_of(v, "fingerprint")?,
            }),
            "ice_candidate" => call(Payload::IceCandidate {
                call_id: call_id_of(v)?,
                candidate: str_of(v, "candidate")?,
                sdp_mid: v["sdp_mid"].as_str().unwrap_or_default().to_owned(),
                sdp_m_line_index: v["sdp_m_line_index"]
                    .as_u64()
                    .and_then(|i| u16::try_from(i).ok())
                    .unwrap_or(0),
            }),
            "hang_up" => call(Payload::HangUp {
                call_id: call_id_of(v)?,
            }),
            "busy" => call(Payload::Busy {
                call_id: call_id_of(v)?,
            }),
            "decline" => call(Payload::Decline {
                call_id: call_id_of(v)?,
            }),
            "answered_elsewhere" => call(Payload::AnsweredElsewhere {
                call_id: call_id_of(v)?,
                device: self.state.device_id(),
            }),
            other => return Err(err(format!("unknown payload kind {other:?}"))),
        })
    }

    fn list_of(&self, user: &str) -> Option<&CachedList> {
        self.record.contacts.get(user).and_then(|c| c.list.as_ref())
    }

    fn sender(&self) -> SenderInfo {
        SenderInfo {
            user: self.state.user().to_owned(),
            device: self.state.device_id(),
        }
    }

    /// Opens and decrypts one delivered envelope; `Ok(Err(need))` asks the page for a list.
    fn open_envelope(
        &mut self,
        ciphertext: &[u8],
        refetched: bool,
    ) -> Result<Result<Value, Need>, String> {
        let own = self.state.user().to_owned();
        let unsealed = open(
            &own,
            self.state.device_id(),
            self.state.device.seal_secret(),
            ciphertext,
        )
        .map_err(|e| format!("does not open on this device: {e}"))?;
        let sender = unsealed.sender;
        if sender.user == own && sender.device == self.state.device_id() {
            return Err("claims to come from this device".into());
        }
        let keys = match self.list_of(&sender.user) {
            Some(list) => match list.device(sender.device) {
                Some(keys) => keys,
                // A device of our own account that the signed list does not vouch for yet:
                // only a link request for a code we issued is accepted that way.
                None if refetched && sender.user == own && self.has_pending_link() => {
                    return Ok(Err(Need::BrokerKeys));
                }
                None if refetched => {
                    return Err(format!(
                        "sender device {} is not in its signed device list",
                        sender.device
                    ));
                }
                None => return Ok(Err(Need::List(sender.user))),
            },
            None if refetched => return Err("the sender has no verified device list".into()),
            None => return Ok(Err(Need::List(sender.user))),
        };
        let payload = self
            .state
            .sessions
            .decrypt(
                &mut self.state.device,
                &sender,
                &keys,
                &unsealed.olm_message,
            )
            .map_err(|e| format!("rejected: {e}"))?;
        let from_own = sender.user == own;
        let sent_ms = unsealed.timestamp_ms;
        let event = match payload {
            Payload::Text { body } if !from_own => {
                self.record.add_message(
                    &sender.user,
                    StoredMessage {
                        outgoing: false,
                        device: sender.device,
                        time_ms: sent_ms,
                        body: body.clone(),
                    },
                );
                json!({"event": "message", "from": sender.user, "device": sender.device,
                       "sent_ms": sent_ms, "text": body})
            }
            Payload::DeliveryToken { token } if !from_own => {
                self.record
                    .contacts
                    .entry(sender.user.clone())
                    .or_default()
                    .delivery_token = Some(ByteBuf::from(token.to_vec()));
                json!({"event": "contact", "from": sender.user})
            }
            Payload::LinkGrant {
                master_key,
                delivery_token,
                contacts,
                proof,
            } if from_own => self.accept_grant(&master_key, &delivery_token, contacts, &proof)?,
            Payload::DeviceLinked { device } if from_own => {
                // Our list changed: fetch it again before the next send.
                if let Some(list) = self
                    .record
                    .contacts
                    .get_mut(&own)
                    .and_then(|c| c.list.as_mut())
                {
                    list.fetched_ms = 0;
                }
                json!({"event": "device_linked", "device": device})
            }
            Payload::AnsweredElsewhere { .. } if from_own => {
                json!({"event": "call", "from": sender.user, "device": sender.device,
                       "sent_ms": sent_ms, "payload": payload_json(&payload)})
            }
            Payload::CallOffer { .. }
            | Payload::CallAnswer { .. }
            | Payload::IceCandidate { .. }
            | Payload::HangUp { .. }
            | Payload::Busy { .. }
            | Payload::Decline { .. }
                if !from_own =>
            {
                json!({"event": "call", "from": sender.user, "device": sender.device,
                       "sent_ms": sent_ms, "payload": payload_json(&payload)})
            }
            Payload::Sent { to, body } if from_own => {
                self.record.add_message(
                    &to,
                    StoredMessage {
                        outgoing: true,
                        device: sender.device,
                        time_ms: sent_ms,
                        body: body.clone(),
                    },
                );
                json!({"event": "sent_elsewhere", "to": to, "device": sender.device, "text": body})
            }
            // Link requests from listed devices and payloads that make no sense from this
            // sender: nothing to show.
            _ => json!({"event": "ignored"}),
        };
        Ok(Ok(event))
    }
}

#[wasm_bindgen]
impl Engine {
    /// A new random local key (base64) for [`Engine::save`].
    pub fn new_local_key() -> String {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        STANDARD.encode(key.as_ref())
    }

    /// Restores a state saved with [`Engine::save`].
    pub fn load(bytes: &[u8], local_key: &str) -> Result<Engine, JsError> {
        let key = local_key_from(local_key)?;
        let state = ClientState::from_encrypted_bytes(bytes, &key).map_err(err)?;
        let record = Record::decode(&state.app_data).ok_or_else(|| err("malformed state"))?;
        Ok(Engine { state, record })
    }

    /// The state, encrypted under `local_key` (base64).
    pub fn save(&mut self, local_key: &str) -> Result<Vec<u8>, JsError> {
        let key = local_key_from(local_key)?;
        self.state.app_data =
            Zeroizing::new(rmp_serde::to_vec(&self.record).map_err(|_| err("encoding state"))?);
        Ok(self.state.to_encrypted_bytes(&key))
    }

    /// This account's handle.
    pub fn handle(&self) -> String {
        self.state.user().to_owned()
    }

    /// This device's id.
    pub fn device_id(&self) -> u32 {
        self.state.device_id()
    }

    /// `Bearer <device>.<token>` for authenticated HTTP requests.
    pub fn bearer(&self) -> String {
        format!(
            "Bearer {}.{}",
            self.state.device_id(),
            URL_SAFE_NO_PAD.encode(&self.record.device_token)
        )
    }

    /// The body of `PUT /v1/accounts/{h}/delivery-token`: this account's token; sealed
    /// envelopes only from contacts holding it.
    pub fn delivery_token_body(&self) -> String {
        json!({"token": URL_SAFE_NO_PAD.encode(&self.record.delivery_token),
               "unrestricted": false})
        .to_string()
    }

    /// Generates one-time keys up to the target when the directory holds `have`.
    pub fn top_up_keys(&mut self, have: u32) {
        let have = usize::try_from(have).unwrap_or(usize::MAX);
        if have < ONE_TIME_KEYS {
            let missing = ONE_TIME_KEYS - have;
            self.state.device.generate_one_time_keys(
                missing.min(self.state.device.max_published_one_time_keys()),
            );
        }
    }

    /// The body of `PUT /v1/accounts/{h}/devices/{id}/keys` for the keys not yet published,
    /// or `""` if there are none; call [`Engine::mark_keys_published`] once it succeeded.
    pub fn key_upload(&mut self) -> String {
        let unpublished = self.state.device.unpublished_keys();
        if unpublished.one_time.is_empty() && unpublished.fallback.is_none() {
            return String::new();
        }
        let mut next = self.record.next_key_id;
        let mut take = || {
            next += 1;
            next
        };
        let one_time: Vec<Value> = unpublished
            .one_time
            .iter()
            .map(|k| json!({"key_id": take(), "key": STANDARD.encode(k.to_bytes())}))
            .collect();
        let mut body = json!({ "one_time_keys": one_time });
        if let Some(f) = unpublished.fallback {
            body["fallback_key"] = json!({"key_id": take(), "key": STANDARD.encode(f.to_bytes())});
        }
        self.record.next_key_id = next;
        body.to_string()
    }

    /// The keys of [`Engine::key_upload`] are published.
    pub fn mark_keys_published(&mut self) {
        self.state.device.mark_keys_as_published();
    }

    /// The body of `PUT /v1/accounts/{h}/device-list`: this device, signed by the master key
    /// (a single-device account, version 1). Once the broker stored it, the page calls
    /// [`Engine::confirm_own_list`].
    pub fn own_device_list(&mut self) -> Result<String, JsError> {
        let list = DeviceList {
            user: self.state.user().to_owned(),
            version: 1,
            devices: vec![(self.state.device_id(), self.state.device.public_keys())],
            master_key: self.state.master_key.public_key(),
        };
        let signed = list.sign(&self.state.master_key).map_err(err)?;
        Ok(json!({"signed": STANDARD.encode(signed.to_bytes())}).to_string())
    }

    /// Records our own list (a `PUT …/device-list` body this engine made) as published, once
    /// the broker stored it: its version is pinned only then, so a refused PUT leaves the
    /// broker's list and ours in agreement.
    pub fn confirm_own_list(&mut self, body: &str) -> Result<(), JsError> {
        let body: Value = serde_json::from_str(body).map_err(err)?;
        let bytes = STANDARD
            .decode(body["signed"].as_str().unwrap_or_default())
            .map_err(err)?;
        let signed = SignedDeviceList::from_bytes(&bytes).map_err(err)?;
        let user = self.state.user().to_owned();
        let verified = self
            .state
            .pins
            .verify_device_list(&user, &signed)
            .map_err(err)?;
        self.record.contacts.entry(user).or_default().list = Some(CachedList::from_list(&verified));
        Ok(())
    }

    /// Verifies `user`'s signed device list (the `signed` field of `GET …/device-list`, base64)
    /// against the pinned master key (pinned now if this is the first), the signature and
    /// version rollback, and keeps it. Returns `{devices, safety_number, verified}`.
    ///
    /// Throws `master key changed: …` if the list is signed by another master key than the
    /// pinned one: nothing may be sent to or accepted from `user` until the user compares the
    /// new safety number.
    pub fn accept_device_list(&mut self, user: &str, signed: &str) -> Result<String, JsError> {
        check_handle(user)?;
        let blob = STANDARD
            .decode(signed)
            .map_err(|_| err("device list is not base64"))?;
        let signed = SignedDeviceList::from_bytes(&blob).map_err(err)?;
        let list = match self.state.pins.verify_device_list(user, &signed) {
            Ok(list) => list,
            Err(DeviceListError::MasterKeyMismatch { got, .. }) => {
                let number = safety_number(
                    self.state.user(),
                    &self.state.master_key.public_key(),
                    user,
                    &got,
                );
                return Err(err(format!(
                    "master key changed: the master key of {user} is not the one you verified \
                     before; new safety number {number}. Nothing was sent."
                )));
            }
            Err(e) => {
                return Err(err(format!(
                    "the device list of {user} does not verify: {e}"
                )));
            }
        };
        let contact = self.record.contacts.entry(user.to_owned()).or_default();
        if let Some(old) = &contact.list {
            for id in old.ids() {
                if list.device(id).is_none() {
                    self.state.sessions.forget(user, id);
                }
            }
        }
        contact.list = Some(CachedList::from_list(&list));
        self.list_summary(user)
    }

    /// `{devices, safety_number, verified, fetched_ms}` for a list accepted before, or `""`.
    pub fn known_list(&self, user: &str) -> Result<String, JsError> {
        if self.list_of(user).is_none() {
            return Ok(String::new());
        }
        self.list_summary(user)
    }

    fn list_summary(&self, user: &str) -> Result<String, JsError> {
        let list = self
            .list_of(user)
            .ok_or_else(|| err("no verified device list"))?;
        Ok(json!({
            "devices": list.ids(),
            "safety_number": safety_number(
                self.state.user(),
                &self.state.master_key.public_key(),
                user,
                &list.master(),
            ).to_string(),
            "verified": self.record.contacts.get(user).is_some_and(|c| c.verified),
            "fetched_ms": list.fetched_ms,
        })
        .to_string())
    }

    /// The safety number with `user` (whose list was accepted).
    pub fn safety_number(&self, user: &str) -> Result<String, JsError> {
        let list = self
            .list_of(user)
            .ok_or_else(|| err("no verified device list"))?;
        Ok(safety_number(
            self.state.user(),
            &self.state.master_key.public_key(),
            user,
            &list.master(),
        )
        .to_string())
    }

    /// The user compared the safety number with `user` and it matched.
    pub fn mark_verified(&mut self, user: &str) {
        self.record
            .contacts
            .entry(user.to_owned())
            .or_default()
            .verified = true;
    }

    /// Devices in `user`'s verified list this device has no Olm session with, for their
    /// current keys (JSON array).
    pub fn devices_without_session(&mut self, user: &str) -> String {
        let own = (user == self.state.user()).then(|| self.state.device_id());
        let listed: Vec<(u32, PublicDeviceKeys)> = self
            .list_of(user)
            .map(|list| {
                list.ids()
                    .into_iter()
                    .filter_map(|d| Some((d, list.device(d)?)))
                    .collect()
            })
            .unwrap_or_default();
        let sessions = &mut self.state.sessions;
        let ids: Vec<u32> = listed
            .into_iter()
            .filter(|(d, keys)| Some(*d) != own && !sessions.has_current_session(user, *d, keys))
            .map(|(d, _)| d)
            .collect();
        json!(ids).to_string()
    }

    /// Headers for claiming one of `user`'s keys (JSON object): its delivery token if we hold
    /// it (the claim then names nobody), else this device's credentials.
    pub fn claim_headers(&self, user: &str) -> String {
        match self
            .record
            .contacts
            .get(user)
            .and_then(|c| c.delivery_token.as_ref())
        {
            Some(t) if user != self.state.user() => {
                json!({"sealpost-delivery-token": URL_SAFE_NO_PAD.encode(t)}).to_string()
            }
            _ => json!({"authorization": self.bearer(), "sealpost-account": self.state.user()})
                .to_string(),
        }
    }

    /// Starts an Olm session with `user`'s `device` from a claimed key (`key` of the claim's
    /// answer, base64), after checking the key's signature by that device.
    pub fn create_session(&mut self, user: &str, device: u32, key: &str) -> Result<(), JsError> {
        let keys = self
            .list_of(user)
            .and_then(|l| l.device(device))
            .ok_or_else(|| err("device not in the verified list"))?;
        let bytes = STANDARD
            .decode(key)
            .map_err(|_| err("claimed key is not base64"))?;
        let otk = SignedOneTimeKey::from_bytes(&bytes).map_err(err)?;
        self.state
            .sessions
            .create_outbound(&self.state.device, user, device, &keys, &otk)
            .map_err(err)
    }

    /// Whether the delivery token was already sent to `user`.
    pub fn token_shared(&self, user: &str) -> bool {
        self.record
            .contacts
            .get(user)
            .is_some_and(|c| c.token_shared)
    }

    /// The delivery token reached `user`.
    pub fn mark_token_shared(&mut self, user: &str) {
        self.record
            .contacts
            .entry(user.to_owned())
            .or_default()
            .token_shared = true;
    }

    /// Whether envelopes to `user` go over the anonymous `/v1/sealed` connection.
    pub fn sends_sealed_to(&self, user: &str) -> bool {
        self.record
            .contacts
            .get(user)
            .is_some_and(|c| c.delivery_token.is_some())
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
        check_handle(to)?;
        let v: Value = serde_json::from_str(payload).map_err(|_| err("payload is not JSON"))?;
        let outgoing = self.parse_outgoing(&v)?;
        let list = self
            .list_of(to)
            .cloned()
            .ok_or_else(|| err("no verified device list"))?;
        let devices: Vec<u32> = if devices.is_empty() {
            list.ids()
        } else {
            serde_json::from_str(devices).map_err(|_| err("devices is not a JSON array"))?
        };
        let retry = !id.is_empty();
        let id = if retry {
            EnvelopeId(unhex::<16>(id)?)
        } else {
            EnvelopeId(rand::random())
        };
        let sender = self.sender();
        let own = to == self.state.user();
        if own {
            // Our own copy comes back to us: recognised by its id and acked unread.
            self.record.seen.insert(id.0);
        }
        let mut copies = BTreeMap::new();
        let mut placeholders = Vec::new();
        for &device in &devices {
            let keys = match list.device(device) {
                Some(keys) if !(own && device == sender.device) => keys,
                _ => {
                    placeholders.push(device);
                    continue;
                }
            };
            if !self.state.sessions.has_current_session(to, device, &keys) {
                return Err(err(format!(
                    "no session with device {device}; claim a key first"
                )));
            }
            let payload = match &outgoing.only_for {
                Some((d, special)) if *d == device => special,
                _ => &outgoing.payload,
            };
            let olm = self
                .state
                .sessions
                .encrypt(to, device, payload)
                .map_err(err)?;
            let sealed =
                seal(to, device, &keys.seal_x25519, &sender, now_ms(), &olm).map_err(err)?;
            copies.insert(device, sealed);
        }
        let size = copies.values().next().map_or(PLACEHOLDER_BYTES, Vec::len);
        for device in placeholders {
            copies.insert(device, placeholder(size));
        }
        if let Some(text) = outgoing.text.filter(|_| !retry) {
            self.record.add_message(
                to,
                StoredMessage {
                    outgoing: true,
                    device: self.state.device_id(),
                    time_ms: now_ms(),
                    body: text,
                },
            );
        }
        let copies: Vec<Copy> = copies
            .into_iter()
            .map(|(d, c)| Copy {
                device: DeviceId(d),
                ciphertext: c,
            })
            .collect();
        let token = if own {
            Some(self.record.delivery_token.clone()).filter(|t| !t.is_empty())
        } else {
            self.record
                .contacts
                .get(to)
                .and_then(|c| c.delivery_token.clone())
        };
        let sealed = token.is_some();
        let frame = match token {
            Some(token) => ClientFrame::SealedSend {
                id,
                to: to.to_owned(),
                class: outgoing.class,
                ttl_secs: outgoing.ttl_secs,
                copies,
                delivery_token: Some(token.into_vec()),
            },
            None => ClientFrame::Send {
                id,
                to: to.to_owned(),
                class: outgoing.class,
                ttl_secs: outgoing.ttl_secs,
                copies,
            },
        };
        Ok(
            json!({"id": hex(&id.0), "sealed": sealed, "frame": STANDARD.encode(frame.encode())})
                .to_string(),
        )
    }

    /// A link code to show on this device for linking a new one: `broker_code` from `POST
    /// /v1/accounts/{h}/link-codes`, plus a secret the broker never sees. Valid until
    /// `expires_ms` (from the same answer).
    pub fn link_code(&mut self, broker_code: &str, expires_ms: f64) -> String {
        let mut secret = Zeroizing::new([0u8; LINK_SECRET_BYTES]);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        let now = now_ms();
        self.record.pending_links.retain(|(_, exp)| *exp > now);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let expires = expires_ms as u64;
        self.record
            .pending_links
            .push((ByteBuf::from(secret.to_vec()), expires));
        format!("{broker_code}.{}", URL_SAFE_NO_PAD.encode(secret.as_ref()))
    }

    /// Whether this device is being linked (waiting for the grant).
    pub fn is_linking(&self) -> bool {
        self.record.linking.is_some()
    }

    /// After [`Engine::receive`] answered `need_broker_keys`: opens the envelope with the
    /// keys the broker lists for the sending device of our own account (`devices` of `GET
    /// /v1/accounts/{own}/devices`, JSON). Only a link request whose proof matches a code this
    /// device issued is accepted: the device is added to the account's signed list, returned
    /// as `{event: "link_request", device, signed}` — publish `signed` (`PUT …/device-list`),
    /// then send `{kind: "link_grant"}` to the own account. Anything else is rejected.
    pub fn receive_link_request(&mut self, frame: &[u8], devices: &str) -> Result<String, JsError> {
        let ServerFrame::Deliver { seq, envelope } = ServerFrame::decode(frame).map_err(err)?
        else {
            return Err(err("not a delivery"));
        };
        let id = envelope.id;
        let event = match self.open_link_request(&envelope.ciphertext, devices) {
            Ok(v) => v,
            Err(reason) => json!({"event": "rejected", "reason": reason}),
        };
        self.record.seen.insert(id.0);
        Ok(json!({"type": "deliver", "seq": seq, "id": hex(&id.0), "event": event}).to_string())
    }

    fn open_link_request(&mut self, ciphertext: &[u8], devices: &str) -> Result<Value, String> {
        let own = self.state.user().to_owned();
        let unsealed = open(
            &own,
            self.state.device_id(),
            self.state.device.seal_secret(),
            ciphertext,
        )
        .map_err(|e| format!("does not open on this device: {e}"))?;
        let sender = unsealed.sender;
        let device = sender.device;
        if sender.user != own {
            return Err("not from this account".into());
        }
        let listed: Value = serde_json::from_str(devices).map_err(|_| "devices is not JSON")?;
        let keys = listed["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["device_id"].as_u64() == Some(u64::from(device)))
            .and_then(|d| STANDARD.decode(d["identity_keys"].as_str()?).ok())
            .and_then(|b| PublicDeviceKeys::from_bytes(&b).ok())
            .ok_or("the broker does not list the sending device")?;
        let payload = self
            .state
            .sessions
            .decrypt(
                &mut self.state.device,
                &sender,
                &keys,
                &unsealed.olm_message,
            )
            .map_err(|e| format!("rejected: {e}"))?;
        let Payload::LinkRequest {
            keys: claimed,
            proof,
        } = payload
        else {
            self.state.sessions.forget(&own, device);
            return Err(
                "a device not in the signed list sent something else than a link request".into(),
            );
        };
        let key_bytes = keys.to_bytes();
        let now = now_ms();
        let matching = self.record.pending_links.iter().position(|(secret, exp)| {
            *exp > now
                && claimed == key_bytes
                && proof_matches(
                    &proof,
                    &link_proof(secret, b"request", &own, device, &[&key_bytes]),
                )
        });
        let Some(index) = matching else {
            self.state.sessions.forget(&own, device);
            return Err("link request with a wrong code proof (or an expired code)".into());
        };
        let (secret, _) = self.record.pending_links.remove(index);
        let current = self
            .list_of(&own)
            .cloned()
            .ok_or("no verified list of this account")?;
        let mut devices: Vec<(u32, PublicDeviceKeys)> = current
            .ids()
            .into_iter()
            .filter_map(|d| Some((d, current.device(d)?)))
            .collect();
        if !devices.iter().any(|(d, _)| *d == device) {
            devices.push((device, keys));
            devices.sort_by_key(|(d, _)| *d);
        }
        let list = DeviceList {
            user: own.clone(),
            version: current.version + 1,
            devices,
            master_key: self.state.master_key.public_key(),
        };
        let signed = list
            .sign(&self.state.master_key)
            .map_err(|e| e.to_string())?;
        // Pinned by `confirm_own_list` once the page has published it.
        self.record.approving = Some((device, secret));
        Ok(json!({"event": "link_request", "device": device,
                  "signed": json!({"signed": STANDARD.encode(signed.to_bytes())}).to_string()}))
    }

    /// The first frame on `/v1/ws`.
    pub fn auth_frame(&self) -> Vec<u8> {
        ClientFrame::Auth {
            user: self.state.user().to_owned(),
            device: DeviceId(self.state.device_id()),
            token: self.record.device_token.to_vec(),
        }
        .encode()
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
    /// - `send_result`: `{id, accepted, code, current_devices}`.
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
                    json!({"type": "send_result", "id": hex(&id.0), "accepted": true,
                           "duplicate": duplicate})
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
                Notice::MailboxFull => "mailbox_full",
            }}),
            ServerFrame::Error { code, message, .. } => {
                json!({"type": "error", "code": code.as_str(), "message": message})
            }
        };
        Ok(out.to_string())
    }

    fn deliver(&mut self, id: EnvelopeId, ciphertext: &[u8], refetched: bool) -> Value {
        if self.record.seen.contains(&id.0) {
            return json!({"id": hex(&id.0), "event": {"event": "duplicate"}});
        }
        let event = match self.open_envelope(ciphertext, refetched) {
            Ok(Err(Need::List(user))) => return json!({"id": hex(&id.0), "need_list": user}),
            Ok(Err(Need::BrokerKeys)) => return json!({"id": hex(&id.0), "need_broker_keys": true}),
            Ok(Ok(event)) => event,
            Err(reason) => json!({"event": "rejected", "reason": reason}),
        };
        self.record.seen.insert(id.0);
        json!({"id": hex(&id.0), "event": event})
    }

    /// Conversations (JSON: `[{with, verified, messages: [{outgoing, device, time_ms,
    /// text}]}]`), most recent first.
    pub fn conversations(&self) -> String {
        let mut out: Vec<(u64, Value)> = self
            .record
            .contacts
            .iter()
            .filter(|(h, c)| *h != self.state.user() && !c.messages.is_empty())
            .map(|(with, c)| {
                let last = c.messages.back().map_or(0, |m| m.time_ms);
                let messages: Vec<Value> = c
                    .messages
                    .iter()
                    .map(|m| {
                        json!({"outgoing": m.outgoing, "device": m.device,
                                    "time_ms": m.time_ms, "text": m.body})
                    })
                    .collect();
                (
                    last,
                    json!({"with": with, "verified": c.verified, "messages": messages}),
                )
            })
            .collect();
        out.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        Value::Array(out.into_iter().map(|(_, v)| v).collect()).to_string()
    }

    /// A new random call id (hex).
    pub fn new_call_id() -> String {
        hex(&rand::random::<[u8; 16]>())
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
