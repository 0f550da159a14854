//! Attachments in the browser: the page reads a file in chunks, seals each here
//! ([`FileUpload`]), uploads the ciphertext itself (`fetch`), and sends the [`FileRef`] as a
//! payload (`{"kind": "file", "file": …}`); a received file is fetched by the page and opened
//! here chunk by chunk ([`FileDownload`]). The construction is the SDK's
//! (`sealpost_client::crypto::attachment`).

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use sealpost_client::crypto::{
    FileKey, FileRef,
    attachment::{CHUNK, FileOpener, FileSealer, SEALED_CHUNK, sealed_size},
};
use serde_bytes::ByteBuf;
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;

use super::err;

/// A file's reference as the page sees it (binary fields base64; the id base64url, as the
/// broker's API has it).
pub(crate) fn file_json(file: &FileRef) -> Value {
    json!({
        "id": URL_SAFE_NO_PAD.encode(&file.id),
        "key": STANDARD.encode(&file.key),
        "size": file.size,
        "digest": STANDARD.encode(&file.digest),
        "name": file.name,
        "media_type": file.media_type,
        "domain": file.domain,
        "thumbnail": file.thumbnail.as_ref().map(|t| STANDARD.encode(t)),
    })
}

/// The reverse of [`file_json`].
pub(crate) fn file_from_json(v: &Value) -> Result<FileRef, JsError> {
    let text = |key: &str| {
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| err(format!("file.{key} missing")))
    };
    let bytes = |key: &str| -> Result<ByteBuf, JsError> {
        STANDARD
            .decode(text(key)?)
            .map(ByteBuf::from)
            .map_err(|_| err(format!("file.{key} is not base64")))
    };
    let file = FileRef {
        id: ByteBuf::from(
            URL_SAFE_NO_PAD
                .decode(text("id")?)
                .map_err(|_| err("file.id is not base64url"))?,
        ),
        key: bytes("key")?,
        size: v["size"].as_u64().ok_or_else(|| err("file.size missing"))?,
        digest: bytes("digest")?,
        name: text("name")?,
        media_type: text("media_type")?,
        domain: text("domain")?,
        thumbnail: match v["thumbnail"].as_str() {
            Some(t) => Some(ByteBuf::from(
                STANDARD
                    .decode(t)
                    .map_err(|_| err("file.thumbnail is not base64"))?,
            )),
            None => None,
        },
    };
    file.file_key().map_err(|e| err(e.to_string()))?;
    Ok(file)
}

/// A file being sealed for upload: feed it [`FileUpload::chunk_size`] bytes at a time (the
/// last chunk shorter, an empty file one empty chunk).
#[wasm_bindgen]
pub struct FileUpload {
    key: FileKey,
    sealer: FileSealer,
    digest: blake3::Hasher,
    size: u64,
}

#[wasm_bindgen]
impl FileUpload {
    /// Starts sealing a file of `size` bytes under a fresh key.
    #[wasm_bindgen(constructor)]
    pub fn new(size: f64) -> FileUpload {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let size = size as u64;
        let key = FileKey::generate();
        let sealer = FileSealer::new(&key, size);
        FileUpload {
            key,
            sealer,
            digest: blake3::Hasher::new(),
            size,
        }
    }

    /// Plaintext bytes of each chunk.
    pub fn chunk_size() -> u32 {
        u32::try_from(CHUNK).expect("64 KiB")
    }

    /// The ciphertext's length (what to start the upload with).
    pub fn sealed_size(&self) -> f64 {
        sealed_size(self.size) as f64
    }

    /// Seals the next chunk.
    pub fn seal(&mut self, chunk: &[u8]) -> Result<Vec<u8>, JsError> {
        let sealed = self
            .sealer
            .seal(chunk)
            .ok_or_else(|| err("a chunk of the wrong length, or past the end of the file"))?;
        self.digest.update(&sealed);
        Ok(sealed)
    }

    /// The file's reference once every chunk is sealed and uploaded as `id`: JSON for the
    /// `file` payload. `thumbnail`: a small JPEG preview (base64), or empty.
    pub fn file_ref(
        &self,
        id: &str,
        name: &str,
        media_type: &str,
        domain: &str,
        thumbnail: &str,
    ) -> Result<String, JsError> {
        let file = FileRef {
            id: ByteBuf::from(
                URL_SAFE_NO_PAD
                    .decode(id)
                    .map_err(|_| err("the upload id is not base64url"))?,
            ),
            key: ByteBuf::from(self.key.to_bytes().to_vec()),
            size: sealed_size(self.size),
            digest: ByteBuf::from(self.digest.finalize().as_bytes().to_vec()),
            name: name.to_owned(),
            media_type: media_type.to_owned(),
            domain: domain.to_owned(),
            thumbnail: if thumbnail.is_empty() {
                None
            } else {
                Some(ByteBuf::from(
                    STANDARD
                        .decode(thumbnail)
                        .map_err(|_| err("the thumbnail is not base64"))?,
                ))
            },
        };
        Ok(file_json(&file).to_string())
    }
}

/// A received file being opened: feed it the ciphertext in order, [`FileDownload::chunk_size`]
/// bytes at a time (the last shorter); each chunk is checked as it comes.
#[wasm_bindgen]
pub struct FileDownload {
    opener: FileOpener,
    digest: blake3::Hasher,
    expected: Vec<u8>,
}

#[wasm_bindgen]
impl FileDownload {
    /// Starts opening the file `file` (its JSON, as events and conversations give it).
    #[wasm_bindgen(constructor)]
    pub fn new(file: &str) -> Result<FileDownload, JsError> {
        let v: Value = serde_json::from_str(file).map_err(|_| err("file is not JSON"))?;
        let file = file_from_json(&v)?;
        let key = file.file_key().map_err(|e| err(e.to_string()))?;
        let opener = FileOpener::new(&key, file.size).map_err(|e| err(e.to_string()))?;
        Ok(FileDownload {
            opener,
            digest: blake3::Hasher::new(),
            expected: file.digest.into_vec(),
        })
    }

    /// Ciphertext bytes of each chunk.
    pub fn chunk_size() -> u32 {
        u32::try_from(SEALED_CHUNK).expect("64 KiB and a tag")
    }

    /// Opens the next chunk.
    pub fn open(&mut self, chunk: &[u8]) -> Result<Vec<u8>, JsError> {
        self.digest.update(chunk);
        self.opener.open(chunk).map_err(|e| err(e.to_string()))
    }

    /// Checks, once every chunk is open, that the whole is what the message announced.
    pub fn finish(&self) -> Result<(), JsError> {
        if !self.opener.done() {
            return Err(err("the attachment ended early"));
        }
        if self.digest.finalize().as_bytes()[..] != self.expected[..] {
            return Err(err(
                "the attachment's digest does not match: it was changed in storage or on the way",
            ));
        }
        Ok(())
    }
}
