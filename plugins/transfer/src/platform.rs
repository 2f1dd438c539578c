//! Platforms (`os/arch[/variant]`) and how a wanted platform matches an image's, after
//! containerd's `platforms` package: names are normalised (`x86_64` is `amd64`, `aarch64` is
//! `arm64`, `arm` means `arm/v7`), and a platform also runs images built for the older
//! variants of its architecture (`amd64/v3` runs `v2`, `v1` and `386`; `arm/v7` runs `v6`
//! and `v5`).
//!
//! Simplified from containerd: arm64 hosts are not offered 32-bit arm images, and
//! `os.version` only has to be equal when both sides name one.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::oci::Descriptor;

/// A platform as OCI descriptors and configs carry it. Field order and names are Go's
/// `ocispec.Platform`, so serialising one gives the bytes containerd writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, GOARCH style (`amd64`, `arm64`).
    #[serde(default)]
    pub architecture: String,
    /// Operating system, GOOS style (`linux`).
    #[serde(default)]
    pub os: String,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub os_version: String,
    /// Required OS features.
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub os_features: Vec<String>,
    /// CPU variant (`v7`, `v8`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        Platform {
            architecture: architecture.to_owned(),
            os: os.to_owned(),
            variant: variant.to_owned(),
            ..Platform::default()
        }
    }

    /// The platform berthd runs on (containerd's `platforms.DefaultSpec()`).
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "arm" => "arm",
            "powerpc64" => "ppc64",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform::new(std::env::consts::OS, arch, "").normalized()
    }

    /// Parses `os[/arch[/variant]]` or `arch[/variant]` (then the host's OS), as containerd's
    /// `platforms.Parse`; the result is normalised.
    pub fn parse(spec: &str) -> Result<Platform> {
        let invalid = |why: &str| {
            Error::Core(berth_core::Error::invalid_argument(format!(
                "platform {spec:?} {why}: use os/arch[/variant], e.g. linux/amd64"
            )))
        };
        if spec.is_empty() {
            return Err(invalid("is empty"));
        }
        let parts: Vec<&str> = spec.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(invalid("is malformed"));
        }
        if parts.iter().any(|p| {
            !p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        }) {
            return Err(invalid("has invalid characters"));
        }
        let host_os = std::env::consts::OS;
        let platform = match parts.as_slice() {
            [one] if is_known_os(one) => {
                Platform::new(one, Platform::host().architecture.as_str(), "")
            }
            [one] => Platform::new(host_os, one, ""),
            [first, second] if is_known_os(first) => Platform::new(first, second, ""),
            [first, second] => Platform::new(host_os, first, second),
            [os, arch, variant] => Platform::new(os, arch, variant),
            _ => return Err(invalid("is malformed")),
        };
        Ok(platform.normalized())
    }

    /// The platform with containerd's normalisation of OS, architecture and variant.
    pub fn normalized(&self) -> Platform {
        let mut os = self.os.to_ascii_lowercase();
        if os.is_empty() {
            os = std::env::consts::OS.to_owned();
        } else if os == "macos" {
            os = "darwin".to_owned();
        }
        let mut arch = self.architecture.to_ascii_lowercase();
        let mut variant = self.variant.to_ascii_lowercase();
        match arch.as_str() {
            "i386" => {
                arch = "386".into();
                variant.clear();
            }
            "x86_64" | "x86-64" | "amd64" => {
                arch = "amd64".into();
                if variant == "v1" {
                    variant.clear();
                }
            }
            "aarch64" | "arm64" => {
                arch = "arm64".into();
                match variant.as_str() {
                    "8" | "v8" | "v8.0" => variant.clear(),
                    "9" | "9.0" | "v9.0" => variant = "v9".into(),
                    _ => {}
                }
            }
            "armhf" => {
                arch = "arm".into();
                variant = "v7".into();
            }
            "armel" => {
                arch = "arm".into();
                variant = "v6".into();
            }
            "arm" => match variant.as_str() {
                "" | "7" => variant = "v7".into(),
                "5" | "6" | "8" => variant = format!("v{variant}"),
                _ => {}
            },
            _ => {}
        }
        let mut os_features = self.os_features.clone();
        os_features.sort();
        os_features.dedup();
        Platform {
            architecture: arch,
            os,
            os_version: self.os_version.clone(),
            os_features,
            variant,
        }
    }

    /// Whether an image built for `image` runs on this platform (containerd's
    /// `platforms.Only(self).Match(image)`): equal after normalisation, or an older variant
    /// of this architecture; the image's OS features must all be ours.
    pub fn matches(&self, image: &Platform) -> bool {
        let image = image.normalized();
        let features_ok = image
            .os_features
            .iter()
            .all(|f| self.os_features.iter().any(|o| o == f));
        let version_ok = self.os_version.is_empty()
            || image.os_version.is_empty()
            || self.os_version == image.os_version;
        features_ok
            && version_ok
            && self.normalized().vector().iter().any(|p| {
                p.os == image.os
                    && p.architecture == image.architecture
                    && p.variant == image.variant
            })
    }

    /// Whether the OS alone matches (containerd's `OnlyOS`, used by unpack configurations
    /// when `check_platform_supported` is off).
    pub fn matches_os(&self, image: &Platform) -> bool {
        self.normalized().os == image.normalized().os
    }

    /// This platform and the older ones it runs, best first (containerd's `platformVector`).
    fn vector(&self) -> Vec<Platform> {
        let mut out = vec![self.clone()];
        let with = |arch: &str, variant: String| Platform {
            architecture: arch.to_owned(),
            variant,
            ..self.clone()
        };
        match self.architecture.as_str() {
            "amd64" => {
                if let Some(v) = variant_number(&self.variant).filter(|v| *v > 1) {
                    for older in (1..v).rev() {
                        let variant = if older == 1 {
                            String::new()
                        } else {
                            format!("v{older}")
                        };
                        out.push(with("amd64", variant));
                    }
                }
                out.push(with("386", String::new()));
            }
            "arm" => {
                if let Some(v) = variant_number(&self.variant).filter(|v| *v > 5) {
                    for older in (5..v).rev() {
                        out.push(with("arm", format!("v{older}")));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// How much this platform prefers `image` (lower is better; `None` when it does not run
    /// it), for picking one manifest out of an index.
    pub fn preference(&self, image: &Platform) -> Option<usize> {
        if !self.matches(image) {
            return None;
        }
        let image = image.normalized();
        self.normalized()
            .vector()
            .iter()
            .position(|p| p.architecture == image.architecture && p.variant == image.variant)
    }
}

fn variant_number(variant: &str) -> Option<u32> {
    variant.strip_prefix('v').unwrap_or(variant).parse().ok()
}

fn is_known_os(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "aix"
            | "android"
            | "darwin"
            | "macos"
            | "dragonfly"
            | "freebsd"
            | "illumos"
            | "ios"
            | "js"
            | "linux"
            | "netbsd"
            | "openbsd"
            | "plan9"
            | "solaris"
            | "wasip1"
            | "windows"
    )
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// Which platforms an import keeps or an export writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PlatformSelection {
    /// Every platform.
    #[default]
    All,
    /// Only these, in order of preference.
    Only(Vec<Platform>),
}

impl PlatformSelection {
    /// The manifests of an index this selection keeps: all of them, or per wanted platform
    /// the best match (each at most once), as pull and push both walk an index.
    pub fn select_manifests(&self, manifests: &[Descriptor]) -> Vec<Descriptor> {
        let PlatformSelection::Only(wanted) = self else {
            return manifests.to_vec();
        };
        let mut kept: Vec<Descriptor> = Vec::new();
        for want in wanted {
            let one = PlatformSelection::Only(vec![want.clone()]);
            let best = manifests
                .iter()
                .filter(|m| m.platform.is_some())
                .filter_map(|m| one.rank(m.platform.as_ref()).map(|r| (r, m)))
                .min_by_key(|(r, _)| *r)
                .map(|(_, m)| m.clone());
            if let Some(best) = best
                && !kept.iter().any(|k| k.digest == best.digest)
            {
                kept.push(best);
            }
        }
        kept
    }

    /// Only the host's platform (the default of `ctr images import` without
    /// `--all-platforms`).
    pub fn host() -> Self {
        PlatformSelection::Only(vec![Platform::host()])
    }

    /// Whether a descriptor with this platform (or none) is kept. Descriptors without a
    /// platform are always kept, as containerd's `FilterPlatforms`.
    pub fn keeps(&self, platform: Option<&Platform>) -> bool {
        match (self, platform) {
            (PlatformSelection::All, _) | (_, None) => true,
            (PlatformSelection::Only(wanted), Some(p)) => wanted.iter().any(|w| w.matches(p)),
        }
    }

    /// The best preference rank of `platform` among the wanted ones (lower is better).
    pub fn rank(&self, platform: Option<&Platform>) -> Option<(usize, usize)> {
        match (self, platform) {
            (PlatformSelection::All, _) => Some((0, 0)),
            (_, None) => Some((usize::MAX, usize::MAX)),
            (PlatformSelection::Only(wanted), Some(p)) => wanted
                .iter()
                .enumerate()
                .filter_map(|(i, w)| w.preference(p).map(|r| (i, r)))
                .min(),
        }
    }
}

impl fmt::Display for PlatformSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformSelection::All => f.write_str("all"),
            PlatformSelection::Only(ps) => {
                let names: Vec<String> = ps.iter().map(Platform::to_string).collect();
                f.write_str(&names.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_normalise() {
        let p = Platform::parse("linux/x86_64").expect("parse");
        assert_eq!(p.to_string(), "linux/amd64");
        assert_eq!(
            Platform::parse("linux/arm").expect("arm").to_string(),
            "linux/arm/v7"
        );
        assert_eq!(
            Platform::parse("linux/aarch64/v8")
                .expect("arm64")
                .to_string(),
            "linux/arm64"
        );
        assert!(Platform::parse("").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
        assert!(Platform::parse("linux//x").is_err());
    }

    #[test]
    fn matching_follows_containerd_vectors() {
        let amd64 = Platform::new("linux", "amd64", "");
        assert!(amd64.matches(&Platform::new("linux", "x86_64", "")));
        assert!(amd64.matches(&Platform::new("linux", "386", "")));
        assert!(!amd64.matches(&Platform::new("linux", "arm64", "")));
        assert!(!amd64.matches(&Platform::new("windows", "amd64", "")));
        let v7 = Platform::new("linux", "arm", "v7");
        assert!(v7.matches(&Platform::new("linux", "arm", "v6")));
        assert!(!v7.matches(&Platform::new("linux", "arm", "v8")));
        let sel = PlatformSelection::Only(vec![amd64.clone()]);
        assert!(sel.keeps(None));
        assert!(!sel.keeps(Some(&Platform::new("linux", "arm64", ""))));
        assert!(
            sel.rank(Some(&amd64)) < sel.rank(Some(&Platform::new("linux", "386", ""))),
            "the exact platform is preferred"
        );
    }

    #[test]
    fn serialises_as_go() {
        let p = Platform::new("linux", "arm", "v7");
        assert_eq!(
            serde_json::to_string(&p).expect("json"),
            r#"{"architecture":"arm","os":"linux","variant":"v7"}"#
        );
    }
}
