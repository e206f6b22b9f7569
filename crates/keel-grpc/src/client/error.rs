//! What can go wrong building clients.

use std::borrow::Cow;

/// A target or configuration the client side refuses.
///
/// Both are caller mistakes, so they convert to
/// [`keel_core::Error::Invalid`] (`invalid_input`).
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// An endpoint that is not a usable `http://` URI.
    #[error("invalid gRPC target {target:?}: {reason}")]
    InvalidTarget {
        /// The endpoint as given (cut to 200 bytes).
        target: String,
        /// Why it was refused.
        reason: Cow<'static, str>,
    },
    /// A setting out of its range.
    #[error("invalid gRPC client setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// Why it was refused.
        reason: Cow<'static, str>,
    },
}

impl ClientError {
    pub(crate) fn target(target: &str, reason: impl Into<Cow<'static, str>>) -> Self {
        let mut target = target.to_owned();
        if target.len() > 200 {
            let mut cut = 200;
            while !target.is_char_boundary(cut) {
                cut -= 1;
            }
            target.truncate(cut);
        }
        Self::InvalidTarget {
            target,
            reason: reason.into(),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

impl From<ClientError> for keel_core::Error {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::InvalidTarget { reason, .. } => {
                keel_core::Error::invalid_input("target", reason.into_owned())
            }
            ClientError::InvalidConfig { field, reason } => {
                keel_core::Error::invalid_input(field, reason.into_owned())
            }
        }
    }
}
