//! One function per command: load the configuration, reach the store, do
//! the thing, print the result.
//!
//! Reaching the store: when a `retryq run` daemon owns it (its owner lock is
//! held), a command goes through that daemon's admin API
//! ([`DaemonClient`]); otherwise it opens the store itself. Both paths print
//! the same output, human and `--json`. The CLI never takes the owner lock
//! and never claims.

use retryq::item::ItemId;

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use retryq::admin::bulk;
use retryq::config::{LoadOptions, Settings, StoreBackend};
use retryq::store::{ListFilter, QueueStats, RetryQueue, SqliteRetryQueue};
use retryq::worker::WorkerStats;
use retryq::{ItemStatus, NewItem, Payload, QueueItem};
use serde_json::{json, Value};

use super::context::Ctx;
use super::daemon_client::{DaemonClient, NoDaemon};
use super::output::{item_json, json_time, print_json, println_out, short, table, time};
use super::{
    Cli, Command, ConfigCommand, EnqueueArgs, ListArgs, PluginsCommand, RetryArgs, UsageError,
};

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
        Command::Delete { id } => delete(&ctx, &id),
        Command::Retry(args) => retry(&ctx, args),
        Command::Purge { status } => purge(&ctx, status.into()),
        Command::Cleanup { ttl } => cleanup(&ctx, ttl),
        Command::Pause { reason } => pause(&ctx, reason),
        Command::Resume => resume(&ctx),
        Command::Repair => repair(&ctx),
        Command::Schedule { max_attempts } => schedule(&ctx, max_attempts),
        Command::Plugins(PluginsCommand::Check { plugin, settings }) => {
            plugins_check(&ctx, &plugin, settings.as_deref())
        }
        Command::Migrate { from } => super::migrate::migrate(&ctx, &from),
        Command::Config(ConfigCommand::Check) => config_check(&ctx),
        Command::Config(ConfigCommand::Show) => config_show(&ctx),
        Command::Keys(command) => super::keys::run(&ctx, command),
        Command::PluginHost {
            path,
            label,
            sha256,
            threads,
            memory_limit,
        } => Ok(retryq::plugin_process::child::serve(
            retryq::plugin_process::child::ChildArgs {
                path,
                label,
                sha256,
                threads,
                memory_limit,
            },
        )?),
    }
}

/// How a command reaches the store.
enum Route {
    /// A running daemon owns it: through its admin API.
    Daemon(DaemonClient),
    /// Nobody owns it: the CLI opens it.
    Direct,
}

/// The settings and the route to the store they name.
fn route(ctx: &Ctx) -> anyhow::Result<(Settings, Route)> {
    let settings = ctx.settings()?;
    let route = match DaemonClient::find(&settings)? {
        Some(client) => Route::Daemon(client),
        None => Route::Direct,
    };
    Ok((settings, route))
}

