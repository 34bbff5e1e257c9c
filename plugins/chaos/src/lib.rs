//! `retryq-chaos`: a transport that fails on purpose, as its settings
//! script, so retry behaviour can be seen and tested without a server.
//!
//! Settings (all optional):
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `sequence` | outcomes of the first pushes, in order: `delivered`, `retryable`, `permanent`, `unauthorized`, `panic`, `hang` | `[]` |
//! | `fail_first` | after the sequence, this many pushes fail with `failure` | `0` |
//! | `failure_rate` | then each push fails with this probability (0..=1) | `0.0` |
//! | `seed` | seed of the deterministic random source | `0` |
//! | `failure` | the failure used by `fail_first` and `failure_rate` | `"retryable"` |
//! | `retry_after` | Retry-After attached to retryable failures (`"30s"`) | none |
//! | `panic_on` | the push (1-based) that panics | none |
//! | `hang_on` | the push (1-based) that hangs for `hang` | none |
//! | `hang` | how long a hang lasts | `"60s"` |
//! | `existing` | fingerprints the checker reports as already upstream | `[]` |
//! | `record_dir` | every delivered payload is written there as `{item id}__{n}.json` | none |
//!
//! Push numbers count every push of one instance, across items.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use retryq_plugin::{
    CallContext, CheckError, CheckResult, FingerprintChecker, ItemMeta, PushOutcome, Pusher,
};
use serde::Deserialize;

/// The chaos plugin's settings (see the crate doc).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosSettings {
    /// Outcomes of the first pushes.
    pub sequence: Vec<Scripted>,
    /// Pushes after the sequence that fail.
    pub fail_first: u64,
    /// Probability of failure afterwards.
    pub failure_rate: f64,
    /// Random seed.
    pub seed: u64,
    /// The failure kind used by `fail_first` and `failure_rate`.
    pub failure: Scripted,
    /// Retry-After on retryable failures.
    #[serde(with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    /// The push (1-based) that panics.
    pub panic_on: Option<u64>,
    /// The push (1-based) that hangs.
    pub hang_on: Option<u64>,
    /// How long a hang lasts.
    #[serde(with = "humantime_serde")]
    pub hang: Duration,
    /// Fingerprints the checker reports as existing.
    pub existing: Vec<String>,
    /// Where delivered payloads are recorded.
    pub record_dir: Option<PathBuf>,
}

impl Default for ChaosSettings {
    fn default() -> Self {
        ChaosSettings {
            sequence: Vec::new(),
            fail_first: 0,
            failure_rate: 0.0,
            seed: 0,
            failure: Scripted::Retryable,
            retry_after: None,
            panic_on: None,
            hang_on: None,
            hang: Duration::from_secs(60),
            existing: Vec::new(),
            record_dir: None,
        }
    }
}

/// A scripted outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scripted {
    /// Accept.
    Delivered,
    /// Transient failure.
    Retryable,
    /// Refuse for good.
    Permanent,
    /// Refuse the credentials.
    Unauthorized,
    /// Panic inside the plugin.
    Panic,
    /// Hang for `hang`.
    Hang,
}

impl ChaosSettings {
    /// Parses and validates settings.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, String> {
        let s: ChaosSettings =
            serde_json::from_value(value.clone()).map_err(|e| format!("chaos settings: {e}"))?;
        if !(0.0..=1.0).contains(&s.failure_rate) {
            return Err(format!(
                "chaos settings: failure_rate {} is outside 0..=1",
                s.failure_rate
            ));
        }
        if s.failure == Scripted::Delivered {
            return Err("chaos settings: failure cannot be \"delivered\"".into());
        }
        Ok(s)
    }
}

/// The chaos pusher.
#[derive(Debug)]
pub struct ChaosPusher {
    settings: ChaosSettings,
    pushes: AtomicU64,
    deliveries: AtomicU64,
}

fn unit_random(seed: u64, n: u64) -> f64 {
    // splitmix64: deterministic per (seed, push number).
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl ChaosPusher {
    /// A pusher from plugin settings.
    pub fn from_settings(value: &serde_json::Value) -> Result<Self, String> {
        let settings = ChaosSettings::from_value(value)?;
        if let Some(dir) = &settings.record_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("chaos settings: record_dir {}: {e}", dir.display()))?;
        }
        Ok(ChaosPusher {
            settings,
            pushes: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
        })
    }

    fn scripted(&self, n: u64) -> Scripted {
        let s = &self.settings;
        let number = n + 1;
        if s.panic_on == Some(number) {
            return Scripted::Panic;
        }
        if s.hang_on == Some(number) {
            return Scripted::Hang;
        }
        if let Some(o) = s.sequence.get(n as usize) {
            return *o;
        }
        let after = n - s.sequence.len() as u64;
        if after < s.fail_first {
            return s.failure;
        }
        if s.failure_rate > 0.0 && unit_random(s.seed, n) < s.failure_rate {
            return s.failure;
        }
        Scripted::Delivered
    }

    fn record(&self, item: &ItemMeta, payload: &[u8]) -> Result<(), String> {
        let Some(dir) = &self.settings.record_dir else {
            return Ok(());
        };
        let n = self.deliveries.fetch_add(1, Ordering::SeqCst);
        let path = dir.join(format!("{}__{n}.json", item.id));
        std::fs::write(&path, payload).map_err(|e| format!("recording to {}: {e}", path.display()))
    }
}

