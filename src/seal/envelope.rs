//! The sealed envelope: what a sealed item holds in its payload field, and
//! sealing and opening it with AES-256-GCM.
//!
//! An envelope is itself a JSON document, so every backend stores it where
//! it stores a clear payload, and clear and sealed items live side by side:
//!
//! ```json
//! {"retryq_sealed":1,"kid":"3f9a0c1e","id":"0193…","nonce":"<12 bytes b64>","ct":"<b64>"}
//! ```
//!
//! - `retryq_sealed` is the format version; a payload that starts with
//!   `{"retryq_sealed":` is an envelope (the key is reserved).
//! - `kid` names the key that sealed it; `id` the item it was sealed for.
//!   Both are also the associated data, so editing either, or copying the
//!   envelope onto another item, makes it fail to open.
//! - `ct` is the AES-256-GCM ciphertext and tag of the sealed fields: the
//!   report, the attributes, and the agent, scanner and target strings.
//! - `nonce` is 96 fresh bits from the OS for each seal.

use std::collections::BTreeMap;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::keyring::Keyring;
use super::SealError;
use crate::item::Payload;

/// How every envelope starts (the version key first).
pub const ENVELOPE_PREFIX: &str = "{\"retryq_sealed\":";
/// How an envelope of this format starts, up to its key ID (which has
/// [`super::keyring::KEY_ID_LEN`] characters): what the census counts.
pub const KID_PREFIX: &str = "{\"retryq_sealed\":1,\"kid\":\"";
/// The envelope format this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;
const NONCE_LEN: usize = 12;
const AD_DOMAIN: &[u8] = b"retryq-seal-v1\0";

/// The fields of an item that are sealed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClearFields {
    /// The report.
    pub report: Option<Payload>,
    /// Attributes for transports.
    pub attributes: BTreeMap<String, String>,
    /// Producing agent.
    pub agent_id: String,
    /// Producing scanner.
    pub scanner_name: String,
    /// What was scanned.
    pub target_path: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    retryq_sealed: u32,
    #[serde(borrow)]
    kid: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    nonce: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    ct: std::borrow::Cow<'a, str>,
}

/// The sealed fields other than the report (short keys: they are
/// encrypted, nobody reads them).
///
/// The plaintext is this as compact JSON, a newline, then the report's
/// compact JSON text as it is: compact JSON holds no raw newline, so the
/// first one splits them, and opening needs no parse of the report.
#[derive(Serialize, Deserialize, Default)]
struct Meta {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    a: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    g: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    s: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    t: String,
}

/// The plaintext of `fields` (see [`Meta`]).
fn plaintext(report: &Payload, fields: &ClearFields) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::with_capacity(report.len() + 64 + 16);
    if fields.attributes.is_empty()
        && fields.agent_id.is_empty()
        && fields.scanner_name.is_empty()
        && fields.target_path.is_empty()
    {
        out.extend_from_slice(b"{}");
    } else {
        let meta = Meta {
            a: fields.attributes.clone(),
            g: fields.agent_id.clone(),
            s: fields.scanner_name.clone(),
            t: fields.target_path.clone(),
        };
        serde_json::to_writer(&mut out, &meta).map_err(|e| SealError::Seal(e.to_string()))?;
    }
    out.push(b'\n');
    out.extend_from_slice(report.as_bytes());
    Ok(out)
}

/// Why an envelope did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Sealed under a key the ring does not hold: not damage, so the item
    /// is left as it is until the key is supplied.
    #[error("sealed under key {kid}, which the keyring does not hold")]
    UnknownKey {
        /// The key ID the envelope names.
        kid: String,
    },
    /// The envelope is damaged, edited or misplaced: the item is
    /// quarantined with this reason.
    #[error("{0}")]
    Corrupt(String),
}

/// What a payload is, as far as sealing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A clear payload.
    Clear,
    /// An envelope sealed under this key ID.
    Sealed(String),
    /// It claims to be an envelope but cannot be read as one.
    Malformed(String),
}

/// True when the payload is (or claims to be) an envelope: a JSON object
/// with a top-level `retryq_sealed` key. As this build writes them, the
/// key comes first; one re-ordered by a tool is still an envelope (and
/// then opens, or is damage), never taken for a clear report.
pub fn is_envelope(payload: &Payload) -> bool {
    let text = payload.as_str();
    if text.starts_with(ENVELOPE_PREFIX) {
        return true;
    }
    // Rare: only payloads that mention the key pay for a parse.
    text.starts_with('{')
        && text.contains("\"retryq_sealed\"")
        && serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .is_ok_and(|map| map.contains_key("retryq_sealed"))
}

