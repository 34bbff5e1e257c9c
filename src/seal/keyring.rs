//! The keyring: the AES-256 keys that seal and open payloads, where they
//! come from (a key file or an environment variable), the checks a key file
//! must pass, and writing a new or rotated key file.
//!
//! # Key file format
//!
//! TOML, one `[[key]]` table per key, oldest first. The **last** key seals;
//! every key opens.
//!
//! ```toml
//! [[key]]
//! id = "3f9a0c1e"                                    # 8 lowercase hex characters
//! created = "2026-11-30T02:00:00Z"                   # informative
//! secret = "q0Jm...="                                # 32 bytes, standard base64
//! ```
//!
//! Key IDs have a fixed length so that a payload re-sealed under another
//! key takes exactly as many bytes as before (a re-seal then never changes
//! what the item counts against `max_bytes`).
//!
//! A key file must be a regular file of mode 0600 (or 0400) owned by the
//! user running retryq; anything else is refused, naming the file and the
//! command that fixes it.
//!
//! `key_env` names a variable holding the same keys in one line:
//! `ID:SECRET[,ID:SECRET...]`, the last one sealing.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::SealError;

/// Length of a key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of a key ID in characters.
pub const KEY_ID_LEN: usize = crate::item::sealed_form::KID_LEN;

/// One key: its ID and its secret bytes.
#[derive(Clone)]
pub struct Key {
    /// Its ID, stored in the clear beside every payload it sealed.
    pub id: String,
    pub(crate) secret: zeroize::Zeroizing<[u8; KEY_LEN]>,
    /// When it was made, as written in the key file (informative).
    pub created: Option<String>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Key").field("id", &self.id).finish()
    }
}

impl Key {
    /// A fresh key from the OS's random source, with a random ID.
    pub fn generate() -> Result<Key, SealError> {
        let mut secret = zeroize::Zeroizing::new([0u8; KEY_LEN]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| SealError::Random(e.to_string()))?;
        let mut id = [0u8; KEY_ID_LEN / 2];
        getrandom::getrandom(&mut id).map_err(|e| SealError::Random(e.to_string()))?;
        Ok(Key {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            secret,
            created: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        })
    }

    fn from_parts(
        id: &str,
        secret_b64: &str,
        created: Option<String>,
        source: &str,
    ) -> Result<Key, SealError> {
        check_key_id(id, source)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secret_b64.trim())
            .map_err(|e| SealError::BadKeyring {
                source_name: source.to_owned(),
                reason: format!("the secret of key {id} is not base64: {e}"),
            })?;
        let bytes = zeroize::Zeroizing::new(bytes);
        let secret: [u8; KEY_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| SealError::BadKeyring {
                    source_name: source.to_owned(),
                    reason: format!(
                        "the secret of key {id} is {} bytes, an AES-256 key is {KEY_LEN}",
                        bytes.len()
                    ),
                })?;
        Ok(Key {
            id: id.to_owned(),
            secret: zeroize::Zeroizing::new(secret),
            created,
        })
    }
}

/// True for a well-formed key ID: [`KEY_ID_LEN`] lowercase hex characters.
pub fn is_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_key_id(id: &str, source: &str) -> Result<(), SealError> {
    if is_key_id(id) {
        Ok(())
    } else {
        Err(SealError::BadKeyring {
            source_name: source.to_owned(),
            reason: format!("key ID {id:?} is not {KEY_ID_LEN} lowercase hex characters"),
        })
    }
}

/// The keys that seal and open: never empty; the last one seals.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<Key>,
    /// Where the keys came from, for messages: a file path or `$VAR`.
    source: String,
}

/// A key file as written on disk.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    secret: String,
}

