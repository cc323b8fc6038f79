//! Username/password authentication from a password file (`password_file`).
//!
//! The file holds one `username:hash` per line (blank lines and `#` comments are skipped), in
//! the format mosquitto uses, so an existing mosquitto password file works unchanged:
//! - `$argon2id$...` (a PHC string): what `mqttd passwd` writes (Argon2id, the `argon2`
//!   crate's recommended parameters);
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512, mosquitto 2's default
//!   (`mosquitto_passwd`);
//! - `$6$<salt>$<hash>`: salted SHA-512, mosquitto 1.6 and earlier.
//!
//! Plain-text passwords are refused when the file is loaded (hash them with `mqttd passwd` or
//! `mosquitto_passwd -U`). A line the broker cannot use is an error naming the file and line,
//! never a silently skipped user.
//!
//! Hashes are deliberately slow, so [`Authenticator::verify`] is meant for a blocking thread
//! (`spawn_blocking`), never the broker core. A verified password is remembered as a keyed
//! SHA-256 (a random key per process), so a fleet reconnecting after a network blip does not
//! cost one Argon2 run per device; a changed or wrong password always takes the slow path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use openssl::hash::MessageDigest;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// A password file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not `username:hash` with a supported hash.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A username or password `mqttd passwd` cannot store.
    #[error("{0}")]
    Invalid(String),
}

/// One user's stored password hash.
#[derive(Clone, PartialEq, Eq)]
enum Stored {
    /// A PHC string (`$argon2id$...`).
    Argon2(String),
    /// mosquitto's `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// mosquitto's `$6$`: SHA-512 of password then salt.
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print hashes into logs.
        f.write_str(match self {
            Stored::Argon2(_) => "argon2",
            Stored::Pbkdf2Sha512 { .. } => "sha512-pbkdf2",
            Stored::Sha512 { .. } => "sha512",
        })
    }
}

/// Most PBKDF2 iterations accepted from a file: a typo must not make each connect take minutes.
const MAX_ITERATIONS: u32 = 10_000_000;

impl Stored {
    fn parse(hash: &str) -> Result<Stored, String> {
        let b64 = |s: &str, what: &str| {
            BASE64
                .decode(s)
                .map_err(|e| format!("{what} is not base64: {e}"))
        };
        if hash.starts_with("$argon2") {
            let parsed =
                PasswordHash::new(hash).map_err(|e| format!("not a valid Argon2 hash: {e}"))?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err("not a valid Argon2 hash: no salt or no hash".into());
            }
            return Ok(Stored::Argon2(hash.to_owned()));
        }
        if let Some(rest) = hash.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(h), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("expected $7$<iterations>$<salt>$<hash>".into());
            };
            let iterations: u32 = iterations
                .parse()
                .ok()
                .filter(|n| (1..=MAX_ITERATIONS).contains(n))
                .ok_or_else(|| format!("iterations must be 1 to {MAX_ITERATIONS}"))?;
            let hash = b64(h, "the hash")?;
            if hash.len() != 64 {
                return Err("a sha512-pbkdf2 hash is 64 bytes".into());
            }
            return Ok(Stored::Pbkdf2Sha512 {
                iterations,
                salt: b64(salt, "the salt")?,
                hash,
            });
        }
        if let Some(rest) = hash.strip_prefix("$6$") {
            let Some((salt, h)) = rest.split_once('$') else {
                return Err("expected $6$<salt>$<hash>".into());
            };
            let hash = b64(h, "the hash")?;
            if hash.len() != 64 {
                return Err("a sha512 hash is 64 bytes".into());
            }
            return Ok(Stored::Sha512 {
                salt: b64(salt, "the salt")?,
                hash,
            });
        }
        Err(
            "not a supported password hash ($argon2id$, $7$ or $6$); plain-text passwords \
             are not accepted: hash the file with `mqttd passwd` or `mosquitto_passwd -U`"
                .into(),
        )
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Stored::Argon2(phc) => PasswordHash::new(phc)
                .map(|h| {
                    argon2::Argon2::default()
                        .verify_password(password, &h)
                        .is_ok()
                })
                .unwrap_or(false),
            Stored::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; 64];
                let Ok(iterations) = usize::try_from(*iterations) else {
                    return false;
                };
                openssl::pkcs5::pbkdf2_hmac(
                    password,
                    salt,
                    iterations,
                    MessageDigest::sha512(),
                    &mut out,
                )
                .is_ok()
                    && bool::from(out.ct_eq(hash))
            }
            Stored::Sha512 { salt, hash } => {
                let out = Sha512::new()
                    .chain_update(password)
                    .chain_update(salt)
                    .finalize();
                bool::from(out.as_slice().ct_eq(hash))
            }
        }
    }
}

