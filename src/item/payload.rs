//! The payload: any JSON document, kept as compact text in document order
//! (whitespace outside strings removed, nothing reordered), so the default
//! fingerprint, SHA-256 of those bytes, equals the one the Go SDK computes
//! for the same report; and the checksum stores keep beside it. In a store
//! a payload may instead be sealed bytes ([`super::sealed_form`]), which
//! show as their JSON envelope.

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{QueueError, QueueResult};

/// SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// CRC-32 of the payload bytes, kept beside each stored payload and verified
/// on every read.
pub fn payload_checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// A JSON document, kept as compact text in document order, or a sealed
/// payload in its binary form.
///
/// Cheap to clone (shared). Built only through [`Payload::from_json_bytes`] /
/// [`Payload::from_value`], which validate and compact it, and by the
/// stores and the sealer.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    Json(Arc<str>),
    Sealed(Arc<SealedBytes>),
}

/// A binary sealed payload and, once asked for, its text form.
struct SealedBytes {
    bytes: Box<[u8]>,
    text: OnceLock<Box<str>>,
}

impl PartialEq for SealedBytes {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for SealedBytes {}

impl Payload {
    /// Parses `bytes` as one JSON document and keeps its compact form.
    pub fn from_json_bytes(bytes: &[u8]) -> QueueResult<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| QueueError::invalid(format!("payload is not UTF-8: {e}")))?;
        Self::from_json_str(text)
    }

    /// Parses `text` as one JSON document and keeps its compact form.
    pub fn from_json_str(text: &str) -> QueueResult<Self> {
        // Validate with serde (exact error position), then compact by hand so
        // key order and number spelling stay as the producer wrote them.
        let mut de = serde_json::Deserializer::from_str(text);
        serde::de::IgnoredAny::deserialize(&mut de)
            .and_then(|_| de.end())
            .map_err(|e| QueueError::invalid(format!("payload is not valid JSON: {e}")))?;
        Ok(Payload::json(compact_json(text)))
    }

    fn json(text: String) -> Self {
        Payload(Repr::Json(Arc::from(text)))
    }

    /// Bytes a store wrote from a `Payload` and has just verified against
    /// their checksum: a binary sealed payload by its first bytes, or text
    /// that was valid compact JSON when written, so only UTF-8 is checked
    /// (parsing every payload again was a tenth of a claim).
    pub(crate) fn from_stored(bytes: Vec<u8>) -> QueueResult<Self> {
        if bytes.starts_with(super::sealed_form::BINARY_PREFIX) {
            return Ok(Payload::from_sealed_bytes(bytes));
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| QueueError::invalid(format!("payload is not UTF-8: {e}")))?;
        Ok(Payload::json(text))
    }

    /// Text this crate wrote as compact JSON (a sealed payload's envelope),
    /// taken as it is.
    pub(crate) fn from_trusted_string(text: String) -> Self {
        Payload::json(text)
    }

    /// A report that just authenticated, compact JSON when it was sealed:
    /// only UTF-8 is checked, and the bytes are copied once, into the
    /// shared buffer.
    pub(crate) fn from_trusted_slice(bytes: &[u8]) -> QueueResult<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| QueueError::invalid(format!("payload is not UTF-8: {e}")))?;
        Ok(Payload(Repr::Json(Arc::from(text))))
    }

    /// A sealed payload in its binary form ([`super::sealed_form`]).
    pub(crate) fn from_sealed_bytes(bytes: Vec<u8>) -> Self {
        Payload(Repr::Sealed(Arc::new(SealedBytes {
            bytes: bytes.into_boxed_slice(),
            text: OnceLock::new(),
        })))
    }

    /// The bytes of a sealed payload in binary form; `None` for JSON text
    /// (which may be a text envelope).
    pub fn sealed_bytes(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Json(_) => None,
            Repr::Sealed(sealed) => Some(&sealed.bytes),
        }
    }

    /// The same payload as JSON text: itself, or a binary sealed payload's
    /// text envelope (for a backend that stores JSON).
    pub fn to_text_form(&self) -> Payload {
        match &self.0 {
            Repr::Json(_) => self.clone(),
            Repr::Sealed(_) => Payload::json(self.as_str().to_owned()),
        }
    }

    /// Serializes a JSON value (keys in the value's own order).
    pub fn from_value(value: &serde_json::Value) -> Self {
        // Serializing a Value cannot fail: keys are strings.
        Payload::json(value.to_string())
    }

    /// The compact JSON text; for a binary sealed payload, its text
    /// envelope (made on first use).
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Json(text) => text,
            Repr::Sealed(sealed) => sealed
                .text
                .get_or_init(|| super::sealed_form::binary_to_text(&sealed.bytes).into()),
        }
    }

    /// The bytes as stored: the compact JSON text (what transports send
    /// and fingerprints hash), or a sealed payload's binary form.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Json(text) => text.as_bytes(),
            Repr::Sealed(sealed) => &sealed.bytes,
        }
    }

    /// Length in bytes, as stored.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// True for an empty payload (never produced by the constructors).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// Parses the payload into a `serde_json::Value`.
    pub fn to_value(&self) -> serde_json::Value {
        // The text was validated at construction.
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }

    /// SHA-256 hex of the payload bytes: the default fingerprint.
    pub fn fingerprint(&self) -> String {
        sha256_hex(self.as_bytes())
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print payloads in full: they can be large and sensitive.
        match &self.0 {
            Repr::Json(_) => write!(f, "Payload({} bytes)", self.len()),
            Repr::Sealed(_) => write!(f, "Payload(sealed, {} bytes)", self.len()),
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue = serde_json::from_str(self.as_str())
            .map_err(|e| serde::ser::Error::custom(format!("payload: {e}")))?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: Box<serde_json::value::RawValue> = Deserialize::deserialize(d)?;
        Ok(Payload::json(compact_json(raw.get())))
    }
}

