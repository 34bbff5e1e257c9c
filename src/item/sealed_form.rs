//! How a sealed payload is laid out in a store: the parts [`crate::seal`]
//! makes (key ID, item ID, nonce, ciphertext) in two interchangeable forms.
//! No key is needed here: the forms differ only in encoding.
//!
//! - **Binary**, for backends that store bytes (SQLite, memory): the parts
//!   back to back behind a magic. It is as long as the plaintext plus about
//!   70 bytes, where the text form adds a third (base64); on the store
//!   bench that third cost as much write time as the encryption itself.
//!
//!   ```text
//!   \x01 R Q S 1 | key ID (8 ASCII) | item ID length (1 byte) | item ID | nonce (12) | ciphertext and tag
//!   ```
//!
//!   `\x01` never starts a stored JSON text (compact JSON starts with a
//!   value), so a stored payload is one or the other by its first byte.
//! - **Text**, for backends that store JSON (files, PostgreSQL) and for
//!   anything that shows a payload as JSON: the version 1 envelope,
//!
//!   ```json
//!   {"retryq_sealed":1,"kid":"3f9a0c1e","id":"0193…","nonce":"<b64>","ct":"<b64>"}
//!   ```
//!
//! A binary payload shows as its text form ([`super::Payload::as_str`]),
//! and the opener reads both, so either form can be moved to a backend
//! of the other kind (`retryq migrate`) and still open.

/// How every binary sealed payload starts: the magic and the format
/// version, which is the text envelope's (the same parts and associated
/// data, another encoding).
pub const BINARY_PREFIX: &[u8] = b"\x01RQS1";
/// [`BINARY_PREFIX`] as text, for the census ([`crate::store::RetryQueue::count_payload_prefix`]).
pub const BINARY_PREFIX_STR: &str = "\u{1}RQS1";
/// How a text envelope starts, up to its key ID.
pub const TEXT_KID_PREFIX: &str = "{\"retryq_sealed\":1,\"kid\":\"";
/// Length of a key ID.
pub const KID_LEN: usize = 8;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;

/// The parts of a sealed payload, borrowed from its binary form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedParts<'a> {
    /// The key that sealed it.
    pub kid: &'a str,
    /// The item it was sealed for.
    pub id: &'a str,
    /// The nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ct: &'a [u8],
}

/// Why binary bytes are not a sealed payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The bytes do not start with [`BINARY_PREFIX`].
    #[error("not a binary sealed payload")]
    NotSealed,
    /// They do, but the parts behind it are cut short or not text where
    /// they must be.
    #[error("binary sealed payload is damaged: {0}")]
    Damaged(&'static str),
}

/// Length of the binary form's header for item `id`: everything before
/// the ciphertext.
pub fn binary_header_len(id: &str) -> usize {
    BINARY_PREFIX.len() + KID_LEN + 1 + id.len() + NONCE_LEN
}

/// Appends the binary form's header to `out`; false (nothing written)
/// when the key ID is not [`KID_LEN`] long or the item ID over 255 bytes.
pub fn write_binary_header(
    out: &mut Vec<u8>,
    kid: &str,
    id: &str,
    nonce: &[u8; NONCE_LEN],
) -> bool {
    let Ok(id_len) = u8::try_from(id.len()) else {
        return false;
    };
    if kid.len() != KID_LEN {
        return false;
    }
    out.extend_from_slice(BINARY_PREFIX);
    out.extend_from_slice(kid.as_bytes());
    out.push(id_len);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(nonce);
    true
}

/// The binary form of the parts.
pub fn to_binary(kid: &str, id: &str, nonce: &[u8; NONCE_LEN], ct: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(binary_header_len(id) + ct.len());
    write_binary_header(&mut out, kid, id, nonce).then(|| {
        out.extend_from_slice(ct);
        out
    })
}

