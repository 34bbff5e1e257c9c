//! Process isolation for transport plugins (`isolation = "process"`): the
//! supervisor that implements [`Pusher`] and [`FingerprintChecker`] by
//! talking to a child process (`retryq plugin-host`, see [`child`]) that
//! loads the library, so a plugin that segfaults, aborts, exits, hangs or
//! eats memory takes down only that child.
//!
//! Contract, as the worker sees it:
//! - calls are framed messages ([`protocol`]) with request IDs, so up to
//!   `concurrency` calls are in flight in one child at once;
//! - a child that dies fails only the calls in flight. When one call was in
//!   flight it is the culprit: its item gets a retryable failure whose text
//!   names the plugin, the signal or exit code and the call ("plugin echo:
//!   plugin host crashed with SIGSEGV in push"). When several were, none is
//!   charged yet: each is replayed alone on the restarted child, so only an
//!   item that crashes it alone is charged;
//! - a call with no answer by its deadline (plus a short grace) kills the
//!   child; the call fails as retryable, the other calls are replayed;
//! - a dead child is restarted on the next call after a backoff (100 ms,
//!   doubling to 30 s) that a call waits out when its deadline allows; five
//!   deaths within a minute is a crash loop: no restart for a minute, each
//!   call fails at once (the worker's circuit opens), logged as an error;
//! - what the plugin logs in the child reaches this process's tracing with
//!   target `retryq::plugin`, the plugin's name and its level.

pub mod check;
pub mod child;
pub mod protocol;

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use retryq_plugin::abi::{RQ_KIND_CHECKER, RQ_KIND_PUSHER};
use retryq_plugin::host::PluginError;
use retryq_plugin::{
    CallContext, CheckError, CheckResult, FingerprintChecker, ItemMeta, PushOutcome, Pusher,
};
use serde::Serialize;

use crate::config::{Isolation, PluginSettings};

use protocol::{read_frame, Answer, CheckTag, CreateStatus, OutcomeTag, Request};

/// Pipe size asked for each direction (the Linux default maximum).
const PIPE_BYTES: usize = 1 << 20;

/// How the supervisor runs and restarts its child.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// The `retryq` binary (it serves `plugin-host`).
    pub program: PathBuf,
    /// Calls the child serves at once (the worker's `concurrency`).
    pub concurrency: usize,
    /// Address-space cap of the child, in bytes.
    pub memory_limit: Option<u64>,
    /// How long the child may take to load the library and create the
    /// instance.
    pub start_timeout: Duration,
    /// First restart delay after a death; doubles per death in a row.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub max_restart_backoff: Duration,
    /// Deaths within [`crash_loop_window`](Self::crash_loop_window) that
    /// make a crash loop.
    pub crash_loop_deaths: usize,
    /// The crash-loop window.
    pub crash_loop_window: Duration,
    /// No restart for this long once in a crash loop.
    pub crash_loop_hold: Duration,
    /// Extra wait past a call's deadline before the child counts as hung (a
    /// plugin that honours the deadline answers right at it).
    pub hang_grace: Duration,
}

impl ProcessOptions {
    /// Defaults, with `program` as the plugin host.
    pub fn new(program: PathBuf) -> Self {
        ProcessOptions {
            program,
            concurrency: 4,
            memory_limit: None,
            start_timeout: Duration::from_secs(10),
            restart_backoff: Duration::from_millis(100),
            max_restart_backoff: Duration::from_secs(30),
            crash_loop_deaths: 5,
            crash_loop_window: Duration::from_secs(60),
            crash_loop_hold: Duration::from_secs(60),
            hang_grace: Duration::from_millis(250),
        }
    }

    /// Defaults, with this very executable as the plugin host (the daemon).
    pub fn this_executable() -> Result<Self, PluginError> {
        std::env::current_exe()
            .map(Self::new)
            .map_err(|e| PluginError::Io {
                plugin: "(plugin host)".into(),
                path: "the running executable".into(),
                reason: e.to_string(),
            })
    }
}

/// Which library the child loads, and the instance's settings.
#[derive(Debug, Clone)]
pub struct PluginTarget {
    /// The plugin as configured (a name or a path), for messages.
    pub label: String,
    /// The library file.
    pub path: PathBuf,
    /// Pinned SHA-256, checked by the child before loading.
    pub sha256: Option<String>,
    /// The instance's settings.
    pub settings: serde_json::Value,
}

