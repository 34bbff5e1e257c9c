//! `retryq keys`: make a keyring, add a key to it, re-seal items under the
//! newest key, check that every item opens, and set aside the items whose
//! key is gone.
//!
//! What is safe while a `retryq run` daemon owns the store:
//! - `generate` and `rotate` only write the key file, through a temporary
//!   file renamed over it; the daemon re-reads a changed key file within a
//!   second (and at once when it meets a key ID it lacks), and every older
//!   key keeps opening what it sealed.
//! - `rotate --reseal`, `check` and `quarantine` read the store directly
//!   (these are the only commands that must see envelopes, which the
//!   daemon's API never shows). On SQLite that is safe beside the daemon: a re-seal changes
//!   only payloads, one transaction per batch, each only where the payload
//!   is still the one read, so a delivery meanwhile is never undone. The
//!   files backend is locked by one process: there they need the daemon
//!   stopped, and say so.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use retryq::config::{Settings, StoreBackend};
use retryq::seal::{self, Key, Keyring, Kind, OpenError, Sealer};
use retryq::store::ListFilter;
use retryq::RetryQueue;
use serde_json::json;

use super::context::Ctx;
use super::daemon_client::DaemonClient;
use super::output::{print_json, println_out};
use super::UsageError;

/// Passes over the items a re-seal makes before it gives up on the ones
/// that kept changing under it (a busy daemon).
const RESEAL_PASSES: usize = 5;

/// `retryq keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new keyring holding one fresh key, mode 0600 (refuses to
    /// overwrite one).
    Generate {
        /// Where [default: store.encryption.key_file].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Add a fresh key to store.encryption.key_file: it seals from now on,
    /// and every older key still opens what it sealed.
    Rotate {
        /// Then re-seal every item under the new key, in batches (safe to
        /// interrupt and to run again; safe beside a running daemon on
        /// SQLite).
        #[arg(long)]
        reseal: bool,
        /// Items per batch (one transaction each).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
    },
    /// Check that every item opens with the keyring; otherwise say how
    /// many do not, under which key ID (exit 1).
    Check,
    /// Move the items sealed under the given key IDs, which the keyring
    /// does not hold (a lost key, or a damaged key ID), to the store's
    /// quarantine, where they are kept with the reason: the store then
    /// opens again. Refuses a key ID the keyring holds.
    Quarantine {
        /// A missing key ID, as the refusal to open named it (repeatable).
        #[arg(long = "key-id", value_name = "ID", required = true)]
        key_ids: Vec<String>,
    },
}

/// Runs one `retryq keys` command.
pub(crate) fn run(ctx: &Ctx, command: KeysCommand) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    match command {
        KeysCommand::Generate { out } => generate(ctx, &settings, out),
        KeysCommand::Rotate { reseal, batch } => rotate(ctx, &settings, reseal, batch as usize),
        KeysCommand::Check => check(ctx, &settings),
        KeysCommand::Quarantine { key_ids } => quarantine(ctx, &settings, &key_ids),
    }
}

/// Quarantines the items sealed under `key_ids`, none of which the
/// keyring may hold: the one way past a refusal to open for a key that
/// will not come back, and an operator's decision, never the daemon's.
fn quarantine(ctx: &Ctx, settings: &Settings, key_ids: &[String]) -> anyhow::Result<()> {
    let enc = &settings.store.encryption;
    enc.validate()?;
    if enc.is_disabled() {
        bail!(UsageError(
            "encryption is off: set [store.encryption] to the keyring the store's other items              are sealed with, so that only items under key IDs it lacks are set aside"
                .to_owned()
        ));
    }
    let sealer = seal::KeySource::from_settings(enc)?.current();
    if let Some(held) = key_ids.iter().find(|id| sealer.ring().get(id).is_some()) {
        bail!(UsageError(format!(
            "key {held} is in the keyring {}: its items open and are not set aside",
            sealer.ring().source()
        )));
    }
    let store = raw_store(ctx, settings, "`retryq keys quarantine`")?;
    let result = (|| -> anyhow::Result<usize> {
        let mut moved = 0;
        for item in store
            .list(&ListFilter::default())
            .context("cannot list the items")?
        {
            let Kind::Sealed(kid) = seal::envelope::kind(&item.report) else {
                continue;
            };
            if !key_ids.contains(&kid) {
                continue;
            }
            let reason = format!(
                "sealed under key {kid}, which the keyring does not hold; set aside by                  `retryq keys quarantine`"
            );
            store
                .quarantine(&item.id, &reason)
                .with_context(|| format!("cannot quarantine item {}", item.id))?;
            moved += 1;
        }
        Ok(moved)
    })();
    let closed = store.close();
    let moved = result?;
    closed.context("cannot close the store")?;
    if ctx.json {
        return print_json(&json!({ "quarantined": moved, "key_ids": key_ids }));
    }
    println_out(&format!(
        "moved {moved} item(s) sealed under {} to the quarantine",
        key_ids.join(", ")
    ))
}

