//! containerd's filter language, used by every List call and by event subscriptions.
//!
//! ```text
//! filters  := filter ( OR filter )*        (several filter strings: any may match)
//! filter   := selector ( ',' selector )*   (all selectors must match)
//! selector := fieldpath [ op value ]       (no op: the field must be present)
//! fieldpath:= field ( '.' field )*
//! field    := [A-Za-z0-9_]+ | quoted
//! op       := '==' | '!=' | '~='           ('~=' is a regular expression match)
//! value    := quoted | run of characters other than ',' and white space
//! quoted   := '"' ... '"' with backslash escapes, or '/' ... '/' and '|' ... '|' (handy for
//!             regular expressions: other escapes are kept for the regex engine)
//! ```
//!
//! For example `topic=="/content/create"` or `labels."containerd.io/gc.root",name~=^busy`.
//! What a field path means is up to the object being filtered ([`Fields`]).

use regex::Regex;

use crate::error::{Error, Result};

/// Exposes an object's fields to a filter.
pub trait Fields {
    /// The value at `path`, or `None` when the object has no such field.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl<F: Fn(&[String]) -> Option<String>> Fields for F {
    fn field(&self, path: &[String]) -> Option<String> {
        self(path)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

impl Selector {
    fn matches(&self, fields: &dyn Fields) -> bool {
        let Some(value) = fields.field(&self.path) else {
            return false;
        };
        match &self.op {
            Op::Present => true,
            Op::Equal(v) => value == *v,
            Op::NotEqual(v) => value != *v,
            Op::Matches(re) => re.is_match(&value),
        }
    }
}

/// A parsed set of filters: matches when any filter matches (an empty set matches all).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any_of: Vec<Vec<Selector>>,
    sources: Vec<String>,
}

impl Filter {
    /// Parses filter strings; empty strings are ignored. Errors are InvalidArgument naming the
    /// filter and the position.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any_of = Vec::new();
        let mut sources = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.trim().is_empty() {
                continue;
            }
            any_of.push(Parser::new(f).filter()?);
            sources.push(f.to_owned());
        }
        Ok(Filter { any_of, sources })
    }

    /// The filter strings this was parsed from (empty ones dropped), so a proxy can pass the
    /// same filter on to a remote store.
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Whether `fields` passes.
    pub fn matches(&self, fields: &dyn Fields) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|s| s.matches(fields)))
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, pos: 0 }
    }

    fn error(&self, what: &str) -> Error {
        Error::invalid_argument(format!(
            "filter {:?}: {what} at position {}",
            self.text, self.pos
        ))
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn filter(&mut self) -> Result<Vec<Selector>> {
        let mut selectors = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.pos += 1;
                    selectors.push(self.selector()?);
                }
                Some(_) => return Err(self.error("expected ',' or the end")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_space();
        let op = if self.rest().starts_with("==") {
            Some("==")
        } else if self.rest().starts_with("!=") {
            Some("!=")
        } else if self.rest().starts_with("~=") {
            Some("~=")
        } else {
            None
        };
        let op = match op {
            None => Op::Present,
            Some(op) => {
                self.pos += 2;
                let value = self.value()?;
                match op {
                    "==" => Op::Equal(value),
                    "!=" => Op::NotEqual(value),
                    _ => Op::Matches(Regex::new(&value).map_err(|e| {
                        self.error(&format!("invalid regular expression {value:?}: {e}"))
                    })?),
                }
            }
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String> {
        self.skip_space();
        if matches!(self.peek(), Some('"')) {
            return self.quoted('"');
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.error("expected a field name"));
        }
        let field = self.rest()[..len].to_owned();
        self.pos += len;
        Ok(field)
    }

    fn value(&mut self) -> Result<String> {
        self.skip_space();
        match self.peek() {
            Some(q @ ('"' | '/' | '|')) => self.quoted(q),
            _ => {
                let len = self
                    .rest()
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(self.rest().len());
                if len == 0 {
                    return Err(self.error("expected a value"));
                }
                let value = self.rest()[..len].to_owned();
                self.pos += len;
                Ok(value)
            }
        }
    }

    fn quoted(&mut self, quote: char) -> Result<String> {
        self.pos += quote.len_utf8();
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.pos += i + c.len_utf8();
                return Ok(out);
            }
            if c == '\\' {
                let Some((_, escaped)) = chars.next() else {
                    break;
                };
                match escaped {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    // In a regular expression, keep the escape for the regex engine.
                    e if quote != '"' && e != quote => {
                        out.push('\\');
                        out.push(e);
                    }
                    e => out.push(e),
                }
            } else {
                out.push(c);
            }
        }
        Err(self.error(&format!("unterminated {quote}-quoted string")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;
    use std::collections::BTreeMap;

    struct Obj {
        name: &'static str,
        labels: BTreeMap<&'static str, &'static str>,
    }

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [f] if f == "name" => Some(self.name.to_owned()),
                [f, rest @ ..] if f == "labels" && !rest.is_empty() => self
                    .labels
                    .get(rest.join(".").as_str())
                    .map(|v| (*v).to_owned()),
                _ => None,
            }
        }
    }

    fn obj() -> Obj {
        Obj {
            name: "busybox",
            labels: BTreeMap::from([("containerd.io/gc.root", "x"), ("env", "prod")]),
        }
    }

    fn check(filters: &[&str]) -> bool {
        Filter::parse_all(filters).expect("parses").matches(&obj())
    }

    #[test]
    fn operators() {
        assert!(check(&[]));
        assert!(check(&[""]));
        assert!(check(&["name==busybox"]));
        assert!(check(&["name == \"busybox\""]));
        assert!(!check(&["name!=busybox"]));
        assert!(check(&["name~=^busy"]));
        assert!(check(&["name~=/b.s+ybox/"]));
        assert!(check(&["name~=|^busy|"]));
        assert!(check(&["labels.env"]));
        assert!(!check(&["labels.missing"]));
        assert!(!check(&["labels.missing!=x"]), "!= needs the field present");
        assert!(check(&["labels.\"containerd.io/gc.root\""]));
        assert!(
            Filter::parse_all(&["labels.containerd.io/gc.root"]).is_err(),
            "an unquoted '/' in a field is an error, as in containerd"
        );
    }

    #[test]
    fn and_within_or_across() {
        assert!(check(&["name==busybox,labels.env==prod"]));
        assert!(!check(&["name==busybox,labels.env==dev"]));
        assert!(check(&["name==alpine", "labels.env==prod"]));
        assert!(!check(&["name==alpine", "labels.env==dev"]));
    }

    #[test]
    fn errors_are_invalid_argument() {
        for bad in ["name==", "==x", "name~=(", "name==\"open", "a b"] {
            let err = Filter::parse_all(&[bad]).expect_err(bad);
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }
}
