//! The delivery core: policy that decides what delivery does, with no
//! actix in it. The actors and the `RetryWorker` handle sit on top of it.
//!
//! - [`circuit`]: the circuit breaker, as a type with its own tests.
//! - [`store_health`]: backing off while the store refuses writes, and
//!   logging that at a bounded rate.
//! - [`outcome`]: what one push outcome does to its item.
//! - [`shared`]: the worker's state (gates, counters, in-flight items,
//!   callbacks, events), shared by the handle and the actors.
//! - [`types`]: the worker's configuration, counters, events and errors,
//!   shared by the actors and the `RetryWorker` handle.

pub mod circuit;
pub mod outcome;
pub mod shared;
pub mod store_health;
pub mod types;

pub use circuit::{CircuitBreaker, CircuitState, CircuitTransition};
pub use outcome::decide;
pub use shared::{Callback, Callbacks, DeliveryState, Gate, Shared, MAX_OVERLAPPING_CYCLES};
pub use store_health::StoreHealth;
