//! The actor runtime: one actor per concern, talking only through the typed
//! messages in [`messages`].
//!
//! - [`store::StoreActor`]: the queue on a committer thread, group commit.
//! - [`scheduler::SchedulerActor`]: when to deliver; outcomes to state.
//! - [`pusher::PusherActor`]: the transport on reusable call threads, each call held to its deadline.
//! - [`checker::CheckerActor`]: the optional fingerprint checker.
//! - [`janitor::JanitorActor`]: TTL, caps, quarantine, lease recovery.
//!
//! Hosts do not use these directly: [`crate::worker::RetryWorker`] starts
//! and stops them and exposes plain async methods.

pub mod checker;
pub mod janitor;
pub mod messages;
pub mod pusher;
pub mod scheduler;
pub mod store;
