//! The C ABI between retryq (the host) and a transport plugin.
//!
//! A plugin exports one symbol, [`ENTRY_SYMBOL`] (`retryq_plugin_entry_v1`),
//! a function returning a pointer to a static [`PluginTable`]. The table
//! starts with `abi_version` and `struct_size`; later versions only append
//! fields, so a host checks `struct_size` before reading a field it needs.
//!
//! Rules of the boundary:
//! - item metadata and fingerprint lists cross as UTF-8 JSON, payloads as raw
//!   bytes; the callee never keeps a pointer it was given after returning;
//! - a buffer the plugin allocates and hands back ([`RqBuf`]) is freed by the
//!   host through the plugin's `free_buffer`; whoever allocates frees;
//! - every call returns a status code ([`RQ_OK`] ...); nothing unwinds across
//!   the boundary (the Rust SDK turns a panic into [`RQ_PANICKED`]);
//! - `deadline_unix_ms` is the wall-clock time by which the host stops
//!   waiting for the call.
//!
//! `include/retryq_plugin.h` is the same contract for C.

use std::ffi::{c_char, c_void};

/// The ABI version this SDK speaks.
pub const ABI_VERSION: u32 = 1;
/// The exported entry symbol, NUL-terminated.
pub const ENTRY_SYMBOL: &[u8] = b"retryq_plugin_entry_v1\0";

/// Success (delivered / checked / created).
pub const RQ_OK: i32 = 0;
/// Transient failure: try again later (see `retry_after_ms`).
pub const RQ_RETRYABLE: i32 = 1;
/// The upstream refuses this item for good.
pub const RQ_PERMANENT: i32 = 2;
/// Credentials refused.
pub const RQ_UNAUTHORIZED: i32 = 3;
/// `create` refused its settings.
pub const RQ_BAD_CONFIG: i32 = 4;
/// The plugin panicked (or otherwise failed internally); the host recreates
/// the instance.
pub const RQ_PANICKED: i32 = 5;

/// The plugin provides a pusher.
pub const RQ_KIND_PUSHER: u32 = 1;
/// The plugin provides a fingerprint checker.
pub const RQ_KIND_CHECKER: u32 = 2;

/// Log levels passed to [`HostCallbacks::log`].
pub const RQ_LOG_ERROR: i32 = 1;
/// Warning.
pub const RQ_LOG_WARN: i32 = 2;
/// Info.
pub const RQ_LOG_INFO: i32 = 3;
/// Debug.
pub const RQ_LOG_DEBUG: i32 = 4;

/// A byte buffer allocated by the plugin, freed by `free_buffer`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RqBuf {
    /// Start of the bytes (null for an empty buffer).
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
    /// Capacity, for the allocator that made it (opaque to the host).
    pub cap: usize,
}

impl RqBuf {
    /// The empty buffer.
    pub const EMPTY: RqBuf = RqBuf {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };
}

/// The answer to one push.
#[repr(C)]
#[derive(Debug)]
pub struct RqPushResult {
    /// A status code.
    pub status: i32,
    /// With `RQ_RETRYABLE`: the upstream's Retry-After in milliseconds, or -1.
    pub retry_after_ms: i64,
    /// A message (UTF-8), possibly empty; freed by the host with `free_buffer`.
    pub message: RqBuf,
}

/// Functions the host lends the plugin. Only grows by appending.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostCallbacks {
    /// Size of this struct as the host built it.
    pub struct_size: u32,
    /// Emits a log line into the host's logs, tagged with the plugin's name.
    pub log: Option<unsafe extern "C" fn(level: i32, msg: *const u8, len: usize)>,
}

/// Creates an instance from JSON settings. On failure writes a message to
/// `out_error` and returns `RQ_BAD_CONFIG`.
pub type CreateFn = unsafe extern "C" fn(
    kind: u32,
    settings: *const u8,
    settings_len: usize,
    host: *const HostCallbacks,
    out_instance: *mut *mut c_void,
    out_error: *mut RqBuf,
) -> i32;

/// Pushes one item.
pub type PushFn = unsafe extern "C" fn(
    instance: *mut c_void,
    meta_json: *const u8,
    meta_len: usize,
    payload: *const u8,
    payload_len: usize,
    deadline_unix_ms: u64,
    out: *mut RqPushResult,
) -> i32;

/// Checks fingerprints: input a JSON array of strings; on `RQ_OK` writes a
/// JSON object `{"existing": [...], "missing": [...]}`, otherwise a message.
pub type CheckFn = unsafe extern "C" fn(
    instance: *mut c_void,
    fingerprints_json: *const u8,
    len: usize,
    deadline_unix_ms: u64,
    out: *mut RqBuf,
) -> i32;

/// Destroys an instance.
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// Frees a buffer the plugin returned.
pub type FreeBufferFn = unsafe extern "C" fn(buf: RqBuf);

/// What a plugin exports (version 1).
#[repr(C)]
#[derive(Debug)]
pub struct PluginTable {
    /// [`ABI_VERSION`] the plugin was built for.
    pub abi_version: u32,
    /// `size_of::<PluginTable>()` as the plugin built it.
    pub struct_size: u32,
    /// Plugin name, NUL-terminated UTF-8.
    pub name: *const c_char,
    /// Plugin version, NUL-terminated UTF-8.
    pub version: *const c_char,
    /// `RQ_KIND_*` bits.
    pub kinds: u32,
    /// Instance constructor.
    pub create: CreateFn,
    /// Push (for pusher instances).
    pub push: PushFn,
    /// Fingerprint check (for checker instances).
    pub check: CheckFn,
    /// Instance destructor.
    pub destroy: DestroyFn,
    /// Frees a buffer returned by the plugin.
    pub free_buffer: FreeBufferFn,
}

// SAFETY: the table is immutable static data: function pointers and pointers
// to static NUL-terminated strings, safe to read from any thread.
unsafe impl Sync for PluginTable {}
// SAFETY: as above; nothing in it is tied to a thread.
unsafe impl Send for PluginTable {}