/// Opens the store, runs `f`, and closes the store whatever `f` returned.
fn with_store<T>(
    ctx: &Ctx,
    settings: &Settings,
    f: impl FnOnce(&dyn RetryQueue) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let queue = ctx.open_store(settings)?;
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
    let source = || {
        args.file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "stdin".to_owned())
    };
    let (settings, route) = route(ctx)?;
    // The API's limit, so a report is accepted or refused alike whichever
    // way it comes in; checked before anything is stored or sent.
    let limit = settings.admin.body_limit as u64;
    if bytes.len() as u64 > limit {
        bail!(UsageError(format!(
            "{}: the report is {} bytes, larger than the limit of {limit} bytes \
             (admin.max_body, the API's limit too); nothing was queued",
            source(),
            bytes.len()
        )));
    }
    // Validated here too, for the same usage error on both routes.
    let payload =
        Payload::from_json_bytes(&bytes).map_err(|e| UsageError(format!("{}: {e}", source())))?;
    let id = match route {
        Route::Daemon(client) => {
            let mut query: Vec<(&str, String)> = vec![("type", args.item_type.clone())];
            let optional = [
                ("fingerprint", args.fingerprint.clone()),
                ("id", args.id.as_ref().map(ToString::to_string)),
                ("max_attempts", args.max_attempts.map(|n| n.to_string())),
            ];
            query.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
            for (name, value) in [
                ("agent_id", &args.agent_id),
                ("scanner_name", &args.scanner_name),
                ("target_path", &args.target_path),
            ] {
                if !value.is_empty() {
                    query.push((name, value.clone()));
                }
            }
            let attrs: Vec<(String, String)> = args
                .attrs
                .iter()
                .map(|(k, v)| (format!("attr.{k}"), v.clone()))
                .collect();
            query.extend(attrs.iter().map(|(k, v)| (k.as_str(), v.clone())));
            let answer = client.post(client.url(&["v1", "items"], &query)?, Some(bytes))?;
            answer["id"]
                .as_str()
                .map(str::to_owned)
                .context("the daemon's answer names no item ID")?
        }
        Route::Direct => {
            let mut item = NewItem::new(payload).with_type(args.item_type.as_str());
            item.id = args.id;
            item.fingerprint = args.fingerprint;
            item.max_attempts = args.max_attempts;
            item.agent_id = args.agent_id;
            item.scanner_name = args.scanner_name;
            item.target_path = args.target_path;
            item.attributes = args.attrs.into_iter().collect();
            with_store(ctx, &settings, |q| Ok(q.enqueue(item)?))?.to_string()
        }
    };
    if ctx.json {
        print_json(&json!({ "id": id }))
    } else {
        println_out(&id)
    }
}

/// The API's page cap may be below `--limit`: pages are fetched until the
/// limit is reached or the daemon has no more.
fn list_through(client: &DaemonClient, args: &ListArgs) -> anyhow::Result<Vec<Value>> {
    let mut items: Vec<Value> = Vec::new();
    while items.len() < args.limit {
        let mut query: Vec<(&str, String)> = vec![
            ("limit", (args.limit - items.len()).to_string()),
            ("offset", (args.offset + items.len()).to_string()),
            ("order_by", order_name(args.order_by).to_owned()),
            ("desc", args.desc.to_string()),
            ("ready", args.ready.to_string()),
        ];
        if let Some(status) = args.status {
            query.push(("status", ItemStatus::from(status).as_str().to_owned()));
        }
        if let Some(t) = &args.item_type {
            query.push(("type", t.clone()));
        }
        let answer = client.get(client.url(&["v1", "items"], &query)?)?;
        let page = match answer.get("items") {
            Some(Value::Array(page)) => page.clone(),
            _ => bail!("the daemon's item list has no items array"),
        };
        if page.is_empty() {
            break;
        }
        items.extend(page);
    }
    Ok(items)
}

fn order_name(order: super::OrderArg) -> &'static str {
    match order {
        super::OrderArg::CreatedAt => "created_at",
        super::OrderArg::NextRetry => "next_retry",
        super::OrderArg::Attempts => "attempts",
    }
}

fn list(ctx: &Ctx, args: ListArgs) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    // Both routes give the items as the API's JSON (no payloads), printed
    // the same way.
    let items: Vec<Value> = match route {
        Route::Daemon(client) => list_through(&client, &args)?,
        Route::Direct => {
            let filter = ListFilter {
                status: args.status.map(Into::into),
                item_type: args.item_type.map(|t| t.as_str().into()),
                ready_only: args.ready,
                order_by: args.order_by.into(),
                descending: args.desc,
                offset: args.offset,
                limit: Some(args.limit),
            };
            with_store(ctx, &settings, |q| {
                q.list(&filter)?
                    .iter()
                    .map(|i| item_json(i, false))
                    .collect::<anyhow::Result<Vec<_>>>()
            })?
        }
    };
    if ctx.json {
        return print_json(&items);
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                text(&i["id"]),
                text(&i["type"]),
                text(&i["status"]),
                format!("{}/{}", text(&i["attempts"]), text(&i["max_attempts"])),
                time(json_time(&i["next_retry"])),
                short(&text(&i["last_error"]), 60),
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
}