/// What the supervisor has seen of its child (for stats and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PluginHealth {
    /// The plugin's name.
    pub plugin: String,
    /// Children started.
    pub starts: u64,
    /// Children that died (crashed, exited, killed for hanging).
    pub deaths: u64,
    /// How the last one died, e.g. "crashed with SIGSEGV in push".
    pub last_death: Option<String>,
    /// In a crash loop: restarts are held back.
    pub crash_loop: bool,
    /// A child is running now.
    pub running: bool,
}

/// A push outcome, check answer or failure, as delivered to the caller.
enum Reply {
    Pushed(PushOutcome),
    Checked(Result<CheckResult, CheckError>),
    /// The child died with this call in flight; `alone` when it was the only one.
    Died {
        what: String,
        alone: bool,
    },
    /// No answer in time: the child was killed.
    Hung(String),
    /// No child could serve the call (restart backoff, crash loop, failed start).
    Down(String),
}

struct Pending {
    tx: mpsc::SyncSender<Reply>,
    call: &'static str,
}

/// One running child.
struct Conn {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set (under `pending`) once the child is gone: no more registrations.
    closed: AtomicBool,
    /// Why we killed it, when we did.
    kill_reason: Mutex<Option<String>>,
    /// Set the moment we decide to kill it: no new call goes to it, and the
    /// calls still in it are not to blame (the culprit was already charged).
    killed: AtomicBool,
}

impl Conn {
    fn kill(&self, reason: String) {
        self.killed.store(true, Ordering::SeqCst);
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        let _ = self.child.lock().unwrap_or_else(|p| p.into_inner()).kill();
    }

    /// Whether calls may still be sent to it.
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && !self.killed.load(Ordering::SeqCst)
    }
}

struct State {
    conn: Option<Arc<Conn>>,
    deaths: VecDeque<Instant>,
    in_a_row: u32,
    not_before: Instant,
    crash_loop_until: Option<Instant>,
    starts: u64,
    total_deaths: u64,
    last_death: Option<String>,
}

/// What the child sends while starting.
enum Startup {
    Hello(String),
    Created(CreateStatus, String),
    Fatal(String),
    Died(String),
}

struct Supervisor {
    target: PluginTarget,
    options: ProcessOptions,
    kind: u32,
    name: Mutex<String>,
    state: Mutex<State>,
    /// Normal calls share it; a call replayed after a crash holds it alone,
    /// so a crash then names one culprit.
    solo: RwLock<()>,
    next_id: AtomicU64,
    weak: Weak<Supervisor>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `SIGSEGV` for 11, and so on (Linux numbering).
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        31 => "SIGSYS",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

/// How a child ended, in words.
fn describe(status: std::io::Result<ExitStatus>, killed_because: Option<String>) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(reason) = killed_because {
        return format!("was killed because it {reason}");
    }
    match status {
        Ok(s) => match (s.signal(), s.code()) {
            (Some(9), _) => "was killed with SIGKILL (out of memory?)".to_owned(),
            (Some(sig), _) => format!("crashed with {}", signal_name(sig)),
            (None, Some(code)) => format!("exited with code {code}"),
            (None, None) => format!("ended: {s}"),
        },
        Err(e) => format!("ended (status unknown: {e})"),
    }
}

fn emit_log(plugin: &str, level: u8, message: &str) {
    match level {
        1 => tracing::error!(target: "retryq::plugin", plugin, "{message}"),
        2 => tracing::warn!(target: "retryq::plugin", plugin, "{message}"),
        3 => tracing::info!(target: "retryq::plugin", plugin, "{message}"),
        _ => tracing::debug!(target: "retryq::plugin", plugin, "{message}"),
    }
}

fn deadline_unix_ms(ctx: &CallContext) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + ctx.remaining()).as_millis() as u64
}

