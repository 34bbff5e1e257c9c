//! What the operator console needs beyond the item API: the live feed and
//! its history ([`LiveFeed`]), what the daemon knows about itself
//! ([`DaemonInfo`]: version, limits, loaded plugins, served by
//! `GET /v1/info`), and the registration of the console's routes
//! (`/ui`, `/v1/events`, `/v1/stats/history`, `/v1/info`).

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::auth::Authorized;
use super::events::{self, LiveFeed};
use super::{history, ui, AdminState, ApiError};
use crate::clock::SharedClock;
use crate::plugin::PluginInfo;

/// What the daemon tells the console about itself.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct DaemonInfo {
    /// retryq's version.
    pub version: &'static str,
    /// `store.max_bytes` (0: no limit).
    pub max_bytes: u64,
    /// `store.max_items` (0: no limit).
    pub max_items: usize,
    /// The plugins loaded for `[pusher]` and `[checker]`.
    pub plugins: Vec<PluginInfo>,
}

/// The console's shared state, kept in [`AdminState::console`].
#[derive(Debug)]
pub struct ConsoleState {
    /// The live feed (and the per-minute history).
    pub feed: Arc<LiveFeed>,
    /// What `GET /v1/info` answers.
    pub info: DaemonInfo,
}

impl ConsoleState {
    /// An empty feed on `clock`, with no plugins and no limits known.
    pub fn new(clock: SharedClock) -> Self {
        ConsoleState {
            feed: Arc::new(LiveFeed::new(clock)),
            info: DaemonInfo {
                version: env!("CARGO_PKG_VERSION"),
                ..DaemonInfo::default()
            },
        }
    }

    /// The same feed with `info` (the version is always this build's).
    pub fn with_info(mut self, info: DaemonInfo) -> Self {
        self.info = DaemonInfo {
            version: env!("CARGO_PKG_VERSION"),
            ..info
        };
        self
    }
}

/// Registers the console's routes (before the API's catch-all).
pub(super) fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/events").route(web::get().to(events::get_events)))
        .service(web::resource("/v1/stats/history").route(web::get().to(history::get_history)))
        .service(web::resource("/v1/info").route(web::get().to(get_info)));
    ui::register(cfg);
}

/// `GET /v1/info`.
#[utoipa::path(get, path = "/v1/info", tag = "live",
    responses(
        (status = 200, description = "Version, limits and loaded plugins", body = DaemonInfo),
        (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn get_info(
    _auth: Authorized,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(&state.console.info))
}
