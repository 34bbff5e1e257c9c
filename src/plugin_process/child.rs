//! The child side of process isolation: `retryq plugin-host`. Loads one
//! plugin library with the ordinary loader, creates the instance the daemon
//! asks for and serves pushes and checks from a pool of threads, answering
//! over the protocol pipe. Everything logged here (the plugin's own lines
//! included) is forwarded to the daemon as log frames.
//!
//! The child holds no queue state: if it dies, the daemon loses nothing but
//! the calls in flight, which it fails as retryable.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use retryq_plugin::abi::{RQ_KIND_CHECKER, RQ_KIND_PUSHER};
use retryq_plugin::host::{DynChecker, DynPusher, Library, PluginError};
use retryq_plugin::{CallContext, CheckError, FingerprintChecker, ItemMeta, PushOutcome, Pusher};
use tracing_subscriber::layer::SubscriberExt;

use super::protocol::{read_frame, Answer, CheckTag, CreateStatus, OutcomeTag, Request};

/// What `retryq plugin-host` is told on its command line.
#[derive(Debug, Clone)]
pub struct ChildArgs {
    /// The shared library to load, checked against `sha256` first when pinned.
    pub path: PathBuf,
    /// The plugin as configured (for messages).
    pub label: String,
    /// The pinned SHA-256, if any.
    pub sha256: Option<String>,
    /// Calls served at once.
    pub threads: usize,
    /// Address-space cap in bytes.
    pub memory_limit: Option<u64>,
}

/// Why the child could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The protocol pipe failed.
    #[error("plugin host: protocol pipe: {0}")]
    Io(#[from] std::io::Error),
    /// The library could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

type Out = Arc<Mutex<File>>;

fn send(out: &Out, answer: &Answer) {
    let bytes = answer.encode();
    let mut file = out.lock().unwrap_or_else(|p| p.into_inner());
    // A broken pipe means the daemon is gone; the read loop ends us then.
    let _ = file.write_all(&bytes);
}

enum Instance {
    Pusher(DynPusher),
    Checker(DynChecker),
}

enum Job {
    Push {
        id: u64,
        deadline_unix_ms: u64,
        meta: Vec<u8>,
        payload: Vec<u8>,
    },
    Check {
        id: u64,
        deadline_unix_ms: u64,
        fingerprints: Vec<u8>,
    },
}

/// Serves the daemon until it closes the pipe. Returns only on a failure
/// before serving started; a clean end exits the process (threads still
/// stuck in the plugin must not keep it alive).
pub fn serve(args: ChildArgs) -> Result<(), ChildError> {
    let out: Out = Arc::new(Mutex::new(File::from(
        retryq_plugin::sandbox::take_stdout()?
    )));
    let subscriber = tracing_subscriber::registry().with(Forward(out.clone()));
    // The binary installs no subscriber for this command: ours is the only one.
    let _ = tracing::subscriber::set_global_default(subscriber);
    if let Some(bytes) = args.memory_limit {
        retryq_plugin::sandbox::limit_address_space(bytes)?;
    }
    let lib = match retryq_plugin::host::load(&args.label, &args.path, args.sha256.as_deref()) {
        Ok(lib) => lib,
        Err(e) => {
            send(
                &out,
                &Answer::Fatal {
                    message: e.to_string(),
                },
            );
            return Err(e.into());
        }
    };
    send(
        &out,
        &Answer::Hello {
            name: lib.name.clone(),
            version: lib.version.clone(),
            kinds: lib.kinds,
        },
    );
    let instance: Arc<OnceLock<Instance>> = Arc::new(OnceLock::new());
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    for n in 0..args.threads.max(1) {
        let (rx, out, instance) = (jobs_rx.clone(), out.clone(), instance.clone());
        std::thread::Builder::new()
            .name(format!("plugin-call-{n}"))
            .spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                if let Some(instance) = instance.get() {
                    send(&out, &run(instance, job));
                }
            })?;
    }
    let mut input = BufReader::new(std::io::stdin().lock());
    while let Some(body) = read_frame(&mut input)? {
        match Request::decode(&body)? {
            Request::Create { kind, settings } => {
                let answer = create(lib, kind, &settings, &instance);
                send(&out, &answer);
            }
            Request::Push {
                id,
                deadline_unix_ms,
                meta,
                payload,
            } => {
                let _ = jobs_tx.send(Job::Push {
                    id,
                    deadline_unix_ms,
                    meta,
                    payload,
                });
            }
            Request::Check {
                id,
                deadline_unix_ms,
                fingerprints,
            } => {
                let _ = jobs_tx.send(Job::Check {
                    id,
                    deadline_unix_ms,
                    fingerprints,
                });
            }
        }
    }
    // The daemon closed the pipe: it stopped or died. Nothing to finish.
    std::process::exit(0)
}

