//! Shared by the kernel tests and the kernel benches: compiling one function and calling it as the executor does,
//! random weights, and the reference math.
#![allow(dead_code, unused_imports)] // each target uses its own subset

use kiln_codegen_cpu::{compile, CpuIsa};
use kiln_ir::cpu_abi::{ActFormat, CpuFunction, Epilogue, MatMulArgs, QuantizeArgs};
use kiln_ir::layout::Layout;
use kiln_ir::plan::CodeEntry;
use kiln_ir::weights::WeightView;
use kiln_ir::QuantFormat;
use kiln_runtime::cpu::code::NativeCode;
use rand::Rng;

#[path = "weights.rs"]
mod weights;
pub use weights::{random_weight, reference, FORMATS};

/// One function compiled and mapped.
pub struct Loaded {
    code: NativeCode,
    function: CpuFunction,
}

impl Loaded {
    pub fn new(isa: &CpuIsa, function: CpuFunction) -> Self {
        let compiled = compile(&function, isa).unwrap();
        let entry = CodeEntry {
            function: function.clone(),
            offset: 0,
            len: compiled.code.len(),
            clif: String::new(),
        };
        Loaded {
            code: NativeCode::load(&[entry], &compiled.code).unwrap(),
            function,
        }
    }

    pub fn call<T>(&self, args: &T) {
        let f = self.code.get(&self.function).unwrap();
        unsafe { f(args as *const T as *const u8) }
    }
}

/// One generated matmul with random operands: `n` rows of `k` weights (two, for gated epilogues), `tokens` rows of
/// activations, the bias or residual, and the output, called through the ABI the executor uses.
pub struct MatMul {
    pub format: QuantFormat,
    pub layout: Layout,
    pub shape: [usize; 2],
    pub tokens: usize,
    /// The weights as stored in the plan (repacked into `layout`).
    pub w: Vec<u8>,
    pub w2: Vec<u8>,
    pub x: Vec<f32>,
    pub extra: Vec<f32>,
    pub out: Vec<f32>,
    xq: Vec<u8>,
    row_bytes: usize,
    quantize: Loaded,
    matmul: Loaded,
}

impl MatMul {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        isa: &CpuIsa,
        rng: &mut impl Rng,
        format: QuantFormat,
        layout: Layout,
        n: usize,
        k: usize,
        tokens: usize,
        epilogue: Epilogue,
    ) -> Self {
        let shape = [n, k];
        let mut weight = || layout.repack(format, &shape, &random_weight(rng, format, n, k));
        let (w, w2) = (weight(), weight());
        let x = (0..tokens * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let extra = (0..tokens * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let act = ActFormat::for_weight(format);
        let row_bytes = act.row_bytes(k);
        MatMul {
            format,
            layout,
            shape,
            tokens,
            w,
            w2,
            x,
            extra,
            out: vec![f32::NAN; tokens * n],
            xq: vec![0u8; tokens * row_bytes],
            row_bytes,
            quantize: Loaded::new(
                isa,
                CpuFunction::Quantize {
                    act,
                    k,
                    norm: false,
                },
            ),
            matmul: Loaded::new(
                isa,
                CpuFunction::MatMul {
                    format,
                    layout,
                    k,
                    epilogue,
                },
            ),
        }
    }

    pub fn view<'a>(&'a self, data: &'a [u8]) -> WeightView<'a> {
        WeightView {
            format: self.format,
            layout: self.layout,
            shape: &self.shape,
            data,
        }
    }

    /// Quantizes the activations (as every launch does first).
    pub fn quantize(&mut self) {
        self.quantize.call(&QuantizeArgs {
            x: self.x.as_ptr(),
            x_stride: self.shape[1] as u64,
            gain: std::ptr::null(),
            out: self.xq.as_mut_ptr(),
            out_stride: self.row_bytes as u64,
            rows: self.tokens as u64,
            eps: 0.0,
        });
    }

    /// Computes output rows `begin..end` for every token.
    pub fn run(&mut self, begin: usize, end: usize) {
        self.call(begin, end, 0..self.tokens);
    }

    /// Computes every output row of token `t` alone, in a call of its own (as a decode step does).
    pub fn run_token(&mut self, t: usize) {
        self.call(0, self.shape[0], t..t + 1);
    }

    fn call(&mut self, begin: usize, end: usize, tokens: std::ops::Range<usize>) {
        let n = self.shape[0];
        self.matmul.call(&MatMulArgs {
            w: self.w.as_ptr(),
            w2: self.w2.as_ptr(),
            x: self.xq[tokens.start * self.row_bytes..].as_ptr(),
            x_stride: self.row_bytes as u64,
            out: self.out[tokens.start * n..].as_mut_ptr(),
            out_stride: n as u64,
            extra: self.extra[tokens.start * n..].as_ptr(),
            extra_stride: n as u64,
            row_begin: begin as u64,
            row_end: end as u64,
            tokens: tokens.len() as u64,
            w_scale: self.view(&self.w).tensor_scale_ptr(),
            w2_scale: self.view(&self.w2).tensor_scale_ptr(),
        });
    }
}
