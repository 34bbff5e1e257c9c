//! The host side of the ABI: finding, verifying and loading plugin
//! libraries, and wrapping their instances in the safe traits.
//!
//! Libraries are loaded once per canonical path and never unloaded (a
//! plugin may have left threads or callbacks behind; unloading would turn
//! them into dangling code). Every failure is a [`PluginError`] naming the
//! plugin and what to do about it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::abi::*;
use crate::{
    CallContext, CheckError, CheckResult, FingerprintChecker, ItemMeta, PushOutcome, Pusher,
};

/// Why a plugin could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// No library file was found.
    #[error("plugin {plugin:?}: no library found (looked for {looked_in:?}); build it or fix [plugins] search_path / the path")]
    NotFound {
        /// The plugin as configured.
        plugin: String,
        /// Every file tried.
        looked_in: Vec<PathBuf>,
    },
    /// The file could not be loaded as a shared library.
    #[error("plugin {plugin:?} ({path}): not a loadable library: {reason}")]
    NotALibrary {
        /// The plugin.
        plugin: String,
        /// Its file.
        path: String,
        /// The loader's message.
        reason: String,
    },
    /// The entry symbol is missing.
    #[error("plugin {plugin:?} ({path}): symbol retryq_plugin_entry_v1 not found; is it a retryq plugin built with export_plugin!?")]
    MissingSymbol {
        /// The plugin.
        plugin: String,
        /// Its file.
        path: String,
    },
    /// The plugin speaks another ABI version.
    #[error("plugin {plugin:?}: built for ABI version {found}, this retryq speaks {expected}; rebuild it against retryq-plugin {expected}")]
    AbiMismatch {
        /// The plugin.
        plugin: String,
        /// Its version.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// The table is shorter than version 1's.
    #[error(
        "plugin {plugin:?}: its table is {found} bytes, at least {expected} are needed; rebuild it"
    )]
    TableTooSmall {
        /// The plugin.
        plugin: String,
        /// Its size.
        found: u32,
        /// The minimum.
        expected: u32,
    },
    /// The plugin does not provide what was asked.
    #[error("plugin {plugin:?} does not provide a {kind}")]
    MissingKind {
        /// The plugin.
        plugin: String,
        /// "pusher" or "fingerprint checker".
        kind: &'static str,
    },
    /// The plugin refused its settings.
    #[error("plugin {plugin:?} refused its settings: {message}")]
    BadSettings {
        /// The plugin.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// `create` failed for another reason than the settings: it returned no
    /// instance, panicked, or answered a status that means nothing there.
    #[error("plugin {plugin:?} could not create an instance: {message}")]
    CreateFailed {
        /// The plugin.
        plugin: String,
        /// What happened, with the plugin's own message if it gave one.
        message: String,
    },
    /// The file or its folder is writable by others.
    #[error("plugin {plugin:?}: {path} is writable by group or others; refusing to load it (chmod go-w)")]
    InsecurePermissions {
        /// The plugin.
        plugin: String,
        /// The file or folder.
        path: String,
    },
    /// The file's SHA-256 is not the pinned one.
    #[error("plugin {plugin:?}: {path} has sha256 {found}, the configuration pins {expected}; refusing to load it")]
    HashMismatch {
        /// The plugin.
        plugin: String,
        /// Its file.
        path: String,
        /// Its hash.
        found: String,
        /// The pinned hash.
        expected: String,
    },
    /// Reading the file failed.
    #[error("plugin {plugin:?}: cannot read {path}: {reason}")]
    Io {
        /// The plugin.
        plugin: String,
        /// The file.
        path: String,
        /// The error.
        reason: String,
    },
}