impl Pusher for ChaosPusher {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        let n = self.pushes.fetch_add(1, Ordering::SeqCst);
        let push_no = n + 1;
        match self.scripted(n) {
            Scripted::Delivered => match self.record(item, payload) {
                Ok(()) => PushOutcome::Delivered,
                Err(e) => PushOutcome::retryable(e),
            },
            Scripted::Retryable => PushOutcome::Retryable {
                message: format!("chaos: scripted retryable failure (push {push_no})"),
                retry_after: self.settings.retry_after,
            },
            Scripted::Permanent => PushOutcome::permanent(format!(
                "chaos: scripted permanent failure (push {push_no})"
            )),
            Scripted::Unauthorized => {
                PushOutcome::unauthorized(format!("chaos: scripted 401 (push {push_no})"))
            }
            Scripted::Panic => panic!("chaos: scripted panic (push {push_no})"),
            Scripted::Hang => {
                std::thread::sleep(self.settings.hang);
                PushOutcome::retryable(format!(
                    "chaos: hung for {:?} (push {push_no}, {:?} were left)",
                    self.settings.hang,
                    ctx.remaining()
                ))
            }
        }
    }
}

/// The chaos checker: reports `existing` fingerprints as already upstream.
#[derive(Debug)]
pub struct ChaosChecker {
    existing: Vec<String>,
}

impl ChaosChecker {
    /// A checker from plugin settings.
    pub fn from_settings(value: &serde_json::Value) -> Result<Self, String> {
        Ok(ChaosChecker {
            existing: ChaosSettings::from_value(value)?.existing,
        })
    }
}

impl FingerprintChecker for ChaosChecker {
    fn check(&self, fps: &[String], _ctx: &CallContext) -> Result<CheckResult, CheckError> {
        let (existing, missing) = fps.iter().cloned().partition(|f| self.existing.contains(f));
        Ok(CheckResult { existing, missing })
    }
}

retryq_plugin::export_plugin! {
    name: "chaos",
    pusher: ChaosPusher::from_settings,
    checker: ChaosChecker::from_settings,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> ItemMeta {
        ItemMeta {
            id: id.into(),
            ..ItemMeta::default()
        }
    }

    #[test]
    fn sequence_then_fail_first_then_deliver() {
        let p = ChaosPusher::from_settings(&serde_json::json!({
            "sequence": ["permanent", "unauthorized"], "fail_first": 2
        }))
        .unwrap();
        let ctx = CallContext::with_timeout(Duration::from_secs(1));
        let kinds: Vec<_> = (0..5)
            .map(|_| p.push(&meta("a"), b"{}", &ctx).kind())
            .collect();
        assert_eq!(
            kinds,
            [
                "permanent",
                "unauthorized",
                "retryable",
                "retryable",
                "delivered"
            ]
        );
    }

    #[test]
    fn failure_rate_is_deterministic_for_a_seed() {
        let settings = serde_json::json!({"failure_rate": 0.5, "seed": 7});
        let run = || {
            let p = ChaosPusher::from_settings(&settings).unwrap();
            let ctx = CallContext::with_timeout(Duration::from_secs(1));
            (0..64)
                .map(|_| p.push(&meta("a"), b"{}", &ctx).kind())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let failures = a.iter().filter(|k| **k == "retryable").count();
        assert!((16..=48).contains(&failures), "{failures}");
    }

    #[test]
    fn bad_settings_are_refused_with_the_key() {
        let e = ChaosPusher::from_settings(&serde_json::json!({"fail_frist": 1})).unwrap_err();
        assert!(e.contains("fail_frist"), "{e}");
        let e = ChaosPusher::from_settings(&serde_json::json!({"failure_rate": 2.0})).unwrap_err();
        assert!(e.contains("failure_rate"), "{e}");
    }

    #[test]
    fn deliveries_are_recorded_per_item() {
        let dir = std::env::temp_dir().join(format!("retryq-chaos-test-{}", std::process::id()));
        let p = ChaosPusher::from_settings(&serde_json::json!({"record_dir": dir})).unwrap();
        let ctx = CallContext::with_timeout(Duration::from_secs(1));
        p.push(&meta("item-1"), b"{\"a\":1}", &ctx);
        p.push(&meta("item-1"), b"{\"a\":1}", &ctx);
        let n = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("item-1__")
            })
            .count();
        assert_eq!(n, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
