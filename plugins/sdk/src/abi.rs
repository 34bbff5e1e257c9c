//! The C ABI between retryq (the host) and a transport plugin.
//!
//! A plugin exports one symbol, [`ENTRY_SYMBOL`] (`retryq_plugin_entry_v1`),
//! a function returning a pointer to a static [`PluginTable`]. The table
//! starts with `abi_version` and `struct_size`; later versions only append
//! fields, so a host checks `struct_size` before reading a field it needs.
//!
//! Evolution rules (proven by `tests/abi_evolution.rs` with a plugin built
//! from the frozen 1.0 header in `tests/abi/v1/`):
//! - fields are only ever appended, never removed, reordered or retyped;
//! - an appended field is optional: null / zero means absent, and the host
//!   reads it only when the plugin's `struct_size` reaches it
//!   ([`copy_table`]); fields a newer plugin appends that the host does not
//!   know are ignored;
//! - the same holds for [`HostCallbacks`] in the other direction: a plugin
//!   reads a callback only when the host's `struct_size` reaches it
//!   ([`read_host_callbacks`]);
//! - anything else (a changed meaning, a required new field) is a new
//!   `abi_version` and a new entry symbol.
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
    // ---- appended after 1.0: optional, null/absent in a shorter table ----
    /// A one-line description, NUL-terminated UTF-8, or null. Appended
    /// after the first release: a table that ends before it (a plugin built
    /// against the 1.0 header) has none.
    pub description: *const c_char,
}

/// Size of the table as the first release of ABI version 1 defined it
/// (every field up to `free_buffer`): the least a host accepts. Every field
/// after it is optional and reads as absent when a plugin's table is
/// shorter.
pub const PLUGIN_TABLE_V1_SIZE: u32 = std::mem::offset_of!(PluginTable, description) as u32;

/// Copies a plugin's table into a full-size host-owned one: the first
/// `min(struct_size, size_of::<PluginTable>())` bytes come from the plugin,
/// the rest are zero, so fields a shorter (older) table lacks are null /
/// absent and fields a longer (newer) table appends are ignored.
///
/// # Safety
/// `table` must point to at least `struct_size` readable bytes, and
/// `struct_size` must be at least [`PLUGIN_TABLE_V1_SIZE`] (the required
/// function pointers are present).
pub unsafe fn copy_table(table: *const PluginTable, struct_size: u32) -> PluginTable {
    let n = (struct_size as usize).min(std::mem::size_of::<PluginTable>());
    let mut out = std::mem::MaybeUninit::<PluginTable>::zeroed();
    // SAFETY: the caller guarantees `n` readable bytes at `table`; `out` is
    // a distinct local of at least `n` bytes.
    unsafe { std::ptr::copy_nonoverlapping(table as *const u8, out.as_mut_ptr() as *mut u8, n) };
    // SAFETY: the v1 prefix (function pointers included) came from a valid
    // table (n >= PLUGIN_TABLE_V1_SIZE), and every later field is a raw
    // pointer or Option for which all-zero is a valid "absent".
    unsafe { out.assume_init() }
}

/// The host's callbacks as a plugin may use them: a field the host's struct
/// (`struct_size`) does not reach reads as absent. This is what the SDK
/// does before it reads a callback.
///
/// # Safety
/// `host` is null or points to at least `struct_size` readable bytes (its
/// first field) of a callbacks struct.
pub unsafe fn read_host_callbacks(host: *const HostCallbacks) -> HostCallbacks {
    let mut out = HostCallbacks {
        struct_size: 0,
        log: None,
    };
    if host.is_null() {
        return out;
    }
    // SAFETY: every version starts with struct_size.
    let size = unsafe { (host as *const u32).read() };
    out.struct_size = size;
    let log_end = std::mem::offset_of!(HostCallbacks, log)
        + std::mem::size_of::<Option<unsafe extern "C" fn(i32, *const u8, usize)>>();
    if size as usize >= log_end {
        // SAFETY: the host's struct reaches past `log`.
        out.log = unsafe { (*host).log };
    }
    out
}

// SAFETY: the table is immutable static data: function pointers and pointers
// to static NUL-terminated strings, safe to read from any thread.
unsafe impl Sync for PluginTable {}
// SAFETY: as above; nothing in it is tied to a thread.
unsafe impl Send for PluginTable {}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn never(_: i32, _: *const u8, _: usize) {}

    #[test]
    fn a_callback_beyond_the_hosts_struct_size_is_absent() {
        let full = HostCallbacks {
            struct_size: std::mem::size_of::<HostCallbacks>() as u32,
            log: Some(never),
        };
        // SAFETY: valid struct.
        assert!(unsafe { read_host_callbacks(&full) }.log.is_some());
        // An older host whose struct ends before `log`.
        let short = HostCallbacks {
            struct_size: 4,
            log: Some(never),
        };
        // SAFETY: valid struct (larger than it claims).
        assert!(unsafe { read_host_callbacks(&short) }.log.is_none());
        // SAFETY: null is allowed.
        assert!(unsafe { read_host_callbacks(std::ptr::null()) }
            .log
            .is_none());
    }

    #[test]
    fn the_v1_table_ends_where_description_begins() {
        assert!(PLUGIN_TABLE_V1_SIZE as usize <= std::mem::size_of::<PluginTable>());
        #[cfg(target_pointer_width = "64")]
        assert_eq!(PLUGIN_TABLE_V1_SIZE, 72);
    }
}
