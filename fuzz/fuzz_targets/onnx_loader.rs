//! Feeds arbitrary bytes to the ONNX loader and importer: any input must give a model or a
//! typed error, never a panic, an abort or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = memc_onnx::import_bytes(data, &Default::default());
});
