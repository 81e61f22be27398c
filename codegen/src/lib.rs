//! The middle and back end of the agr spec compiler.
//!
//! `agr_grammar` parses and checks a spec; [`lower`] turns it into the
//! [`ir::Program`] that every back end prints; [`backend::rust`] prints the
//! fused CPU step as Rust source.

pub mod backend;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod tokens;

pub use lower::{compile, compile_with_warnings, lower};
