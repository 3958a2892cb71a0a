//! keel-serving (scaffold; replaced as the crate is built).
#![cfg_attr(not(test), forbid(unsafe_code))]

mod error;

pub use error::{Error, Result};
