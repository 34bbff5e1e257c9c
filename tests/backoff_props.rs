//! Property tests for the laws of `retryq::backoff`: the cap holds with any
//! jitter and sample, delays grow monotonically without jitter, no attempt
//! count schedules into the past, jitter stays in its band, the validating
//! constructor refuses nonsense, and the schedule adds up.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use retryq::backoff::{calculate_next_retry, BackoffConfig, BackoffStrategy, JitterMode};

fn strategy() -> impl Strategy<Value = BackoffStrategy> {
    prop_oneof![
        Just(BackoffStrategy::Exponential),
        Just(BackoffStrategy::Linear),
        Just(BackoffStrategy::Constant),
    ]
}

fn jitter_mode() -> impl Strategy<Value = JitterMode> {
    prop_oneof![Just(JitterMode::Proportional), Just(JitterMode::Full)]
}

/// Attempt counts, with the extremes well represented.
fn attempt() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..70u32,
        Just(u32::MAX),
        Just(u32::MAX - 1),
        Just(i32::MAX as u32),
        Just(i32::MAX as u32 + 2),
        any::<u32>(),
    ]
}

/// A valid configuration: base from a millisecond to a day, cap at or above
/// it (up to "forever"), any multiplier >= 1, any jitter in [0, 1].
fn config() -> impl Strategy<Value = BackoffConfig> {
    (
        strategy(),
        1u64..86_400_000,
        prop_oneof![Just(0u64), 0..1_000_000_000u64, Just(u64::MAX / 2_000_000)],
        prop_oneof![Just(1.0f64), 1.0..10.0f64, Just(2.0), Just(1e300)],
        prop_oneof![Just(0.0f64), 0.0..=1.0f64, Just(1.0)],
        jitter_mode(),
    )
        .prop_map(|(strategy, base_ms, extra_ms, multiplier, jitter, mode)| {
            let base = Duration::from_millis(base_ms);
            let max = base.saturating_add(Duration::from_millis(extra_ms));
            BackoffConfig::new(strategy, base, max)
                .unwrap()
                .with_multiplier(multiplier)
                .unwrap()
                .with_jitter(jitter)
                .unwrap()
                .with_jitter_mode(mode)
        })
}

fn sample() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0..1.0f64,
        Just(0.0),
        Just(0.999_999_999),
        Just(1.0),
        Just(-3.0),
        Just(7.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
    ]
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        (0i64..4_000_000_000).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        Just(DateTime::<Utc>::MAX_UTC),
        Just(DateTime::<Utc>::MAX_UTC - chrono::Duration::seconds(1)),
        Just(DateTime::<Utc>::MIN_UTC),
    ]
}