fn show(ctx: &Ctx, id: &ItemId, payload: bool) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    let item: QueueItem = match route {
        Route::Daemon(client) => {
            // With the payload, the API's item is the whole item.
            let url = client.url(&["v1", "items", id], &[("payload", "true".to_owned())])?;
            serde_json::from_value(client.get(url)?)
                .context("the daemon's answer is not an item")?
        }
        Route::Direct => with_store(ctx, &settings, |q| Ok(q.get(id)?))?,
    };
    if ctx.json {
        return print_json(&item_json(&item, payload)?);
    }
    let mut lines = vec![
        format!("id:           {}", item.id),
        format!("type:         {}", item.item_type),
        format!("status:       {}", item.status()),
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
    if let Some(lease) = item.lease_until() {
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
}

fn stats(ctx: &Ctx) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    let via_daemon = matches!(route, Route::Daemon(_));
    let (stats, worker, body) = match route {
        Route::Daemon(client) => {
            let body = client.get(client.url(&["v1", "stats"], &[])?)?;
            let stats: QueueStats = serde_json::from_value(body.clone())
                .context("the daemon's statistics are not queue statistics")?;
            let worker: Option<WorkerStats> = match &body["worker"] {
                Value::Null => None,
                w => Some(
                    serde_json::from_value(w.clone())
                        .context("the daemon's worker statistics are not readable")?,
                ),
            };
            (stats, worker, body)
        }
        Route::Direct => {
            let stats = with_store(ctx, &settings, |q| Ok(q.stats()?))?;
            let body = serde_json::to_value(&stats).context("cannot serialize the statistics")?;
            (stats, None, body)
        }
    };
    if ctx.json {
        // The daemon's answer adds `worker` (paused, pause_reason, ...).
        return print_json(&body);
    }
    let s = stats;
    let mut lines = vec![
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
    ];
    if s.salvaged > 0 || s.salvage_lost > 0 {
        lines.push(format!("salvaged:         {}", s.salvaged));
        lines.push(format!("salvage_lost:     {}", s.salvage_lost));
    }
    if s.skipped_entries > 0 {
        lines.push(format!("skipped_entries:  {}", s.skipped_entries));
    }
    lines.push(format!(
        "delivery:         {}",
        delivery_state(via_daemon, worker.as_ref())
    ));
    for host in body["worker"]["plugin_hosts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = host["plugin"].as_str().unwrap_or("?");
        let deaths = host["deaths"].as_u64().unwrap_or(0);
        let mut line = format!("plugin_host:      {name}: {deaths} deaths");
        if let Some(last) = host["last_death"].as_str() {
            line.push_str(&format!(", last {last}"));
        }
        if host["crash_loop"].as_bool() == Some(true) {
            line.push_str("; CRASH LOOP, restarts held back");
        }
        lines.push(line);
    }
    if let Some(w) = &worker {
        if let Some(error) = &w.store_error {
            lines.push(format!(
                "store_error:      {} (since {})",
                short(error, 160),
                time(w.store_failing_since)
            ));
        }
    }
    println_out(&lines.join("\n"))
}