/// What a failed `create` (anything but a refusal of the settings) did, in
/// words: the plugin's own message when it gave one.
fn create_failure(status: i32, message: &str) -> String {
    let what = match status {
        RQ_OK => "create reported success (status 0) but returned no instance".to_owned(),
        RQ_PANICKED => "create panicked (status 5)".to_owned(),
        RQ_RETRYABLE | RQ_PERMANENT | RQ_UNAUTHORIZED => {
            format!("create returned status {status}, a push outcome, not an instance")
        }
        other => format!("create returned unknown status {other}"),
    };
    if message.is_empty() {
        what
    } else {
        format!("{what}: {message}")
    }
}

/// Candidate file names for a plugin called `name` on this platform:
/// `lib{name}.so` and `libretryq_{name}.so` (dashes become underscores, as
/// cargo names libraries).
pub fn library_file_names(name: &str) -> Vec<String> {
    let base = name.replace('-', "_");
    let mut names = vec![base.clone()];
    if !base.starts_with("retryq_") {
        names.push(format!("retryq_{base}"));
    }
    names
        .into_iter()
        .map(|n| {
            format!(
                "{}{n}{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            )
        })
        .collect()
}

/// Finds the library for `name` on `search_path`.
pub fn resolve(name: &str, search_path: &[PathBuf]) -> Result<PathBuf, PluginError> {
    let mut looked_in = Vec::new();
    for dir in search_path {
        for file in library_file_names(name) {
            let candidate = dir.join(file);
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked_in.push(candidate);
        }
    }
    Err(PluginError::NotFound {
        plugin: name.to_owned(),
        looked_in,
    })
}

#[cfg(unix)]
fn check_permissions(plugin: &str, path: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for p in [path, dir] {
        let meta = std::fs::metadata(p).map_err(|e| PluginError::Io {
            plugin: plugin.to_owned(),
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
        let mode = meta.permissions().mode();
        // A sticky world-writable folder (like /tmp) still lets others
        // replace only their own files, but a plugin folder has no reason to
        // be shared: refuse any group/other write bit.
        if mode & 0o022 != 0 {
            return Err(PluginError::InsecurePermissions {
                plugin: plugin.to_owned(),
                path: p.display().to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_plugin: &str, _path: &Path) -> Result<(), PluginError> {
    Ok(())
}

/// SHA-256 of a file, as lowercase hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A loaded plugin library (lives for the rest of the process).
#[derive(Debug)]
pub struct Library {
    /// Name the plugin reports.
    pub name: String,
    /// Version the plugin reports.
    pub version: String,
    /// `RQ_KIND_*` bits.
    pub kinds: u32,
    /// Its one-line description; empty when its table has none (a plugin
    /// built against the 1.0 header).
    pub description: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    table: &'static PluginTable,
}

impl Library {
    /// True when it provides a pusher.
    pub fn has_pusher(&self) -> bool {
        self.kinds & RQ_KIND_PUSHER != 0
    }
    /// True when it provides a checker.
    pub fn has_checker(&self) -> bool {
        self.kinds & RQ_KIND_CHECKER != 0
    }
    /// The ABI version it reports.
    pub fn abi_version(&self) -> u32 {
        self.table.abi_version
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, &'static Library>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, &'static Library>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Loads (once) the plugin library at `path`, after the permission check
/// and, if `sha256` is given, the hash check.
pub fn load(
    plugin: &str,
    path: &Path,
    sha256: Option<&str>,
) -> Result<&'static Library, PluginError> {
    let io = |e: std::io::Error| PluginError::Io {
        plugin: plugin.to_owned(),
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if !path.exists() {
        return Err(PluginError::NotFound {
            plugin: plugin.to_owned(),
            looked_in: vec![path.to_path_buf()],
        });
    }
    let canonical = path.canonicalize().map_err(io)?;
    check_permissions(plugin, &canonical)?;
    if let Some(expected) = sha256 {
        let found = file_sha256(&canonical).map_err(io)?;
        if !found.eq_ignore_ascii_case(expected.trim()) {
            return Err(PluginError::HashMismatch {
                plugin: plugin.to_owned(),
                path: canonical.display().to_string(),
                found,
                expected: expected.to_owned(),
            });
        }
    }
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(lib) = reg.get(&canonical) {
        return Ok(lib);
    }
    let shown = canonical.display().to_string();
    // SAFETY: loading a library runs its initializers. We only load files
    // that passed the permission (and optional hash) checks: the operator
    // chose this file as a retryq plugin.
    let library =
        unsafe { libloading::Library::new(&canonical) }.map_err(|e| PluginError::NotALibrary {
            plugin: plugin.to_owned(),
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    // Never unloaded: leak it so the table and code stay valid forever.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol, if present, is the ABI's entry function with this
    // exact signature (that is the contract of the exported name).
    let entry: libloading::Symbol<'static, unsafe extern "C" fn() -> *const PluginTable> =
        unsafe { library.get(ENTRY_SYMBOL) }.map_err(|_| PluginError::MissingSymbol {
            plugin: plugin.to_owned(),
            path: shown.clone(),
        })?;
    // SAFETY: calling the entry function has no preconditions.
    let table_ptr = unsafe { entry() };
    if table_ptr.is_null() {
        return Err(PluginError::MissingSymbol {
            plugin: plugin.to_owned(),
            path: shown,
        });
    }
    // SAFETY: the first two u32 fields are present in every ABI version;
    // read them before trusting the rest of the struct.
    let (abi_version, struct_size) = unsafe {
        let head = table_ptr as *const u32;
        (head.read(), head.add(1).read())
    };
    if abi_version != ABI_VERSION {
        return Err(PluginError::AbiMismatch {
            plugin: plugin.to_owned(),
            found: abi_version,
            expected: ABI_VERSION,
        });
    }
    // Only the first release's fields are required; later ones are optional.
    let needed = PLUGIN_TABLE_V1_SIZE;
    if struct_size < needed {
        return Err(PluginError::TableTooSmall {
            plugin: plugin.to_owned(),
            found: struct_size,
            expected: needed,
        });
    }
    // SAFETY: version and size checked: the table has every v1 field and
    // `struct_size` readable bytes (static data of a library we never
    // unload). The copy reads no further: a shorter table's later fields
    // are absent, a longer one's unknown fields ignored.
    let table: &'static PluginTable =
        Box::leak(Box::new(unsafe { copy_table(table_ptr, struct_size) }));
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI requires NUL-terminated static strings.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let lib: &'static Library = Box::leak(Box::new(Library {
        name: text(table.name),
        version: text(table.version),
        kinds: table.kinds,
        description: text(table.description),
        path: canonical.clone(),
        table,
    }));
    tracing::info!(plugin = %lib.name, version = %lib.version, path = %shown, "loaded plugin");
    reg.insert(canonical, lib);
    Ok(lib)
}

thread_local! {
    static CURRENT_PLUGIN: RefCell<String> = const { RefCell::new(String::new()) };
}

unsafe extern "C" fn host_log_callback(level: i32, msg: *const u8, len: usize) {
    let text = if msg.is_null() {
        String::new()
    } else {
        // SAFETY: the plugin passes `len` readable bytes for this call.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, len) }).into_owned()
    };
    CURRENT_PLUGIN.with(|p| {
        let plugin = p.borrow();
        let plugin = if plugin.is_empty() {
            "plugin"
        } else {
            plugin.as_str()
        };
        match level {
            RQ_LOG_ERROR => tracing::error!(target: "retryq::plugin", plugin, "{text}"),
            RQ_LOG_WARN => tracing::warn!(target: "retryq::plugin", plugin, "{text}"),
            RQ_LOG_INFO => tracing::info!(target: "retryq::plugin", plugin, "{text}"),
            _ => tracing::debug!(target: "retryq::plugin", plugin, "{text}"),
        }
    });
}

static HOST_CALLBACKS: HostCallbacks = HostCallbacks {
    struct_size: std::mem::size_of::<HostCallbacks>() as u32,
    log: Some(host_log_callback),
};

fn with_plugin_name<T>(name: &str, f: impl FnOnce() -> T) -> T {
    CURRENT_PLUGIN.with(|p| name.clone_into(&mut p.borrow_mut()));
    f()
}

/// Takes a plugin-allocated buffer's bytes and frees it.
fn take_buf(lib: &Library, buf: RqBuf) -> Vec<u8> {
    if buf.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: the plugin returned this buffer; it is valid for `len` bytes
    // until we free it, once, with the plugin's own free_buffer.
    let bytes = unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }.to_vec();
    // SAFETY: as above.
    unsafe { (lib.table.free_buffer)(buf) };
    bytes
}

/// Takes a plugin's message buffer as text. A NULL pointer with a
/// non-zero length breaks the ABI; it is named rather than read, so the
/// operator sees why the message is missing.
fn take_message(lib: &Library, buf: RqBuf) -> String {
    if buf.ptr.is_null() && buf.len > 0 {
        return format!(
            "plugin {} returned a NULL message buffer of length {}",
            lib.name, buf.len
        );
    }
    String::from_utf8_lossy(&take_buf(lib, buf)).into_owned()
}

struct RawInstance(*mut c_void);
// SAFETY: instances are created for use from any host thread: the ABI
// requires plugin instances to be thread-safe (the Rust SDK's traits are
// Send + Sync).
unsafe impl Send for RawInstance {}
// SAFETY: as above.
unsafe impl Sync for RawInstance {}

/// One plugin instance: created from settings, recreated after a panic.
struct Instance {
    lib: &'static Library,
    kind: u32,
    settings: Vec<u8>,
    raw: RwLock<RawInstance>,
}

impl Instance {
    fn create(
        lib: &'static Library,
        kind: u32,
        settings: &serde_json::Value,
    ) -> Result<Self, PluginError> {
        let settings = serde_json::to_vec(settings).unwrap_or_else(|_| b"{}".to_vec());
        let raw = Self::create_raw(lib, kind, &settings)?;
        Ok(Instance {
            lib,
            kind,
            settings,
            raw: RwLock::new(RawInstance(raw)),
        })
    }

    fn create_raw(
        lib: &'static Library,
        kind: u32,
        settings: &[u8],
    ) -> Result<*mut c_void, PluginError> {
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut err = RqBuf::EMPTY;
        // SAFETY: valid settings buffer, static host callbacks, writable out
        // slots, per the CreateFn contract.
        let status = with_plugin_name(&lib.name, || unsafe {
            (lib.table.create)(
                kind,
                settings.as_ptr(),
                settings.len(),
                &HOST_CALLBACKS,
                &mut out,
                &mut err,
            )
        });
        let message = take_message(lib, err);
        match (status, out.is_null()) {
            (RQ_OK, false) => Ok(out),
            (RQ_BAD_CONFIG, _) => Err(PluginError::BadSettings {
                plugin: lib.name.clone(),
                message: if message.is_empty() {
                    "create refused the settings without saying why".to_owned()
                } else {
                    message
                },
            }),
            (status, _) => Err(PluginError::CreateFailed {
                plugin: lib.name.clone(),
                message: create_failure(status, &message),
            }),
        }
    }

    /// Replaces the instance after it panicked.
    fn recreate(&self) {
        let mut raw = self.raw.write().unwrap_or_else(|p| p.into_inner());
        match Self::create_raw(self.lib, self.kind, &self.settings) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut raw.0, fresh);
                // SAFETY: we hold the write lock: no call uses `old` now.
                unsafe { (self.lib.table.destroy)(old) };
                tracing::warn!(plugin = %self.lib.name, "plugin instance panicked; recreated it");
            }
            Err(e) => {
                tracing::error!(plugin = %self.lib.name, error = %e, "could not recreate the plugin instance")
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let raw = self.raw.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: we own the instance and no call is in progress (&mut self).
        unsafe { (self.lib.table.destroy)(raw.0) };
    }
}

fn deadline_ms(ctx: &CallContext) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + ctx.remaining()).as_millis() as u64
}

/// A pusher living in a dynamic plugin.
pub struct DynPusher {
    instance: Instance,
}

impl DynPusher {
    /// Creates a pusher instance of `lib` from `settings`.
    pub fn new(lib: &'static Library, settings: &serde_json::Value) -> Result<Self, PluginError> {
        if !lib.has_pusher() {
            return Err(PluginError::MissingKind {
                plugin: lib.name.clone(),
                kind: "pusher",
            });
        }
        Ok(DynPusher {
            instance: Instance::create(lib, RQ_KIND_PUSHER, settings)?,
        })
    }

    /// The library.
    pub fn library(&self) -> &'static Library {
        self.instance.lib
    }
}

impl Pusher for DynPusher {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        let lib = self.instance.lib;
        let meta = match serde_json::to_vec(item) {
            Ok(m) => m,
            Err(e) => return PushOutcome::permanent(format!("cannot encode item metadata: {e}")),
        };
        let mut out = RqPushResult {
            status: RQ_PANICKED,
            retry_after_ms: -1,
            message: RqBuf::EMPTY,
        };
        let status = {
            let raw = self.instance.raw.read().unwrap_or_else(|p| p.into_inner());
            // SAFETY: live instance (read lock held), valid input buffers,
            // writable result slot, per the PushFn contract.
            with_plugin_name(&lib.name, || unsafe {
                (lib.table.push)(
                    raw.0,
                    meta.as_ptr(),
                    meta.len(),
                    payload.as_ptr(),
                    payload.len(),
                    deadline_ms(ctx),
                    &mut out,
                )
            })
        };
        let message = take_message(lib, out.message);
        match status {
            RQ_OK => PushOutcome::Delivered,
            RQ_RETRYABLE => PushOutcome::Retryable {
                message,
                retry_after: u64::try_from(out.retry_after_ms)
                    .ok()
                    .map(Duration::from_millis),
            },
            RQ_PERMANENT => PushOutcome::Permanent { message },
            RQ_UNAUTHORIZED => PushOutcome::Unauthorized { message },
            other => {
                self.instance.recreate();
                PushOutcome::retryable(if other == RQ_PANICKED {
                    message
                } else {
                    format!("plugin returned unknown status {other}: {message}")
                })
            }
        }
    }
}

/// A fingerprint checker living in a dynamic plugin.
pub struct DynChecker {
    instance: Instance,
}

impl DynChecker {
    /// Creates a checker instance of `lib` from `settings`.
    pub fn new(lib: &'static Library, settings: &serde_json::Value) -> Result<Self, PluginError> {
        if !lib.has_checker() {
            return Err(PluginError::MissingKind {
                plugin: lib.name.clone(),
                kind: "fingerprint checker",
            });
        }
        Ok(DynChecker {
            instance: Instance::create(lib, RQ_KIND_CHECKER, settings)?,
        })
    }
}

impl FingerprintChecker for DynChecker {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        let lib = self.instance.lib;
        let input =
            serde_json::to_vec(fingerprints).map_err(|e| CheckError::Unavailable(e.to_string()))?;
        let mut out = RqBuf::EMPTY;
        let status = {
            let raw = self.instance.raw.read().unwrap_or_else(|p| p.into_inner());
            // SAFETY: live instance, valid input, writable out slot (CheckFn).
            with_plugin_name(&lib.name, || unsafe {
                (lib.table.check)(
                    raw.0,
                    input.as_ptr(),
                    input.len(),
                    deadline_ms(ctx),
                    &mut out,
                )
            })
        };
        let bytes = take_buf(lib, out);
        match status {
            RQ_OK => serde_json::from_slice(&bytes).map_err(|e| {
                CheckError::Unavailable(format!("plugin {} answered malformed JSON: {e}", lib.name))
            }),
            RQ_UNAUTHORIZED => Err(CheckError::Unauthorized(
                String::from_utf8_lossy(&bytes).into_owned(),
            )),
            RQ_PANICKED => {
                self.instance.recreate();
                Err(CheckError::Unavailable(
                    String::from_utf8_lossy(&bytes).into_owned(),
                ))
            }
            _ => Err(CheckError::Unavailable(
                String::from_utf8_lossy(&bytes).into_owned(),
            )),
        }
    }
}

/// A panic payload carried from a call thread back to its caller.
type Panic = Box<dyn std::any::Any + Send>;
type Job = Box<dyn FnOnce() + Send>;

/// Threads kept idle at most; more are only needed while that many calls
/// run at once, and they exit when handed back past this.
const MAX_IDLE_CALL_THREADS: usize = 256;

const CALL_RUNNING: u8 = 0;
const CALL_DONE: u8 = 1;
const CALL_ABANDONED: u8 = 2;

/// Reusable threads for transport calls that must be abandoned at their
/// deadline.
///
/// A call runs on an idle pool thread (one is started when none is idle)
/// and the caller waits only until the deadline. A call that returns in
/// time hands its thread back for the next call; a late call's thread is
/// abandoned (it exits once the call finally returns) and the next call
/// that finds no idle thread starts its replacement. So threads are started
/// only up to the peak number of calls at once, plus one per abandoned
/// call, never one per call.
pub struct CallPool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    name: String,
    idle: Mutex<Vec<CallThread>>,
    started: AtomicU64,
    abandoned: AtomicU64,
}

