//! Printers over the IR, one per target.

pub mod rust;
