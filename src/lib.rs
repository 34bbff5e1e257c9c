//! retryq: a durable store-and-forward retry queue for results that must
//! reach an upstream API.
//!
//! A producer hands retryq a report ([`item::NewItem`]); retryq persists it
//! ([`store::RetryQueue`]) before the first send, delivers it through a
//! transport ([`retryq_plugin::Pusher`], in-process or a dynamic plugin),
//! retries with backoff ([`backoff::BackoffConfig`]) when the upstream
//! fails, skips uploads the upstream already has (fingerprint check),
//! expires old items, and deletes an item only when the upstream
//! acknowledged it.
//!
//! Nothing that `enqueue` acknowledged is ever lost: every state change is
//! durable before the call returns, and delivery is at-least-once.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod actors;
pub mod admin;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod error;
pub mod fleet;
pub mod item;
pub mod metrics;
pub mod plugin;
pub mod plugin_process;
pub mod poison;
pub mod seal;
pub mod settings;
pub mod store;
pub mod worker;

pub use error::{QueueError, QueueResult};
pub use item::{ItemStatus, ItemType, NewItem, Payload, QueueItem};
pub use retryq_plugin as plugin_sdk;
pub use store::{
    FileRetryQueue, ListFilter, QueueStats, RetryQueue, SqliteRetryQueue, StoreOptions,
};
