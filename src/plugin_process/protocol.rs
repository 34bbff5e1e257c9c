//! The framed messages between the daemon and a `retryq plugin-host` child,
//! over the child's stdin (requests) and stdout (answers and logs).
//!
//! A frame is a little-endian `u32` length, then that many bytes: one tag
//! byte and the fields. Integers are little-endian; a byte string is a `u32`
//! length and the bytes. The payload of a push crosses as those raw bytes:
//! it is never re-encoded. Request IDs let many calls share the pipe.

use std::io::{self, Read, Write};

/// Largest frame accepted: a report is capped well below this
/// (`admin.max_body`); anything longer means the stream is corrupt.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

const CREATE: u8 = 1;
const PUSH: u8 = 2;
const CHECK: u8 = 3;
const HELLO: u8 = 10;
const CREATED: u8 = 11;
const PUSHED: u8 = 12;
const CHECKED: u8 = 13;
const LOG: u8 = 14;
const FATAL: u8 = 15;

/// What the daemon asks the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create the instance (`kind` is `RQ_KIND_PUSHER` or `RQ_KIND_CHECKER`).
    Create {
        /// `RQ_KIND_PUSHER` or `RQ_KIND_CHECKER`, as the C ABI numbers them.
        kind: u32,
        /// The settings, as JSON.
        settings: Vec<u8>,
    },
    /// Push one item.
    Push {
        /// Chosen by the daemon, echoed in the answer, so answers may come out of order.
        id: u64,
        /// Wall-clock deadline, Unix milliseconds.
        deadline_unix_ms: u64,
        /// Item metadata, JSON.
        meta: Vec<u8>,
        /// The report, raw.
        payload: Vec<u8>,
    },
    /// Check fingerprints.
    Check {
        /// Chosen by the daemon, echoed in the answer.
        id: u64,
        /// Wall-clock deadline, Unix milliseconds.
        deadline_unix_ms: u64,
        /// JSON array of fingerprints.
        fingerprints: Vec<u8>,
    },
}

/// How `create` ended in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateStatus {
    /// An instance exists.
    Ok = 0,
    /// The settings were refused.
    BadSettings = 1,
    /// The plugin does not provide that kind.
    MissingKind = 2,
    /// Any other failure.
    Failed = 3,
}

/// A push outcome's tag on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeTag {
    /// `PushOutcome::Delivered`.
    Delivered = 0,
    /// `PushOutcome::Retryable`; `retry_after_ms` may carry a Retry-After.
    Retryable = 1,
    /// `PushOutcome::Permanent`: a dead letter at once.
    Permanent = 2,
    /// `PushOutcome::Unauthorized`: released, delivery paused.
    Unauthorized = 3,
}

/// A check answer's tag on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckTag {
    /// The body is the JSON answer.
    Ok = 0,
    /// The body is a message: unavailable.
    Unavailable = 1,
    /// The body is a message: unauthorized.
    Unauthorized = 2,
}

/// What the child tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The library loaded: its metadata.
    Hello {
        /// Name it reports.
        name: String,
        /// Version it reports.
        version: String,
        /// `RQ_KIND_*` bits.
        kinds: u32,
    },
    /// The answer to `Create`.
    Created {
        /// How it ended.
        status: CreateStatus,
        /// Why, when it failed.
        message: String,
    },
    /// The answer to a push.
    Pushed {
        /// The `id` of the `Push` this answers.
        id: u64,
        /// Which `PushOutcome` it was.
        tag: OutcomeTag,
        /// Retry-After in ms, or -1.
        retry_after_ms: i64,
        /// The transport's error text; empty when delivered.
        message: String,
    },
    /// The answer to a check.
    Checked {
        /// The `id` of the `Check` this answers.
        id: u64,
        /// How it ended.
        tag: CheckTag,
        /// JSON answer or message.
        body: Vec<u8>,
    },
    /// A log line from the child (the plugin's own, or the loader's).
    Log {
        /// 1 error, 2 warn, 3 info, 4 debug (the ABI's levels).
        level: u8,
        /// The text, logged by the daemon under the plugin's name.
        message: String,
    },
    /// The child cannot serve (the library failed to load); it exits next.
    Fatal {
        /// The loader's error, logged by the daemon before it restarts the child.
        message: String,
    },
}

