//! Test doubles and harness shared by this crate's content tests.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod memory_content;
pub mod serving;