/// One pool thread, reached through its job channel. Only the idle list or
/// the job it is running holds this: dropping it closes the channel, and
/// the thread exits after the job it is running, if any.
struct CallThread {
    jobs: mpsc::Sender<Job>,
}

/// A call started with [`CallPool::start`]; the waiter's handle on it.
pub struct CallTicket {
    state: Arc<AtomicU8>,
    pool: Arc<PoolShared>,
}

impl CallTicket {
    /// Gives up on the call (its deadline passed): its thread exits after
    /// it instead of serving again. `false` if the call had already
    /// returned: then its result is delivered (or about to be), and the
    /// waiter should take it.
    pub fn abandon(self) -> bool {
        let won = self
            .state
            .compare_exchange(
                CALL_RUNNING,
                CALL_ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if won {
            self.pool.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        won
    }
}

impl CallPool {
    /// An empty pool whose threads are called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        CallPool {
            shared: Arc::new(PoolShared {
                name: name.into(),
                idle: Mutex::new(Vec::new()),
                started: AtomicU64::new(0),
                abandoned: AtomicU64::new(0),
            }),
        }
    }

    /// Threads started so far (the first calls', and replacements).
    pub fn threads_started(&self) -> u64 {
        self.shared.started.load(Ordering::Relaxed)
    }