impl Supervisor {
    fn new(target: PluginTarget, options: ProcessOptions, kind: u32) -> Arc<Self> {
        let sup = Arc::new_cyclic(|weak| Supervisor {
            name: Mutex::new(target.label.clone()),
            target,
            options,
            kind,
            state: Mutex::new(State {
                conn: None,
                deaths: VecDeque::new(),
                in_a_row: 0,
                not_before: Instant::now(),
                crash_loop_until: None,
                starts: 0,
                total_deaths: 0,
                last_death: None,
            }),
            solo: RwLock::new(()),
            next_id: AtomicU64::new(1),
            weak: weak.clone(),
        });
        let mut all = lock(live());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&sup));
        sup
    }

    fn name(&self) -> String {
        lock(&self.name).clone()
    }

    fn plugin_error(&self, message: String) -> PluginError {
        PluginError::CreateFailed {
            plugin: self.name(),
            message,
        }
    }

    /// Starts a child and creates the instance in it.
    fn start_child(&self) -> Result<Arc<Conn>, PluginError> {
        let mut cmd = Command::new(&self.options.program);
        cmd.arg("plugin-host")
            .arg("--path")
            .arg(&self.target.path)
            .arg("--label")
            .arg(&self.target.label)
            .arg("--threads")
            .arg(self.options.concurrency.max(1).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(sha) = &self.target.sha256 {
            cmd.arg("--sha256").arg(sha);
        }
        if let Some(bytes) = self.options.memory_limit {
            cmd.arg("--memory-limit").arg(bytes.to_string());
        }
        let mut child = cmd.spawn().map_err(|e| {
            self.plugin_error(format!(
                "cannot start the plugin host {}: {e}",
                self.options.program.display()
            ))
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(self.plugin_error("plugin host started without pipes".into()));
        };
        // A report larger than the default 64 KiB pipe would cross in many
        // wake-ups of both sides; best effort (the pipe works either way).
        let _ = retryq_plugin::sandbox::grow_pipe(&stdin, PIPE_BYTES);
        let _ = retryq_plugin::sandbox::grow_pipe(&stdout, PIPE_BYTES);
        let conn = Arc::new(Conn {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            kill_reason: Mutex::new(None),
            killed: AtomicBool::new(false),
        });
        let (start_tx, start_rx) = mpsc::channel();
        let reader_conn = conn.clone();
        let weak = self.weak.clone();
        let spawned = std::thread::Builder::new()
            .name("retryq-plugin-host-reader".into())
            .spawn(move || read_answers(weak, reader_conn, stdout, start_tx));
        if let Err(e) = spawned {
            conn.kill("could not be watched".into());
            return Err(self.plugin_error(format!("cannot start a reader thread: {e}")));
        }
        let create = Request::Create {
            kind: self.kind,
            settings: serde_json::to_vec(&self.target.settings).unwrap_or_else(|_| b"{}".to_vec()),
        }
        .encode();
        // A write error means the child is already gone: the reader says how.
        {
            let mut stdin = lock(&conn.stdin);
            let _ = stdin.write_all(&create).and_then(|_| stdin.flush());
        }
        let deadline = Instant::now() + self.options.start_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match start_rx.recv_timeout(left) {
                Ok(Startup::Hello(name)) => *lock(&self.name) = name,
                Ok(Startup::Created(CreateStatus::Ok, _)) => return Ok(conn),
                Ok(Startup::Created(status, message)) => {
                    conn.kill("refused create".into());
                    let plugin = self.name();
                    return Err(match status {
                        CreateStatus::BadSettings => PluginError::BadSettings { plugin, message },
                        CreateStatus::MissingKind => PluginError::MissingKind {
                            plugin,
                            kind: if self.kind == RQ_KIND_PUSHER {
                                "pusher"
                            } else {
                                "fingerprint checker"
                            },
                        },
                        _ => PluginError::CreateFailed { plugin, message },
                    });
                }
                Ok(Startup::Fatal(message)) => {
                    conn.kill("could not load the library".into());
                    return Err(self.plugin_error(format!("plugin host: {message}")));
                }
                Ok(Startup::Died(what)) => {
                    return Err(self.plugin_error(format!("plugin host {what} in create")))
                }
                Err(_) => {
                    conn.kill("did not finish create in time".into());
                    return Err(self.plugin_error(format!(
                        "plugin host did not load the library and create the instance within {:?}",
                        self.options.start_timeout
                    )));
                }
            }
        }
    }

    /// Records a death: restart backoff, crash-loop detection, one log line.
    fn note_death(&self, st: &mut State, what: &str, in_flight: usize) {
        let now = Instant::now();
        st.total_deaths += 1;
        st.in_a_row = st.in_a_row.saturating_add(1);
        st.last_death = Some(what.to_owned());
        st.deaths.push_back(now);
        while st
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.options.crash_loop_window)
        {
            st.deaths.pop_front();
        }
        let plugin = self.name();
        if st.deaths.len() >= self.options.crash_loop_deaths {
            st.not_before = now + self.options.crash_loop_hold;
            st.crash_loop_until = Some(st.not_before);
            tracing::error!(
                plugin = %plugin,
                deaths = st.deaths.len(),
                window = ?self.options.crash_loop_window,
                hold = ?self.options.crash_loop_hold,
                last = %what,
                "plugin host is in a crash loop; no restart until the hold ends, calls fail meanwhile"
            );
        } else {
            let exp = st.in_a_row.saturating_sub(1).min(16);
            let backoff = self
                .options
                .restart_backoff
                .saturating_mul(1 << exp)
                .min(self.options.max_restart_backoff);
            st.not_before = now + backoff;
            tracing::error!(
                plugin = %plugin,
                in_flight,
                restart_in = ?backoff,
                "plugin host {what}; the calls in flight fail as retryable"
            );
        }
    }

    /// The running child, starting one when allowed; waits out a restart
    /// backoff that ends before the call's deadline.
    fn connection(&self, ctx: &CallContext) -> Result<Arc<Conn>, String> {
        loop {
            let mut st = lock(&self.state);
            if let Some(conn) = &st.conn {
                if conn.usable() {
                    return Ok(conn.clone());
                }
            }
            let now = Instant::now();
            if st.not_before > now {
                let wait = st.not_before - now;
                if wait >= ctx.remaining() {
                    let last = st.last_death.clone().unwrap_or_default();
                    return Err(if st.crash_loop_until.is_some_and(|t| t > now) {
                        format!(
                            "plugin {} is in a crash loop ({} deaths within {:?}, last: plugin host {last}); next restart in {:?}",
                            self.name(),
                            st.deaths.len(),
                            self.options.crash_loop_window,
                            wait
                        )
                    } else {
                        format!(
                            "plugin {} is restarting (plugin host {last}); next start in {wait:?}",
                            self.name()
                        )
                    });
                }
                drop(st);
                std::thread::sleep(wait);
                continue;
            }
            // Started under the lock: concurrent callers wait for this child
            // instead of starting their own.
            return match self.start_child() {
                Ok(conn) => {
                    st.starts += 1;
                    st.crash_loop_until = None;
                    st.conn = Some(conn.clone());
                    Ok(conn)
                }
                Err(e) => {
                    let what = e.to_string();
                    self.note_death(&mut st, &format!("could not restart: {what}"), 0);
                    Err(what)
                }
            };
        }
    }

    /// One call on the current child.
    fn call_once(
        &self,
        call: &'static str,
        ctx: &CallContext,
        send: &dyn Fn(&mut ChildStdin, u64) -> std::io::Result<()>,
    ) -> Reply {
        let conn = match self.connection(ctx) {
            Ok(c) => c,
            Err(message) => return Reply::Down(message),
        };
        // Out of time before it was even sent (it waited for a replay after
        // a crash): no answer could come in time, and a healthy child must
        // not be killed as hung for it.
        if ctx.is_expired() {
            return Reply::Down(format!(
                "plugin {}: no time left to send the {call} (deadline {:?}) while calls were replayed after a crash",
                self.name(),
                ctx.timeout()
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut pending = lock(&conn.pending);
            if !conn.usable() {
                return Reply::Died {
                    what: format!("ended before {call} was sent"),
                    alone: false,
                };
            }
            pending.insert(id, Pending { tx, call });
        }
        // A failed write means the child is gone; the reader answers with how.
        let _ = send(&mut lock(&conn.stdin), id);
        match rx.recv_timeout(ctx.remaining() + self.options.hang_grace) {
            Ok(reply) => reply,
            Err(_) => {
                if lock(&conn.pending).remove(&id).is_some() {
                    let reason = format!("hung in {call} past its deadline ({:?})", ctx.timeout());
                    conn.kill(reason.clone());
                    Reply::Hung(format!(
                        "plugin {}: plugin host {reason}; killed it",
                        self.name()
                    ))
                } else {
                    // The answer (or the death) raced the timeout: take it.
                    rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
                        Reply::Hung(format!("plugin {}: lost answer", self.name()))
                    })
                }
            }
        }
    }

    /// A call, replayed alone if the child died with other calls in flight.
    fn call(
        &self,
        call: &'static str,
        ctx: &CallContext,
        send: &dyn Fn(&mut ChildStdin, u64) -> std::io::Result<()>,
    ) -> Reply {
        let shared = self.solo.read().unwrap_or_else(|p| p.into_inner());
        let reply = self.call_once(call, ctx, send);
        drop(shared);
        match reply {
            Reply::Died { what, alone: false } => {
                let _alone = self.solo.write().unwrap_or_else(|p| p.into_inner());
                tracing::info!(plugin = %self.name(), "plugin host {what} with other calls in flight; replaying this {call} alone");
                match self.call_once(call, ctx, send) {
                    Reply::Died { what, .. } => Reply::Died { what, alone: true },
                    other => other,
                }
            }
            other => other,
        }
    }

    fn answered(&self) {
        lock(&self.state).in_a_row = 0;
    }

    fn failure(&self, reply: Reply) -> String {
        match reply {
            Reply::Died { what, .. } => format!("plugin {}: plugin host {what}", self.name()),
            Reply::Hung(m) | Reply::Down(m) => m,
            Reply::Pushed(_) | Reply::Checked(_) => {
                format!("plugin {}: mismatched answer", self.name())
            }
        }
    }

    fn health(&self) -> PluginHealth {
        let st = lock(&self.state);
        PluginHealth {
            plugin: self.name(),
            starts: st.starts,
            deaths: st.total_deaths,
            last_death: st.last_death.clone(),
            crash_loop: st.crash_loop_until.is_some_and(|t| t > Instant::now()),
            running: st
                .conn
                .as_ref()
                .is_some_and(|c| !c.closed.load(Ordering::SeqCst)),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let conn = lock(&self.state).conn.take();
        if let Some(conn) = conn {
            conn.kill("was stopped with the daemon".into());
        }
    }
}

