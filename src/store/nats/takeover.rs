//! Taking over the federation outboxes of pods that are gone.
//!
//! Each pod writes its own outboxes (`sp.out.<D>.<pod>`, see the outbox module) and marks
//! itself alive in the KV bucket `sealpost_pods` (`p.<pod>`, entries live 30 s; a pod
//! refreshes its own every few seconds). A pod that finds outbox entries of a pod that is not
//! alive claims them (`c.<D>.<pod>`, created by one pod only, refreshed while it works), hands
//! each entry to its own federation peer of that domain, and deletes it once its own outbox
//! has it. The destination deduplicates by envelope id, so an entry handed over twice (a claim
//! that lapsed mid-way) is delivered once.
//!
//! ```text
//!  pod-b (gone) ── sp.out.<D>.pod-b ──▶ pod-a: claim c.<D>.pod-b ─▶ Federation::adopt ─▶ sp.out.<D>.pod-a
//! ```

use std::{collections::HashMap, time::Duration};

use async_nats::jetstream::kv;
use futures_util::StreamExt;

use super::{NatsStore, subjects};
use crate::store::{OutboxRecord, Result, StoreError, records};

/// How long a pod counts as alive after its last heartbeat, and a claim as held.
pub const POD_TTL: Duration = Duration::from_secs(30);

/// One entry of a gone pod's outbox, claimed for this pod.
pub struct Orphan {
    /// Where it is stored.
    sequence: u64,
    /// The entry.
    pub record: OutboxRecord,
}

impl NatsStore {
    async fn pods(&self) -> Result<kv::Store> {
        self.inner
            .js
            .get_key_value(subjects::POD_BUCKET)
            .await
            .map_err(|e| StoreError::Io(format!("bucket {}: {e}", subjects::POD_BUCKET)))
    }

    /// Marks this pod alive for [`POD_TTL`]; call it well within that.
    pub async fn heartbeat(&self) -> Result<()> {
        let pods = self.pods().await?;
        pods.put(format!("p.{}", self.inner.pod), "1".into())
            .await
            .map_err(|e| StoreError::Io(format!("heartbeat: {e}")))?;
        Ok(())
    }

    /// Up to `limit` entries of the outboxes of pods that are gone, claimed for this pod.
    pub async fn orphaned_outbox(&self, limit: usize) -> Result<Vec<Orphan>> {
        let pods = self.pods().await?;
        let stream = self
            .inner
            .js
            .get_stream(subjects::OUTBOX_STREAM)
            .await
            .map_err(|e| StoreError::Io(format!("outbox stream: {e}")))?;
        let held: HashMap<String, usize> = stream
            .info_with_subjects(subjects::OUTBOX_SUBJECTS)
            .await
            .map_err(|e| StoreError::Io(format!("outbox subjects: {e}")))?
            .filter_map(|s| std::future::ready(s.ok()))
            .collect()
            .await;
        let mut out = Vec::new();
        for (subject, count) in held {
            let Some((domain, owner)) = subject
                .strip_prefix("sp.out.")
                .and_then(|rest| rest.split_once('.'))
            else {
                continue;
            };
            if count == 0 || owner == self.inner.pod || out.len() >= limit {
                continue;
            }
            let alive = pods
                .get(format!("p.{owner}"))
                .await
                .map_err(|e| StoreError::Io(format!("pods: {e}")))?
                .is_some();
            if alive || !claim(&pods, &format!("c.{domain}.{owner}"), &self.inner.pod).await? {
                continue;
            }
            for m in self
                .inner
                .batch(subjects::OUTBOX_STREAM, &subject, 1, limit - out.len())
                .await?
                .messages
            {
                out.push(Orphan {
                    sequence: m.sequence,
                    record: records::decode(&m.payload)?,
                });
            }
        }
        Ok(out)
    }

    /// Deletes an adopted entry from the gone pod's outbox.
    pub async fn forget_orphan(&self, orphan: &Orphan) -> Result<()> {
        super::inbox::delete_message(&self.inner, subjects::OUTBOX_STREAM, orphan.sequence, true)
            .await
    }
}

/// Claims `key` for `pod`: true if `pod` holds it now (created it, or holds it already and
/// refreshed it).
async fn claim(pods: &kv::Store, key: &str, pod: &str) -> Result<bool> {
    match pods.create(key, pod.to_owned().into()).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let entry = pods
                .entry(key)
                .await
                .map_err(|e| StoreError::Io(format!("pods: {e}")))?;
            match entry {
                Some(e) if e.value.as_ref() == pod.as_bytes() => {
                    let _ = pods.update(key, e.value.clone(), e.revision).await;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
        Err(e) => Err(StoreError::Io(format!("claim: {e}"))),
    }
}
