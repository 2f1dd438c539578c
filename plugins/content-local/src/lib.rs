//! Local content store (being written).