/// A loaded password file: usernames and their password hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, Stored>,
}

impl PasswordFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.to_owned(),
            source,
        })?;
        PasswordFile::parse(&text, path)
    }

    /// Parses the text of a password file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PasswordFile, AuthError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let err = |message: String| AuthError::Line {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("expected `username:hash`".into()));
            };
            if user.is_empty() {
                return Err(err("empty username".into()));
            }
            let stored = Stored::parse(hash).map_err(|m| err(format!("user `{user}`: {m}")))?;
            if users.insert(user.to_owned(), stored).is_some() {
                return Err(err(format!("user `{user}` appears twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file names no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `username`'s (slow: run it on a blocking thread).
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        self.users
            .get(username)
            .is_some_and(|stored| stored.verify(password))
    }
}

/// The Argon2id PHC string of `password` with a fresh random salt.
pub fn hash_password(password: &[u8]) -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| AuthError::Invalid(format!("no randomness for the salt: {e}")))?;
    let salt = SaltString::encode_b64(&bytes)
        .map_err(|e| AuthError::Invalid(format!("cannot encode the salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Invalid(format!("cannot hash the password: {e}")))
}

/// The text of the password file `text` with `username` set to `password` (added or replaced)
/// or, with `password == None`, removed. Other lines (comments too) are kept as they were.
pub fn edit_file(text: &str, username: &str, password: Option<&[u8]>) -> Result<String, AuthError> {
    if username.is_empty() || username.contains([':', '\n', '\r']) {
        return Err(AuthError::Invalid(
            "a username must be non-empty and contain no `:` or line break".into(),
        ));
    }
    let entry = match password {
        Some(p) => Some(format!("{username}:{}", hash_password(p)?)),
        None => None,
    };
    let mut out = String::with_capacity(text.len() + 128);
    let mut entry = entry;
    for line in text.lines() {
        if line.split_once(':').is_some_and(|(u, _)| u == username) {
            if let Some(e) = entry.take() {
                out.push_str(&e);
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(e) = entry {
        out.push_str(&e);
        out.push('\n');
    }
    Ok(out)
}

/// Verifies CONNECT credentials against a [`PasswordFile`], remembering recent successes.
#[derive(Debug)]
pub struct Authenticator {
    file: PasswordFile,
    key: [u8; 32],
    verified: Mutex<HashMap<String, [u8; 32]>>,
}

/// Most remembered verified passwords; beyond it the memory is cleared and refilled.
const REMEMBERED: usize = 100_000;

impl Authenticator {
    /// An authenticator for `file`.
    pub fn new(file: PasswordFile) -> Authenticator {
        let mut key = [0u8; 32];
        // A failure leaves an all-zero key: the memory still works, only less private.
        let _ = getrandom::fill(&mut key);
        Authenticator {
            file,
            key,
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn digest(&self, username: &str, password: &[u8]) -> [u8; 32] {
        Sha256::new()
            .chain_update(self.key)
            .chain_update((username.len() as u64).to_be_bytes())
            .chain_update(username)
            .chain_update(password)
            .finalize()
            .into()
    }

    /// Whether `password` is `username`'s. Slow on a first success and on every failure: call
    /// it from a blocking thread.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        let digest = self.digest(username, password);
        let remembered = self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(username).copied());
        if remembered.is_some_and(|r| bool::from(r.ct_eq(&digest))) {
            return true;
        }
        if !self.file.verify(username, password) {
            return false;
        }
        if let Ok(mut m) = self.verified.lock() {
            if m.len() >= REMEMBERED {
                m.clear();
            }
            m.insert(username.to_owned(), digest);
        }
        true
    }

    /// Number of users in the file.
    pub fn users(&self) -> usize {
        self.file.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<PasswordFile, AuthError> {
        PasswordFile::parse(text, Path::new("passwd"))
    }

    #[test]
    fn mosquitto_pbkdf2_and_sha512_hashes_verify() {
        // Written by mosquitto_passwd 2.0.11 (-H sha512-pbkdf2, the default) for "secret pass".
        let f = file(
            "alice:$7$101$Ni/ruJbC0Zkkhg3D$pt87ubXHq8f5MlWLv9ENMYVbQl9xQFefQ4BTgAtBSccQlehFt0hX6pd+QQE+4LLrVNAFkH4u9S6vpNYzNkKeMg==\n",
        )
        .expect("parse");
        assert!(f.verify("alice", b"secret pass"));
        assert!(!f.verify("alice", b"secret pasS"));
        assert!(!f.verify("bob", b"secret pass"));
        // $6$: SHA-512(password || salt), built here from its definition.
        let salt = b"0123456789ab";
        let hash = Sha512::new()
            .chain_update(b"hunter2")
            .chain_update(salt)
            .finalize();
        let line = format!("bob:$6${}${}\n", BASE64.encode(salt), BASE64.encode(hash));
        let f = file(&line).expect("parse");
        assert!(f.verify("bob", b"hunter2"));
        assert!(!f.verify("bob", b"hunter3"));
    }

    #[test]
    fn argon2_entries_are_added_replaced_and_removed_keeping_other_lines() {
        let text = "# fleet\nalice:$6$MDEyMzQ1Njc4OWFi$AAAA\n";
        let text = text.replace("$AAAA", &format!("${}", BASE64.encode([0u8; 64])));
        let added = edit_file(&text, "dev-1", Some(b"pw1")).expect("add");
        let f = file(&added).expect("parse");
        assert!(f.verify("dev-1", b"pw1"));
        assert!(added.starts_with("# fleet\nalice:"), "{added}");
        let replaced = edit_file(&added, "dev-1", Some(b"pw2")).expect("replace");
        let f = file(&replaced).expect("parse");
        assert!(f.verify("dev-1", b"pw2") && !f.verify("dev-1", b"pw1"));
        assert_eq!(f.len(), 2);
        let removed = edit_file(&replaced, "dev-1", None).expect("remove");
        let f = file(&removed).expect("parse");
        assert_eq!(f.len(), 1);
        assert!(!f.verify("dev-1", b"pw2"));
        assert!(edit_file("", "a:b", Some(b"x")).is_err());
        assert!(edit_file("", "", Some(b"x")).is_err());
    }

    #[test]
    fn unusable_lines_are_named_with_their_line_number() {
        for (text, needle) in [
            (
                "\n# c\nalice:plaintext\n",
                "passwd:3: user `alice`: not a supported",
            ),
            ("alice\n", "passwd:1: expected `username:hash`"),
            (":$6$a$b\n", "passwd:1: empty username"),
            ("a:$7$0$AAAA$AAAA\n", "iterations"),
            ("a:$7$101$AAAA$AAAA\n", "64 bytes"),
            ("a:$7$101$!!$AAAA\n", "64 bytes"),
            ("a:$argon2id$nonsense\n", "not a valid Argon2 hash"),
        ] {
            let err = file(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let bad_salt = format!("a:$7$101$!!${}\n", BASE64.encode([0u8; 64]));
        let err = file(&bad_salt).expect_err("bad salt").to_string();
        assert!(err.contains("the salt is not base64"), "{err}");
        let twice = format!(
            "a:{}\na:{}\n",
            hash_password(b"x").expect("hash"),
            hash_password(b"y").expect("hash")
        );
        assert!(
            file(&twice)
                .expect_err("duplicate")
                .to_string()
                .contains("appears twice")
        );
    }

    #[test]
    fn the_authenticator_remembers_only_the_verified_password() {
        let text = edit_file("", "dev", Some(b"right")).expect("add");
        let auth = Authenticator::new(file(&text).expect("parse"));
        assert!(!auth.verify("dev", b"wrong"));
        assert!(auth.verify("dev", b"right"));
        // Remembered now; a wrong password is still refused, and so is another user.
        assert!(auth.verify("dev", b"right"));
        assert!(!auth.verify("dev", b"wrong"));
        assert!(!auth.verify("other", b"right"));
    }
}