/// The reader thread of one child: dispatches answers, forwards logs, and
/// when the pipe ends, reaps the child and fails the calls in flight.
fn read_answers(
    sup: Weak<Supervisor>,
    conn: Arc<Conn>,
    stdout: std::process::ChildStdout,
    start_tx: mpsc::Sender<Startup>,
) {
    let mut start_tx = Some(start_tx);
    // Only a child that created its instance is "serving"; one that died or
    // was killed while starting is reported to `start_child` alone.
    let mut serving = false;
    let mut input = BufReader::new(stdout);
    let mut plugin = sup.upgrade().map(|s| s.name()).unwrap_or_default();
    let mut broken = None;
    loop {
        let body = match read_frame(&mut input) {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        };
        let answer = match Answer::decode(&body) {
            Ok(a) => a,
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        };
        match answer {
            Answer::Hello { name, .. } => {
                plugin = name.clone();
                if let Some(tx) = &start_tx {
                    let _ = tx.send(Startup::Hello(name));
                }
            }
            Answer::Created { status, message } => {
                serving = status == CreateStatus::Ok;
                if let Some(tx) = start_tx.take() {
                    let _ = tx.send(Startup::Created(status, message));
                }
            }
            Answer::Fatal { message } => {
                if let Some(tx) = &start_tx {
                    let _ = tx.send(Startup::Fatal(message));
                }
            }
            Answer::Log { level, message } => emit_log(&plugin, level, &message),
            Answer::Pushed {
                id,
                tag,
                retry_after_ms,
                message,
            } => {
                let outcome = match tag {
                    OutcomeTag::Delivered => PushOutcome::Delivered,
                    OutcomeTag::Retryable => PushOutcome::Retryable {
                        message,
                        retry_after: u64::try_from(retry_after_ms)
                            .ok()
                            .map(Duration::from_millis),
                    },
                    OutcomeTag::Permanent => PushOutcome::Permanent { message },
                    OutcomeTag::Unauthorized => PushOutcome::Unauthorized { message },
                };
                if let Some(p) = lock(&conn.pending).remove(&id) {
                    let _ = p.tx.send(Reply::Pushed(outcome));
                }
            }
            Answer::Checked { id, tag, body } => {
                let text = || String::from_utf8_lossy(&body).into_owned();
                let result = match tag {
                    CheckTag::Ok => serde_json::from_slice(&body).map_err(|e| {
                        CheckError::Unavailable(format!(
                            "plugin {plugin} answered malformed JSON: {e}"
                        ))
                    }),
                    CheckTag::Unavailable => Err(CheckError::Unavailable(text())),
                    CheckTag::Unauthorized => Err(CheckError::Unauthorized(text())),
                };
                if let Some(p) = lock(&conn.pending).remove(&id) {
                    let _ = p.tx.send(Reply::Checked(result));
                }
            }
        }
    }
    if let Some(reason) = broken {
        // A child that writes garbage on the pipe cannot be trusted further.
        conn.kill(format!("broke the protocol ({reason})"));
    }
    let status = lock(&conn.child).wait();
    let what = describe(status, lock(&conn.kill_reason).take());
    // A child that never served is reported to `start_child` alone (which
    // may hold the state lock while it waits for this very report).
    let sup = if serving { sup.upgrade() } else { None };
    // The death is recorded (restart backoff set) before the calls in flight
    // hear of it and before anyone can see the connection closed: a caller
    // that finds it closed then also finds the backoff.
    let mut st = sup.as_ref().map(|s| lock(&s.state));
    let in_flight: Vec<Pending> = {
        let mut pending = lock(&conn.pending);
        conn.closed.store(true, Ordering::SeqCst);
        pending.drain().map(|(_, p)| p).collect()
    };
    if !serving {
        if let Some(tx) = start_tx {
            let _ = tx.send(Startup::Died(what));
        }
        return;
    }
    // Killed by us (a hang): the hung call was charged already; whatever
    // else was inside is innocent and is replayed, never blamed.
    let alone = in_flight.len() == 1 && !conn.killed.load(Ordering::SeqCst);
    // Gone when the supervisor itself was dropped: a stop, not a death.
    if let (Some(sup), Some(st)) = (&sup, st.as_mut()) {
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            st.conn = None;
        }
        let what = match in_flight.first() {
            Some(p) if alone => format!("{what} in {}", p.call),
            _ => what.clone(),
        };
        sup.note_death(st, &what, in_flight.len());
    }
    drop(st);
    for p in &in_flight {
        let _ = p.tx.send(Reply::Died {
            what: format!("{what} in {}", p.call),
            alone,
        });
    }
}

