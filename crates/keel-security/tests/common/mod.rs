//! Shared test helpers; each test binary uses some of them.

#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

pub(crate) mod secret_manager;
