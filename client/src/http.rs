//! The JSON bodies of the broker's HTTP API that carry keys or credentials, built and read in
//! one place for both clients: the SDK's reqwest client (`api`) and the browser's
//! page (through `web/`). Byte strings are padded standard base64, except tokens: unpadded
//! base64url, as the broker's answers carry them.

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::engine::{BrokerDevice, KeyUpload};

/// A token (device or delivery) as the broker's API carries it: unpadded base64url.
pub fn token(token: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(URL_SAFE_NO_PAD.encode(token))
}

/// The `authorization` header of a device: `Bearer <device>.<token>`.
pub fn bearer(device: u32, token: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(format!("Bearer {device}.{}", self::token(token).as_str()))
}

/// Decodes a token as the broker's answers carry it; `None` if it is not base64url.
pub fn decode_token(token: &str) -> Option<Zeroizing<Vec<u8>>> {
    URL_SAFE_NO_PAD.decode(token).ok().map(Zeroizing::new)
}

/// The body of `PUT /v1/accounts/{h}/devices/{id}/keys`.
pub fn key_upload_body(upload: &KeyUpload) -> Value {
    let key = |(id, bytes): &(u64, Vec<u8>)| json!({ "key_id": id, "key": STANDARD.encode(bytes) });
    let mut body = json!({ "one_time_keys": upload.one_time.iter().map(key).collect::<Vec<_>>() });
    if let Some(f) = &upload.fallback {
        body["fallback_key"] = key(f);
    }
    body
}

/// The body of `PUT /v1/accounts/{h}/device-list`.
pub fn device_list_body(signed: &[u8]) -> Value {
    json!({ "signed": STANDARD.encode(signed) })
}

/// The signed list of a `GET /v1/accounts/{h}/device-list` answer (or of a
/// [`device_list_body`]).
pub fn signed_list(answer: &Value) -> Option<Vec<u8>> {
    STANDARD.decode(answer["signed"].as_str()?).ok()
}

/// The key-transparency evidence of a `GET /v1/accounts/{h}/device-list` answer (`None`: the
/// domain keeps no log, or the field does not decode).
pub fn list_evidence(answer: &Value) -> Option<Vec<u8>> {
    STANDARD.decode(answer["evidence"].as_str()?).ok()
}

/// The records (base64 strings) of a list field of a transparency answer (`roots`,
/// `cosignatures`); `None` if malformed.
pub fn records(answer: &Value, field: &str) -> Option<Vec<Vec<u8>>> {
    answer[field]
        .as_array()?
        .iter()
        .map(|r| STANDARD.decode(r.as_str()?).ok())
        .collect()
}

/// One record (base64) of a transparency answer (`root`, `proof`).
pub fn record(answer: &Value, field: &str) -> Option<Vec<u8>> {
    STANDARD.decode(answer[field].as_str()?).ok()
}

/// The body of `PUT /v1/accounts/{h}/delivery-token`: sealed envelopes only from holders of
/// `token` (none: no sealed envelopes), or from anyone if `unrestricted`.
pub fn delivery_token_body(token: Option<&[u8]>, unrestricted: bool) -> Value {
    let token = token.map(self::token);
    json!({ "token": token.as_deref().map(String::as_str), "unrestricted": unrestricted })
}

/// The devices of a `GET /v1/accounts/{h}/devices` answer; `None` if malformed.
pub fn broker_devices(answer: &Value) -> Option<Vec<BrokerDevice>> {
    answer["devices"]
        .as_array()?
        .iter()
        .map(|d| {
            Some(BrokerDevice {
                device: u32::try_from(d["device_id"].as_u64()?).ok()?,
                identity_keys: STANDARD.decode(d["identity_keys"].as_str()?).ok()?,
            })
        })
        .collect()
}

/// The key of a `POST …/keys/claim` answer.
pub fn claimed_key(answer: &Value) -> Option<Vec<u8>> {
    STANDARD.decode(answer["key"].as_str()?).ok()
}

/// Device identity keys as `POST /v1/accounts` and `POST …/devices` take them.
pub fn identity_keys(keys: &[u8]) -> String {
    STANDARD.encode(keys)
}
