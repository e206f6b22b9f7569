//! TLS modes (always through rustls).

use super::*;

/// How the connection uses TLS (always through rustls).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum TlsMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate.
    Prefer,
    /// Require TLS, without verifying the certificate.
    Require,
    /// Require TLS and a certificate signed by a trusted CA.
    ///
    /// Caveat: with sqlx 0.8.6 and rustls 0.23.24 or later, the host name is
    /// checked too, as in [`VerifyFull`](TlsMode::VerifyFull) (sqlx issue
    /// #3793, fixed upstream after 0.8.6). That is stricter, never weaker;
    /// connect by a name the certificate lists.
    VerifyCa,
    /// Require TLS, a trusted certificate, and a host name that matches it.
    VerifyFull,
}

impl TlsMode {
    /// The libpq name of the mode, e.g. `verify-full`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    pub(super) fn to_sqlx(self) -> PgSslMode {
        match self {
            TlsMode::Disable => PgSslMode::Disable,
            TlsMode::Prefer => PgSslMode::Prefer,
            TlsMode::Require => PgSslMode::Require,
            TlsMode::VerifyCa => PgSslMode::VerifyCa,
            TlsMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }

    pub(super) fn from_sqlx(mode: PgSslMode) -> Self {
        match mode {
            PgSslMode::Disable => TlsMode::Disable,
            PgSslMode::Allow | PgSslMode::Prefer => TlsMode::Prefer,
            PgSslMode::Require => TlsMode::Require,
            PgSslMode::VerifyCa => TlsMode::VerifyCa,
            PgSslMode::VerifyFull => TlsMode::VerifyFull,
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = DatabaseError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" => Ok(TlsMode::Disable),
            "prefer" => Ok(TlsMode::Prefer),
            "require" => Ok(TlsMode::Require),
            "verify-ca" | "verify_ca" => Ok(TlsMode::VerifyCa),
            "verify-full" | "verify_full" => Ok(TlsMode::VerifyFull),
            other => Err(config_error(
                "tls_mode",
                format!(
                    "unknown TLS mode {other:?}; expected disable, prefer, require, verify-ca or verify-full"
                ),
            )),
        }
    }
}
