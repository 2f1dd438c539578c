//! Registry authentication: `WWW-Authenticate` challenges, credentials and the bearer token
//! cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A user name and password (or token secret) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret: errors and logs carry Debug output.
        write!(
            f,
            "Credentials {{ user: {:?}, secret: <redacted> }}",
            self.user
        )
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lowercased (`basic`, `bearer`).
    pub scheme: String,
    /// Parameters with lowercased names (`realm`, `service`, `scope`, `error`).
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// A parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses every challenge in a `WWW-Authenticate` value (RFC 7235: `scheme k=v, k="v", ...`,
/// several challenges separated by commas).
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let b = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && !matches!(b[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        header[start..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let word = token(&mut i);
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' {
            // A parameter of the current challenge.
            i = j + 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    v.push(b[i]);
                    i += 1;
                }
                i += 1;
                String::from_utf8_lossy(&v).into_owned()
            } else {
                token(&mut i)
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), value);
            }
        } else if !word.is_empty() {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        } else {
            i += 1;
        }
    }
    out
}

/// How a registry host wants to be authenticated, learned from its first 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAuth {
    /// HTTP basic with the configured credentials.
    Basic,
    /// Bearer tokens from `realm` for `service`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// The `service` parameter.
        service: String,
    },
}

/// Bearer tokens per (registry host, scope), each until its expiry.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl TokenCache {
    /// A live token for `host` and `scope`.
    pub fn get(&self, host: &str, scope: &str) -> Option<String> {
        let map = self.tokens.lock().ok()?;
        map.get(&(host.to_string(), scope.to_string()))
            .filter(|(_, exp)| Instant::now() < *exp)
            .map(|(t, _)| t.clone())
    }

    /// Stores a token valid for `lifetime` (shortened a little so it is not used as it
    /// expires on the way).
    pub fn put(&self, host: &str, scope: &str, token: String, lifetime: Duration) {
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        if let Ok(mut map) = self.tokens.lock() {
            map.insert(
                (host.to_string(), scope.to_string()),
                (token, Instant::now() + lifetime.saturating_sub(margin)),
            );
        }
    }

    /// Drops the token of `host` and `scope`.
    pub fn remove(&self, host: &str, scope: &str) {
        if let Ok(mut map) = self.tokens.lock() {
            map.remove(&(host.to_string(), scope.to_string()));
        }
    }
}

/// Standard base64 (padded), for basic auth.
pub(crate) fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push",error="invalid_token""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.example/token"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(c[0].param("error"), Some("invalid_token"));

        let c = parse_challenges(r#"Basic realm="x y", Bearer realm=http://t/tok, service=s"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("x y"));
        assert_eq!(c[1].param("realm"), Some("http://t/tok"));
        assert_eq!(c[1].param("service"), Some("s"));
        assert!(parse_challenges("").is_empty());
    }

    #[test]
    fn tokens_expire_and_are_per_scope() {
        let cache = TokenCache::default();
        cache.put(
            "h",
            "repository:a:pull",
            "t1".into(),
            Duration::from_secs(60),
        );
        cache.put("h", "repository:b:pull", "t2".into(), Duration::ZERO);
        assert_eq!(cache.get("h", "repository:a:pull").as_deref(), Some("t1"));
        assert_eq!(cache.get("h", "repository:b:pull"), None, "expired");
        assert_eq!(cache.get("other", "repository:a:pull"), None);
        cache.remove("h", "repository:a:pull");
        assert_eq!(cache.get("h", "repository:a:pull"), None);
    }

    #[test]
    fn basic_encoding_and_redaction() {
        assert_eq!(base64(b"berth:s3cret"), "YmVydGg6czNjcmV0");
        assert_eq!(base64(b"ab"), "YWI=");
        let c = Credentials {
            user: "u".into(),
            secret: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
