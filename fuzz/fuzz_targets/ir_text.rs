//! The IR text parser (a plan's graph section, `kiln inspect --ir` dumps) on arbitrary text: it returns a graph or
//! a typed error, never panics; a graph it returns that verifies prints back to text that parses to the same
//! printout.
//! Run: RUSTC_BOOTSTRAP=1 cargo fuzz run ir_text -- -max_total_time=600 -rss_limit_mb=2048
#![no_main]

use kiln_ir::text::{parse, print};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(graph) = parse(text) else { return };
    if kiln_ir::verify(&graph).is_err() {
        return;
    }
    let printed = print(&graph);
    let again =
        parse(&printed).unwrap_or_else(|e| panic!("the printout does not parse: {e}\n{printed}"));
    assert_eq!(print(&again), printed);
});