/// The worker's state in a few words: running, paused and why, circuit open.
fn delivery_state(via_daemon: bool, worker: Option<&WorkerStats>) -> String {
    let Some(w) = worker else {
        return if via_daemon {
            "stopped (the daemon's worker is not running)".to_owned()
        } else {
            "no daemon running on this store".to_owned()
        };
    };
    if !w.is_running {
        return "stopped".to_owned();
    }
    if w.paused {
        return format!(
            "paused since {}: {}",
            time(w.paused_since),
            w.pause_reason.as_deref().unwrap_or("no reason given")
        );
    }
    match w.circuit_state {
        retryq::worker::CircuitState::Closed => "running".to_owned(),
        retryq::worker::CircuitState::Open => {
            "circuit open: upstream looks down, waiting for the cool-down".to_owned()
        }
        retryq::worker::CircuitState::HalfOpen => {
            "circuit half-open: probing the upstream".to_owned()
        }
    }
}

fn delete(ctx: &Ctx, id: &ItemId) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    match route {
        Route::Daemon(client) => {
            client.delete(client.url(&["v1", "items", id], &[])?)?;
        }
        Route::Direct => with_store(ctx, &settings, |q| Ok(q.delete(id)?))?,
    }
    if ctx.json {
        print_json(&json!({ "deleted": id }))
    } else {
        println_out(&format!("deleted {id}"))
    }
}

fn retry(ctx: &Ctx, args: RetryArgs) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    let revived: Vec<ItemId> = match (&args.id, args.failed, route) {
        (None, false, _) => bail!(UsageError("give an ID or --failed".to_owned())),
        (Some(id), _, Route::Daemon(client)) => {
            client.post(client.url(&["v1", "items", id, "retry"], &[])?, None)?;
            vec![id.clone()]
        }
        (None, true, Route::Daemon(client)) => {
            let answer = client.post(client.url(&["v1", "items", "retry-failed"], &[])?, None)?;
            serde_json::from_value(answer["ids"].clone())
                .context("the daemon's answer lists no revived IDs")?
        }
        (Some(id), _, Route::Direct) => with_store(ctx, &settings, |q| Ok(vec![q.revive(id)?.id]))?,
        (None, true, Route::Direct) => with_store(ctx, &settings, |q| Ok(bulk::revive_failed(q)?))?,
    };
    if ctx.json {
        print_json(&json!({ "revived": revived.len(), "ids": revived }))
    } else {
        println_out(&format!(
            "{} item(s) back to pending, due now",
            revived.len()
        ))
    }
}

fn purge(ctx: &Ctx, status: ItemStatus) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    let purged = match route {
        Route::Daemon(client) => {
            let url = client.url(&["v1", "items"], &[("status", status.as_str().to_owned())])?;
            let answer = client.delete(url)?;
            answer["purged"]
                .as_u64()
                .context("the daemon's answer has no purged count")?
        }
        Route::Direct => with_store(ctx, &settings, |q| Ok(bulk::purge_status(q, status)?))? as u64,
    };
    if ctx.json {
        print_json(&json!({ "purged": purged, "status": status.as_str() }))
    } else {
        println_out(&format!("purged {purged} {status} item(s)"))
    }
}

