//! # control — from cluster objects to classifier snapshots
#![forbid(unsafe_code)]
