//! Entry names: lexical cleaning into a relative path below the layer root.
//!
//! Cleaning is purely lexical (as Go's `filepath.Clean`, which containerd applies to every
//! name): the file system is never consulted, so a symlink cannot change what `..` means.
//! The result is then resolved component by component without following symlinks (see
//! `tree`), which is what makes it safe.

/// Linux's PATH_MAX. containerd passes `root + name` to path-based system calls, so a longer
/// name fails there with ENAMETOOLONG; refusing it here also bounds the directory depth (and
/// so the open descriptors) a single entry can make the applier walk.
pub(crate) const MAX_NAME_BYTES: usize = 4096;

/// Cleans a tar entry name (or hard link target) into `a/b/c` form.
///
/// Returns `Ok(None)` for the root itself (`.`, `./`, `/`, `a/..`), which containerd ignores.
/// A leading `/` is dropped (containerd joins every name to the root) unless
/// `refuse_absolute`. A `..` that would climb above the root is refused; one that stays
/// inside (`a/../b`) cleans away, as in containerd.
pub(crate) fn clean(name: &[u8], refuse_absolute: bool) -> Result<Option<Vec<u8>>, String> {
    if name.contains(&0) {
        return Err("name contains a NUL byte".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "name is {} bytes long, more than PATH_MAX ({MAX_NAME_BYTES})",
            name.len()
        ));
    }
    if refuse_absolute && name.first() == Some(&b'/') {
        return Err("absolute names are refused (refuse_absolute_names is set)".to_owned());
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in name.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("name escapes the layer root through \"..\"".to_owned());
                }
            }
            _ => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(parts.join(&b'/')))
}

/// Splits a cleaned path into its parent components and its last component.
pub(crate) fn split(path: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut parts: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
    // A cleaned path is never empty, so there is a last component.
    let base = parts.pop().unwrap_or_default();
    (parts, base)
}

/// Shows a path (or a component list) in messages.
pub(crate) fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str) -> Option<String> {
        clean(name.as_bytes(), false)
            .expect(name)
            .map(|p| String::from_utf8(p).expect("utf8"))
    }

    #[test]
    fn names_clean_like_go_filepath_clean() {
        assert_eq!(ok("a/b/c"), Some("a/b/c".into()));
        assert_eq!(ok("./a//b/./c/"), Some("a/b/c".into()));
        assert_eq!(ok("a/../b"), Some("b".into()));
        assert_eq!(ok("/etc/passwd"), Some("etc/passwd".into()));
        assert_eq!(ok("//etc"), Some("etc".into()));
        assert_eq!(ok("."), None);
        assert_eq!(ok("./"), None);
        assert_eq!(ok("/"), None);
        assert_eq!(ok("a/.."), None);
        assert_eq!(ok("..."), Some("...".into()));
        assert_eq!(ok(".wh...wh..opq"), Some(".wh...wh..opq".into()));
    }

    #[test]
    fn escapes_are_refused() {
        for bad in ["..", "../x", "a/../../x", "/../x", "./.."] {
            let err = clean(bad.as_bytes(), false).expect_err(bad);
            assert!(err.contains(".."), "{bad}: {err}");
        }
        assert!(clean(b"a\0b", false).is_err());
        assert!(clean(&vec![b'a'; MAX_NAME_BYTES + 1], false).is_err());
        assert!(clean(b"/etc/passwd", true).is_err());
        assert!(clean(b"etc/passwd", true).is_ok());
    }

    #[test]
    fn split_gives_parents_and_base() {
        let (parents, base) = split(b"a/b/c");
        assert_eq!(parents, vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(base, b"c");
        let (parents, base) = split(b"top");
        assert!(parents.is_empty());
        assert_eq!(base, b"top");
    }
}
