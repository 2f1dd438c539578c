//! Generates the Rust bindings of every `.proto` file in this crate.
//!
//! Proto sources live in top-level directories of the crate named after their
//! first package component (`containerd/`, `google/`); import paths are
//! relative to the crate root. All `.proto` files found under those
//! directories are compiled, so adding a file needs no change here. Every
//! service gets both a tonic client and a tonic server.

use std::error::Error;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Top-level directories of the crate that hold Rust or Cargo files, never protos.
const NON_PROTO_DIRS: &[&str] = &["src", "tests", "benches", "examples", "target"];

/// Name of the encoded `FileDescriptorSet` written to `OUT_DIR`.
const DESCRIPTOR_SET: &str = "berth_descriptor_set.bin";

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut protos = Vec::new();
    for dir in proto_roots(&root)? {
        // A directory watch covers files added or removed anywhere below it.
        println!("cargo:rerun-if-changed={}", dir.display());
        collect_protos(&dir, &mut protos)?;
    }
    protos.sort();
    if protos.is_empty() {
        return Err(format!("no .proto files found under {}", root.display()).into());
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-env-changed=PROTOC_INCLUDE");

    let mut config = tonic_prost_build::Config::new();
    // Generate `prost::Name` impls. containerd's Any type URLs are the bare
    // full names; prost's `type_url()` always adds a leading `/`, so
    // `berth_proto::type_url` builds URLs from `Name::full_name()` instead.
    config.enable_type_names();

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .file_descriptor_set_path(out_dir.join(DESCRIPTOR_SET))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}

/// The crate's top-level directories that may contain `.proto` files.
fn proto_roots(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_dir()
            && !name.starts_with('.')
            && !NON_PROTO_DIRS.contains(&name.as_ref())
        {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Appends every `.proto` file below `dir` to `out`.
fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
