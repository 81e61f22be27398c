//! A generator of random valid agr specs, deterministic per seed.
//!
//! The test of this crate (`tests/random_specs.rs`) compiles every spec the
//! checker accepts through `optimizer!` (its build script writes them into
//! one generated module, so rustc compiles them all in one crate), runs the
//! fused CPU step and the CUDA text (as host C++, and through NVRTC and
//! ptxas where they are installed) against the reference evaluation. A fifth
//! of the specs carry a matrix block (products, transposes, `repeat`, `if`
//! on tensor conditions); those run on the CPU only and are left out of the
//! CUDA checks (the test prints how many).
//!
//! Seeds: `AGR_SPECGEN_SEED` (a number, or `random` for a fresh one; CI
//! uses the fixed default) and `AGR_SPECGEN_COUNT` (default 240).

pub mod gen;
