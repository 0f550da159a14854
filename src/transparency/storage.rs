//! akd's `Database` on the store's [`TransparencyStore`] seam: records encoded with
//! MessagePack (akd's serde), value states by handle and epoch.

use std::{collections::HashMap, sync::Arc};

use akd::{
    AkdLabel, AkdValue,
    errors::StorageError,
    storage::{
        Database, DbSetState, Storable, StorageUtil,
        types::{
            DbRecord, KeyData, StorageType, ValueState, ValueStateKey, ValueStateRetrievalFlag,
        },
    },
};
use async_trait::async_trait;

use crate::store::transparency::{KtBatch, TransparencyStore};

/// See the module docs.
#[derive(Clone)]
pub(crate) struct AkdStore {
    store: Arc<dyn TransparencyStore>,
}

impl AkdStore {
    pub(crate) fn new(store: Arc<dyn TransparencyStore>) -> Self {
        AkdStore { store }
    }

    /// The newest value of `label`, if it has one.
    pub(crate) async fn latest_value(
        &self,
        label: &AkdLabel,
    ) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
        let states = self
            .states(&label.0)
            .await
            .map_err(|e| crate::store::StoreError::Corruption(e.to_string()))?;
        Ok(states.into_iter().next_back().map(|s| s.value.0))
    }

    async fn states(&self, label: &[u8]) -> Result<Vec<ValueState>, StorageError> {
        let raw = self.store.states(label.to_vec()).await.map_err(failed)?;
        raw.iter()
            .map(|bytes| match decode(bytes)? {
                DbRecord::ValueState(state) => Ok(state),
                _ => Err(StorageError::Other(
                    "a value state key holds another record".into(),
                )),
            })
            .collect()
    }
}

fn failed(e: crate::store::StoreError) -> StorageError {
    StorageError::Connection(e.to_string())
}

fn decode(bytes: &[u8]) -> Result<DbRecord, StorageError> {
    rmp_serde::from_slice(bytes).map_err(|e| StorageError::Other(format!("stored record: {e}")))
}

fn encode(record: &DbRecord) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec(record).map_err(|e| StorageError::Other(format!("encoding a record: {e}")))
}

/// The state `flag` selects among a handle's states (in epoch order).
fn select(states: Vec<ValueState>, flag: ValueStateRetrievalFlag) -> Option<ValueState> {
    use ValueStateRetrievalFlag::*;
    match flag {
        MaxEpoch => states.into_iter().next_back(),
        MinEpoch => states.into_iter().next(),
        SpecificVersion(v) => states.into_iter().find(|s| s.version == v),
        SpecificEpoch(e) => states.into_iter().find(|s| s.epoch == e),
        LeqEpoch(e) => states.into_iter().rev().find(|s| s.epoch <= e),
    }
}

#[async_trait]
impl Database for AkdStore {
    async fn set(&self, record: DbRecord) -> Result<(), StorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    async fn batch_set(
        &self,
        records: Vec<DbRecord>,
        _state: DbSetState,
    ) -> Result<(), StorageError> {
        let mut batch = KtBatch::default();
        for record in &records {
            let bytes = encode(record)?;
            match record {
                DbRecord::ValueState(state) => {
                    batch
                        .states
                        .push((state.username.0.clone(), state.epoch, bytes))
                }
                _ => batch.records.push((record.get_full_binary_id(), bytes)),
            }
        }
        self.store.write(batch).await.map_err(failed)
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let binary = St::get_full_binary_key_id(id);
        if St::data_type() == StorageType::ValueState {
            let ValueStateKey(label, epoch) =
                ValueState::key_from_full_binary(&binary).map_err(StorageError::Other)?;
            return select(
                self.states(&label).await?,
                ValueStateRetrievalFlag::SpecificEpoch(epoch),
            )
            .map(DbRecord::ValueState)
            .ok_or_else(|| StorageError::NotFound("value state".into()));
        }
        let mut found = self.store.records(vec![binary]).await.map_err(failed)?;
        match found.pop().flatten() {
            Some(bytes) => decode(&bytes),
            None => Err(StorageError::NotFound(format!("{:?}", St::data_type()))),
        }
    }

    async fn batch_get<St: Storable>(
        &self,
        ids: &[St::StorageKey],
    ) -> Result<Vec<DbRecord>, StorageError> {
        if St::data_type() == StorageType::ValueState {
            let mut out = Vec::new();
            for id in ids {
                if let Ok(record) = self.get::<St>(id).await {
                    out.push(record);
                }
            }
            return Ok(out);
        }
        let binary = ids.iter().map(St::get_full_binary_key_id).collect();
        let found = self.store.records(binary).await.map_err(failed)?;
        found.into_iter().flatten().map(|b| decode(&b)).collect()
    }

    async fn get_user_data(&self, label: &AkdLabel) -> Result<KeyData, StorageError> {
        let states = self.states(&label.0).await?;
        if states.is_empty() {
            return Err(StorageError::NotFound("no value states".into()));
        }
        Ok(KeyData { states })
    }

    async fn get_user_state(
        &self,
        label: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, StorageError> {
        select(self.states(&label.0).await?, flag)
            .ok_or_else(|| StorageError::NotFound("value state".into()))
    }

    async fn get_user_state_versions(
        &self,
        labels: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, StorageError> {
        let mut out = HashMap::new();
        for label in labels {
            if let Some(state) = select(self.states(&label.0).await?, flag) {
                out.insert(label.clone(), (state.version, state.value));
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl StorageUtil for AkdStore {
    async fn batch_get_type_direct<St: Storable>(&self) -> Result<Vec<DbRecord>, StorageError> {
        let all = self.batch_get_all_direct().await?;
        Ok(all
            .into_iter()
            .filter(|r| match r {
                DbRecord::Azks(_) => St::data_type() == StorageType::Azks,
                DbRecord::TreeNode(_) => St::data_type() == StorageType::TreeNode,
                DbRecord::ValueState(_) => St::data_type() == StorageType::ValueState,
            })
            .collect())
    }

    async fn batch_get_all_direct(&self) -> Result<Vec<DbRecord>, StorageError> {
        let raw = self.store.everything().await.map_err(failed)?;
        raw.iter().map(|b| decode(b)).collect()
    }
}
