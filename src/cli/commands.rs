//! One function per command: load the configuration, open the store, do
//! the thing, print the result.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use retryq::config::{LoadOptions, Settings};
use retryq::store::{ListFilter, RetryQueue};
use retryq::{ItemStatus, NewItem, Payload};
use serde_json::json;

use super::output::{item_json, print_json, println_out, short, table, time};
use super::{
    Cli, Command, ConfigCommand, EnqueueArgs, ListArgs, PluginsCommand, RetryArgs, UsageError,
};

/// What every command shares: output mode and how to load the configuration.
pub(crate) struct Ctx {
    pub(crate) json: bool,
    pub(crate) load: LoadOptions,
}

impl Ctx {
    pub(crate) fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(&self.load)?)
    }

    pub(crate) fn open_store(&self, settings: &Settings) -> anyhow::Result<Arc<dyn RetryQueue>> {
        settings.open_store().with_context(|| {
            format!(
                "cannot open the {} store at {}",
                settings.store.backend.as_str(),
                settings.store.effective_path().display()
            )
        })
    }
}

/// Runs the parsed command line.
pub fn run_command(cli: Cli) -> anyhow::Result<()> {
    let ctx = Ctx {
        json: cli.json,
        load: LoadOptions {
            config_dir: cli.config_dir.clone(),
            files: cli.config.clone(),
            ..LoadOptions::default()
        },
    };
    match cli.command {
        Command::Run => run_daemon(&ctx),
        Command::Enqueue(args) => enqueue(&ctx, args),
        Command::List(args) => list(&ctx, args),
        Command::Show { id, payload } => show(&ctx, &id, payload),
        Command::Stats => stats(&ctx),
        Command::Delete { id } => with_store(&ctx, |q| {
            q.delete(&id)?;
            if ctx.json {
                print_json(&json!({ "deleted": id }))
            } else {
                println_out(&format!("deleted {id}"))
            }
        }),
        Command::Retry(args) => retry(&ctx, args),
        Command::Purge { status } => purge(&ctx, status.into()),
        Command::Cleanup { ttl } => cleanup(&ctx, ttl),
        Command::Schedule { max_attempts } => schedule(&ctx, max_attempts),
        Command::Plugins(PluginsCommand::Check { plugin, settings }) => {
            plugins_check(&ctx, &plugin, settings.as_deref())
        }
        Command::Migrate { from } => super::migrate::migrate(&ctx, &from),
        Command::Config(ConfigCommand::Check) => config_check(&ctx),
        Command::Config(ConfigCommand::Show) => config_show(&ctx),
    }
}

/// Opens the store, runs `f`, and closes the store whatever `f` returned.
fn with_store<T>(
    ctx: &Ctx,
    f: impl FnOnce(&dyn RetryQueue) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let settings = ctx.settings()?;
    let queue = ctx.open_store(&settings)?;
    let result = f(queue.as_ref());
    let closed = queue.close();
    let value = result?;
    closed.context("cannot close the store")?;
    Ok(value)
}

fn run_daemon(ctx: &Ctx) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    super::logging::init(&settings.log);
    if !settings.pusher.is_configured() {
        return Err(UsageError(
            "no transport configured: set [pusher] name or path (see config/demo.toml for a \
             server-less demo, config/openctem.toml for the HTTP plugin)"
                .to_owned(),
        )
        .into());
    }
    retryq::daemon::run_until_signal(settings).map_err(anyhow::Error::from)
}

fn read_payload(file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    match file {
        None => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the payload from stdin")?;
        }
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the payload from stdin")?;
        }
        Some(p) => {
            bytes = std::fs::read(p)
                .with_context(|| format!("cannot read the payload file {}", p.display()))?;
        }
    }
    Ok(bytes)
}

fn enqueue(ctx: &Ctx, args: EnqueueArgs) -> anyhow::Result<()> {
    let bytes = read_payload(args.file.as_deref())?;
    let payload = Payload::from_json_bytes(&bytes).map_err(|e| {
        let source = args
            .file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdin".to_owned());
        UsageError(format!("{source}: {e}"))
    })?;
    let mut item = NewItem::new(payload).with_type(args.item_type.as_str());
    item.id = args.id;
    item.fingerprint = args.fingerprint;
    item.max_attempts = args.max_attempts;
    item.agent_id = args.agent_id;
    item.scanner_name = args.scanner_name;
    item.target_path = args.target_path;
    item.attributes = args.attrs.into_iter().collect();
    with_store(ctx, |q| {
        let id = q.enqueue(item)?;
        if ctx.json {
            print_json(&json!({ "id": id }))
        } else {
            println_out(&id)
        }
    })
}

fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<()> {
    let filter = ListFilter {
        status: args.status.map(Into::into),
        item_type: args.item_type.map(|t| t.as_str().into()),
        ready_only: args.ready,
        order_by: args.order_by.into(),
        descending: args.desc,
        offset: args.offset,
        limit: Some(args.limit),
    };
    with_store(ctx, |q| {
        let items = q.list(&filter)?;
        if ctx.json {
            let values = items
                .iter()
                .map(|i| item_json(i, false))
                .collect::<anyhow::Result<Vec<_>>>()?;
            return print_json(&values);
        }
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.item_type.to_string(),
                    i.status.to_string(),
                    format!("{}/{}", i.attempts, i.max_attempts),
                    time(Some(i.next_retry)),
                    short(&i.last_error, 60),
                ]
            })
            .collect();
        println_out(&table(
            &[
                "ID",
                "TYPE",
                "STATUS",
                "ATTEMPTS",
                "NEXT_RETRY",
                "LAST_ERROR",
            ],
            &rows,
        ))?;
        if items.is_empty() {
            eprintln!("(no items)");
        }
        Ok(())
    })
}

fn show(ctx: &Ctx, id: &str, payload: bool) -> anyhow::Result<()> {
    with_store(ctx, |q| {
        let item = q.get(id)?;
        if ctx.json {
            return print_json(&item_json(&item, payload)?);
        }
        let mut lines = vec![
            format!("id:           {}", item.id),
            format!("type:         {}", item.item_type),
            format!("status:       {}", item.status),
            format!("fingerprint:  {}", item.fingerprint),
            format!("attempts:     {}/{}", item.attempts, item.max_attempts),
            format!("next_retry:   {}", time(Some(item.next_retry))),
            format!("last_attempt: {}", time(item.last_attempt)),
            format!("last_error:   {}", short(&item.last_error, 200)),
            format!("created_at:   {}", time(Some(item.created_at))),
            format!("updated_at:   {}", time(Some(item.updated_at))),
            format!("agent_id:     {}", item.agent_id),
            format!("scanner_name: {}", item.scanner_name),
            format!("target_path:  {}", item.target_path),
            format!("size_bytes:   {}", item.size_bytes()),
        ];
        if let Some(lease) = item.lease_until {
            lines.push(format!("lease_until:  {}", time(Some(lease))));
        }
        for (k, v) in &item.attributes {
            lines.push(format!("attr.{k}: {v}"));
        }
        if payload {
            let pretty = serde_json::to_string_pretty(&item.report.to_value())
                .context("cannot format the payload")?;
            lines.push(format!("payload:\n{pretty}"));
        }
        println_out(&lines.join("\n"))
    })
}

fn stats(ctx: &Ctx) -> anyhow::Result<()> {
    with_store(ctx, |q| {
        let s = q.stats()?;
        if ctx.json {
            return print_json(&s);
        }
        println_out(
            &[
                format!("total_items:      {}", s.total_items),
                format!("pending_items:    {}", s.pending_items),
                format!("processing_items: {}", s.processing_items),
                format!("failed_items:     {}", s.failed_items),
                format!("oldest_item:      {}", time(s.oldest_item)),
                format!("newest_item:      {}", time(s.newest_item)),
                format!("total_retries:    {}", s.total_retries),
                format!("last_retry:       {}", time(s.last_retry)),
                format!("total_bytes:      {}", s.total_bytes),
                format!("bytes_on_disk:    {}", s.bytes_on_disk),
                format!("quarantined:      {}", s.quarantined),
                format!("evicted:          {}", s.evicted),
            ]
            .join("\n"),
        )
    })
}

fn retry(ctx: &Ctx, args: RetryArgs) -> anyhow::Result<()> {
    with_store(ctx, |q| {
        let ids: Vec<String> = match (&args.id, args.failed) {
            (Some(id), _) => vec![id.clone()],
            (None, true) => q
                .list(&ListFilter {
                    status: Some(ItemStatus::Failed),
                    ..ListFilter::default()
                })?
                .into_iter()
                .map(|i| i.id)
                .collect(),
            (None, false) => bail!(UsageError("give an ID or --failed".to_owned())),
        };
        let mut revived = Vec::with_capacity(ids.len());
        for id in &ids {
            revived.push(q.revive(id)?.id);
        }
        if ctx.json {
            print_json(&json!({ "revived": revived.len(), "ids": revived }))
        } else {
            println_out(&format!(
                "{} item(s) back to pending, due now",
                revived.len()
            ))
        }
    })
}