/// A frame that cannot be decoded.
fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad frame: {what}"))
}

/// Builds one frame: reserves the length, lets `body` append, fills it in.
struct Frame(Vec<u8>);

impl Frame {
    fn new(tag: u8, capacity: usize) -> Self {
        let mut v = Vec::with_capacity(capacity + 5);
        v.extend_from_slice(&[0, 0, 0, 0, tag]);
        Frame(v)
    }
    fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn i64(mut self, x: i64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Writes a push frame without copying the payload into a new buffer: the
/// header and metadata go in one write, the payload bytes in the next.
pub fn write_push<W: Write>(
    w: &mut W,
    id: u64,
    deadline_unix_ms: u64,
    meta: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    let body_len = 1 + 8 + 8 + 4 + meta.len() + 4 + payload.len();
    if body_len > MAX_FRAME {
        return Err(bad("payload too large"));
    }
    let mut head = Frame::new(PUSH, 24 + meta.len())
        .u64(id)
        .u64(deadline_unix_ms)
        .bytes(meta)
        .u32(payload.len() as u32)
        .0;
    head[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

impl Request {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Create { kind, settings } => Frame::new(CREATE, settings.len() + 8)
                .u32(*kind)
                .bytes(settings)
                .finish(),
            Request::Push {
                id,
                deadline_unix_ms,
                meta,
                payload,
            } => Frame::new(PUSH, meta.len() + payload.len() + 24)
                .u64(*id)
                .u64(*deadline_unix_ms)
                .bytes(meta)
                .bytes(payload)
                .finish(),
            Request::Check {
                id,
                deadline_unix_ms,
                fingerprints,
            } => Frame::new(CHECK, fingerprints.len() + 20)
                .u64(*id)
                .u64(*deadline_unix_ms)
                .bytes(fingerprints)
                .finish(),
        }
    }

    /// Decodes one frame body (after the length).
    pub fn decode(body: &[u8]) -> io::Result<Self> {
        let mut r = Reader(body);
        let req = match r.u8()? {
            CREATE => Request::Create {
                kind: r.u32()?,
                settings: r.bytes()?.to_vec(),
            },
            PUSH => Request::Push {
                id: r.u64()?,
                deadline_unix_ms: r.u64()?,
                meta: r.bytes()?.to_vec(),
                payload: r.bytes()?.to_vec(),
            },
            CHECK => Request::Check {
                id: r.u64()?,
                deadline_unix_ms: r.u64()?,
                fingerprints: r.bytes()?.to_vec(),
            },
            other => return Err(bad(&format!("unknown request tag {other}"))),
        };
        r.end()?;
        Ok(req)
    }
}

impl Answer {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Answer::Hello {
                name,
                version,
                kinds,
            } => Frame::new(HELLO, name.len() + version.len() + 12)
                .bytes(name.as_bytes())
                .bytes(version.as_bytes())
                .u32(*kinds)
                .finish(),
            Answer::Created { status, message } => Frame::new(CREATED, message.len() + 5)
                .u8(*status as u8)
                .bytes(message.as_bytes())
                .finish(),
            Answer::Pushed {
                id,
                tag,
                retry_after_ms,
                message,
            } => Frame::new(PUSHED, message.len() + 21)
                .u64(*id)
                .u8(*tag as u8)
                .i64(*retry_after_ms)
                .bytes(message.as_bytes())
                .finish(),
            Answer::Checked { id, tag, body } => Frame::new(CHECKED, body.len() + 13)
                .u64(*id)
                .u8(*tag as u8)
                .bytes(body)
                .finish(),
            Answer::Log { level, message } => Frame::new(LOG, message.len() + 5)
                .u8(*level)
                .bytes(message.as_bytes())
                .finish(),
            Answer::Fatal { message } => Frame::new(FATAL, message.len() + 4)
                .bytes(message.as_bytes())
                .finish(),
        }
    }

