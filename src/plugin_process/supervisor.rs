//! The supervisor of one plugin's child: which child serves calls now,
//! when a dead one may be restarted (backoff, crash loop), each call sent
//! and waited for up to its deadline (a hung child is killed), a call
//! replayed alone when a crash had several in flight, and the health every
//! supervisor of the process reports.

use std::collections::VecDeque;
use std::process::ChildStdin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use retryq_plugin::host::PluginError;
use retryq_plugin::CallContext;

use super::conn::{Conn, Pending, Reply};
use super::{PluginHealth, PluginTarget, ProcessOptions};

pub(super) struct State {
    pub(super) conn: Option<Arc<Conn>>,
    pub(super) deaths: VecDeque<Instant>,
    pub(super) in_a_row: u32,
    pub(super) not_before: Instant,
    pub(super) crash_loop_until: Option<Instant>,
    pub(super) starts: u64,
    pub(super) total_deaths: u64,
    pub(super) last_death: Option<String>,
}

pub(super) struct Supervisor {
    pub(super) target: PluginTarget,
    pub(super) options: ProcessOptions,
    pub(super) kind: u32,
    pub(super) name: Mutex<String>,
    pub(super) state: Mutex<State>,
    /// Normal calls share it; a call replayed after a crash holds it alone,
    /// so a crash then names one culprit.
    pub(super) solo: RwLock<()>,
    pub(super) next_id: AtomicU64,
    pub(super) weak: Weak<Supervisor>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    pub(super) fn new(target: PluginTarget, options: ProcessOptions, kind: u32) -> Arc<Self> {
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

    pub(super) fn name(&self) -> String {
        lock(&self.name).clone()
    }

    pub(super) fn plugin_error(&self, message: String) -> PluginError {
        PluginError::CreateFailed {
            plugin: self.name(),
            message,
        }
    }

    /// Records a death: restart backoff, crash-loop detection, one log line.
    pub(super) fn note_death(&self, st: &mut State, what: &str, in_flight: usize) {
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
    pub(super) fn connection(&self, ctx: &CallContext) -> Result<Arc<Conn>, String> {
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
    pub(super) fn call_once(
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
    pub(super) fn call(
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

    pub(super) fn answered(&self) {
        lock(&self.state).in_a_row = 0;
    }

    pub(super) fn failure(&self, reply: Reply) -> String {
        match reply {
            Reply::Died { what, .. } => format!("plugin {}: plugin host {what}", self.name()),
            Reply::Hung(m) | Reply::Down(m) => m,
            Reply::Pushed(_) | Reply::Checked(_) => {
                format!("plugin {}: mismatched answer", self.name())
            }
        }
    }

    pub(super) fn health(&self) -> PluginHealth {
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
