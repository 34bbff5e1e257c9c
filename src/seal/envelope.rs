//! The sealed envelope: what a sealed item holds in its payload field, and
//! sealing and opening it with AES-256-GCM.
//!
//! A sealed payload has four parts, laid out by [`crate::item::sealed_form`]
//! in a binary form (SQLite, memory) or as a JSON envelope (files,
//! PostgreSQL, and whatever shows a payload), so clear and sealed items live
//! side by side in every backend:
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
//!
//! The cipher is ring's AES-256-GCM (BoringSSL's assembly), about five
//! times the speed of RustCrypto's `aes-gcm` on this project's machines; a
//! test opens what it seals with `aes-gcm`, so the format is plain
//! AES-256-GCM either way.

use std::collections::BTreeMap;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};

use super::keyring::Keyring;
use super::SealError;
use crate::item::sealed_form::{self, NONCE_LEN};
use crate::item::Payload;

/// How every text envelope starts (the version key first).
pub const ENVELOPE_PREFIX: &str = "{\"retryq_sealed\":";
/// How a text envelope of this format starts, up to its key ID (which has
/// [`super::keyring::KEY_ID_LEN`] characters): what the census counts.
pub const KID_PREFIX: &str = sealed_form::TEXT_KID_PREFIX;
/// How a binary sealed payload starts, up to its key ID: what the census
/// counts too.
pub const BINARY_KID_PREFIX: &str = sealed_form::BINARY_PREFIX_STR;
/// The envelope format this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;
const AD_DOMAIN: &[u8] = b"retryq-seal-v1\0";
const TAG_LEN: usize = 16;

/// Which of the two forms ([`sealed_form`]) a sealed payload is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Bytes, for a backend that stores bytes.
    Binary,
    /// A JSON envelope, for a backend that stores JSON.
    Text,
}

impl Form {
    /// The form `payload` is in (text for anything not binary).
    pub fn of(payload: &Payload) -> Form {
        if payload.sealed_bytes().is_some() {
            Form::Binary
        } else {
            Form::Text
        }
    }
}

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

