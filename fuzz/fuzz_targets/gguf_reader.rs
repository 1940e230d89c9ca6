//! The GGUF reader on arbitrary bytes: it must return Ok or a typed error, never panic, hang or over-allocate.
//! Run: RUSTC_BOOTSTRAP=1 cargo fuzz run gguf_reader -- -max_total_time=600 -rss_limit_mb=2048
#![no_main]

use kiln_compiler::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        // Reading every tensor's bytes must stay in bounds too.
        for t in file.tensors() {
            let _ = file.tensor_data(t).len();
        }
        for (_, v) in file.metadata() {
            let _ = v.to_string();
        }
    }
});