fn close_to(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn delays_never_exceed_the_cap(c in config(), a in attempt(), u in sample()) {
        prop_assert!(c.delay(a) <= c.max_interval);
        prop_assert!(c.delay_with_sample(a, u) <= c.max_interval);
        prop_assert!(c.jittered_delay(a) <= c.max_interval);
    }

    #[test]
    fn without_jitter_delays_never_shrink(c in config(), a in attempt()) {
        let next = a.saturating_add(1);
        prop_assert!(c.delay(a) <= c.delay(next), "{:?} then {:?}", c.delay(a), c.delay(next));
        // Nor does the delay fall below the base (attempt 0 counts as 1).
        prop_assert!(c.delay(a) >= c.base.min(c.max_interval));
    }

    #[test]
    fn exponential_and_linear_follow_their_formulas_below_the_cap(
        c in config(), a in 1..40u32,
    ) {
        let base = c.base.as_secs_f64();
        let expected = match c.strategy {
            BackoffStrategy::Exponential => base * c.multiplier.powi(a as i32 - 1),
            BackoffStrategy::Linear => base * f64::from(a),
            BackoffStrategy::Constant => base,
        };
        let capped = expected.min(c.max_interval.as_secs_f64());
        prop_assert!(close_to(c.delay(a).as_secs_f64(), capped), "{:?} vs {}", c.delay(a), capped);
    }

    #[test]
    fn never_schedules_into_the_past(c in config(), a in attempt(), from in time()) {
        let next = c.next_retry_from(a, from);
        prop_assert!(next >= from, "{} < {}", next, from);
        prop_assert!(calculate_next_retry(&c, a, from) >= from);
        // And never later than from + cap (saturating at the end of time).
        let latest = chrono::Duration::from_std(c.max_interval)
            .ok()
            .and_then(|d| from.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        prop_assert!(next <= latest);
    }

    #[test]
    fn proportional_jitter_stays_within_its_band(c in config(), a in attempt(), u in 0.0..=1.0f64) {
        let c = c.with_jitter_mode(JitterMode::Proportional);
        let d = c.delay(a).as_secs_f64();
        let j = c.delay_with_sample(a, u).as_secs_f64();
        let slack = 1e-9 * d.max(1.0);
        prop_assert!(j >= d * (1.0 - c.jitter) - slack, "{} below band of {}", j, d);
        prop_assert!(j <= d * (1.0 + c.jitter) + slack, "{} above band of {}", j, d);
        prop_assert!(j <= c.max_interval.as_secs_f64());
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_delay(c in config(), a in attempt(), u in sample()) {
        let c = c.with_jitter_mode(JitterMode::Full);
        let j = c.delay_with_sample(a, u);
        prop_assert!(j <= c.delay(a));
    }

    #[test]
    fn schedule_has_one_entry_per_retry_and_sums_saturating(c in config(), n in 0..200u32) {
        let schedule = c.retry_schedule(n);
        prop_assert_eq!(schedule.len(), n.saturating_sub(1) as usize);
        for (i, d) in schedule.iter().enumerate() {
            prop_assert_eq!(*d, c.delay(i as u32 + 1));
        }
        let sum = schedule.iter().fold(Duration::ZERO, |acc, d| acc.saturating_add(*d));
        prop_assert_eq!(c.total_backoff_time(n), sum);
    }

    #[test]
    fn validation_refuses_nonsense(
        s in strategy(),
        base_ms in 1u64..1_000_000,
        below in 1u64..1_000_000,
        bad_jitter in prop_oneof![-10.0..-1e-9f64, 1.000_001..10.0f64, Just(f64::NAN), Just(f64::INFINITY)],
        bad_multiplier in prop_oneof![-10.0..0.999_999f64, Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
    ) {
        let base = Duration::from_millis(base_ms);
        prop_assert_eq!(BackoffConfig::new(s, Duration::ZERO, base).unwrap_err().field, "base");
        let max = base.saturating_sub(Duration::from_millis(below.min(base_ms)));
        prop_assert_eq!(BackoffConfig::new(s, base, max).unwrap_err().field, "max");
        let ok = BackoffConfig::new(s, base, base).unwrap();
        prop_assert_eq!(ok.clone().with_jitter(bad_jitter).unwrap_err().field, "jitter");
        prop_assert_eq!(ok.clone().with_multiplier(bad_multiplier).unwrap_err().field, "multiplier");
        // validate() catches the same on a deserialized or hand-built config.
        let mut raw = ok.clone();
        raw.jitter = bad_jitter;
        prop_assert!(raw.validate().is_err());
        let mut raw = ok;
        raw.base = Duration::ZERO;
        prop_assert!(raw.validate().is_err());
    }
}

#[test]
fn the_largest_attempt_is_capped_not_overflowed() {
    for strategy in [
        BackoffStrategy::Exponential,
        BackoffStrategy::Linear,
        BackoffStrategy::Constant,
    ] {
        let c = BackoffConfig::new(
            strategy,
            Duration::from_secs(300),
            Duration::from_secs(48 * 3600),
        )
        .unwrap();
        let expected = if strategy == BackoffStrategy::Constant {
            Duration::from_secs(300)
        } else {
            Duration::from_secs(48 * 3600)
        };
        assert_eq!(c.delay(u32::MAX), expected);
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        assert!(c.next_retry_from(u32::MAX, now) > now);
        assert!(c.next_retry_from(u32::MAX, DateTime::<Utc>::MAX_UTC) == DateTime::<Utc>::MAX_UTC);
    }
}
