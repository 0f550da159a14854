//! Files: [`Client::send_file`] encrypts a file under a fresh key (see
//! [`crate::crypto::attachment`]), uploads the ciphertext to this account's broker in pieces
//! and announces it in an end-to-end encrypted message; [`Client::save_file`] downloads what
//! such a message announced, opening and checking it piece by piece.
//!
//! A newly linked device can be sent the account's conversation history the same way
//! ([`Client::send_history`], [`Client::import_history`]): an archive of the conversations,
//! uploaded as an attachment, its key sent in an Olm message to the account.
//!
//! An upload cut short (the program killed, the broker restarted) goes on where the broker has
//! it: the upload's id and key are kept in the state until it finishes, and sealing again with
//! the same key gives the same bytes, so nothing but the file itself is needed to resume.

use std::{
    fs::{self, File},
    io::{Read, Write},
    path::{Path, PathBuf},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sealpost_proto::{EnvelopeId, Handle, limits::MAX_BLOB_PIECE_BYTES};
use serde_bytes::ByteBuf;

use super::{Client, now_ms};
use crate::{
    crypto::{
        AttachmentError, FileKey, FileRef,
        attachment::{CHUNK, FileOpener, FileSealer, SEALED_CHUNK, sealed_size},
    },
    engine::Outgoing,
    error::ClientError,
};

/// Sealed chunks per uploaded or downloaded piece: as many as fit in the broker's piece limit.
const CHUNKS_PER_PIECE: usize = MAX_BLOB_PIECE_BYTES / SEALED_CHUNK;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |error| ClientError::Io {
        path: path.to_owned(),
        error,
    }
}

/// An upload that went through: what a [`FileRef`] needs of it.
struct Uploaded {
    id: Vec<u8>,
    key: FileKey,
    size: u64,
    digest: [u8; 32],
}

impl Client {
    /// Sends the file at `path` to `to`: encrypted, uploaded (resuming an earlier attempt at
    /// the same file), then announced. `progress(uploaded, total)` hears of each piece, in
    /// ciphertext bytes.
    pub async fn send_file(
        &mut self,
        to: &str,
        path: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<EnvelopeId, ClientError> {
        self.check_contact(to, "sending to your own account is not supported")?;
        let meta = fs::metadata(path).map_err(io(path))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ClientError::Invalid(format!("{} is not a file", path.display())))?;
        // What identifies this file for a later resume: where it is, its length and its time.
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let which = format!("{}\n{}\n{modified}", path.display(), meta.len());
        let mut file = File::open(path).map_err(io(path))?;
        let uploaded = self
            .upload(&mut file, meta.len(), Some(&which), progress)
            .await
            .map_err(|e| match e {
                ClientError::Io { error, .. } => io(path)(error),
                e => e,
            })?;
        let file_ref = self.file_ref(uploaded, name, media_type(path))?;
        self.share_token_once(to).await?;
        let sent = self
            .send_outgoing(to, Outgoing::file(file_ref.clone()))
            .await?;
        self.engine.forget_upload(&which);
        self.engine.queue_file_transcript(to, &file_ref, now_ms());
        self.save()?;
        Ok(sent)
    }

    /// Sends the account's conversation history to `device`, a device just linked to it (its
    /// user chose to): an encrypted archive uploaded as an attachment, its key in an Olm
    /// message to the account. Answers how many bytes the archive is.
    pub async fn send_history(
        &mut self,
        device: u32,
        progress: impl FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        let archive = self.engine.history_archive();
        let len = archive.len() as u64;
        let uploaded = self
            .upload(&mut std::io::Cursor::new(archive), len, None, progress)
            .await?;
        let file = self.file_ref(uploaded, "history".into(), HISTORY_TYPE)?;
        let own = self.engine.user().to_owned();
        self.own_list().await?;
        let history = crate::crypto::Payload::History { device, file };
        self.send_outgoing(&own, Outgoing::payload(history)).await?;
        self.save()?;
        Ok(len)
    }