fn key_file(settings: &Settings) -> anyhow::Result<&Path> {
    match (
        &settings.store.encryption.key_file,
        &settings.store.encryption.key_env,
    ) {
        (Some(path), _) => Ok(path),
        (None, Some(var)) => bail!(UsageError(format!(
            "the keyring comes from ${var} ([store.encryption] key_env): rotate it there by \
             appending ,ID:SECRET of a new key (`retryq keys generate --out FILE` makes one), \
             or move it to a key_file"
        ))),
        (None, None) => bail!(UsageError(
            "encryption is off: set [store.encryption] key_file (see `retryq keys generate`)"
                .to_owned()
        )),
    }
}

fn generate(ctx: &Ctx, settings: &Settings, out: Option<PathBuf>) -> anyhow::Result<()> {
    let path = match out {
        Some(path) => path,
        None => key_file(settings)?.to_path_buf(),
    };
    let ring = Keyring::new(vec![Key::generate()?], path.display().to_string())?;
    ring.write_file(&path, false)?;
    let kid = ring.sealing().id.clone();
    if ctx.json {
        return print_json(&json!({ "key_file": path, "key_id": kid }));
    }
    println_out(&format!(
        "wrote {} (mode 0600) with key {kid}; to use it:\n\n[store.encryption]\nkey_file = {:?}\n\n\
         Back it up: an item sealed under a lost key can never be read.",
        path.display(),
        path.display().to_string()
    ))
}

fn rotate(ctx: &Ctx, settings: &Settings, reseal: bool, batch: usize) -> anyhow::Result<()> {
    let path = key_file(settings)?;
    let ring = Keyring::load_file(path)?;
    let ring = ring.with_key(Key::generate()?)?;
    ring.write_file(path, true)?;
    let kid = ring.sealing().id.clone();
    let older = ring.keys().len() - 1;
    if !ctx.json {
        println_out(&format!(
            "added key {kid} to {}: it seals from now on; the {older} older key(s) still open \
             what they sealed",
            path.display()
        ))?;
    }
    let report = if reseal {
        Some(reseal_all(ctx, settings, &Sealer::new(ring)?, batch)?)
    } else {
        None
    };
    if ctx.json {
        return print_json(&json!({
            "key_file": path,
            "key_id": kid,
            "keys": older + 1,
            "resealed": report.map(|r| r.resealed),
            "left": report.map(|r| r.left),
        }));
    }
    if let Some(r) = report {
        println_out(&format!(
            "re-sealed {} item(s) under key {kid}; {} still under an older key",
            r.resealed, r.left
        ))?;
        if r.left > 0 {
            bail!(
                "{} item(s) were not re-sealed (they kept changing, or do not open: see \
                 `retryq keys check`); run `retryq keys rotate --reseal` again later \
                 (it skips what is done)",
                r.left
            );
        }
    }
    Ok(())
}

/// The store, unsealed, for a command that reads envelopes: refused on the
/// files backend while a daemon holds it.
fn raw_store(
    ctx: &Ctx,
    settings: &Settings,
    what: &str,
) -> anyhow::Result<std::sync::Arc<dyn RetryQueue>> {
    if settings.store.backend == StoreBackend::Files {
        if let Some(daemon) = DaemonClient::find(settings)? {
            bail!(
                "{what} reads the files-backend directory {}, which the running daemon (pid {}) \
                 holds locked: stop `retryq run`, then run it again",
                settings.store.effective_path().display(),
                daemon.pid()
            );
        }
    }
    ctx.open_raw_store(settings)
}

#[derive(Debug, Clone, Copy)]
struct Resealed {
    resealed: usize,
    left: usize,
}

