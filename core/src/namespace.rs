//! Namespace names and how a call carries them.
//!
//! A namespace name is a parsed newtype, so code past the service boundary never sees an
//! unvalidated name. Validation follows containerd's `identifiers.Validate`: one or more
//! alphanumeric runs joined by single `.`, `_` or `-`, at most 76 characters.

use std::fmt;

use crate::error::{Error, Result};

/// gRPC metadata key that carries the namespace of a call.
pub const GRPC_HEADER: &str = "containerd-namespace";
/// gRPC metadata key that carries the lease a call's new objects join.
pub const LEASE_HEADER: &str = "containerd-lease";
/// Longest accepted identifier, as containerd.
pub const MAX_LENGTH: usize = 76;

/// A validated namespace name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// Parses `name`, failing with InvalidArgument that names it and the rule it breaks.
    pub fn parse(name: &str) -> Result<Namespace> {
        validate_identifier(name)?;
        Ok(Namespace(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Namespace {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Checks an identifier (namespace, container or lease id) as containerd does.
pub fn validate_identifier(s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid_argument("identifier must not be empty"));
    }
    if s.len() > MAX_LENGTH {
        return Err(Error::invalid_argument(format!(
            "identifier {s:?} greater than allowed length ({MAX_LENGTH})"
        )));
    }
    let mut previous_was_separator = true;
    for c in s.chars() {
        let is_separator = matches!(c, '.' | '_' | '-');
        let ok = if is_separator {
            !previous_was_separator
        } else {
            c.is_ascii_alphanumeric()
        };
        if !ok {
            return Err(Error::invalid_argument(format!(
                "identifier {s:?} must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
            )));
        }
        previous_was_separator = is_separator;
    }
    if previous_was_separator {
        return Err(Error::invalid_argument(format!(
            "identifier {s:?} must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
        )));
    }
    Ok(())
}

/// The namespace a call names in its metadata, if any (validated when present).
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Namespace>> {
    match metadata.get(GRPC_HEADER) {
        None => Ok(None),
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                Error::invalid_argument(format!("{GRPC_HEADER} header is not valid text"))
            })?;
            Namespace::parse(text).map(Some)
        }
    }
}

/// The lease a call's new objects join (`containerd-lease`), if any.
pub fn lease_from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(LEASE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// The namespace a namespaced call must carry: FailedPrecondition when it has none, as in
/// containerd ("namespace is required").
pub fn require(metadata: &tonic::metadata::MetadataMap) -> Result<Namespace> {
    from_metadata(metadata)?.ok_or_else(|| {
        Error::failed_precondition(format!(
            "namespace is required: set the {GRPC_HEADER} header (ctr: -n NAME)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::error::Classify;

    #[test]
    fn valid_names() {
        for name in ["default", "k8s.io", "a", "a-b_c.d", "A9", &"x".repeat(76)] {
            Namespace::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn invalid_names_are_invalid_argument() {
        for name in [
            "",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a/b",
            "ä",
            ".",
            &"x".repeat(77),
        ] {
            let err = Namespace::parse(name).expect_err(name);
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{name}");
        }
    }

    #[test]
    fn missing_namespace_is_failed_precondition() {
        let md = tonic::metadata::MetadataMap::new();
        assert_eq!(from_metadata(&md).map(|n| n.is_none()), Ok(true));
        let err = require(&md).expect_err("no namespace");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("namespace is required"));
    }

    #[test]
    fn header_namespace_is_parsed_and_validated() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(GRPC_HEADER, "k8s.io".parse().expect("ascii"));
        assert_eq!(require(&md).map(|n| n.to_string()), Ok("k8s.io".to_owned()));
        md.insert(GRPC_HEADER, "bad..name".parse().expect("ascii"));
        assert_eq!(
            require(&md).map_err(|e| e.kind()),
            Err(ErrorKind::InvalidArgument)
        );
    }
}
