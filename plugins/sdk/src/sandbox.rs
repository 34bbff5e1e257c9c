//! Process-level guards for a plugin host child (`retryq plugin-host`):
//! keeping the protocol pipe away from a plugin that prints to stdout, and
//! capping the address space so a plugin that allocates without bound dies
//! alone instead of taking the machine's memory.
//!
//! The only unsafe code outside the ABI proper, kept here because the SDK
//! is where this project allows it; each call is one libc function.

use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[cfg(target_os = "linux")]
#[repr(C)]
struct RLimit {
    cur: u64,
    max: u64,
}

#[cfg(target_os = "linux")]
extern "C" {
    fn dup(fd: i32) -> i32;
    fn dup2(old: i32, new: i32) -> i32;
    fn setrlimit(resource: i32, limit: *const RLimit) -> i32;
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
}

/// `F_SETPIPE_SZ` on Linux.
#[cfg(target_os = "linux")]
const F_SETPIPE_SZ: i32 = 1031;

/// Grows the pipe behind `fd` to hold `bytes` (rounded up by the kernel; at
/// most `/proc/sys/fs/pipe-max-size`, 1 MiB by default), so a large report
/// crosses in one write instead of a ping-pong of 64 KiB wake-ups. Best
/// effort: the pipe keeps working at its old size if this fails.
#[cfg(target_os = "linux")]
pub fn grow_pipe(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    // SAFETY: fcntl on a descriptor we own, with an int argument, as
    // F_SETPIPE_SZ takes.
    if unsafe { fcntl(fd.as_raw_fd(), F_SETPIPE_SZ, bytes) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Not supported off Linux: a no-op.
#[cfg(not(target_os = "linux"))]
pub fn grow_pipe<T>(_fd: &T, _bytes: usize) -> io::Result<()> {
    Ok(())
}

/// `RLIMIT_AS` on Linux (every architecture Rust supports there).
#[cfg(target_os = "linux")]
const RLIMIT_AS: i32 = 9;

/// Moves this process's stdout out of reach: returns a new descriptor for
/// what fd 1 was (the protocol pipe) and points fd 1 at stderr, so a
/// plugin's `printf` lands in the host's stderr instead of corrupting frames.
#[cfg(target_os = "linux")]
pub fn take_stdout() -> io::Result<OwnedFd> {
    let stdout = io::stdout();
    let fd = stdout.as_raw_fd();
    // SAFETY: dup has no memory preconditions; a valid result is a new
    // descriptor that nobody else owns, so wrapping it in OwnedFd is sound.
    let copy = unsafe { dup(fd) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above: `copy` is ours alone.
    let owned = unsafe { OwnedFd::from_raw_fd(copy) };
    // SAFETY: dup2 on two descriptors of this process; fd 2 stays open and
    // fd 1 becomes a second name for it (std's Stdout keeps using fd 1).
    if unsafe { dup2(io::stderr().as_raw_fd(), fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Not supported off Linux.
#[cfg(not(target_os = "linux"))]
pub fn take_stdout() -> io::Result<std::fs::File> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "process isolation needs Linux",
    ))
}

/// Caps this process's address space at `bytes` (`RLIMIT_AS`): past it an
/// allocation fails (and a plugin that does not check dies) instead of the
/// kernel's OOM killer choosing a victim on the whole machine.
#[cfg(target_os = "linux")]
pub fn limit_address_space(bytes: u64) -> io::Result<()> {
    let limit = RLimit {
        cur: bytes,
        max: bytes,
    };
    // SAFETY: setrlimit reads one valid, initialised struct.
    if unsafe { setrlimit(RLIMIT_AS, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Not supported off Linux.
#[cfg(not(target_os = "linux"))]
pub fn limit_address_space(_bytes: u64) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "memory limits need Linux",
    ))
}