fn reseal_all(
    ctx: &Ctx,
    settings: &Settings,
    sealer: &Sealer,
    batch: usize,
) -> anyhow::Result<Resealed> {
    let store = raw_store(ctx, settings, "`retryq keys rotate --reseal`")?;
    let result = (|| -> anyhow::Result<Resealed> {
        let mut resealed = 0;
        let mut left = 0;
        for _ in 0..RESEAL_PASSES {
            let stale: Vec<_> = store
                .list(&ListFilter::default())
                .context("cannot list the items to re-seal")?
                .into_iter()
                .filter(|item| {
                    matches!(seal::envelope::kind(&item.report), Kind::Sealed(kid) if kid != sealer.sealing_kid())
                })
                .collect();
            if stale.is_empty() {
                left = 0;
                break;
            }
            let bar = progress(stale.len(), ctx.json);
            left = 0;
            let mut changed = 0;
            for chunk in stale.chunks(batch) {
                let report = seal::reseal_batch(store.as_ref(), sealer, chunk)
                    .context("cannot re-seal a batch (the batches before it are done)")?;
                resealed += report.resealed;
                changed += report.changed;
                left += report.changed + report.unreadable;
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            // Another pass helps only items that changed under us.
            if changed == 0 {
                break;
            }
        }
        Ok(Resealed { resealed, left })
    })();
    let closed = store.close();
    let value = result?;
    closed.context("cannot close the store")?;
    Ok(value)
}

fn progress(total: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "re-sealing [{bar:30}] {human_pos}/{human_len} items, eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("#>.");
    bar.set_style(style);
    bar
}

fn check(ctx: &Ctx, settings: &Settings) -> anyhow::Result<()> {
    let enc = &settings.store.encryption;
    enc.validate()?;
    let sealer = if enc.is_enabled() {
        Some(seal::KeySource::from_settings(enc)?.current())
    } else {
        None
    };
    let store = raw_store(ctx, settings, "`retryq keys check`")?;
    let items = store.list(&ListFilter::default());
    let closed = store.close();
    let items = items.context("cannot list the items")?;
    closed.context("cannot close the store")?;

    let mut clear = 0usize;
    let mut sealed: std::collections::BTreeMap<String, usize> = Default::default();
    // Per key ID: items that do not open, and why (the first reason seen).
    let mut failing: std::collections::BTreeMap<String, (usize, String)> = Default::default();
    for item in &items {
        let kid = match seal::envelope::kind(&item.report) {
            Kind::Clear => {
                clear += 1;
                continue;
            }
            Kind::Sealed(kid) => kid,
            Kind::Malformed(reason) => {
                let entry = failing
                    .entry("(unreadable)".to_owned())
                    .or_insert((0, reason));
                entry.0 += 1;
                continue;
            }
        };
        *sealed.entry(kid.clone()).or_default() += 1;
        let why = match &sealer {
            None => Some("encryption is off ([store.encryption] sets no key)".to_owned()),
            Some(sealer) => match sealer.open(&item.id, &item.report) {
                Ok(_) => None,
                Err(OpenError::UnknownKey { .. }) => {
                    Some(format!("key {kid} is not in the keyring"))
                }
                Err(OpenError::Corrupt(reason)) => Some(reason),
            },
        };
        if let Some(why) = why {
            let entry = failing.entry(kid).or_insert((0, why));
            entry.0 += 1;
        }
    }
    let not_opening: usize = failing.values().map(|(n, _)| n).sum();
    if ctx.json {
        print_json(&json!({
            "items": items.len(),
            "clear": clear,
            "sealed": sealed,
            "sealing_key": sealer.as_ref().map(|s| s.sealing_kid().to_owned()),
            "not_opening": not_opening,
            "failing": failing.iter().map(|(kid, (n, why))| json!({"key_id": kid, "items": n, "reason": why})).collect::<Vec<_>>(),
        }))?;
    } else {
        let by_key = sealed
            .iter()
            .map(|(kid, n)| format!("{kid}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println_out(&format!(
            "{} item(s): {clear} clear, {} sealed{}",
            items.len(),
            sealed.values().sum::<usize>(),
            if by_key.is_empty() {
                String::new()
            } else {
                format!(" ({by_key})")
            }
        ))?;
        for (kid, (n, why)) in &failing {
            println_out(&format!("  {n} item(s) under key {kid} do not open: {why}"))?;
        }
        if not_opening == 0 {
            println_out("every item opens")?;
        }
    }
    if not_opening > 0 {
        bail!(
            "{not_opening} item(s) do not open ({})",
            failing
                .iter()
                .map(|(kid, (n, _))| format!("key {kid}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