    /// Fetches the history another device of the account sent this one
    /// ([`Event::History`](crate::Event::History)) and adds it to this device's
    /// conversations; answers how many messages were new here.
    pub async fn import_history(&mut self, file: &FileRef) -> Result<usize, ClientError> {
        if file.media_type != HISTORY_TYPE || file.size > MAX_HISTORY_BYTES {
            return Err(ClientError::Invalid("not a history archive".into()));
        }
        let mut archive = Vec::new();
        self.download(file, &mut archive, |_, _| {}).await?;
        let added = self.engine.import_history(&archive)?;
        self.save()?;
        Ok(added)
    }

    /// Seals `source` (`plain` bytes) under a fresh key and uploads it; with `resume`, an
    /// earlier upload of the same source that was cut short goes on where the broker has it.
    async fn upload(
        &mut self,
        source: &mut dyn Read,
        plain: u64,
        resume: Option<&str>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Uploaded, ClientError> {
        let total = sealed_size(plain);
        let creds = self.creds();
        let pending = resume.and_then(|which| self.engine.pending_upload(which));
        let resumed = match pending {
            Some(upload) => match (upload.key(), self.api.blob_offset(&upload.id).await) {
                (Some(key), Ok(at)) => Some((upload.id, key, at)),
                _ => None, // expired at the broker: start again
            },
            None => None,
        };
        let (id, key, mut at) = match resumed {
            Some(resumed) => resumed,
            None => {
                let key = FileKey::generate();
                let id = self.api.start_blob(&creds, total).await?;
                if let Some(which) = resume {
                    self.engine.remember_upload(which, &id, &key);
                    self.save()?;
                }
                (id, key, 0)
            }
        };
        progress(at, total);
        // Seal from the start (the digest covers every byte), sending what the broker lacks.
        let mut sealer = FileSealer::new(&key, plain);
        let mut digest = blake3::Hasher::new();
        let (mut sealed_at, mut left) = (0u64, plain);
        let mut piece = Vec::with_capacity(CHUNKS_PER_PIECE * SEALED_CHUNK);
        let mut chunk = vec![0u8; CHUNK];
        let source_io = |error| ClientError::Io {
            path: PathBuf::new(),
            error,
        };
        loop {
            let len = usize::try_from(left.min(CHUNK as u64)).expect("at most CHUNK");
            source.read_exact(&mut chunk[..len]).map_err(source_io)?;
            left -= len as u64;
            let sealed = sealer.seal(&chunk[..len]).ok_or_else(|| {
                ClientError::Invalid("the file changed while it was being sent".into())
            })?;
            digest.update(&sealed);
            let end = sealed_at + sealed.len() as u64;
            if end > at {
                let skip = usize::try_from(at.saturating_sub(sealed_at)).unwrap_or(0);
                piece.extend_from_slice(&sealed[skip..]);
            }
            sealed_at = end;
            let last = left == 0;
            if !piece.is_empty() && (last || piece.len() + SEALED_CHUNK > MAX_BLOB_PIECE_BYTES) {
                let from = at;
                at = self
                    .api
                    .put_blob_piece(&creds, &id, from, std::mem::take(&mut piece))
                    .await?;
                if at != sealed_at {
                    return Err(ClientError::Invalid(
                        "the broker's copy of the upload is not where this one is; send it again"
                            .into(),
                    ));
                }
                progress(at, total);
            }
            if last {
                break;
            }
        }
        let id = URL_SAFE_NO_PAD
            .decode(&id)
            .map_err(|_| ClientError::Invalid("the broker gave a malformed id".into()))?;
        Ok(Uploaded {
            id,
            key,
            size: total,
            digest: *digest.finalize().as_bytes(),
        })
    }

    fn file_ref(
        &self,
        uploaded: Uploaded,
        name: String,
        media_type: &str,
    ) -> Result<FileRef, ClientError> {
        Ok(FileRef {
            id: ByteBuf::from(uploaded.id),
            key: ByteBuf::from(uploaded.key.to_bytes().to_vec()),
            size: uploaded.size,
            digest: ByteBuf::from(uploaded.digest.to_vec()),
            name,
            media_type: media_type.to_owned(),
            domain: own_domain(self.engine.user())?,
            thumbnail: None,
        })
    }

    /// Downloads a file a message announced into `dir`, opening and checking each piece as it
    /// comes; answers where it is. A file of the same name there is kept: the new one gets a
    /// name of its own. `progress(downloaded, total)` hears of each piece.
    pub async fn save_file(
        &self,
        file: &FileRef,
        dir: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<PathBuf, ClientError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let target = free_name(dir, &file.name);
        let part = target.with_extension("part");
        let mut out = File::create(&part).map_err(io(&part))?;
        let fetched = async {
            self.download(file, &mut out, progress).await?;
            out.sync_all().map_err(io(&part))?;
            fs::rename(&part, &target).map_err(io(&target))
        }
        .await;
        if let Err(e) = fetched {
            let _ = fs::remove_file(&part);
            return Err(match e {
                ClientError::Io { error, path } if path.as_os_str().is_empty() => io(&part)(error),
                e => e,
            });
        }
        Ok(target)
    }

    /// Fetches, opens and checks an attachment into `out`: every piece is checked as it comes,
    /// and the whole against the message's digest at the end (`out` then holds it all).
    async fn download(
        &self,
        file: &FileRef,
        out: &mut dyn Write,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), ClientError> {
        // Another domain's attachment comes through this account's own broker: that domain's
        // broker sees our broker ask, not this device.
        let remote =
            (file.domain != own_domain(self.engine.user())?).then_some(file.domain.as_str());
        let key = file.file_key()?;
        let mut opener = FileOpener::new(&key, file.size)?;
        let id = URL_SAFE_NO_PAD.encode(&file.id);
        let mut digest = blake3::Hasher::new();
        let mut at = 0u64;
        while at < file.size {
            let end = (at + (CHUNKS_PER_PIECE * SEALED_CHUNK) as u64).min(file.size);
            // Anonymous: holding the id is what allows it; the request names nobody.
            let piece = self.anon.blob_range(remote, &id, at, end).await?;
            if piece.len() as u64 != end - at {
                return Err(AttachmentError::Length.into());
            }
            digest.update(&piece);
            for sealed in piece.chunks(SEALED_CHUNK) {
                let plain = opener.open(sealed)?;
                out.write_all(&plain).map_err(|error| ClientError::Io {
                    path: PathBuf::new(),
                    error,
                })?;
            }
            at = end;
            progress(at, file.size);
        }
        if digest.finalize().as_bytes()[..] != file.digest[..] {
            return Err(AttachmentError::Digest.into());
        }
        Ok(())
    }
}

/// The media type of a history archive.
const HISTORY_TYPE: &str = "application/x-sealpost-history";

/// Largest history archive a device takes (ciphertext bytes).
const MAX_HISTORY_BYTES: u64 = 64 * 1024 * 1024;

/// The domain of this account (where its files are kept).
fn own_domain(user: &str) -> Result<String, ClientError> {
    Handle::parse(user)
        .map(|h| h.domain().to_owned())
        .map_err(|e| ClientError::InvalidHandle(user.to_owned(), e.to_string()))
}

/// A path in `dir` for a received file called `name`: the name without any directory part
/// (a sender cannot write outside `dir`), numbered if taken.
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let base = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "file".to_owned());
    let mut candidate = dir.join(&base);
    let mut n = 1;
    while candidate.exists() || candidate.with_extension("part").exists() {
        candidate = dir.join(format!("{n} {base}"));
        n += 1;
    }
    candidate
}

/// A media type from a file's extension (what a recipient's application shows it as).
fn media_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "mp3" => "audio/mpeg",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_name_cannot_leave_the_directory_or_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            free_name(dir.path(), "../../etc/passwd"),
            dir.path().join("passwd")
        );
        assert_eq!(free_name(dir.path(), ".."), dir.path().join("file"));
        fs::write(dir.path().join("a.txt"), b"x").unwrap();
        assert_eq!(free_name(dir.path(), "a.txt"), dir.path().join("1 a.txt"));
    }
}