    /// Calls abandoned at their deadline so far.
    pub fn calls_abandoned(&self) -> u64 {
        self.shared.abandoned.load(Ordering::Relaxed)
    }

    /// Starts `f` on a pool thread; `done` receives its result (or its
    /// panic) on that thread once it returns, whether or not the waiter
    /// still waits. The waiter waits however it likes (a channel, a
    /// future) and calls [`CallTicket::abandon`] at the deadline. `None`
    /// when no thread could be started.
    pub fn start<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
        done: impl FnOnce(std::thread::Result<R>) + Send + 'static,
    ) -> Option<CallTicket> {
        let state = Arc::new(AtomicU8::new(CALL_RUNNING));
        let ticket = CallTicket {
            state: state.clone(),
            pool: self.shared.clone(),
        };
        let thread = self.take_idle().or_else(|| self.start_thread())?;
        let sender = thread.jobs.clone();
        let pool = self.shared.clone();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(f));
            // Back to the pool before the result goes out, so a caller
            // calling again at once finds this thread idle.
            if state
                .compare_exchange(CALL_RUNNING, CALL_DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                pool.give_back(thread);
            } else {
                drop(thread);
            }
            done(result);
        });
        // A pool thread leaves its loop only once its channel is closed, and
        // we hold a sender: this fails only if the thread died some other
        // way (an abort would end the process anyway).
        sender.send(job).ok()?;
        Some(ticket)
    }

    /// Runs `f` on a pool thread and waits for it at most `timeout`.
    /// `None` when the call is late (it goes on, alone, on its abandoned
    /// thread) or no thread could be started. A panic in `f` is resumed
    /// here, on the caller's thread, which keeps the pool thread.
    pub fn run<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        if timeout.is_zero() {
            return None;
        }
        let (tx, rx) = mpsc::sync_channel::<Result<R, Panic>>(1);
        let ticket = self.start(f, move |result| {
            let _ = tx.send(result);
        })?;
        let result = match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(_) if ticket.abandon() => return None,
            // It returned just as the deadline passed: its result is sent.
            Err(_) => rx.recv().ok()?,
        };
        match result {
            Ok(value) => Some(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn take_idle(&self) -> Option<CallThread> {
        self.shared
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
    }

    fn start_thread(&self) -> Option<CallThread> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name(self.shared.name.clone())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        match spawned {
            Ok(_) => {
                self.shared.started.fetch_add(1, Ordering::Relaxed);
                Some(CallThread { jobs })
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a transport call thread");
                None
            }
        }
    }
}