/// Every supervisor alive in this process, for [`health_snapshot`].
fn live() -> &'static Mutex<Vec<Weak<Supervisor>>> {
    static LIVE: std::sync::OnceLock<Mutex<Vec<Weak<Supervisor>>>> = std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// The health of every plugin host this process supervises, summed by
/// plugin name (deaths and starts added, in a crash loop if any is): what
/// `/metrics` shows as `retryq_plugin_host_*`.
pub fn health_snapshot() -> Vec<PluginHealth> {
    let sups: Vec<Arc<Supervisor>> = lock(live()).iter().filter_map(Weak::upgrade).collect();
    let mut by_name: std::collections::BTreeMap<String, PluginHealth> = Default::default();
    for h in sups.iter().map(|s| s.health()) {
        let e = by_name
            .entry(h.plugin.clone())
            .or_insert_with(|| PluginHealth {
                plugin: h.plugin.clone(),
                ..PluginHealth::default()
            });
        e.starts += h.starts;
        e.deaths += h.deaths;
        e.crash_loop |= h.crash_loop;
        e.running |= h.running;
        if h.last_death.is_some() {
            e.last_death = h.last_death;
        }
    }
    by_name.into_values().collect()
}

/// A pusher whose plugin runs in a child process.
pub struct ProcessPusher {
    sup: Arc<Supervisor>,
}