/// Classifies a stored payload without opening it.
pub fn kind(payload: &Payload) -> Kind {
    if !is_envelope(payload) {
        return Kind::Clear;
    }
    match parse(payload) {
        Ok(env) => Kind::Sealed(env.kid.into_owned()),
        Err(OpenError::Corrupt(reason)) | Err(OpenError::UnknownKey { kid: reason }) => {
            Kind::Malformed(reason)
        }
    }
}

fn parse(payload: &Payload) -> Result<Envelope<'_>, OpenError> {
    let env: Envelope<'_> = serde_json::from_str(payload.as_str()).map_err(|e| {
        OpenError::Corrupt(format!(
            "sealed payload is malformed (a truncated or damaged record): {e}"
        ))
    })?;
    if env.retryq_sealed != ENVELOPE_VERSION {
        return Err(OpenError::Corrupt(format!(
            "sealed payload has format version {}, this build reads version {ENVELOPE_VERSION}",
            env.retryq_sealed
        )));
    }
    Ok(env)
}

/// Reads an envelope laid out exactly as [`Sealer::seal`] writes it,
/// without a JSON parser; `None` for anything else (then [`parse`] decides).
fn parse_fast(text: &str) -> Option<Envelope<'_>> {
    let rest = text.strip_prefix(KID_PREFIX)?;
    let (kid, rest) = rest.split_at_checked(super::keyring::KEY_ID_LEN)?;
    let rest = rest.strip_prefix("\",\"id\":\"")?;
    let (id, rest) = rest.split_once('"')?;
    let rest = rest.strip_prefix(",\"nonce\":\"")?;
    let (nonce, rest) = rest.split_once('"')?;
    let rest = rest.strip_prefix(",\"ct\":\"")?;
    let ct = rest.strip_suffix("\"}")?;
    let plain = |s: &str| !s.contains(['\\', '"']);
    (plain(kid) && plain(id) && plain(nonce) && plain(ct)).then(|| Envelope {
        retryq_sealed: ENVELOPE_VERSION,
        kid: kid.into(),
        id: id.into(),
        nonce: nonce.into(),
        ct: ct.into(),
    })
}

/// Nonces drawn from the OS 64 at a time: each is still 96 fresh random
/// bits used once, for a tenth of the system calls. The pool remembers the
/// process it was filled in: a forked child never hands out its parent's.
struct NoncePool {
    pid: u32,
    bytes: [u8; NONCE_LEN * 64],
    used: usize,
}

static NONCES: std::sync::Mutex<Option<NoncePool>> = std::sync::Mutex::new(None);

fn fresh_nonce() -> Result<[u8; NONCE_LEN], SealError> {
    let mut pool = NONCES.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    let empty = match pool.as_ref() {
        Some(p) => p.pid != pid || p.used == p.bytes.len(),
        None => true,
    };
    if empty {
        let mut bytes = [0u8; NONCE_LEN * 64];
        getrandom::getrandom(&mut bytes).map_err(|e| SealError::Random(e.to_string()))?;
        *pool = Some(NoncePool {
            pid,
            bytes,
            used: 0,
        });
    }
    let Some(p) = pool.as_mut() else {
        return Err(SealError::Random("nonce pool unavailable".to_owned()));
    };
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&p.bytes[p.used..p.used + NONCE_LEN]);
    // Handed out once: wiped from the pool.
    p.bytes[p.used..p.used + NONCE_LEN].fill(0);
    p.used += NONCE_LEN;
    Ok(nonce)
}

fn associated_data(item_id: &str, kid: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_DOMAIN.len() + item_id.len() + 1 + kid.len());
    ad.extend_from_slice(AD_DOMAIN);
    ad.extend_from_slice(item_id.as_bytes());
    ad.push(0);
    ad.extend_from_slice(kid.as_bytes());
    ad
}

/// Seals and opens with the keys of one keyring.
pub struct Sealer {
    ring: Keyring,
    /// One cipher per key of the ring, in the same order (key schedules
    /// computed once, not per item).
    ciphers: Vec<Aes256Gcm>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("ring", &self.ring).finish()
    }
}

impl Sealer {
    /// A sealer over `ring`.
    pub fn new(ring: Keyring) -> Sealer {
        let ciphers = ring
            .keys()
            .iter()
            .map(|k| Aes256Gcm::new((&*k.secret).into()))
            .collect();
        Sealer { ring, ciphers }
    }

