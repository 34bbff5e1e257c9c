//! The plugin side of the ABI: the `extern "C"` shims behind
//! [`export_plugin!`](crate::export_plugin), which turn the safe traits into
//! the C table and make sure no panic crosses the boundary.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::abi::*;
use crate::{CallContext, CheckError, FingerprintChecker, ItemMeta, PushOutcome, Pusher};

/// Builds a pusher from the plugin's settings.
pub type PusherCtor = fn(&serde_json::Value) -> Result<Box<dyn Pusher>, String>;
/// Builds a checker from the plugin's settings.
pub type CheckerCtor = fn(&serde_json::Value) -> Result<Box<dyn FingerprintChecker>, String>;

/// What a plugin registers through the export macro.
#[derive(Debug, Clone, Copy)]
pub struct Registration {
    /// Pusher constructor, if the plugin provides one.
    pub pusher: Option<PusherCtor>,
    /// Checker constructor, if the plugin provides one.
    pub checker: Option<CheckerCtor>,
}

impl Registration {
    /// The `RQ_KIND_*` bits this registration provides.
    pub const fn kinds(&self) -> u32 {
        (if self.pusher.is_some() {
            RQ_KIND_PUSHER
        } else {
            0
        }) | (if self.checker.is_some() {
            RQ_KIND_CHECKER
        } else {
            0
        })
    }
}

enum Instance {
    Pusher(Box<dyn Pusher>),
    Checker(Box<dyn FingerprintChecker>),
}

static HOST: OnceLock<HostCallbacks> = OnceLock::new();

/// Sends a log line to the host (its `tracing` logs, tagged with the
/// plugin's name). A no-op before the host created an instance.
pub fn host_log(level: i32, message: &str) {
    if let Some(log) = HOST.get().and_then(|h| h.log) {
        // SAFETY: the host guarantees `log` stays valid for the life of the
        // process and reads exactly `len` bytes from `ptr` during the call.
        unsafe { log(level, message.as_ptr(), message.len()) }
    }
}

fn into_buf(bytes: Vec<u8>) -> RqBuf {
    let mut bytes = std::mem::ManuallyDrop::new(bytes);
    RqBuf {
        ptr: bytes.as_mut_ptr(),
        len: bytes.len(),
        cap: bytes.capacity(),
    }
}

/// Frees a buffer made by this SDK (the table's `free_buffer`).
///
/// # Safety
/// `buf` must come from this plugin (a buffer it returned) and be freed once.
pub unsafe extern "C" fn free_buffer(buf: RqBuf) {
    if !buf.ptr.is_null() {
        // SAFETY: per the contract, `buf` was produced by `into_buf` from a
        // Vec<u8> with exactly this pointer, length and capacity.
        drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
    }
}

/// # Safety
/// `ptr` must be valid for `len` bytes (or null with len 0).
unsafe fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn context(deadline_unix_ms: u64) -> CallContext {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    CallContext::with_timeout(Duration::from_millis(
        deadline_unix_ms.saturating_sub(now_ms),
    ))
}

/// The body of the generated `create` shim.
///
/// # Safety
/// Pointers as documented on [`CreateFn`].
pub unsafe fn create(
    reg: &Registration,
    kind: u32,
    settings: *const u8,
    settings_len: usize,
    host: *const HostCallbacks,
    out_instance: *mut *mut c_void,
    out_error: *mut RqBuf,
) -> i32 {
    let fail = |status: i32, msg: String| {
        if !out_error.is_null() {
            // SAFETY: the host passes a writable RqBuf.
            unsafe { *out_error = into_buf(msg.into_bytes()) };
        }
        status
    };
    if !host.is_null() {
        // SAFETY: the host passes a valid callbacks struct that outlives us;
        // only the fields its struct_size reaches are read.
        let callbacks = unsafe { crate::abi::read_host_callbacks(host) };
        let _ = HOST.set(callbacks);
    }
    // SAFETY: the host passes `settings_len` readable bytes.
    let bytes = unsafe { slice(settings, settings_len) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let value: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(bytes).map_err(|e| format!("settings are not JSON: {e}"))?
        };
        match kind {
            RQ_KIND_PUSHER => match reg.pusher {
                Some(ctor) => ctor(&value).map(Instance::Pusher),
                None => Err("this plugin provides no pusher".into()),
            },
            RQ_KIND_CHECKER => match reg.checker {
                Some(ctor) => ctor(&value).map(Instance::Checker),
                None => Err("this plugin provides no fingerprint checker".into()),
            },
            other => Err(format!("unknown instance kind {other}")),
        }
    }));
    match result {
        Ok(Ok(instance)) => {
            if out_instance.is_null() {
                return fail(RQ_BAD_CONFIG, "host passed no instance slot".into());
            }
            // SAFETY: checked non-null; the host owns the slot.
            unsafe { *out_instance = Box::into_raw(Box::new(instance)).cast() };
            RQ_OK
        }
        Ok(Err(msg)) => fail(RQ_BAD_CONFIG, msg),
        Err(p) => fail(
            RQ_PANICKED,
            format!("plugin panicked while creating: {}", panic_text(p.as_ref())),
        ),
    }
}

