//! Plan files: compiled once, they give exactly what the GGUF gives, and every corruption is a clear error.

mod common;

use common::{kiln, kiln_ok, model, smollm2_plan};
use kiln_runtime::plan::PlanFile;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[test]
fn plan_runs_exactly_like_the_gguf() {
    let (Some(gguf), Some(plan)) = (model("smollm2"), smollm2_plan()) else {
        return;
    };
    // The plan on the reference interpreter (a plan runs its generated code by default, a GGUF never does): same
    // ids and the same logits, bit for bit (the JSON prints every f32 exactly).
    assert_eq!(
        common::greedy_json(&plan, 16, &["--reference"]),
        common::greedy_json(&gguf, 16, &[])
    );
    assert_eq!(
        common::perplexity_json(&plan, &["--chunks", "2", "--reference"]),
        common::perplexity_json(&gguf, &["--chunks", "2"])
    );
    let tokens = |path: &Path| {
        kiln_ok(&[
            "tokenize",
            path.to_str().unwrap(),
            "<|im_start|>user\nHello, world!<|im_end|>",
            "--json",
        ])
    };
    assert_eq!(tokens(&plan), tokens(&gguf));
}

#[test]
fn inspect_shows_sections_and_ir() {
    let Some(plan) = smollm2_plan() else { return };
    let out = kiln_ok(&["inspect", plan.to_str().unwrap()]);
    let version = format!(
        "kiln plan, format version {}",
        kiln_ir::plan::FORMAT_VERSION
    );
    for want in [
        version.as_str(),
        "kernels",
        "code",
        "targets      cpu (",
        "meta",
        "graph",
        "weight index",
        "weights",
        "token_embd.weight",
        "schedule",
        "memory plan: one arena of",
        "the CPU executor keeps the logits apart",
        "kernels (7 distinct, 152 launches):",
        "qkv_rope(f32[tokens, 576], f32[576], q4_1[576, 576]",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let ir = kiln_ok(&["inspect", "--ir", plan.to_str().unwrap()]);
    assert!(
        ir.starts_with("graph llama\n") && ir.contains("output logits = %"),
        "{}",
        &ir[..200]
    );
}

fn copy_of_plan(name: &str) -> Option<PathBuf> {
    let plan = smollm2_plan()?;
    let copy = plan.with_file_name(format!("kiln-test-{}-{name}.plan", std::process::id()));
    std::fs::copy(&plan, &copy).unwrap();
    Some(copy)
}

fn load_error(path: &Path) -> String {
    let out = kiln(&["inspect", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a damaged plan was accepted");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn flip_byte(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
}

#[test]
fn every_flipped_byte_is_a_clear_error() {
    let Some(path) = copy_of_plan("flips") else {
        return;
    };
    let len = std::fs::metadata(&path).unwrap().len();
    let sections: Vec<(String, u64, u64)> = kiln_ok(&["inspect", path.to_str().unwrap()])
        .lines()
        .skip_while(|l| !l.starts_with("sections:"))
        .skip(2)
        .take(5)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let n = cols.len();
            (
                cols[..n - 3].join(" "),
                cols[n - 3].parse().unwrap(),
                cols[n - 2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(sections.len(), 5);
    // The header and table, then the first, middle and last byte of each section, and padding.
    let mut positions: Vec<u64> = vec![0, 7, 8, 12, 16, 24, 32, 40, 63, 100, 150, 160];
    for (_, offset, size) in &sections {
        positions.extend([*offset, offset + size / 2, offset + size - 1]);
    }
    positions.push(sections[0].1 + sections[0].2); // padding after the meta section
    positions.push(len - 1);
    for at in positions {
        flip_byte(&path, at);
        let err = load_error(&path);
        let clear = [
            "neither a GGUF model nor a kiln plan",
            "plan format version",
            "the plan is corrupted",
            "the plan is truncated",
        ];
        assert!(clear.iter().any(|c| err.contains(c)), "byte {at}: {err}");
        flip_byte(&path, at); // restore
    }
    kiln_ok(&["inspect", path.to_str().unwrap()]); // restored intact
    std::fs::remove_file(path).unwrap();
}

#[test]
fn truncated_plan_is_refused() {
    let Some(path) = copy_of_plan("truncated") else {
        return;
    };
    let len = std::fs::metadata(&path).unwrap().len();
    for keep in [len - 1, len / 2, 100, 20] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let err = load_error(&path);
        assert!(
            err.contains("truncated") || err.contains("corrupted"),
            "{keep}: {err}"
        );
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn other_format_version_is_refused_with_advice() {
    let Some(path) = copy_of_plan("version") else {
        return;
    };
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(8)).unwrap();
    let version = kiln_ir::plan::FORMAT_VERSION;
    f.write_all(&(version + 1).to_le_bytes()).unwrap();
    drop(f);
    let err = load_error(&path);
    let want = format!(
        "plan format version {}, but this kiln reads version {version}: recompile the model with this kiln",
        version + 1
    );
    assert!(err.contains(&want), "{err}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn plan_for_another_target_is_refused() {
    let Some(gguf_path) = model("smollm2") else {
        return;
    };
    let gguf = kiln_compiler::GgufFile::open(&gguf_path).unwrap();
    let lowered = kiln_compiler::lower(&gguf).unwrap();
    let path = std::env::temp_dir().join(format!("kiln-test-{}-riscv.plan", std::process::id()));
    let target = kiln_ir::plan::Target::Cpu {
        arch: "riscv64".into(),
        features: vec![],
    };
    let meta = kiln_ir::plan::PlanMeta {
        compiler: "test".into(),
        targets: vec![target],
        model: lowered.info,
    };
    let c = kiln_compiler::passes::compile(
        lowered.graph,
        kiln_compiler::passes::Readers::Cpu,
        &gguf,
        |_, _, _| {},
    )
    .unwrap();
    kiln_compiler::plan_writer::write_plan(&path, &meta, &c, &Default::default(), &gguf, |_, _| {})
        .unwrap();
    // The plan loads (its graph and weights are fine) but its CPU code cannot run here.
    let out = kiln(&[
        "run",
        path.to_str().unwrap(),
        "-p",
        "hi",
        "-n",
        "1",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("the plan was compiled for cpu (riscv64), which this host cannot run: this host is x86_64; compile it here with `kiln compile MODEL.gguf --target native`")
            || !cfg!(target_arch = "x86_64"),
        "{err}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn runtime_does_not_depend_on_the_compiler() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "kiln-runtime",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.contains("kiln-ir"), "{tree}");
    assert!(
        !tree.contains("kiln-compiler"),
        "kiln-runtime depends on kiln-compiler:\n{tree}"
    );
}

#[test]
fn graph_forms_render_and_round_trip() {
    let Some(plan) = smollm2_plan() else { return };
    let plan = plan.to_str().unwrap();
    let ir = kiln_ok(&["inspect", "--ir", plan]);
    // JSON reads back into the same graph.
    let graph: kiln_ir::Graph =
        serde_json::from_str(&kiln_ok(&["inspect", "--json", plan])).unwrap();
    assert_eq!(kiln_ir::text::print(&graph), ir);
    // Graphviz accepts the dot form.
    let dot = kiln_ok(&["inspect", "--dot", plan]);
    let Some(out) = common::pipe_through("dot", &["-Tsvg"], &dot, "apt-get install graphviz")
    else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("<svg"));
}

#[test]
fn dump_ir_writes_every_stage() {
    let Some(gguf) = model("smollm2") else { return };
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-dump", std::process::id()));
    let plan = dir.join("m.plan");
    std::fs::create_dir_all(&dir).unwrap();
    let out = kiln(&[
        "compile",
        gguf.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
        "--dump-ir",
        dir.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    for stage in [
        "1 canonicalize",
        "2 fuse",
        "154 nodes",
        "3 layout",
        "4 schedule",
        "152 launches of 7 distinct kernels",
    ] {
        assert!(log.contains(stage), "compile log lacks {stage:?}:\n{log}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let want = [
        "00-lowered.kir",
        "01-canonicalize.kir",
        "02-fuse.kir",
        "03-layout.txt",
        "04-schedule.txt",
        "final.dot",
        "final.json",
        "m.plan",
    ];
    assert_eq!(names, want);
    for kir in &want[..3] {
        let graph = kiln_ir::text::parse(&std::fs::read_to_string(dir.join(kir)).unwrap()).unwrap();
        kiln_ir::verify(&graph).unwrap_or_else(|e| panic!("{kir}: {e}"));
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("02-fuse.kir")).unwrap(),
        kiln_ok(&["inspect", "--ir", plan.to_str().unwrap()])
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A plan's weights copied into huge pages (what a CPU run does by default) are the file's bytes, and run to the same
/// greedy ids and logits as weights served from the mapped file (`--mapped-weights`).
#[test]
fn weights_in_huge_pages_run_exactly_like_mapped_weights() {
    let Some(path) = smollm2_plan() else {
        return;
    };
    let mapped = PlanFile::open(&path).unwrap();
    let mut copied = PlanFile::open(&path).unwrap();
    if !copied.move_to_huge_pages().unwrap() {
        eprintln!("this host has no transparent huge pages: the weights stayed mapped");
    }
    assert!(mapped.weights_bytes() == copied.weights_bytes());
    assert_eq!(
        common::greedy_json(&path, 16, &[]),
        common::greedy_json(&path, 16, &["--mapped-weights"])
    );
}