    /// Decodes one frame body (after the length).
    pub fn decode(body: &[u8]) -> io::Result<Self> {
        let mut r = Reader(body);
        let answer = match r.u8()? {
            HELLO => Answer::Hello {
                name: r.string()?,
                version: r.string()?,
                kinds: r.u32()?,
            },
            CREATED => Answer::Created {
                status: match r.u8()? {
                    0 => CreateStatus::Ok,
                    1 => CreateStatus::BadSettings,
                    2 => CreateStatus::MissingKind,
                    _ => CreateStatus::Failed,
                },
                message: r.string()?,
            },
            PUSHED => Answer::Pushed {
                id: r.u64()?,
                tag: match r.u8()? {
                    0 => OutcomeTag::Delivered,
                    1 => OutcomeTag::Retryable,
                    2 => OutcomeTag::Permanent,
                    3 => OutcomeTag::Unauthorized,
                    other => return Err(bad(&format!("unknown outcome {other}"))),
                },
                retry_after_ms: r.i64()?,
                message: r.string()?,
            },
            CHECKED => Answer::Checked {
                id: r.u64()?,
                tag: match r.u8()? {
                    0 => CheckTag::Ok,
                    2 => CheckTag::Unauthorized,
                    _ => CheckTag::Unavailable,
                },
                body: r.bytes()?.to_vec(),
            },
            LOG => Answer::Log {
                level: r.u8()?,
                message: r.string()?,
            },
            FATAL => Answer::Fatal {
                message: r.string()?,
            },
            other => return Err(bad(&format!("unknown answer tag {other}"))),
        };
        r.end()?;
        Ok(answer)
    }
}

/// Reads one frame's body; `Ok(None)` at a clean end of stream.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(bad(&format!("length {len}")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn i64(&mut self) -> io::Result<i64> {
        Ok(self.u64()? as i64)
    }
    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> io::Result<String> {
        // Messages from a plugin may be any bytes: never fail on them.
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    fn end(&self) -> io::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(bad("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_push_streams_the_payload() {
        let push = Request::Push {
            id: 7,
            deadline_unix_ms: 99,
            meta: b"{\"id\":\"a\"}".to_vec(),
            payload: vec![0xff, 0, 1],
        };
        let mut streamed = Vec::new();
        write_push(&mut streamed, 7, 99, b"{\"id\":\"a\"}", &[0xff, 0, 1]).unwrap();
        assert_eq!(streamed, push.encode());
        for req in [
            push,
            Request::Create {
                kind: 1,
                settings: b"{}".to_vec(),
            },
            Request::Check {
                id: 3,
                deadline_unix_ms: 5,
                fingerprints: b"[\"x\"]".to_vec(),
            },
        ] {
            let bytes = req.encode();
            let body = read_frame(&mut &bytes[..]).unwrap().unwrap();
            assert_eq!(Request::decode(&body).unwrap(), req);
        }
    }

    #[test]
    fn answers_round_trip_and_bad_bytes_become_text() {
        for a in [
            Answer::Hello {
                name: "n".into(),
                version: "v".into(),
                kinds: 3,
            },
            Answer::Created {
                status: CreateStatus::BadSettings,
                message: "no".into(),
            },
            Answer::Pushed {
                id: 1,
                tag: OutcomeTag::Retryable,
                retry_after_ms: -1,
                message: "m".into(),
            },
            Answer::Checked {
                id: 2,
                tag: CheckTag::Ok,
                body: b"{}".to_vec(),
            },
            Answer::Log {
                level: 2,
                message: "w".into(),
            },
            Answer::Fatal {
                message: "f".into(),
            },
        ] {
            let bytes = a.encode();
            let body = read_frame(&mut &bytes[..]).unwrap().unwrap();
            assert_eq!(Answer::decode(&body).unwrap(), a);
        }
        let log = Frame::new(LOG, 4).u8(1).bytes(&[0xff, b'x']).finish();
        let body = read_frame(&mut &log[..]).unwrap().unwrap();
        assert!(
            matches!(Answer::decode(&body).unwrap(), Answer::Log { message, .. } if message.ends_with('x'))
        );
    }

    #[test]
    fn corrupt_frames_are_errors_not_panics() {
        assert!(read_frame(&mut &[0u8, 0, 0, 0][..]).is_err());
        assert!(read_frame(&mut &[0xffu8, 0xff, 0xff, 0xff][..]).is_err());
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        assert!(Answer::decode(&[PUSHED, 1, 2]).is_err());
        assert!(Request::decode(&[99]).is_err());
    }
}