/// The table's `push`.
///
/// # Safety
/// Pointers as documented on [`PushFn`]; `instance` from `create`.
pub unsafe extern "C" fn push(
    instance: *mut c_void,
    meta_json: *const u8,
    meta_len: usize,
    payload: *const u8,
    payload_len: usize,
    deadline_unix_ms: u64,
    out: *mut RqPushResult,
) -> i32 {
    if instance.is_null() || out.is_null() {
        return RQ_PANICKED;
    }
    // SAFETY: `instance` was made by `create` and is alive until `destroy`.
    let instance = unsafe { &*(instance as *const Instance) };
    // SAFETY: the host passes readable buffers of the given lengths.
    let (meta, payload) = unsafe { (slice(meta_json, meta_len), slice(payload, payload_len)) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let Instance::Pusher(p) = instance else {
            return PushOutcome::permanent("instance is not a pusher");
        };
        let meta: ItemMeta = match serde_json::from_slice(meta) {
            Ok(m) => m,
            Err(e) => return PushOutcome::permanent(format!("bad item metadata: {e}")),
        };
        p.push(&meta, payload, &context(deadline_unix_ms))
    }));
    let (status, retry_after_ms, message) = match result {
        Ok(PushOutcome::Delivered) => (RQ_OK, -1, String::new()),
        Ok(PushOutcome::Retryable {
            message,
            retry_after,
        }) => (
            RQ_RETRYABLE,
            retry_after.map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64),
            message,
        ),
        Ok(PushOutcome::Permanent { message }) => (RQ_PERMANENT, -1, message),
        Ok(PushOutcome::Unauthorized { message }) => (RQ_UNAUTHORIZED, -1, message),
        Err(p) => (
            RQ_PANICKED,
            -1,
            format!("plugin panicked: {}", panic_text(p.as_ref())),
        ),
    };
    // SAFETY: checked non-null; the host owns the result slot.
    unsafe {
        *out = RqPushResult {
            status,
            retry_after_ms,
            message: into_buf(message.into_bytes()),
        }
    };
    status
}

/// The table's `check`.
///
/// # Safety
/// Pointers as documented on [`CheckFn`]; `instance` from `create`.
pub unsafe extern "C" fn check(
    instance: *mut c_void,
    fingerprints_json: *const u8,
    len: usize,
    deadline_unix_ms: u64,
    out: *mut RqBuf,
) -> i32 {
    if instance.is_null() || out.is_null() {
        return RQ_PANICKED;
    }
    // SAFETY: `instance` was made by `create` and is alive until `destroy`.
    let instance = unsafe { &*(instance as *const Instance) };
    // SAFETY: the host passes `len` readable bytes.
    let input = unsafe { slice(fingerprints_json, len) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let Instance::Checker(c) = instance else {
            return Err((RQ_PERMANENT, "instance is not a checker".to_owned()));
        };
        let fps: Vec<String> = serde_json::from_slice(input)
            .map_err(|e| (RQ_PERMANENT, format!("bad fingerprint list: {e}")))?;
        match c.check(&fps, &context(deadline_unix_ms)) {
            Ok(r) => serde_json::to_vec(&r).map_err(|e| (RQ_RETRYABLE, e.to_string())),
            Err(CheckError::Unavailable(m)) => Err((RQ_RETRYABLE, m)),
            Err(CheckError::Unauthorized(m)) => Err((RQ_UNAUTHORIZED, m)),
        }
    }));
    let (status, bytes) = match result {
        Ok(Ok(json)) => (RQ_OK, json),
        Ok(Err((status, msg))) => (status, msg.into_bytes()),
        Err(p) => (
            RQ_PANICKED,
            format!("plugin panicked: {}", panic_text(p.as_ref())).into_bytes(),
        ),
    };
    // SAFETY: checked non-null.
    unsafe { *out = into_buf(bytes) };
    status
}

