//! The operator's pause shared by a fleet: one fleet setting in the
//! store's schema ([`PostgresRetryQueue::fleet_setting`]), written by the
//! daemon whose API was asked, read by every daemon. It outlives any
//! daemon, so a restarted one starts paused.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::QueueResult;
use crate::store::postgres::PostgresRetryQueue;

/// The fleet setting's key.
pub const PAUSE_KEY: &str = "pause";

/// A pause in force across the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPause {
    /// Why, as the operator said.
    pub reason: String,
    /// When it was asked for.
    pub since: DateTime<Utc>,
    /// The instance whose API was asked.
    pub by: String,
}

/// The shared pause of one schema.
#[derive(Debug, Clone)]
pub struct SharedPause {
    store: Arc<PostgresRetryQueue>,
}

impl SharedPause {
    /// The pause kept in `store`'s schema.
    pub fn new(store: Arc<PostgresRetryQueue>) -> Self {
        SharedPause { store }
    }

    /// The pause in force, if any. A value this binary cannot read (written
    /// by a newer one) still pauses: stopping is the safe reading.
    pub fn get(&self) -> QueueResult<Option<FleetPause>> {
        Ok(self.store.fleet_setting(PAUSE_KEY)?.map(|text| {
            serde_json::from_str(&text).unwrap_or_else(|_| FleetPause {
                reason: "paused fleet-wide (unreadable reason)".to_owned(),
                since: DateTime::<Utc>::UNIX_EPOCH,
                by: String::new(),
            })
        }))
    }

    /// Pauses the fleet, durably.
    pub fn set(&self, pause: &FleetPause) -> QueueResult<()> {
        let text = serde_json::to_string(pause).unwrap_or_default();
        self.store.set_fleet_setting(PAUSE_KEY, Some(&text))
    }

    /// Lifts the fleet's pause, durably.
    pub fn clear(&self) -> QueueResult<()> {
        self.store.set_fleet_setting(PAUSE_KEY, None)
    }
}