fn create(lib: &'static Library, kind: u32, settings: &[u8], slot: &OnceLock<Instance>) -> Answer {
    let failed = |status, message: String| Answer::Created { status, message };
    if slot.get().is_some() {
        return failed(CreateStatus::Failed, "instance already created".into());
    }
    let settings: serde_json::Value = match serde_json::from_slice(settings) {
        Ok(v) => v,
        Err(e) => return failed(CreateStatus::BadSettings, format!("settings: {e}")),
    };
    let made = match kind {
        RQ_KIND_PUSHER => DynPusher::new(lib, &settings).map(Instance::Pusher),
        RQ_KIND_CHECKER => DynChecker::new(lib, &settings).map(Instance::Checker),
        other => return failed(CreateStatus::Failed, format!("unknown kind {other}")),
    };
    match made {
        Ok(instance) => {
            let _ = slot.set(instance);
            failed(CreateStatus::Ok, String::new())
        }
        Err(PluginError::BadSettings { message, .. }) => failed(CreateStatus::BadSettings, message),
        Err(e @ PluginError::MissingKind { .. }) => {
            failed(CreateStatus::MissingKind, e.to_string())
        }
        Err(PluginError::CreateFailed { message, .. }) => failed(CreateStatus::Failed, message),
        Err(e) => failed(CreateStatus::Failed, e.to_string()),
    }
}

fn context(deadline_unix_ms: u64) -> CallContext {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    CallContext::with_timeout(Duration::from_millis(deadline_unix_ms.saturating_sub(now)))
}

fn run(instance: &Instance, job: Job) -> Answer {
    match (instance, job) {
        (
            Instance::Pusher(p),
            Job::Push {
                id,
                deadline_unix_ms,
                meta,
                payload,
            },
        ) => {
            let outcome = match serde_json::from_slice::<ItemMeta>(&meta) {
                Ok(meta) => p.push(&meta, &payload, &context(deadline_unix_ms)),
                Err(e) => PushOutcome::permanent(format!("plugin host: bad item metadata: {e}")),
            };
            let (tag, retry_after_ms, message) = match outcome {
                PushOutcome::Delivered => (OutcomeTag::Delivered, -1, String::new()),
                PushOutcome::Retryable {
                    message,
                    retry_after,
                } => (
                    OutcomeTag::Retryable,
                    retry_after.map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64),
                    message,
                ),
                PushOutcome::Permanent { message } => (OutcomeTag::Permanent, -1, message),
                PushOutcome::Unauthorized { message } => (OutcomeTag::Unauthorized, -1, message),
            };
            Answer::Pushed {
                id,
                tag,
                retry_after_ms,
                message,
            }
        }
        (
            Instance::Checker(c),
            Job::Check {
                id,
                deadline_unix_ms,
                fingerprints,
            },
        ) => {
            let answer = serde_json::from_slice::<Vec<String>>(&fingerprints)
                .map_err(|e| CheckError::Unavailable(format!("plugin host: bad input: {e}")))
                .and_then(|fps| c.check(&fps, &context(deadline_unix_ms)));
            let (tag, body) = match answer {
                Ok(result) => (
                    CheckTag::Ok,
                    serde_json::to_vec(&result).unwrap_or_else(|_| b"{}".to_vec()),
                ),
                Err(CheckError::Unavailable(m)) => (CheckTag::Unavailable, m.into_bytes()),
                Err(CheckError::Unauthorized(m)) => (CheckTag::Unauthorized, m.into_bytes()),
            };
            Answer::Checked { id, tag, body }
        }
        (_, Job::Push { id, .. }) => Answer::Pushed {
            id,
            tag: OutcomeTag::Permanent,
            retry_after_ms: -1,
            message: "plugin host: this instance is not a pusher".into(),
        },
        (_, Job::Check { id, .. }) => Answer::Checked {
            id,
            tag: CheckTag::Unavailable,
            body: b"plugin host: this instance is not a checker".to_vec(),
        },
    }
}

/// Forwards every event at info or above (and the plugin's own lines at
/// any level) to the daemon as a log frame; the daemon re-emits it tagged
/// with the plugin's name.
struct Forward(Out);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Forward {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        let from_plugin = meta.target() == "retryq::plugin";
        let level = match *meta.level() {
            tracing::Level::ERROR => 1,
            tracing::Level::WARN => 2,
            tracing::Level::INFO => 3,
            _ if from_plugin => 4,
            _ => return,
        };
        let mut text = Text::default();
        event.record(&mut text);
        send(
            &self.0,
            &Answer::Log {
                level,
                message: text.finish(),
            },
        );
    }
}

#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Text {
    fn finish(self) -> String {
        if self.fields.is_empty() {
            self.message
        } else {
            format!("{}{}", self.message, self.fields)
        }
    }
}

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            // The daemon tags the line with the plugin's name itself.
            "plugin" => {}
            name => self.fields.push_str(&format!(" {name}={value:?}")),
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "plugin" => {}
            name => self.fields.push_str(&format!(" {name}={value}")),
        }
    }
}
