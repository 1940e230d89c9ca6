//! Native code for a compiled graph: every function its launches call, generated once and compiled for the target.

use crate::passes::Layouts;
use crate::plan_writer::PlanCode;
use kiln_codegen_cpu::{CodegenError, CpuIsa};
use kiln_codegen_cuda::CudaCodegenError;
use kiln_ir::cpu_abi::{
    attention_function, embed_function, node_weights, op_functions, rms_norm_function,
    rope_function, CpuFunction,
};
use kiln_ir::cuda_abi::{op_kernels, CudaCode, CudaKernel, NodeShapes};
use kiln_ir::layout::Layout;
use kiln_ir::Graph;

/// The distinct functions the CPU executor calls for `graph`, in first-use order.
pub fn cpu_functions(graph: &Graph, layouts: &Layouts) -> Vec<CpuFunction> {
    let layout_of = |name: &str| layouts.get(name).copied().unwrap_or(Layout::GGUF);
    let mut out: Vec<CpuFunction> = Vec::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        let weights = node_weights(graph, node, layout_of);
        let matmuls = op_functions(&node.op, &weights);
        let others = [
            attention_function(graph, node),
            rope_function(graph, node),
            rms_norm_function(node),
            embed_function(&node.op, &weights),
        ];
        for f in matmuls.into_iter().chain(others.into_iter().flatten()) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// Generates and compiles every function kiln has a generator for; the executor runs the others with its
/// reference code. `on_function(done, total)` reports progress.
pub fn generate_cpu_code(
    graph: &Graph,
    layouts: &Layouts,
    isa: &CpuIsa,
    mut on_function: impl FnMut(usize, usize),
) -> Result<PlanCode, CodegenError> {
    let functions: Vec<CpuFunction> = cpu_functions(graph, layouts)
        .into_iter()
        .filter(kiln_codegen_cpu::supports)
        .collect();
    let mut code = PlanCode::default();
    for (i, function) in functions.iter().enumerate() {
        let compiled = kiln_codegen_cpu::compile(function, isa)?;
        code.push(compiled.function, compiled.clif, &compiled.code);
        on_function(i + 1, functions.len());
    }
    Ok(code)
}

/// The distinct kernels the CUDA executor launches for `graph`, in first-use order.
pub fn cuda_kernels(graph: &Graph, layouts: &Layouts) -> Vec<CudaKernel> {
    let layout_of = |name: &str| layouts.get(name).copied().unwrap_or(Layout::GGUF);
    let mut out: Vec<CudaKernel> = Vec::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        if matches!(node.op, kiln_ir::Op::Input { .. }) {
            continue;
        }
        for k in op_kernels(&node.op, &NodeShapes::of(graph, node, layout_of)) {
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

/// Generates the CUDA module of `graph` and compiles it with NVRTC for every architecture in
/// `kiln_codegen_cuda::ARCHS`. `on_arch(done, total)` reports progress.
pub fn generate_cuda_code(
    graph: &Graph,
    layouts: &Layouts,
    on_arch: impl FnMut(usize, usize),
) -> Result<CudaCode, CudaCodegenError> {
    kiln_codegen_cuda::compile(
        &cuda_kernels(graph, layouts),
        &kiln_codegen_cuda::ARCHS,
        on_arch,
    )
}
