//! Label rules shared by every labelled object, as containerd's `labels.Validate`.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Largest key, and largest key plus value, in bytes.
pub const MAX_LABEL_SIZE: usize = 4096;

/// Labels of an object, ordered so that listings and stored records are stable.
pub type Labels = BTreeMap<String, String>;

/// Checks one label: the key at most 4096 bytes, key and value together at most 4096 bytes.
pub fn validate(key: &str, value: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument("label key must not be empty"));
    }
    if key.len() > MAX_LABEL_SIZE {
        return Err(Error::invalid_argument(format!(
            "label key {:?}... greater than maximum size ({MAX_LABEL_SIZE} bytes)",
            key.chars().take(64).collect::<String>()
        )));
    }
    if key.len() + value.len() > MAX_LABEL_SIZE {
        return Err(Error::invalid_argument(format!(
            "label key and value of {key:?} greater than maximum size ({MAX_LABEL_SIZE} bytes)"
        )));
    }
    Ok(())
}

/// Checks every label of a set.
pub fn validate_all(labels: &Labels) -> Result<()> {
    labels.iter().try_for_each(|(k, v)| validate(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(validate("k", "v").is_ok());
        assert!(validate(&"k".repeat(4096), "").is_ok());
        assert!(validate(&"k".repeat(4097), "").is_err());
        assert!(validate(&"k".repeat(4000), &"v".repeat(97)).is_err());
        assert!(validate("", "v").is_err());
    }
}
