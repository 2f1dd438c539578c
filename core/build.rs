//! Builds `PLUGIN_ABI` (see `src/dynamic.rs`): the string a dynamic plugin library must carry
//! to be loaded by a berthd, made of berth-core's version, a digest of berth-core's sources
//! and the version of the rustc that compiles this crate.
//!
//! Rust has no stable ABI: a library and berthd share types (registrations, trait objects,
//! errors) only when both were compiled from the same berth-core by the same compiler. The
//! version alone would miss an edit of core between two builds of the same version, so the
//! sources are digested too (any change of a file under `src/` changes the string).

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=build.rs");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_else(|_| "unknown".to_owned());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        // Without a version to compare, no library can be trusted: an empty rustc part
        // still yields a string, and a library built the same way is the only one that
        // matches it.
        .unwrap_or_else(|| format!("{rustc} (version unknown)"));
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    let digest = source_digest(&Path::new(&manifest).join("src"));
    println!(
        "cargo:rustc-env=BERTH_PLUGIN_ABI=berth-core {version}+src.{digest:016x} / {rustc_version}"
    );
}

/// A digest of every file below `dir` (relative paths and contents, in sorted order).
fn source_digest(dir: &Path) -> u64 {
    let mut files = Vec::new();
    collect(dir, &mut files);
    files.sort();
    // SipHash with fixed keys: deterministic for one toolchain, which the string names too.
    let mut hasher = DefaultHasher::new();
    for file in files {
        let relative = file.strip_prefix(dir).unwrap_or(&file);
        hasher.write(relative.to_string_lossy().as_bytes());
        hasher.write_u8(0);
        match std::fs::read(&file) {
            Ok(bytes) => hasher.write(&bytes),
            Err(e) => panic!(
                "cannot read {} for the plugin ABI digest: {e}",
                file.display()
            ),
        }
        hasher.write_u8(0);
    }
    hasher.finish()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => panic!(
            "cannot list {} for the plugin ABI digest: {e}",
            dir.display()
        ),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => collect(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}