fn purge(ctx: &Ctx, status: ItemStatus) -> anyhow::Result<()> {
    with_store(ctx, |q| {
        let items = q.list(&ListFilter {
            status: Some(status),
            ..ListFilter::default()
        })?;
        let mut purged = 0usize;
        for item in &items {
            match q.delete(&item.id) {
                Ok(()) => purged += 1,
                // Gone meanwhile (a daemon delivered or expired it): nothing to purge.
                Err(retryq::QueueError::ItemNotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if ctx.json {
            print_json(&json!({ "purged": purged, "status": status.as_str() }))
        } else {
            println_out(&format!("purged {purged} {status} item(s)"))
        }
    })
}

fn cleanup(ctx: &Ctx, ttl: Option<std::time::Duration>) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    let ttl = ttl.unwrap_or(settings.worker.ttl);
    let queue = ctx.open_store(&settings)?;
    let result = queue.cleanup(ttl);
    queue.close().context("cannot close the store")?;
    let report = result?;
    if ctx.json {
        let mut v = serde_json::to_value(report).context("cannot serialize the report")?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("removed".to_owned(), report.removed().into());
            obj.insert(
                "ttl".to_owned(),
                humantime::format_duration(ttl).to_string().into(),
            );
        }
        print_json(&v)
    } else {
        println_out(&format!(
            "removed {} item(s) (ttl {}): {} expired, {} dead letters expired; {} quarantined record(s) trimmed",
            report.removed(),
            humantime::format_duration(ttl),
            report.expired,
            report.dead_letters_expired,
            report.quarantine_trimmed
        ))
    }
}

fn schedule(ctx: &Ctx, max_attempts: Option<u32>) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    let max_attempts = max_attempts.unwrap_or(settings.worker.max_attempts);
    if max_attempts == 0 {
        bail!(UsageError("--max-attempts must be at least 1".to_owned()));
    }
    let backoff = &settings.backoff;
    let delays = backoff.retry_schedule(max_attempts);
    let total = backoff.total_backoff_time(max_attempts);
    let fmt = |d: std::time::Duration| humantime::format_duration(d).to_string();
    if ctx.json {
        let mut elapsed = std::time::Duration::ZERO;
        let entries: Vec<_> = delays
            .iter()
            .enumerate()
            .map(|(i, d)| {
                elapsed = elapsed.saturating_add(*d);
                json!({
                    "after_attempt": i + 1,
                    "delay": fmt(*d),
                    "delay_secs": d.as_secs_f64(),
                    "elapsed": fmt(elapsed),
                    "elapsed_secs": elapsed.as_secs_f64(),
                })
            })
            .collect();
        return print_json(&json!({
            "strategy": backoff.strategy,
            "base": fmt(backoff.base),
            "max": fmt(backoff.max_interval),
            "multiplier": backoff.multiplier,
            "jitter": backoff.jitter,
            "jitter_mode": backoff.jitter_mode,
            "max_attempts": max_attempts,
            "retry_schedule": entries,
            "total_backoff_time": fmt(total),
            "total_backoff_secs": total.as_secs_f64(),
        }));
    }
    let mut elapsed = std::time::Duration::ZERO;
    let rows: Vec<Vec<String>> = delays
        .iter()
        .enumerate()
        .map(|(i, d)| {
            elapsed = elapsed.saturating_add(*d);
            vec![(i + 1).to_string(), fmt(*d), fmt(elapsed)]
        })
        .collect();
    println_out(&table(&["AFTER_ATTEMPT", "DELAY", "ELAPSED"], &rows))?;
    println_out(&format!(
        "total backoff time over {max_attempts} attempts: {} (jitter ±{} not included)",
        fmt(total),
        backoff.jitter
    ))
}

fn plugins_check(ctx: &Ctx, plugin: &str, settings_json: Option<&str>) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    let plugin_settings = match settings_json {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => bail!(UsageError(format!(
                "--settings must be a JSON object, got {}",
                short(text, 60)
            ))),
        },
        None if settings.pusher.name.as_deref() == Some(plugin)
            || settings.pusher.path.as_deref() == Some(Path::new(plugin)) =>
        {
            settings.pusher.settings.clone()
        }
        None => serde_json::Map::new(),
    };
    let report = super::plugin_check::check(plugin, plugin_settings, &settings)?;
    if ctx.json {
        print_json(&report)?;
    } else {
        println_out(&serde_json::to_string_pretty(&report).context("cannot format the report")?)?;
    }
    let failed: Vec<&str> = report
        .report
        .findings
        .iter()
        .filter(|f| !f.passed)
        .map(|f| f.check.as_str())
        .collect();
    if !report.passed {
        anyhow::bail!(
            "plugin {plugin} failed the conformance checks: {}",
            if failed.is_empty() {
                "nothing could be checked".to_owned()
            } else {
                failed.join(", ")
            }
        );
    }
    Ok(())
}

fn config_check(ctx: &Ctx) -> anyhow::Result<()> {
    let loaded = Settings::load_with_origins(&ctx.load)?;
    let settings = loaded.settings;
    let layers: Vec<String> = loaded.layers.iter().map(ToString::to_string).collect();
    if ctx.json {
        print_json(&json!({
            "ok": true,
            "layers": layers,
            "store": {
                "backend": settings.store.backend.as_str(),
                "path": settings.store.effective_path(),
            },
            "pusher": settings.pusher.is_configured().then(|| settings.pusher.describe()),
            "checker": settings.checker.is_configured().then(|| settings.checker.describe()),
        }))
    } else {
        println_out(&format!(
            "configuration OK ({}): store {} at {}, pusher {}",
            layers.join(", "),
            settings.store.backend.as_str(),
            settings.store.effective_path().display(),
            settings.pusher.describe()
        ))
    }
}

fn config_show(ctx: &Ctx) -> anyhow::Result<()> {
    let settings = ctx.settings()?.redacted();
    if ctx.json {
        print_json(&settings)
    } else {
        let text = toml::to_string(&settings).context("cannot format the configuration as TOML")?;
        println_out(text.trim_end())
    }
}
