//! Shared helpers for Postern's integration tests.
//!
//! Include from a test crate with `mod support;` and use, e.g.,
//! `support::pg::TempPg` to get a throwaway PostgreSQL cluster.
#![allow(dead_code)]

pub mod authority;
pub mod fuzz;
pub mod net;
pub mod netns;
pub mod oidc;
pub mod pg;
pub mod procs;
pub mod raw;