    /// The keys it uses.
    pub fn ring(&self) -> &Keyring {
        &self.ring
    }

    /// The ID of the key that seals.
    pub fn sealing_kid(&self) -> &str {
        &self.ring.sealing().id
    }

    /// Seals `fields` for item `item_id` under the newest key.
    pub fn seal(&self, item_id: &str, fields: &ClearFields) -> Result<Payload, SealError> {
        let report = fields
            .report
            .as_ref()
            .ok_or_else(|| SealError::Seal("an item without a report".to_owned()))?;
        let mut buffer = zeroize::Zeroizing::new(plaintext(report, fields)?);
        let index = self.ciphers.len() - 1;
        let kid = &self.ring.keys()[index].id;
        let nonce = fresh_nonce()?;
        self.ciphers[index]
            .encrypt_in_place(
                Nonce::from_slice(&nonce),
                &associated_data(item_id, kid),
                &mut *buffer,
            )
            .map_err(|_| SealError::Seal("AES-GCM refused to encrypt".to_owned()))?;
        // Written by hand, in the order the census and `parse_fast` read:
        // base64 and key IDs never need escaping, so serde's escaping scan
        // over the ciphertext is saved (it was a quarter of a seal).
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut text = String::with_capacity(buffer.len() * 4 / 3 + item_id.len() + 96);
        text.push_str(KID_PREFIX);
        text.push_str(kid);
        text.push_str("\",\"id\":");
        // Store IDs never need escaping either; serde keeps any other safe.
        text.push_str(&serde_json::to_string(item_id).map_err(|e| SealError::Seal(e.to_string()))?);
        text.push_str(",\"nonce\":\"");
        b64.encode_string(nonce, &mut text);
        text.push_str("\",\"ct\":\"");
        b64.encode_string(&*buffer, &mut text);
        text.push_str("\"}");
        Payload::from_stored(text.into_bytes()).map_err(|e| SealError::Seal(e.to_string()))
    }