impl ProcessPusher {
    /// Starts the child and creates the pusher in it; the errors are those of
    /// loading in process (settings refused, no such kind, not a library).
    pub fn start(target: PluginTarget, options: ProcessOptions) -> Result<Self, PluginError> {
        let sup = Supervisor::new(target, options, RQ_KIND_PUSHER);
        let conn = sup.start_child()?;
        {
            let mut st = lock(&sup.state);
            st.starts += 1;
            st.conn = Some(conn);
        }
        Ok(ProcessPusher { sup })
    }

    /// What the supervisor has seen.
    pub fn health(&self) -> PluginHealth {
        self.sup.health()
    }
}

impl Pusher for ProcessPusher {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        let meta = match serde_json::to_vec(item) {
            Ok(m) => m,
            Err(e) => return PushOutcome::permanent(format!("cannot encode item metadata: {e}")),
        };
        let deadline = deadline_unix_ms(ctx);
        let send =
            |w: &mut ChildStdin, id: u64| protocol::write_push(w, id, deadline, &meta, payload);
        match self.sup.call("push", ctx, &send) {
            Reply::Pushed(outcome) => {
                self.sup.answered();
                outcome
            }
            other => {
                let message = self.sup.failure(other);
                tracing::error!(item_id = %item.id, plugin = %self.sup.name(), "{message}");
                PushOutcome::retryable(message)
            }
        }
    }
}

