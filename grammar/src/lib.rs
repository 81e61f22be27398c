//! The front end of the agr spec compiler: parse (pest grammar → syntax tree)
//! and check (names, types, ranges). The IR and the back ends live in
//! `agr-codegen`.

pub mod ast;
pub mod builtins;
pub mod check;
pub mod diag;
pub mod parse;
pub mod print;

pub use diag::{Diagnostic, Severity, Span};
pub use parse::parse;
