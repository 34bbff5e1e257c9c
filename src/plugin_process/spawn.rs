//! Starting a child: `retryq plugin-host` spawned with its pipes, its
//! reader thread started, and the instance created in it within
//! `start_timeout`, or the start refused with the in-process loader's
//! errors.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use retryq_plugin::abi::RQ_KIND_PUSHER;
use retryq_plugin::host::PluginError;

use super::conn::{Conn, Startup};
use super::protocol::{CreateStatus, Request};
use super::reader::read_answers;
use super::supervisor::{lock, Supervisor};

/// Pipe size asked for each direction (the Linux default maximum).
const PIPE_BYTES: usize = 1 << 20;

impl Supervisor {
    /// Starts a child and creates the instance in it.
    pub(super) fn start_child(&self) -> Result<Arc<Conn>, PluginError> {
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
}