/// The table's `destroy`.
///
/// # Safety
/// `instance` from `create`, destroyed once, with no call in progress.
pub unsafe extern "C" fn destroy(instance: *mut c_void) {
    if !instance.is_null() {
        let _ = catch_unwind(|| {
            // SAFETY: made by Box::into_raw in `create`; destroyed once.
            drop(unsafe { Box::from_raw(instance as *mut Instance) });
        });
    }
}

/// Exports a plugin: generates the entry symbol and the C table.
///
/// ```ignore
/// retryq_plugin::export_plugin! {
///     name: "echo",
///     pusher: |settings| Ok(EchoPusher::from_settings(settings)?),
///     checker: |settings| Ok(EchoChecker::from_settings(settings)?),   // optional
/// }
/// ```
/// Constructors take `&serde_json::Value` (the `settings` table from the
/// host's config) and return `Result<impl Pusher, String>` (or a checker);
/// an `Err` is shown to the operator as the reason the settings were refused.
/// The version exported is the plugin crate's `CARGO_PKG_VERSION`.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:literal, pusher: $pusher:expr $(, checker: $checker:expr)? $(,)?) => {
        $crate::export_plugin!(@build $name, Some((|v: &$crate::serde_json::Value| {
            let f = $pusher;
            f(v).map(|p| Box::new(p) as Box<dyn $crate::Pusher>)
        }) as $crate::export::PusherCtor), $crate::export_plugin!(@checker $($checker)?));
    };
    (name: $name:literal, checker: $checker:expr $(,)?) => {
        $crate::export_plugin!(@build $name, None, $crate::export_plugin!(@checker $checker));
    };
    (@checker) => { None };
    (@checker $checker:expr) => {
        Some((|v: &$crate::serde_json::Value| {
            let f = $checker;
            f(v).map(|c| Box::new(c) as Box<dyn $crate::FingerprintChecker>)
        }) as $crate::export::CheckerCtor)
    };
    (@build $name:literal, $pusher:expr, $checker:expr) => {
        static RETRYQ_REGISTRATION: $crate::export::Registration = $crate::export::Registration {
            pusher: $pusher,
            checker: $checker,
        };

        unsafe extern "C" fn retryq_plugin_create(
            kind: u32,
            settings: *const u8,
            settings_len: usize,
            host: *const $crate::abi::HostCallbacks,
            out_instance: *mut *mut ::std::ffi::c_void,
            out_error: *mut $crate::abi::RqBuf,
        ) -> i32 {
            // SAFETY: the host upholds the CreateFn contract.
            unsafe {
                $crate::export::create(
                    &RETRYQ_REGISTRATION, kind, settings, settings_len, host, out_instance, out_error,
                )
            }
        }

        static RETRYQ_TABLE: $crate::abi::PluginTable = $crate::abi::PluginTable {
            abi_version: $crate::abi::ABI_VERSION,
            struct_size: ::std::mem::size_of::<$crate::abi::PluginTable>() as u32,
            name: concat!($name, "\0").as_ptr() as *const ::std::ffi::c_char,
            version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const ::std::ffi::c_char,
            kinds: RETRYQ_REGISTRATION.kinds(),
            create: retryq_plugin_create,
            push: $crate::export::push,
            check: $crate::export::check,
            destroy: $crate::export::destroy,
            free_buffer: $crate::export::free_buffer,
            description: concat!(env!("CARGO_PKG_DESCRIPTION"), "\0").as_ptr()
                as *const ::std::ffi::c_char,
        };

        /// The plugin's entry point (retryq plugin ABI v1).
        #[no_mangle]
        pub extern "C" fn retryq_plugin_entry_v1() -> *const $crate::abi::PluginTable {
            &RETRYQ_TABLE
        }
    };
}
