//! JSON shapes and body limits shared by several endpoints.

use actix_web::web;
use serde::Serialize;

use super::error::ApiError;

/// Largest JSON request body. Routes that take more (key uploads, signed device lists) set
/// their own limit with [`json_config`].
pub(crate) const MAX_JSON_BODY: usize = 16 * 1024;

/// JSON body extraction with a size limit and errors in the API's format.
pub(crate) fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|err, _| ApiError::BadRequest(format!("invalid JSON body: {err}")).into())
}

#[derive(Serialize)]
pub(crate) struct DeviceList {
    pub(crate) handle: String,
    pub(crate) devices: Vec<DeviceEntry>,
}

#[derive(Serialize)]
pub(crate) struct DeviceEntry {
    pub(crate) device_id: u32,
    pub(crate) identity_keys: String,
}