    /// Opens the envelope `sealed` held by item `item_id`.
    pub fn open(&self, item_id: &str, sealed: &Payload) -> Result<ClearFields, OpenError> {
        let env = match parse_fast(sealed.as_str()) {
            Some(env) => env,
            None => parse(sealed)?,
        };
        if env.id != item_id {
            return Err(OpenError::Corrupt(format!(
                "sealed payload was sealed for item {}, not this one (a ciphertext copied between items)",
                env.id
            )));
        }
        let Some(index) = self.ring.keys().iter().position(|k| k.id == env.kid) else {
            return Err(OpenError::UnknownKey {
                kid: env.kid.into_owned(),
            });
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let malformed = |what: &str, e: &dyn std::fmt::Display| {
            OpenError::Corrupt(format!(
                "sealed payload is malformed (a truncated or damaged record): {what}: {e}"
            ))
        };
        let nonce = b64
            .decode(env.nonce.as_bytes())
            .map_err(|e| malformed("nonce", &e))?;
        if nonce.len() != NONCE_LEN {
            return Err(malformed("nonce", &format!("{} bytes", nonce.len())));
        }
        let mut plaintext = b64
            .decode(env.ct.as_bytes())
            .map_err(|e| malformed("ct", &e))?;
        self.ciphers[index]
            .decrypt_in_place(
                Nonce::from_slice(&nonce),
                &associated_data(item_id, &env.kid),
                &mut plaintext,
            )
            .map_err(|_| {
                OpenError::Corrupt(format!(
                    "sealed payload failed authentication under key {} (the ciphertext was changed or damaged)",
                    env.kid
                ))
            })?;
        let mut plaintext = zeroize::Zeroizing::new(plaintext);
        let not_an_item = |e: &dyn std::fmt::Display| {
            // Authenticated yet unreadable: written by a broken sealer.
            OpenError::Corrupt(format!(
                "sealed payload opened but is not a sealed item: {e}"
            ))
        };
        let Some(split) = plaintext.iter().position(|b| *b == b'\n') else {
            return Err(not_an_item(&"no newline after the sealed fields"));
        };
        let meta = &plaintext[..split];
        let sealed: Meta = if meta == b"{}" {
            Meta::default()
        } else {
            serde_json::from_slice(meta).map_err(|e| not_an_item(&e))?
        };
        // The report was compact JSON text when sealed, and it is authentic.
        let report =
            Payload::from_stored(plaintext.split_off(split + 1)).map_err(|e| not_an_item(&e))?;
        Ok(ClearFields {
            report: Some(report),
            attributes: sealed.a,
            agent_id: sealed.g,
            scanner_name: sealed.s,
            target_path: sealed.t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::keyring::Key;
    use proptest::prelude::*;

    fn sealer() -> Sealer {
        Sealer::new(Keyring::new(vec![Key::generate().unwrap()], "test").unwrap())
    }

    fn fields(report: &str) -> ClearFields {
        ClearFields {
            report: Some(Payload::from_json_str(report).unwrap()),
            attributes: [("k".to_owned(), "v".to_owned())].into(),
            agent_id: "agent".into(),
            scanner_name: "scanner".into(),
            target_path: "/srv".into(),
        }
    }

    #[test]
    fn an_envelope_names_its_key_and_item_and_never_holds_the_plaintext() {
        let s = sealer();
        let sealed = s
            .seal("item-1", &fields(r#"{"secret":"MARKER-123"}"#))
            .unwrap();
        assert!(is_envelope(&sealed));
        assert!(
            !sealed.as_str().contains("MARKER-123"),
            "{}",
            sealed.as_str()
        );
        assert!(!sealed.as_str().contains("/srv"));
        assert_eq!(kind(&sealed), Kind::Sealed(s.sealing_kid().to_owned()));
        let after = sealed.as_str().strip_prefix(KID_PREFIX).unwrap();
        assert_eq!(
            &after[..8],
            s.sealing_kid(),
            "the census reads the key ID there"
        );
        let again = s
            .seal("item-1", &fields(r#"{"secret":"MARKER-123"}"#))
            .unwrap();
        assert_ne!(sealed, again, "a fresh nonce per seal");
        assert_eq!(sealed.len(), again.len(), "same plaintext, same size");
        assert_eq!(
            s.open("item-1", &sealed).unwrap(),
            fields(r#"{"secret":"MARKER-123"}"#)
        );
    }

    #[test]
    fn an_envelope_copied_onto_another_item_does_not_open() {
        let s = sealer();
        let sealed = s.seal("a", &fields("{}")).unwrap();
        let err = s.open("b", &sealed).unwrap_err();
        assert!(err.to_string().contains("sealed for item a"), "{err}");
        // Relabelled to fit: the associated data still differs.
        let relabelled =
            Payload::from_json_str(&sealed.as_str().replace("\"id\":\"a\"", "\"id\":\"b\""))
                .unwrap();
        let err = s.open("b", &relabelled).unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_not_damage() {
        let sealed = sealer().seal("a", &fields("{}")).unwrap();
        let err = sealer().open("a", &sealed).unwrap_err();
        assert!(matches!(err, OpenError::UnknownKey { .. }), "{err}");
    }

    proptest! {
        #[test]
        fn what_is_sealed_opens_to_the_same_fields(
            text in "[ -~]{0,200}",
            attrs in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,16}", 0..4),
            id in "[A-Za-z0-9_-]{1,64}",
        ) {
            let s = sealer();
            let clear = ClearFields {
                report: Some(Payload::from_value(&serde_json::Value::String(text.clone()))),
                attributes: attrs,
                agent_id: text.clone(),
                scanner_name: String::new(),
                target_path: text,
            };
            let sealed = s.seal(&id, &clear).unwrap();
            prop_assert_eq!(s.open(&id, &sealed).unwrap(), clear);
        }

        /// Every single-byte change of an envelope is refused: either it is
        /// no longer an envelope, or it fails to open as damage (never as a
        /// missing key, which would leave it unquarantined, and never to
        /// different contents).
        #[test]
        fn every_single_byte_corruption_is_refused(
            report in "[a-z]{0,40}",
            delta in 1u8..=255,
        ) {
            let s = sealer();
            let clear = fields(&serde_json::Value::String(report).to_string());
            let sealed = s.seal("item-7", &clear).unwrap();
            let bytes = sealed.as_bytes().to_vec();
            for at in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[at] = bad[at].wrapping_add(delta);
                let Ok(text) = String::from_utf8(bad) else { continue };
                let Ok(payload) = Payload::from_json_str(&text) else { continue };
                if payload == sealed {
                    continue;
                }
                match s.open("item-7", &payload) {
                    Ok(opened) => {
                        return Err(proptest::test_runner::TestCaseError::fail(format!(
                            "byte {at} changed yet opened: {opened:?}"
                        )))
                    }
                    Err(OpenError::UnknownKey { kid }) => {
                        // Only an edit of the key ID itself names another key.
                        prop_assert_ne!(kid, s.sealing_kid().to_owned());
                    }
                    Err(OpenError::Corrupt(_)) => {}
                }
            }
        }
    }
}
