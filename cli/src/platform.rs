//! Platform arguments (`--platform linux/arm64/v8`) and the host's platform, written as
//! containerd's `platforms.Parse` reads them: `os`, `arch`, `os/arch` or `os/arch/variant`,
//! with the usual architecture aliases (`x86_64`, `aarch64`, `armhf`) normalised.

use berth_proto::containerd::types::Platform;

const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "windows",
];

/// An architecture name as containerd writes it, with its default variant.
fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    match (arch, variant) {
        ("i386" | "x86", _) => ("386".into(), String::new()),
        ("x86_64" | "x86-64", v) => ("amd64".into(), v.into()),
        ("aarch64" | "arm64", "8" | "v8") => ("arm64".into(), String::new()),
        ("aarch64", v) => ("arm64".into(), v.into()),
        ("armhf", _) => ("arm".into(), "v7".into()),
        ("armel", _) => ("arm".into(), "v6".into()),
        ("arm", "" | "7") => ("arm".into(), "v7".into()),
        ("arm", "5" | "6" | "8") => ("arm".into(), format!("v{variant}")),
        (a, v) => (a.into(), v.into()),
    }
}

fn known_arch(arch: &str) -> bool {
    matches!(
        arch,
        "386"
            | "i386"
            | "x86"
            | "amd64"
            | "x86_64"
            | "x86-64"
            | "arm"
            | "armhf"
            | "armel"
            | "arm64"
            | "aarch64"
            | "ppc64"
            | "ppc64le"
            | "s390x"
            | "riscv64"
            | "mips64"
            | "mips64le"
            | "loong64"
            | "wasm"
    )
}

/// The platform of this machine, as berthd's default.
pub fn host() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    };
    let (architecture, variant) = normalize_arch(arch, "");
    Platform {
        os: std::env::consts::OS.to_owned(),
        architecture,
        variant,
        ..Platform::default()
    }
}

/// Parses a platform argument; the error says what was wrong and what is expected.
pub fn parse(text: &str) -> Result<Platform, String> {
    let lower = text.trim().to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('/').collect();
    let bad = |why: &str| {
        format!(
            "platform {text:?} {why}: write os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8"
        )
    };
    if parts.iter().any(|p| {
        p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    }) {
        return Err(bad("is not valid"));
    }
    let host = host();
    let (os, arch, variant) = match parts.as_slice() {
        [one] if KNOWN_OS.contains(one) => (
            one.to_string(),
            host.architecture.clone(),
            host.variant.clone(),
        ),
        [one] if known_arch(one) => (host.os.clone(), one.to_string(), String::new()),
        [_] => return Err(bad("names no known operating system or architecture")),
        [os, arch] => (os.to_string(), arch.to_string(), String::new()),
        [os, arch, variant] => (os.to_string(), arch.to_string(), variant.to_string()),
        _ => return Err(bad("has too many parts")),
    };
    let (architecture, variant) = normalize_arch(&arch, &variant);
    Ok(Platform {
        os,
        architecture,
        variant,
        ..Platform::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(p: &Platform) -> String {
        if p.variant.is_empty() {
            format!("{}/{}", p.os, p.architecture)
        } else {
            format!("{}/{}/{}", p.os, p.architecture, p.variant)
        }
    }

    fn round(text: &str) -> String {
        format(&parse(text).expect(text))
    }

    #[test]
    fn parses_like_containerd() {
        assert_eq!(round("linux/amd64"), "linux/amd64");
        assert_eq!(round("Linux/x86_64"), "linux/amd64");
        assert_eq!(round("linux/aarch64"), "linux/arm64");
        assert_eq!(round("linux/arm64/v8"), "linux/arm64");
        assert_eq!(round("linux/arm"), "linux/arm/v7");
        assert_eq!(round("linux/armhf"), "linux/arm/v7");
        assert_eq!(round("linux/arm/6"), "linux/arm/v6");
        assert_eq!(round("windows/amd64"), "windows/amd64");
        assert_eq!(
            parse("linux").expect("os").architecture,
            host().architecture
        );
        assert_eq!(parse("arm64").expect("arch").os, host().os);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "",
            "linux/",
            "/amd64",
            "linux/amd64/v8/x",
            "plan10",
            "linux/am d64",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("os/arch"), "{err}");
        }
    }

    #[test]
    fn host_is_normalised() {
        let h = host();
        assert!(!h.os.is_empty() && !h.architecture.is_empty());
        assert_ne!(h.architecture, "x86_64");
        assert_ne!(h.architecture, "aarch64");
    }
}
