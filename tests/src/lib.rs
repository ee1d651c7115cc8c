//! Shared helpers for ocelot's end-to-end tests.
#![forbid(unsafe_code)]

pub mod netns;