fn cleanup(ctx: &Ctx, ttl: Option<std::time::Duration>) -> anyhow::Result<()> {
    let (settings, route) = route(ctx)?;
    let effective_ttl = ttl.unwrap_or(settings.worker.ttl);
    let report = match route {
        Route::Daemon(client) => {
            // Without --ttl the daemon runs its own janitor pass (its TTL,
            // its limits, expired leases).
            let query: Vec<(&str, String)> = ttl
                .map(|t| ("ttl", humantime::format_duration(t).to_string()))
                .into_iter()
                .collect();
            let answer = client.post(client.url(&["v1", "cleanup"], &query)?, None)?;
            serde_json::from_value::<retryq::store::CleanupReport>(answer)
                .context("the daemon's answer is not a cleanup report")?
        }
        Route::Direct => with_store(ctx, &settings, |q| Ok(q.cleanup(effective_ttl)?))?,
    };
    let ttl = effective_ttl;
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

/// The running daemon, or [`NoDaemon`] for `command`.
fn daemon_for(ctx: &Ctx, command: &'static str) -> anyhow::Result<DaemonClient> {
    let (settings, route) = route(ctx)?;
    match route {
        Route::Daemon(client) => Ok(client),
        Route::Direct => Err(NoDaemon {
            store: settings.store.location(),
            command,
        }
        .into()),
    }
}

fn pause(ctx: &Ctx, reason: Option<String>) -> anyhow::Result<()> {
    let client = daemon_for(ctx, "pause")?;
    let body = reason
        .map(|r| serde_json::to_vec(&json!({ "reason": r })))
        .transpose()
        .context("cannot encode the reason")?;
    let answer = client.post(client.url(&["v1", "pause"], &[])?, body)?;
    if ctx.json {
        return print_json(&answer);
    }
    println_out(&format!(
        "delivery paused (daemon pid {}): {}",
        client.pid(),
        answer["pause_reason"].as_str().unwrap_or("no reason given")
    ))
}

fn resume(ctx: &Ctx) -> anyhow::Result<()> {
    let client = daemon_for(ctx, "resume")?;
    let answer = client.post(client.url(&["v1", "resume"], &[])?, None)?;
    if ctx.json {
        return print_json(&answer);
    }
    println_out(&format!("delivery resumed (daemon pid {})", client.pid()))
}

fn schedule(ctx: &Ctx, max_attempts: Option<u32>) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    let max_attempts = max_attempts.unwrap_or(settings.worker.max_attempts);
    if max_attempts == 0 {
        bail!(UsageError("--max-attempts must be at least 1".to_owned()));
    }
    let backoff = &settings.worker.backoff;
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
    // A shared store is checked by reaching it: the url, password and TLS
    // settings only prove themselves on a real connection.
    if let (StoreBackend::Postgres, Some(pg)) = (settings.store.backend, &settings.store.postgres) {
        retryq::fleet::probe(pg)?;
    }
    if ctx.json {
        print_json(&json!({
            "ok": true,
            "layers": layers,
            "store": {
                "backend": settings.store.backend.as_str(),
                "path": settings.store.effective_path(),
                "location": settings.store.location(),
            },
            "pusher": settings.pusher.is_configured().then(|| settings.pusher.describe()),
            "checker": settings.checker.is_configured().then(|| settings.checker.describe()),
        }))
    } else {
        println_out(&format!(
            "configuration OK ({}): store {} at {}, pusher {}",
            layers.join(", "),
            settings.store.backend.as_str(),
            settings.store.location(),
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

fn repair(ctx: &Ctx) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    let path = settings.store.effective_path();
    if settings.store.backend == StoreBackend::Postgres {
        bail!(UsageError(
            "retryq repair salvages a SQLite store; a PostgreSQL store is the server's to \
             repair, and retryq quarantines a corrupt row when it reads it"
                .to_owned()
        ));
    }
    if settings.store.backend == StoreBackend::Files {
        bail!(UsageError(format!(
            "retryq repair salvages a SQLite store; the files backend at {} needs none: \
             it moves a damaged item file to corrupt/ whenever it opens",
            path.display()
        )));
    }
    // The salvage replaces the database file: never under a running daemon
    // (repair itself refuses then too, naming its pid).
    let report = SqliteRetryQueue::repair(&path, &settings.store_options()).with_context(|| {
        format!(
            "cannot repair {} (retryq repair runs on a stopped store: stop `retryq run` first)",
            path.display()
        )
    })?;
    if ctx.json {
        return print_json(&report);
    }
    if report.healthy {
        return println_out(&format!(
            "{} is healthy (quick_check ok); nothing changed",
            path.display()
        ));
    }
    let moved = report
        .moved_to
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".to_owned());
    println_out(&format!(
        "salvaged {}: {} item(s) kept, {} quarantined, {} lost; the damaged file is kept at {moved} \
         (cause: {})",
        path.display(),
        report.salvaged,
        report.quarantined,
        report.lost,
        short(&report.cause, 200)
    ))
}