/// Reads the parts of a binary sealed payload.
pub fn parse_binary(bytes: &[u8]) -> Result<SealedParts<'_>, FormError> {
    let rest = bytes
        .strip_prefix(BINARY_PREFIX)
        .ok_or(FormError::NotSealed)?;
    let (kid, rest) = rest
        .split_at_checked(KID_LEN)
        .ok_or(FormError::Damaged("cut short in the key ID"))?;
    let kid = std::str::from_utf8(kid).map_err(|_| FormError::Damaged("key ID is not text"))?;
    let (&id_len, rest) = rest
        .split_first()
        .ok_or(FormError::Damaged("cut short before the item ID"))?;
    let (id, rest) = rest
        .split_at_checked(usize::from(id_len))
        .ok_or(FormError::Damaged("cut short in the item ID"))?;
    let id = std::str::from_utf8(id).map_err(|_| FormError::Damaged("item ID is not text"))?;
    let (nonce, ct) = rest
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(FormError::Damaged("cut short in the nonce"))?;
    Ok(SealedParts { kid, id, nonce, ct })
}

/// The text envelope holding `parts`.
pub fn to_text(kid: &str, id: &str, nonce: &[u8], ct: &[u8]) -> String {
    // SIMD base64: the scalar encoder took as long as the encryption.
    let b64 = base64_simd::STANDARD;
    let mut text = String::with_capacity(ct.len() * 4 / 3 + id.len() + 96);
    text.push_str(TEXT_KID_PREFIX);
    text.push_str(kid);
    text.push_str("\",\"id\":");
    // Item IDs never need escaping (they are checked where they enter);
    // serde keeps any other string safe all the same.
    text.push_str(&serde_json::Value::from(id).to_string());
    text.push_str(",\"nonce\":\"");
    b64.encode_append(nonce, &mut text);
    text.push_str("\",\"ct\":\"");
    b64.encode_append(ct, &mut text);
    text.push_str("\"}");
    text
}

/// The text form of binary `bytes`. Damaged bytes still become an
/// envelope, one that cannot be read, so whoever opens it quarantines it
/// as damage rather than taking it for a clear report.
pub fn binary_to_text(bytes: &[u8]) -> String {
    match parse_binary(bytes) {
        Ok(p) => to_text(p.kid, p.id, p.nonce, p.ct),
        Err(e) => format!(
            "{{\"retryq_sealed\":1,\"damaged\":{},\"bytes\":\"{}\"}}",
            serde_json::Value::from(e.to_string()),
            base64_simd::STANDARD.encode_to_string(bytes)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_form_reads_back_its_parts() {
        let nonce = [7u8; NONCE_LEN];
        let bytes = to_binary("0123abcd", "item-1", &nonce, b"cipher+tag").unwrap();
        assert!(bytes.starts_with(BINARY_PREFIX));
        assert_eq!(BINARY_PREFIX_STR.as_bytes(), BINARY_PREFIX);
        let parts = parse_binary(&bytes).unwrap();
        assert_eq!(
            parts,
            SealedParts {
                kid: "0123abcd",
                id: "item-1",
                nonce: &nonce,
                ct: b"cipher+tag"
            }
        );
        assert!(binary_to_text(&bytes).starts_with(TEXT_KID_PREFIX));
    }

    #[test]
    fn a_cut_binary_form_is_damage_and_still_shows_as_an_envelope() {
        let bytes = to_binary("0123abcd", "item-1", &[1; NONCE_LEN], b"").unwrap();
        for len in BINARY_PREFIX.len()..bytes.len() - 1 {
            assert!(
                matches!(parse_binary(&bytes[..len]), Err(FormError::Damaged(_))),
                "{len}"
            );
            let text = binary_to_text(&bytes[..len]);
            assert!(text.starts_with("{\"retryq_sealed\":1,"), "{text}");
            serde_json::from_str::<serde_json::Value>(&text).unwrap();
        }
        assert_eq!(parse_binary(b"{}"), Err(FormError::NotSealed));
    }

    #[test]
    fn ids_and_key_ids_that_do_not_fit_are_refused() {
        assert!(to_binary("short", "a", &[0; NONCE_LEN], b"").is_none());
        assert!(to_binary("0123abcd", &"x".repeat(256), &[0; NONCE_LEN], b"").is_none());
    }
}