/// The sealed fields other than the report, as the plaintext starts
/// (see [`Meta`]), or `None` when all are empty (then `{}`); the caller
/// wipes it once copied.
fn meta_bytes(fields: &ClearFields) -> Result<Option<Vec<u8>>, SealError> {
    if fields.attributes.is_empty()
        && fields.agent_id.is_empty()
        && fields.scanner_name.is_empty()
        && fields.target_path.is_empty()
    {
        return Ok(None);
    }
    let meta = Meta {
        a: fields.attributes.clone(),
        g: fields.agent_id.clone(),
        s: fields.scanner_name.clone(),
        t: fields.target_path.clone(),
    };
    serde_json::to_vec(&meta)
        .map(Some)
        .map_err(|e| SealError::Seal(e.to_string()))
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

/// True when the payload is (or claims to be) an envelope: binary sealed
/// bytes, or a JSON object with a top-level `retryq_sealed` key. As this
/// build writes them, the key comes first; one re-ordered by a tool is
/// still an envelope (and then opens, or is damage), never taken for a
/// clear report.
pub fn is_envelope(payload: &Payload) -> bool {
    if payload.sealed_bytes().is_some() {
        return true;
    }
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
    if let Some(bytes) = payload.sealed_bytes() {
        return match sealed_form::parse_binary(bytes) {
            Ok(parts) => Kind::Sealed(parts.kid.to_owned()),
            Err(e) => Kind::Malformed(e.to_string()),
        };
    }
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
    // One character at a time each: a single-char search runs as memchr,
    // a set of two was a per-character loop as long as the decoding.
    let plain = |s: &str| !s.contains('\\') && !s.contains('"');
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

/// The associated data: a domain, the item ID and the key ID. Built on the
/// stack (item IDs are at most 64 bytes, key IDs 8), so each seal and open
/// spares an allocation.
struct AssociatedData {
    bytes: [u8; AD_MAX],
    len: usize,
}

const AD_MAX: usize = AD_DOMAIN.len() + crate::item::MAX_ID_LEN + 1 + 64;

impl AssociatedData {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn associated_data(item_id: &str, kid: &str) -> Result<AssociatedData, OpenError> {
    let len = AD_DOMAIN.len() + item_id.len() + 1 + kid.len();
    if len > AD_MAX {
        return Err(OpenError::Corrupt(format!(
            "sealed payload names an item ID of {} bytes and a key ID of {}, longer than any this build seals",
            item_id.len(),
            kid.len()
        )));
    }
    let mut bytes = [0u8; AD_MAX];
    let mut at = 0;
    for part in [AD_DOMAIN, item_id.as_bytes(), &[0], kid.as_bytes()] {
        bytes[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    Ok(AssociatedData { bytes, len })
}

/// Seals and opens with the keys of one keyring.
pub struct Sealer {
    ring: Keyring,
    /// One cipher per key of the ring, in the same order (key schedules
    /// computed once, not per item).
    ciphers: Vec<LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("ring", &self.ring).finish()
    }
}

/// An envelope's parts, the ciphertext copied out to be opened in place.
struct Parts<'a> {
    kid: std::borrow::Cow<'a, str>,
    id: std::borrow::Cow<'a, str>,
    nonce: [u8; NONCE_LEN],
    ct: Vec<u8>,
}

fn malformed(what: &str, e: &dyn std::fmt::Display) -> OpenError {
    OpenError::Corrupt(format!(
        "sealed payload is malformed (a truncated or damaged record): {what}: {e}"
    ))
}

/// The parts of `sealed`, in either form.
fn parts(sealed: &Payload) -> Result<Parts<'_>, OpenError> {
    if let Some(bytes) = sealed.sealed_bytes() {
        let p = sealed_form::parse_binary(bytes).map_err(|e| {
            OpenError::Corrupt(format!(
                "sealed payload is malformed (a truncated or damaged record): {e}"
            ))
        })?;
        return Ok(Parts {
            kid: p.kid.into(),
            id: p.id.into(),
            nonce: *p.nonce,
            ct: p.ct.to_vec(),
        });
    }
    let env = match parse_fast(sealed.as_str()) {
        Some(env) => env,
        None => parse(sealed)?,
    };
    let b64 = base64_simd::STANDARD;
    let nonce = b64
        .decode_to_vec(env.nonce.as_bytes())
        .map_err(|e| malformed("nonce", &e))?;
    let nonce: [u8; NONCE_LEN] = nonce
        .as_slice()
        .try_into()
        .map_err(|_| malformed("nonce", &format!("{} bytes", nonce.len())))?;
    let ct = b64
        .decode_to_vec(env.ct.as_bytes())
        .map_err(|e| malformed("ct", &e))?;
    Ok(Parts {
        kid: env.kid,
        id: env.id,
        nonce,
        ct,
    })
}

/// The binary form of a text envelope, for a store that keeps bytes;
/// `None` when it is not one that reads (it is then stored as it is, and
/// quarantined when opened).
pub fn to_binary_form(sealed: &Payload) -> Option<Payload> {
    if sealed.sealed_bytes().is_some() {
        return Some(sealed.clone());
    }
    let p = parts(sealed).ok()?;
    sealed_form::to_binary(&p.kid, &p.id, &p.nonce, &p.ct).map(Payload::from_sealed_bytes)
}

impl Sealer {
    /// A sealer over `ring`.
    pub fn new(ring: Keyring) -> Result<Sealer, SealError> {
        let ciphers = ring
            .keys()
            .iter()
            .map(|k| {
                UnboundKey::new(&AES_256_GCM, k.secret.as_slice())
                    .map(LessSafeKey::new)
                    .map_err(|_| SealError::BadKeyring {
                        source_name: ring.source().to_owned(),
                        reason: format!("key {} is not an AES-256 key", k.id),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Sealer { ring, ciphers })
    }

    /// The keys it uses.
    pub fn ring(&self) -> &Keyring {
        &self.ring
    }

    /// The ID of the key that seals.
    pub fn sealing_kid(&self) -> &str {
        &self.ring.sealing().id
    }

    /// Seals `fields` for item `item_id` under the newest key, in `form`.
    pub fn seal(
        &self,
        form: Form,
        item_id: &str,
        fields: &ClearFields,
    ) -> Result<Payload, SealError> {
        let report = fields
            .report
            .as_ref()
            .ok_or_else(|| SealError::Seal("an item without a report".to_owned()))?;
        let index = self.ciphers.len() - 1;
        let kid = &self.ring.keys()[index].id;
        let nonce = fresh_nonce()?;
        let meta = zeroize::Zeroizing::new(meta_bytes(fields)?);
        let meta: &[u8] = meta.as_deref().unwrap_or(b"{}");
        // The plaintext is laid out where its ciphertext goes (behind the
        // binary form's header) and encrypted in place: no copy of it is
        // left behind, and the buffer is sized once so it never moves.
        let header = match form {
            Form::Binary => sealed_form::binary_header_len(item_id),
            Form::Text => 0,
        };
        let mut out = Vec::with_capacity(header + meta.len() + 1 + report.len() + TAG_LEN);
        if form == Form::Binary && !sealed_form::write_binary_header(&mut out, kid, item_id, &nonce)
        {
            return Err(SealError::Seal(format!(
                "item ID of {} bytes or key ID {kid} does not fit the sealed form",
                item_id.len()
            )));
        }
        out.extend_from_slice(meta);
        out.push(b'\n');
        out.extend_from_slice(report.as_bytes());
        let ad = associated_data(item_id, kid).map_err(|e| SealError::Seal(e.to_string()))?;
        let tag = match self.ciphers[index].seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(ad.as_slice()),
            &mut out[header..],
        ) {
            Ok(tag) => tag,
            Err(_) => {
                zeroize::Zeroize::zeroize(&mut out);
                return Err(SealError::Seal("AES-GCM refused to encrypt".to_owned()));
            }
        };
        out.extend_from_slice(tag.as_ref());
        match form {
            Form::Binary => Ok(Payload::from_sealed_bytes(out)),
            Form::Text => {
                let text = sealed_form::to_text(kid, item_id, &nonce, &out);
                Ok(Payload::from_trusted_string(text))
            }
        }
    }

    /// Opens the envelope `sealed` (either form) held by item `item_id`.
    pub fn open(&self, item_id: &str, sealed: &Payload) -> Result<ClearFields, OpenError> {
        let Parts { kid, id, nonce, ct } = parts(sealed)?;
        if id != item_id {
            return Err(OpenError::Corrupt(format!(
                "sealed payload was sealed for item {id}, not this one (a ciphertext copied between items)"
            )));
        }
        let Some(index) = self.ring.keys().iter().position(|k| k.id == kid) else {
            return Err(OpenError::UnknownKey {
                kid: kid.into_owned(),
            });
        };
        let mut plaintext = ct;
        let len = self.ciphers[index]
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(item_id, &kid)?.as_slice()),
                &mut plaintext,
            )
            .map_err(|_| {
                OpenError::Corrupt(format!(
                    "sealed payload failed authentication under key {kid} (the ciphertext was changed or damaged)"
                ))
            })?
            .len();
        plaintext.truncate(len);
        let not_an_item = |plaintext: &mut Vec<u8>, e: &dyn std::fmt::Display| {
            zeroize::Zeroize::zeroize(plaintext);
            // Authenticated yet unreadable: written by a broken sealer.
            OpenError::Corrupt(format!(
                "sealed payload opened but is not a sealed item: {e}"
            ))
        };
        let Some(split) = plaintext.iter().position(|b| *b == b'\n') else {
            return Err(not_an_item(
                &mut plaintext,
                &"no newline after the sealed fields",
            ));
        };
        let meta = &plaintext[..split];
        let sealed: Meta = if meta == b"{}" {
            Meta::default()
        } else {
            match serde_json::from_slice(meta) {
                Ok(meta) => meta,
                Err(e) => return Err(not_an_item(&mut plaintext, &e)),
            }
        };
        // The report was compact JSON text when sealed, and it is
        // authentic; then the sealed fields are wiped (the rest of the
        // buffer is the report, clear from here on).
        let report = Payload::from_trusted_slice(&plaintext[split + 1..]);
        zeroize::Zeroize::zeroize(&mut plaintext[..split]);
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                return Err(OpenError::Corrupt(format!(
                    "sealed payload opened but is not a sealed item: {e}"
                )))
            }
        };
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
        Sealer::new(Keyring::new(vec![Key::generate().unwrap()], "test").unwrap()).unwrap()
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
            .seal(Form::Text, "item-1", &fields(r#"{"secret":"MARKER-123"}"#))
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
            .seal(Form::Text, "item-1", &fields(r#"{"secret":"MARKER-123"}"#))
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
        let sealed = s.seal(Form::Text, "a", &fields("{}")).unwrap();
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
        for form in [Form::Binary, Form::Text] {
            let sealed = sealer().seal(form, "a", &fields("{}")).unwrap();
            let err = sealer().open("a", &sealed).unwrap_err();
            assert!(matches!(err, OpenError::UnknownKey { .. }), "{err}");
        }
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
            for form in [Form::Binary, Form::Text] {
                let sealed = s.seal(form, &id, &clear).unwrap();
                prop_assert_eq!(Form::of(&sealed), form);
                prop_assert_eq!(s.open(&id, &sealed).unwrap(), clear.clone());
                // Either form converts to the other without the key.
                let other = match form {
                    Form::Binary => sealed.to_text_form(),
                    Form::Text => to_binary_form(&sealed).unwrap(),
                };
                prop_assert_ne!(Form::of(&other), form);
                prop_assert_eq!(s.open(&id, &other).unwrap(), clear.clone());
            }
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
            for form in [Form::Binary, Form::Text] {
            let sealed = s.seal(form, "item-7", &clear).unwrap();
            let bytes = sealed.as_bytes().to_vec();
            for at in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[at] = bad[at].wrapping_add(delta);
                // As a store would hand it back: binary by its magic, else
                // text, which a store only ever holds as JSON.
                let payload = if bad.starts_with(sealed_form::BINARY_PREFIX) {
                    Payload::from_sealed_bytes(bad)
                } else {
                    let Ok(text) = String::from_utf8(bad) else { continue };
                    let Ok(payload) = Payload::from_json_str(&text) else { continue };
                    payload
                };
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

    /// The format is plain AES-256-GCM: RustCrypto's implementation opens
    /// what ring sealed, given the same nonce and associated data.
    #[test]
    fn another_aes_gcm_implementation_opens_what_is_sealed() {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        let key = Key::generate().unwrap();
        let secret = *key.secret;
        let s = Sealer::new(Keyring::new(vec![key], "test").unwrap()).unwrap();
        let clear = fields(r#"{"secret":"MARKER-9"}"#);
        let sealed = s.seal(Form::Binary, "item-3", &clear).unwrap();
        let parts = sealed_form::parse_binary(sealed.as_bytes()).unwrap();
        let cipher = aes_gcm::Aes256Gcm::new((&secret).into());
        let mut buffer = parts.ct.to_vec();
        cipher
            .decrypt_in_place(
                aes_gcm::Nonce::from_slice(parts.nonce),
                associated_data("item-3", parts.kid).unwrap().as_slice(),
                &mut buffer,
            )
            .unwrap();
        let text = String::from_utf8(buffer).unwrap();
        assert!(text.ends_with("\n{\"secret\":\"MARKER-9\"}"), "{text}");
    }
}
