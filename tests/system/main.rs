//! Real-time system tests: the real `retryq run` binary with the real `http`
//! plugin, against a scripted HTTP upstream, on the real clock with real
//! signals. Each scenario owns its temp dir, config, ports and upstream, so
//! they run in parallel; timings are short (intervals of a few hundred ms,
//! cool-downs of 1-2 s) and every wait is bounded.
//!
//! Scenarios, one module each: outage then recovery (`outage`), `kill -9`
//! rounds and SIGTERM (`crash`), 401 then fixed credentials (`auth`), a full
//! disk (`disk`), corruption of either backend (`corruption`), and how
//! single answers map to delivery: 429 Retry-After, a hang, fail-first-N
//! (`answers`), and a sealed store (`sealed`): no plaintext on disk while
//! items wait, `kill -9`, key rotation and a re-seal beside the daemon, and
//! a refusal to start without the key.
//!
//! Run alone with `cargo test --test system`; the plugin library is built
//! on first use (`support::plugin_lib`). The full-disk test needs root and
//! skips otherwise, unless RETRYQ_REQUIRE_SERVICES=1 (CI) makes that a
//! failure.

#![cfg(unix)]

#[path = "../support/mod.rs"]
mod support;

mod harness;
mod upstream;

mod answers;
mod auth;
mod corruption;
mod crash;
mod disk;
mod outage;
mod sealed;
