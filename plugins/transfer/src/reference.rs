//! Image references: Docker's normalisation (`busybox` is `docker.io/library/busybox:latest`),
//! the OCI ref-name annotation, and the name prefix rules of containerd's import
//! (`core/images/archive/reference.go`).

use crate::error::{Error, Result};

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DOMAIN: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";

/// A reference split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

fn invalid(reference: &str, why: &str) -> Error {
    Error::Core(berth_core::Error::invalid_argument(format!(
        "invalid image reference {reference:?}: {why}"
    )))
}

fn parse_normalized(reference: &str) -> Result<Parsed> {
    if reference.is_empty() {
        return Err(invalid(reference, "it is empty"));
    }
    if reference.len() == 64 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            reference,
            "a 64-character hexadecimal string is an image id, not a name",
        ));
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => {
            berth_core::content::Digest::parse(digest)
                .map_err(|e| invalid(reference, e.message()))?;
            (rest, Some(digest.to_owned()))
        }
        None => (reference, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_owned())),
        _ => (rest, None),
    };
    if let Some(tag) = &tag {
        let valid = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if !valid {
            return Err(invalid(reference, "the tag is malformed"));
        }
    }
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), rest.to_owned())
        }
        _ => (DEFAULT_DOMAIN.to_owned(), name.to_owned()),
    };
    if path.is_empty() {
        return Err(invalid(reference, "the repository name is empty"));
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid(reference, "repository names must be lowercase"));
    }
    for component in path.split('/') {
        let ok = !component.is_empty()
            && component
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && component
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && component
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !ok {
            return Err(invalid(reference, "the repository name is malformed"));
        }
    }
    let domain = if domain == LEGACY_DOMAIN {
        DEFAULT_DOMAIN.to_owned()
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_REPO_PREFIX}{path}")
    } else {
        path
    };
    Ok(Parsed {
        domain,
        path,
        tag,
        digest,
    })
}

/// The full reference Docker means by `reference` (distribution's `ParseDockerRef`):
/// `busybox` is `docker.io/library/busybox:latest`; a reference with a digest keeps only the
/// digest.
pub fn normalize(reference: &str) -> Result<String> {
    let p = parse_normalized(reference)?;
    Ok(match (&p.digest, &p.tag) {
        (Some(d), _) => format!("{}/{}@{d}", p.domain, p.path),
        (None, Some(t)) => format!("{}/{}:{t}", p.domain, p.path),
        (None, None) => format!("{}/{}:latest", p.domain, p.path),
    })
}

/// Docker's short form of a full reference (`docker.io/library/busybox:latest` is
/// `busybox:latest`), with `:latest` added when it names neither tag nor digest.
pub fn familiarize(reference: &str) -> Result<String> {
    let p = parse_normalized(reference)?;
    let name = if p.domain == DEFAULT_DOMAIN {
        p.path
            .strip_prefix(OFFICIAL_REPO_PREFIX)
            .filter(|rest| !rest.contains('/'))
            .map_or_else(|| p.path.clone(), str::to_owned)
    } else {
        format!("{}/{}", p.domain, p.path)
    };
    Ok(match (&p.tag, &p.digest) {
        (Some(t), Some(d)) => format!("{name}:{t}@{d}"),
        (Some(t), None) => format!("{name}:{t}"),
        (None, Some(d)) => format!("{name}@{d}"),
        (None, None) => format!("{name}:latest"),
    })
}

/// The OCI `org.opencontainers.image.ref.name` for a full name: its tag, or the whole name
/// when it has none or is pinned by digest (containerd's `ociReferenceName`).
pub fn oci_ref_name(name: &str) -> String {
    // The object is what follows the last ':' or '@' after the last '/'.
    let after_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[after_slash..].find([':', '@']) {
        Some(i) if name.as_bytes()[after_slash + i] == b':' => {
            name[after_slash + i + 1..].to_owned()
        }
        _ => name.to_owned(),
    }
}

/// containerd's `refTranslator`: a tag-only reference (no `/`, `:` or `@`) becomes
/// `prefix:tag`; a full reference is kept, or, with `check_prefix`, kept only when it lies
/// under `prefix` (else the empty string: no name).
pub fn translate(prefix: &str, reference: &str, check_prefix: bool) -> String {
    if prefix.is_empty() {
        return String::new();
    }
    if reference.contains(['/', ':', '@']) {
        if check_prefix && !is_image_prefix(reference, prefix) {
            return String::new();
        }
        return reference.to_owned();
    }
    format!("{prefix}:{reference}")
}

fn is_image_prefix(s: &str, prefix: &str) -> bool {
    match s.strip_prefix(prefix) {
        None => false,
        Some("") => true,
        Some(rest) => rest.starts_with(['/', ':', '@']),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_normalisation() {
        assert_eq!(
            normalize("busybox").expect("n"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(normalize("foo/bar:1").expect("n"), "docker.io/foo/bar:1");
        assert_eq!(
            normalize("localhost:5000/x:y").expect("n"),
            "localhost:5000/x:y"
        );
        assert_eq!(
            normalize("index.docker.io/library/alpine:3").expect("n"),
            "docker.io/library/alpine:3"
        );
        let d = berth_core::content::Digest::sha256_of(b"x");
        assert_eq!(
            normalize(&format!("alpine:3@{d}")).expect("n"),
            format!("docker.io/library/alpine@{d}")
        );
        assert!(normalize("Busybox").is_err());
        assert!(normalize(&"a".repeat(64)).is_err());
        assert!(normalize("x:").is_err());
    }

    #[test]
    fn familiar_names_and_ref_names() {
        assert_eq!(
            familiarize("docker.io/library/busybox:latest").expect("f"),
            "busybox:latest"
        );
        assert_eq!(
            familiarize("docker.io/foo/bar").expect("f"),
            "foo/bar:latest"
        );
        assert_eq!(
            familiarize("example.com/a/b:1").expect("f"),
            "example.com/a/b:1"
        );
        assert_eq!(oci_ref_name("docker.io/library/busybox:latest"), "latest");
        assert_eq!(oci_ref_name("localhost:5000/x"), "localhost:5000/x");
        let d = berth_core::content::Digest::sha256_of(b"x");
        assert_eq!(oci_ref_name(&format!("a/b@{d}")), format!("a/b@{d}"));
    }

    #[test]
    fn prefix_translation() {
        assert_eq!(translate("foo/bar", "latest", true), "foo/bar:latest");
        assert_eq!(translate("foo/bar", "foo/bar:1", true), "foo/bar:1");
        assert_eq!(translate("foo/bar", "foo/barn:1", true), "");
        assert_eq!(translate("foo/bar", "other:1", false), "other:1");
        assert_eq!(translate("", "latest", false), "");
    }
}
