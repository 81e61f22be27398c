//! Coverage-guided fuzzing of the spec compiler: any bytes, as UTF-8 text,
//! through parse, check, lowering and both printers. A panic is a bug; a
//! rejection must carry a span inside the input.
//!
//!     cargo install cargo-fuzz
//!     cargo +nightly fuzz run compile_spec -- -max_total_time=600
//!
//! (from the repository root; `fuzz/corpus/compile_spec` is seeded from the
//! built-in specs on the first run if you copy them there).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else { return };
    match agr_codegen::compile(source) {
        Ok(prog) => {
            let _ = agr_codegen::backend::rust::emit(&prog);
            let _ = agr_codegen::backend::cuda::emit(&prog);
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in diags {
                assert!(d.span.start <= d.span.end && d.span.end <= source.len(), "span {:?}", d.span);
                let _ = d.render("fuzz.agr", source);
            }
        }
    }
});