/// Removes whitespace outside strings from valid JSON text, keeping
/// everything else byte for byte.
pub fn compact_json(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Copy the whole string literal in one go. Working on bytes
                // is safe: the quote, the backslash and JSON whitespace are
                // ASCII, and no byte of a multi-byte UTF-8 character is.
                let start = i;
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
                out.extend_from_slice(&bytes[start..i.min(bytes.len())]);
            }
            b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII whitespace between tokens was left out, so `out` is UTF-8;
    // the lossy fallback is never taken.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_compacted_in_document_order() {
        let p = Payload::from_json_str("{ \"b\" : 1,\n \"a\": \"x y\\\" z\" }").unwrap();
        assert_eq!(p.as_str(), r#"{"b":1,"a":"x y\" z"}"#);
        assert!(Payload::from_json_str("{").is_err());
        assert!(Payload::from_json_str("{} {}").is_err());
    }

    #[test]
    fn default_fingerprint_is_sha256_of_compact_payload() {
        let p = Payload::from_json_str("{\"a\": 1}").unwrap();
        assert_eq!(p.fingerprint(), sha256_hex(b"{\"a\":1}"));
    }

    #[test]
    fn sha256_hex_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Any text: quotes, backslashes, control characters, whitespace
            // and multi-byte characters, all of which must survive.
            any::<String>().prop_map(Value::String),
            "[ \\t\\n\"\\\\a-zé€😀]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[ a-z\"\\\\]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Compacting a pretty-printed document gives exactly what serde
        /// writes compactly: no byte inside a string changes, no whitespace
        /// between tokens stays.
        #[test]
        fn compaction_matches_serde_compact_output(value in any_json()) {
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let compact = serde_json::to_string(&value).unwrap();
            proptest::prop_assert_eq!(compact_json(&pretty), compact.clone());
            proptest::prop_assert_eq!(compact_json(&compact), compact);
        }
    }
}
