#!/usr/bin/env bash
# Installs the Debian packages berth builds and tests with (idempotent; needs root).
#   protobuf-compiler  protoc for proto/ code generation
#   libprotobuf-dev    the well-known types protoc imports (google/protobuf/*.proto); only a
#                      Recommends of protobuf-compiler, which --no-install-recommends skips
#   containerd         ctr (the compatibility client) and containerd (the reference daemon)
#   runc               the OCI runtime
#   busybox-static     the root file system of the test images
#   umoci skopeo       pack test images into OCI layouts, OCI archives and Docker archives
#   zstd xz-utils      compress test archives
#   docker-registry    the registry the pull and push tests start on loopback
#   apache2-utils      htpasswd for the registry's basic-auth tests
#   openssl            the registry tests' CA, certificates and token signatures
set -euo pipefail
packages=(protobuf-compiler libprotobuf-dev containerd runc busybox-static umoci skopeo zstd xz-utils docker-registry apache2-utils openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || {
  echo "cargo is missing: berth needs a Rust toolchain (rustup, Rust 1.95) on PATH" >&2
  exit 1
}
