//! Image references, normalised as Docker and containerd do.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The registry a reference without a host names.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed, normalised image reference: `domain/repository[:tag][@digest]`.
///
/// A name whose first component has no `.` or `:` and is not `localhost` is on Docker Hub
/// (`busybox` is `docker.io/library/busybox:latest`); a reference with neither tag nor digest
/// gets the tag `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub domain: String,
    /// Repository path (`library/busybox`).
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest, if any (it wins over the tag when fetching).
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises `s`.
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |reason: &str| Error::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (name, None),
        };
        let (domain, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let repository = if domain == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty()
            || !repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
                    && c.as_bytes()[0].is_ascii_alphanumeric()
            })
        {
            return Err(bad(
                "the repository must be lowercase path components of [a-z0-9._-]",
            ));
        }
        if let Some(t) = &tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && (t.as_bytes()[0].is_ascii_alphanumeric() || t.starts_with('_'))
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid {
                return Err(bad(
                    "the tag must be 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            domain,
            repository,
            tag,
            digest,
        })
    }

    /// What a manifest request names: the digest if any, else the tag.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The token scope for `actions` (`pull` or `pull,push`) on this repository.
    pub fn scope(&self, actions: &str) -> String {
        format!("repository:{}:{actions}", self.repository)
    }

    /// The same repository at `digest` (no tag).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            tag: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Reference> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).expect(s).to_string()
    }

    #[test]
    fn docker_hub_normalisation() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("localhost/app:v1"), "localhost/app:v1");
        assert_eq!(
            norm("127.0.0.1:5000/library/busybox:test"),
            "127.0.0.1:5000/library/busybox:test"
        );
        let d = Digest::of(b"x");
        let r = Reference::parse(&format!("ghcr.io/a/b@{d}")).expect("digest ref");
        assert_eq!(r.tag, None);
        assert_eq!(r.object(), d.to_string());
        let r = Reference::parse(&format!("ghcr.io/a/b:t@{d}")).expect("tag and digest");
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.object(), d.to_string());
        assert_eq!(r.scope("pull"), "repository:a/b:pull");
    }

    #[test]
    fn bad_references_name_themselves() {
        for bad in [
            "",
            "Busybox",
            "a//b",
            "busybox:-x",
            "busybox@sha256:12",
            "host:5000/",
        ] {
            let e = Reference::parse(bad).expect_err(bad);
            assert!(
                e.to_string().contains(&format!("{bad:?}")) || bad.contains('@'),
                "{e}"
            );
        }
    }
}
