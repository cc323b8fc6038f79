//! Errors a user can act on: each names the file, the peer or the TLS alert involved.

use std::path::PathBuf;

/// What went wrong in TLS configuration or in a handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {path}: {source}")]
    ReadFile {
        /// What the file should hold ("certificate chain", "private key", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PEM data did not parse.
    #[error("{what} from {origin} is not valid PEM: {detail}")]
    BadPem {
        /// What the data should hold.
        what: &'static str,
        /// A file name, or "memory".
        origin: String,
        /// OpenSSL's reason.
        detail: String,
    },
    /// The private key does not belong to the certificate.
    #[error("the private key from {key} does not match the certificate from {cert}")]
    KeyMismatch {
        /// Where the certificate came from.
        cert: String,
        /// Where the key came from.
        key: String,
    },
    /// A configuration value was rejected.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
    /// The handshake failed with a TLS alert that this side sent.
    #[error("TLS handshake with {peer} failed: sent alert {alert} ({name}){detail}")]
    AlertSent {
        /// The peer ("client" / "server", or its name).
        peer: String,
        /// TLS alert code.
        alert: u8,
        /// The alert's name.
        name: &'static str,
        /// More context, such as the certificate verification error, with a leading ": ".
        detail: String,
    },
    /// The handshake failed inside OpenSSL without an alert we could attribute.
    #[error("TLS handshake with {peer} failed: {detail}")]
    Handshake {
        /// The peer.
        peer: String,
        /// OpenSSL's error queue, rendered.
        detail: String,
    },
    /// A callback from C panicked; the panic was caught at the FFI boundary.
    #[error("a TLS callback panicked: {0}")]
    CallbackPanicked(String),
    /// OpenSSL failed in a way that is not the peer's fault.
    #[error("OpenSSL error: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
}

/// The name of a TLS alert (RFC 8446 section 6, plus QUIC's use of 120).
pub fn alert_name(code: u8) -> &'static str {
    match code {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => "unknown alert",
    }
}
