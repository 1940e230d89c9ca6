//! Filetests, Cranelift style: each `tests/filetests/*.kir` file names the pass it tests on its first line
//! (`; pass: NAME`) and holds an input graph; the graph after the pass is snapshotted in
//! `tests/filetests/expected/`. Bless intended changes with `INSTA_UPDATE=always cargo test --test filetests`.

use kiln_compiler::passes::run_pass;
use std::path::Path;

#[test]
fn filetests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kir"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let pass = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("; pass: "))
            .unwrap_or_else(|| panic!("{name}: first line must be `; pass: NAME`"));
        let input = kiln_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        kiln_ir::verify(&input).unwrap_or_else(|e| panic!("{name}: input: {e}"));
        let output = run_pass(pass.trim(), input)
            .unwrap_or_else(|| panic!("{name}: no pass `{pass}`"))
            .unwrap();
        insta::with_settings!({ snapshot_path => dir.join("expected"), prepend_module_to_snapshot => false, description => text.clone() }, {
            insta::assert_snapshot!(name, kiln_ir::text::print(&output));
        });
    }
}
