//! Harness shared by this crate's content tests (the in-memory store is
//! `berth_core::testing::MemoryContentStore`).

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod serving;
