//! Every fusion against the unfused graph, on random weights and inputs: the graphs of
//! `compiler/tests/filetests/fuse-*.kir` (llama, qwen2 and gemma3 layers with different head counts, head dims,
//! biases, QK-norm, post-norms and a sliding window) run before and after the `fuse` pass over prefill and
//! decode steps of several sizes.
//!
//! The compiled form, fused and with weights repacked by the layout pass, is compared too.
//!
//! Tolerance: exact (bit for bit). The reference executor runs each fused op as the composition its definition
//! states; a native fused kernel is held to the unfused reference within a stated tolerance in its own tests.

use kiln_compiler::passes::run_pass;
use kiln_ir::layout::Layout;
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::{DType, Graph, QuantFormat};
use kiln_runtime::{Engine, ReferenceExecutor};
use std::collections::HashMap;
use std::path::Path;

/// xorshift64*: deterministic, dependency-free test randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

struct RandomWeights(HashMap<String, (QuantFormat, Layout, Vec<usize>, Vec<u8>)>);

impl RandomWeights {
    /// Random data for every weight `graph` declares: norm gains near 1, other floats small, Q8_0 blocks with
    /// small scales and random codes.
    fn for_graph(graph: &Graph, rng: &mut Rng) -> Self {
        let mut map = HashMap::new();
        for decl in graph.weights() {
            let shape: Vec<usize> = decl
                .ty
                .shape
                .iter()
                .map(|d| d.clone().fixed().expect("fixed weight dims"))
                .collect();
            let n: usize = shape.iter().product();
            let format = decl.ty.dtype.format().expect("weights have a format");
            let bytes: Vec<u8> = match decl.ty.dtype {
                DType::F32 if shape.len() == 1 => (0..n)
                    .flat_map(|_| rng.uniform(0.5, 1.5).to_le_bytes())
                    .collect(),
                DType::F32 => (0..n)
                    .flat_map(|_| rng.uniform(-0.5, 0.5).to_le_bytes())
                    .collect(),
                DType::F16 => (0..n)
                    .flat_map(|_| half::f16::from_f32(rng.uniform(-0.3, 0.3)).to_le_bytes())
                    .collect(),
                DType::Quant(QuantFormat::Q8_0) => (0..n / 32)
                    .flat_map(|_| {
                        let mut block = half::f16::from_f32(rng.uniform(0.002, 0.01))
                            .to_le_bytes()
                            .to_vec();
                        block.extend((0..32).map(|_| rng.next() as u8));
                        block
                    })
                    .collect(),
                other => panic!("no random generator for {other}"),
            };
            map.insert(decl.name.clone(), (format, Layout::GGUF, shape, bytes));
        }
        RandomWeights(map)
    }

    /// The same weights, repacked as the compiler's layout pass chooses for `graph`.
    fn repacked_for(&self, graph: &Graph) -> Self {
        let layouts =
            kiln_compiler::passes::choose_layouts(graph, kiln_compiler::passes::Readers::Cpu, self);
        let mut map = self.0.clone();
        for (name, layout) in &layouts {
            let (format, _, shape, bytes) = &self.0[name];
            map.insert(
                name.clone(),
                (
                    *format,
                    *layout,
                    shape.clone(),
                    layout.repack(*format, shape, bytes),
                ),
            );
        }
        RandomWeights(map)
    }
}

impl WeightSource for RandomWeights {
    fn weight(&self, name: &str) -> Option<WeightView<'_>> {
        self.0
            .get(name)
            .map(|(format, layout, shape, data)| WeightView {
                format: *format,
                layout: *layout,
                shape,
                data,
            })
    }
}

#[test]
fn fused_graphs_compute_exactly_what_unfused_graphs_compute() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compiler/tests/filetests");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("fuse-") {
            continue;
        }
        let unfused = kiln_ir::text::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let fused = run_pass("fuse", unfused.clone()).unwrap().unwrap();
        assert!(fused.len() < unfused.len(), "{name}: nothing fused");
        let vocab = match unfused.node(unfused.output("logits").unwrap()).ty.inner() {
            Some(kiln_ir::Dim::Fixed(v)) => *v,
            _ => unreachable!(),
        };
        for seed in 1..=3u64 {
            let mut rng = Rng(seed * 0x9e37_79b9_7f4a_7c15);
            let weights = RandomWeights::for_graph(&unfused, &mut rng);
            let mut a = ReferenceExecutor::new(unfused.clone(), &weights, 32).unwrap();
            let mut b = ReferenceExecutor::new(fused.clone(), &weights, 32).unwrap();
            // The compiled form: fused, with weights repacked by the layout pass.
            let repacked = weights.repacked_for(&fused);
            let mut c = ReferenceExecutor::new(fused.clone(), &repacked, 32).unwrap();
            // Prefill, single-token decode steps, then a chunk: past the gemma graph's window of 3.
            let mut pos = 0;
            for step in [5, 1, 1, 1, 4, 1] {
                let tokens: Vec<u32> = (0..step)
                    .map(|_| (rng.next() % vocab as u64) as u32)
                    .collect();
                let (la, lb) = (
                    a.forward(&tokens, pos).unwrap(),
                    b.forward(&tokens, pos).unwrap(),
                );
                let lc = c.forward(&tokens, pos).unwrap();
                let same_c = la
                    .data
                    .iter()
                    .zip(&lc.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same_c,
                    "{name} seed {seed} at position {pos}: repacked weights change the logits"
                );
                assert!(
                    la.data.iter().all(|x| x.is_finite()),
                    "{name}: non-finite logits"
                );
                let same = la
                    .data
                    .iter()
                    .zip(&lb.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{name} seed {seed} at position {pos}: fused logits differ"
                );
                pos += step;
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}