/// A fingerprint checker whose plugin runs in a child process.
pub struct ProcessChecker {
    sup: Arc<Supervisor>,
}

impl ProcessChecker {
    /// Starts the child and creates the checker in it.
    pub fn start(target: PluginTarget, options: ProcessOptions) -> Result<Self, PluginError> {
        let sup = Supervisor::new(target, options, RQ_KIND_CHECKER);
        let conn = sup.start_child()?;
        {
            let mut st = lock(&sup.state);
            st.starts += 1;
            st.conn = Some(conn);
        }
        Ok(ProcessChecker { sup })
    }

    /// What the supervisor has seen.
    pub fn health(&self) -> PluginHealth {
        self.sup.health()
    }
}

impl FingerprintChecker for ProcessChecker {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        let input =
            serde_json::to_vec(fingerprints).map_err(|e| CheckError::Unavailable(e.to_string()))?;
        let deadline = deadline_unix_ms(ctx);
        let send = |w: &mut ChildStdin, id: u64| {
            w.write_all(
                &Request::Check {
                    id,
                    deadline_unix_ms: deadline,
                    fingerprints: input.clone(),
                }
                .encode(),
            )?;
            w.flush()
        };
        match self.sup.call("check", ctx, &send) {
            Reply::Checked(result) => {
                self.sup.answered();
                result
            }
            other => Err(CheckError::Unavailable(self.sup.failure(other))),
        }
    }
}

/// The library file a section names, found as the in-process loader finds
/// it but not loaded here: only the child loads it (and checks its
/// permissions and pinned hash).
fn target_of(spec: &PluginSettings, search_path: &[PathBuf]) -> Result<PluginTarget, PluginError> {
    let (label, path) = match (&spec.name, &spec.path) {
        (_, Some(path)) => (path.display().to_string(), path.clone()),
        (Some(name), None) => (
            name.clone(),
            retryq_plugin::host::resolve(name, &crate::plugin::effective_search_path(search_path))?,
        ),
        (None, None) => {
            return Err(PluginError::NotFound {
                plugin: "(none)".into(),
                looked_in: Vec::new(),
            })
        }
    };
    Ok(PluginTarget {
        label,
        path,
        sha256: spec.sha256.clone(),
        settings: serde_json::Value::Object(spec.settings.clone()),
    })
}

fn options_for(spec: &PluginSettings, concurrency: usize) -> Result<ProcessOptions, PluginError> {
    Ok(ProcessOptions {
        concurrency,
        memory_limit: spec.memory_limit,
        ..ProcessOptions::this_executable()?
    })
}

/// The pusher a `[pusher]` section names, in the daemon or in a child as
/// its `isolation` says; `concurrency` is the worker's.
pub fn pusher_for(
    spec: &PluginSettings,
    search_path: &[PathBuf],
    concurrency: usize,
) -> Result<Arc<dyn Pusher>, PluginError> {
    match spec.isolation {
        Isolation::InProcess => crate::plugin::load_pusher(spec, search_path),
        Isolation::Process => Ok(Arc::new(ProcessPusher::start(
            target_of(spec, search_path)?,
            options_for(spec, concurrency)?,
        )?)),
    }
}

/// The checker a `[checker]` section names, in the daemon or in a child.
pub fn checker_for(
    spec: &PluginSettings,
    search_path: &[PathBuf],
) -> Result<Arc<dyn FingerprintChecker>, PluginError> {
    match spec.isolation {
        Isolation::InProcess => crate::plugin::load_checker(spec, search_path),
        Isolation::Process => Ok(Arc::new(ProcessChecker::start(
            target_of(spec, search_path)?,
            options_for(spec, 1)?,
        )?)),
    }
}
