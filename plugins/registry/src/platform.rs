//! Platform selection from image indexes (manifest lists).

use crate::digest::{Descriptor, Platform};
use crate::error::{Error, Result};

impl Platform {
    /// This machine's platform, with OCI's architecture names (`amd64`, `arm64`, ...).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "arm" => "arm",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: std::env::consts::OS.to_string(),
            variant: (architecture == "arm64").then(|| "v8".to_string()),
        }
    }

    /// Parses `os/arch[/variant]` (ctr's `--platform` form).
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(Error::Protocol {
                context: format!("platform {s:?}"),
                reason: "expected os/arch or os/arch/variant, e.g. linux/amd64".into(),
            }),
        }
    }

    /// Whether an index entry for `other` can run here: same OS and architecture, and the
    /// same variant when both name one (arm64 without a variant is `v8`).
    pub fn matches(&self, other: &Platform) -> bool {
        let norm = |p: &Platform| -> Option<String> {
            match (p.architecture.as_str(), p.variant.as_deref()) {
                ("arm64", None) => Some("v8".into()),
                (_, v) => v.map(str::to_string),
            }
        };
        self.os == other.os
            && self.architecture == other.architecture
            && match (norm(self), norm(other)) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Picks the manifest for `want` from an index's JSON: the first entry whose platform
/// matches, preferring one with the exact variant. An index without a match is an error
/// listing what it has.
pub fn select_manifest(index: &[u8], want: &Platform) -> Result<Descriptor> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    let idx: Index = serde_json::from_slice(index).map_err(|e| Error::Protocol {
        context: "parsing an image index".into(),
        reason: e.to_string(),
    })?;
    let candidates: Vec<&Descriptor> = idx
        .manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
        .collect();
    let exact = candidates.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.variant == want.variant)
    });
    if let Some(d) = exact.or(candidates.first()) {
        return Ok((*d).clone());
    }
    let available: Vec<String> = idx
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
        .collect();
    Err(Error::NotFound {
        registry: "the image index".into(),
        what: format!(
            "a manifest for platform {want} (the index has: {})",
            if available.is_empty() {
                "none with a platform".to_string()
            } else {
                available.join(", ")
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn index() -> Vec<u8> {
        let d = |n: &[u8]| Digest::of(n).to_string();
        format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":2,"platform":{{"architecture":"arm","os":"linux","variant":"v6"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":3,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":4,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}
            ]}}"#,
            d(b"amd64"),
            d(b"v6"),
            d(b"v7"),
            d(b"arm64")
        )
        .into_bytes()
    }

    #[test]
    fn picks_the_matching_platform() {
        let pick =
            |p: &str| select_manifest(&index(), &Platform::parse(p).expect(p)).map(|d| d.size);
        assert_eq!(pick("linux/amd64").expect("amd64"), 1);
        assert_eq!(pick("linux/arm/v7").expect("v7"), 3);
        assert_eq!(pick("linux/arm/v6").expect("v6"), 2);
        assert_eq!(pick("linux/arm64").expect("arm64 is v8"), 4);
        let e = pick("linux/s390x").expect_err("absent");
        let msg = e.to_string();
        assert!(
            msg.contains("linux/s390x") && msg.contains("linux/arm/v7"),
            "{msg}"
        );
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn host_platform_is_in_oci_terms() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        assert!(!h.architecture.contains("x86_64") && !h.architecture.contains("aarch64"));
    }
}