impl PoolShared {
    fn give_back(&self, thread: CallThread) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_CALL_THREADS {
            idle.push(thread);
        }
    }
}

thread_local! {
    static DEADLINE_ENFORCED_BY_CALLER: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`WithDeadline`] calls on this thread made directly, with
/// no hop to a call thread of its own: for a caller that already runs `f`
/// on an abandonable thread (a [`CallPool`] thread) and enforces the same
/// deadline itself. One thread switch less per call.
pub fn deadline_enforced_by_caller<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE_ENFORCED_BY_CALLER.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(DEADLINE_ENFORCED_BY_CALLER.with(|flag| flag.replace(true)));
    f()
}

fn deadline_enforced_here() -> bool {
    DEADLINE_ENFORCED_BY_CALLER.with(Cell::get)
}

/// Runs each call of the inner transport on a [`CallPool`] thread and waits
/// only until the call's deadline: a call past it is a retryable failure,
/// and its thread is abandoned (and replaced for later calls) instead of
/// holding a pusher thread forever.
pub struct WithDeadline<T: ?Sized> {
    inner: Arc<T>,
    pool: CallPool,
}

impl<T: ?Sized> WithDeadline<T> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<T>) -> Self {
        WithDeadline {
            inner,
            pool: CallPool::new("retryq-call"),
        }
    }

    /// The threads the calls run on.
    pub fn pool(&self) -> &CallPool {
        &self.pool
    }
}

