//! `google.protobuf.Any` packing with containerd's type URLs.
//!
//! containerd identifies the message inside an `Any` by its bare proto full
//! name (`containerd.events.TaskExit`), with no `type.googleapis.com/` domain
//! and no leading `/`. prost's own `Name::type_url()` and
//! `prost_types::Any::from_msg` produce `/containerd.events.TaskExit`, so use
//! these helpers instead whenever an `Any` goes on the wire.
//!
//! When reading, a URL with a domain prefix (anything up to the last `/`) is
//! accepted too, as protobuf's own runtimes do.

use std::fmt;

use prost::Name;
use prost_types::Any;

/// Returns the bare type URL for a proto full name.
///
/// A leading `.` (descriptor form, `.containerd.events.TaskExit`) or a
/// domain prefix ending in `/` is removed, so the result is always the form
/// containerd writes.
#[must_use]
pub fn type_url(full_name: &str) -> String {
    bare_name(full_name).trim_start_matches('.').to_owned()
}

/// Returns the bare type URL of message type `M`, e.g.
/// `containerd.events.TaskExit`.
#[must_use]
pub fn of<M: Name>() -> String {
    type_url(&M::full_name())
}

/// Encodes `message` into an `Any` whose type URL is its bare full name.
#[must_use]
pub fn to_any<M: Name>(message: &M) -> Any {
    Any {
        type_url: of::<M>(),
        value: message.encode_to_vec(),
    }
}

/// Reports whether `any` holds a message of type `M`.
#[must_use]
pub fn is<M: Name>(any: &Any) -> bool {
    bare_name(&any.type_url) == of::<M>()
}

/// Decodes the message of type `M` held by `any`.
///
/// # Errors
///
/// [`FromAnyError::TypeMismatch`] if `any` holds another type, and
/// [`FromAnyError::Decode`] if its value is not a valid `M`.
pub fn from_any<M: Name + Default>(any: &Any) -> Result<M, FromAnyError> {
    if !is::<M>(any) {
        return Err(FromAnyError::TypeMismatch {
            expected: of::<M>(),
            found: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(FromAnyError::Decode)
}

/// Why [`from_any`] could not produce a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromAnyError {
    /// The `Any` holds a different message type.
    TypeMismatch {
        /// Bare type URL of the requested type.
        expected: String,
        /// Type URL found in the `Any`.
        found: String,
    },
    /// The value is not a valid encoding of the requested type.
    Decode(prost::DecodeError),
}

impl fmt::Display for FromAnyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TypeMismatch { expected, found } => {
                write!(f, "Any holds type {found:?}, expected {expected:?}")
            }
            Self::Decode(err) => write!(f, "cannot decode Any value: {err}"),
        }
    }
}

impl std::error::Error for FromAnyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::TypeMismatch { .. } => None,
            Self::Decode(err) => Some(err),
        }
    }
}

/// The part of a type URL after its last `/`.
fn bare_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_url_strips_prefixes() {
        assert_eq!(
            type_url("containerd.events.TaskExit"),
            "containerd.events.TaskExit"
        );
        assert_eq!(
            type_url(".containerd.events.TaskExit"),
            "containerd.events.TaskExit"
        );
        assert_eq!(
            type_url("/containerd.events.TaskExit"),
            "containerd.events.TaskExit"
        );
        assert_eq!(
            type_url("type.googleapis.com/google.protobuf.Empty"),
            "google.protobuf.Empty"
        );
    }
}