impl Keyring {
    /// A ring of `keys` (oldest first); refuses an empty ring and a repeated ID.
    pub fn new(keys: Vec<Key>, source: impl Into<String>) -> Result<Keyring, SealError> {
        let source = source.into();
        if keys.is_empty() {
            return Err(SealError::BadKeyring {
                source_name: source,
                reason: "it holds no key (`retryq keys generate` writes one)".to_owned(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for key in &keys {
            if !seen.insert(key.id.as_str()) {
                return Err(SealError::BadKeyring {
                    source_name: source,
                    reason: format!("key ID {} appears twice", key.id),
                });
            }
        }
        Ok(Keyring { keys, source })
    }

    /// Reads and checks a key file (mode, owner, format).
    pub fn load_file(path: &Path) -> Result<Keyring, SealError> {
        check_key_file(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| SealError::KeyFileIo {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse_file_text(&text, &path.display().to_string())
    }

    /// Parses key-file text; `source` names it in errors.
    pub fn parse_file_text(text: &str, source: &str) -> Result<Keyring, SealError> {
        let file: KeyFile = toml::from_str(text).map_err(|e| SealError::BadKeyring {
            source_name: source.to_owned(),
            reason: format!("not a keyring: {}", e.message()),
        })?;
        let keys = file
            .key
            .into_iter()
            .map(|k| Key::from_parts(&k.id, &k.secret, k.created, source))
            .collect::<Result<Vec<_>, _>>()?;
        Keyring::new(keys, source)
    }

    /// Reads the one-line form from environment variable `var`.
    pub fn load_env(var: &str) -> Result<Keyring, SealError> {
        let source = format!("${var}");
        let text = std::env::var(var).map_err(|_| SealError::BadKeyring {
            source_name: source.clone(),
            reason: "the variable is not set (or not UTF-8)".to_owned(),
        })?;
        let keys = text
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| match part.trim().split_once(':') {
                Some((id, secret)) => Key::from_parts(id, secret, None, &source),
                None => Err(SealError::BadKeyring {
                    source_name: source.clone(),
                    reason: "expected ID:SECRET[,ID:SECRET...]".to_owned(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Keyring::new(keys, source)
    }

    /// The key that seals: the newest.
    pub fn sealing(&self) -> &Key {
        // `new` refuses an empty ring.
        &self.keys[self.keys.len() - 1]
    }

    /// The key with this ID, if the ring holds it.
    pub fn get(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Every key, oldest first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Where the keys came from (a path, or `$VAR`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The ring with `key` added as the newest (the one that seals).
    pub fn with_key(&self, key: Key) -> Result<Keyring, SealError> {
        let mut keys = self.keys.clone();
        keys.push(key);
        Keyring::new(keys, self.source.clone())
    }

    /// The key-file text for this ring.
    pub fn to_file_text(&self) -> String {
        let file = KeyFile {
            key: self
                .keys
                .iter()
                .map(|k| KeyEntry {
                    id: k.id.clone(),
                    created: k.created.clone(),
                    secret: base64::engine::general_purpose::STANDARD.encode(k.secret.as_ref()),
                })
                .collect(),
        };
        let body = toml::to_string(&file).unwrap_or_default();
        format!(
            "# retryq keyring: AES-256 keys, oldest first. The last key seals; every key opens.\n\
             # Keep this file mode 0600, owned by the user running retryq, and back it up:\n\
             # an item sealed under a key that is lost can never be read again.\n\n{body}"
        )
    }

    /// Writes the ring to `path` as a new 0600 file: through a temporary
    /// file renamed over it, so a reader (a running daemon) sees the old
    /// ring or the new one, never half of one. `replace`: an existing file
    /// may be replaced (rotation); otherwise one is refused.
    pub fn write_file(&self, path: &Path, replace: bool) -> Result<(), SealError> {
        let io = |e| SealError::KeyFileIo {
            path: path.to_path_buf(),
            source: e,
        };
        if !replace && path.exists() {
            return Err(SealError::KeyFileExists(path.to_path_buf()));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keyring".to_owned());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let written = (|| {
            let mut file = options.open(&tmp)?;
            file.write_all(self.to_file_text().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Ok(d) = std::fs::File::open(&dir) {
                // The rename is durable once the directory is.
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

/// Refuses a key file that others could read or that another user owns.
pub fn check_key_file(path: &Path) -> Result<(), SealError> {
    let meta = std::fs::metadata(path).map_err(|e| SealError::KeyFileIo {
        path: path.to_path_buf(),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(SealError::KeyFileUnsafe {
            path: path.to_path_buf(),
            problem: "is not a regular file".to_owned(),
            fix: "point key_file at the keyring written by `retryq keys generate`".to_owned(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::KeyFileUnsafe {
                path: path.to_path_buf(),
                problem: format!("has mode {mode:04o}: other users can read the keys"),
                fix: format!("chmod 600 {}", path.display()),
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(SealError::KeyFileUnsafe {
                path: path.to_path_buf(),
                problem: format!(
                    "is owned by uid {}, but retryq runs as uid {me}",
                    meta.uid()
                ),
                fix: format!("chown {me} {}", path.display()),
            });
        }
    }
    Ok(())
}

/// How many items each key ID seals, for messages ("3f9a0c1e: 12 items").
pub fn describe_counts(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(kid, n)| format!("{kid} ({n} item{})", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_mode(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join("keys.toml");
        let ring = Keyring::new(vec![Key::generate().unwrap()], "test").unwrap();
        ring.write_file(&path, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        path
    }

    #[test]
    fn a_generated_ring_round_trips_through_its_file_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let ring = Keyring::new(vec![Key::generate().unwrap()], "x").unwrap();
        let ring = ring.with_key(Key::generate().unwrap()).unwrap();
        ring.write_file(&path, false).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        }
        let back = Keyring::load_file(&path).unwrap();
        assert_eq!(back.keys().len(), 2);
        assert_eq!(back.sealing().id, ring.sealing().id);
        assert_eq!(*back.sealing().secret, *ring.sealing().secret);
        let again = ring.write_file(&path, false).unwrap_err();
        assert!(matches!(again, SealError::KeyFileExists(_)), "{again}");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let path = write_mode(dir.path(), mode);
            let err = Keyring::load_file(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
        }
        let path = write_mode(dir.path(), 0o400);
        assert!(Keyring::load_file(&path).is_ok(), "0400 is stricter still");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_owned_by_another_user_is_refused_with_chown() {
        use std::os::unix::fs::MetadataExt as _;
        // Files owned by another user need root to make; a root-owned file
        // serves when the test runs as somebody else.
        let me = rustix::process::geteuid().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let path = write_mode(dir.path(), 0o600);
        let target = if me == 0 { 65534 } else { 0 };
        if me == 0 {
            std::os::unix::fs::chown(&path, Some(target), None).unwrap();
        } else {
            // Cannot give a file away: use one root owns, if any is 0600.
            let Some(root_file) = ["/etc/shadow", "/etc/gshadow"]
                .into_iter()
                .map(Path::new)
                .find(|p| {
                    std::fs::metadata(p)
                        .map(|m| m.uid() == 0 && m.mode() & 0o077 == 0)
                        .unwrap_or(false)
                })
            else {
                return;
            };
            let err = check_key_file(root_file).unwrap_err().to_string();
            assert!(err.contains("chown"), "{err}");
            return;
        }
        let err = Keyring::load_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(&format!("owned by uid {target}")), "{err}");
        assert!(
            err.contains(&format!("chown {me} {}", path.display())),
            "{err}"
        );
    }

    #[test]
    fn bad_rings_are_refused_with_the_reason() {
        let one = Key::generate().unwrap();
        let dup = Keyring::new(vec![one.clone(), one], "x").unwrap_err();
        assert!(dup.to_string().contains("appears twice"), "{dup}");
        let empty = Keyring::parse_file_text("", "f").unwrap_err();
        assert!(empty.to_string().contains("no key"), "{empty}");
        let short =
            Keyring::parse_file_text("[[key]]\nid = \"0011aabb\"\nsecret = \"AAAA\"\n", "f")
                .unwrap_err();
        assert!(short.to_string().contains("is 3 bytes"), "{short}");
        let bad_id =
            Keyring::parse_file_text("[[key]]\nid = \"K1\"\nsecret = \"AAAA\"\n", "f").unwrap_err();
        assert!(bad_id.to_string().contains("8 lowercase hex"), "{bad_id}");
    }

    #[test]
    fn the_env_form_lists_keys_oldest_first() {
        let a = Key::generate().unwrap();
        let b = Key::generate().unwrap();
        let enc = |k: &Key| base64::engine::general_purpose::STANDARD.encode(k.secret.as_ref());
        let var = "RETRYQ_TEST_KEYRING_ENV_FORM";
        std::env::set_var(var, format!("{}:{},{}:{}", a.id, enc(&a), b.id, enc(&b)));
        let ring = Keyring::load_env(var).unwrap();
        assert_eq!(ring.sealing().id, b.id);
        assert!(ring.get(&a.id).is_some());
        assert_eq!(ring.source(), format!("${var}"));
        std::env::remove_var(var);
        assert!(Keyring::load_env(var).is_err());
    }
}