impl<T: Pusher + ?Sized + 'static> Pusher for WithDeadline<T> {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        if deadline_enforced_here() {
            return self.inner.push(item, payload, ctx);
        }
        let inner = self.inner.clone();
        let (item2, payload2, ctx2) = (item.clone(), payload.to_vec(), *ctx);
        let pushed = self.pool.run(ctx.remaining(), move || {
            inner.push(&item2, &payload2, &ctx2)
        });
        pushed.unwrap_or_else(|| {
            tracing::warn!(item_id = %item.id, "transport call passed its deadline; abandoning it");
            // The budget, not what is left of it: by now that is zero.
            PushOutcome::retryable(format!(
                "transport call timed out (deadline {:?})",
                ctx.timeout()
            ))
        })
    }
}

impl<T: FingerprintChecker + ?Sized + 'static> FingerprintChecker for WithDeadline<T> {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        if deadline_enforced_here() {
            return self.inner.check(fingerprints, ctx);
        }
        let inner = self.inner.clone();
        let (fps, ctx2) = (fingerprints.to_vec(), *ctx);
        let checked = self
            .pool
            .run(ctx.remaining(), move || inner.check(&fps, &ctx2));
        checked.unwrap_or_else(|| {
            Err(CheckError::Unavailable(format!(
                "fingerprint check timed out (deadline {:?})",
                ctx.timeout()
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn calls_in_turn_share_one_thread() {
        let pool = CallPool::new("test-call");
        let mut names = std::collections::HashSet::new();
        for i in 0..200 {
            let id = pool
                .run(LONG, move || (i, std::thread::current().id()))
                .expect("answered in time");
            assert_eq!(id.0, i);
            names.insert(id.1);
        }
        assert_eq!(pool.threads_started(), 1);
        assert_eq!(names.len(), 1, "every call ran on the same thread");
    }

    #[test]
    fn concurrent_calls_start_at_most_one_thread_each() {
        let pool = Arc::new(CallPool::new("test-call"));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let pool = pool.clone();
                scope.spawn(move || {
                    for _ in 0..100 {
                        assert_eq!(pool.run(LONG, || 7), Some(7));
                    }
                });
            }
        });
        let started = pool.threads_started();
        assert!(
            (1..=4).contains(&started),
            "{started} threads for 4 callers"
        );
    }

    #[test]
    fn a_late_call_is_abandoned_and_only_its_thread_replaced() {
        let pool = CallPool::new("test-call");
        assert_eq!(pool.run(LONG, || 1), Some(1));
        let (release, wait) = mpsc::channel::<()>();
        let late = pool.run(Duration::from_millis(50), move || {
            let _ = wait.recv();
            2
        });
        assert_eq!(late, None, "the caller stopped waiting at the deadline");
        assert_eq!(pool.calls_abandoned(), 1);
        // The stuck thread is not handed out again: a new one serves.
        assert_eq!(pool.run(LONG, || 3), Some(3));
        assert_eq!(pool.threads_started(), 2);
        drop(release);
        assert_eq!(pool.run(LONG, || 4), Some(4));
        assert_eq!(pool.threads_started(), 2, "the replacement is reused");
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_thread_survives() {
        let pool = CallPool::new("test-call");
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(LONG, || -> u32 { panic!("boom") })
        }));
        let panic = caught.expect_err("the panic is resumed in the caller");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
        assert_eq!(pool.run(LONG, || 5), Some(5));
        assert_eq!(pool.threads_started(), 1);
    }

    #[test]
    fn a_call_with_no_time_left_is_not_started() {
        let pool = CallPool::new("test-call");
        let ran = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        assert_eq!(
            pool.run(Duration::ZERO, move || r.fetch_add(1, Ordering::SeqCst)),
            None
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(pool.threads_started(), 0);
    }

    struct ThreadOf(Mutex<Vec<std::thread::ThreadId>>);

    impl Pusher for ThreadOf {
        fn push(&self, _: &ItemMeta, _: &[u8], _: &CallContext) -> PushOutcome {
            self.0.lock().unwrap().push(std::thread::current().id());
            PushOutcome::Delivered
        }
    }

    #[test]
    fn with_deadline_runs_inline_when_the_caller_enforces_the_deadline() {
        let inner = Arc::new(ThreadOf(Mutex::new(Vec::new())));
        let guarded = WithDeadline::new(inner.clone());
        let ctx = CallContext::with_timeout(LONG);
        let me = std::thread::current().id();
        guarded.push(&ItemMeta::default(), b"{}", &ctx);
        deadline_enforced_by_caller(|| guarded.push(&ItemMeta::default(), b"{}", &ctx));
        guarded.push(&ItemMeta::default(), b"{}", &ctx);
        let seen = inner.0.lock().unwrap().clone();
        assert_ne!(seen[0], me, "a call of its own runs on a pool thread");
        assert_eq!(seen[1], me, "inline while the caller enforces the deadline");
        assert_ne!(seen[2], me, "and only then");
        assert_eq!(guarded.pool().threads_started(), 1);
    }
}
