//! The CUDA executor: runs a plan's schedule with the PTX it carries.
//!
//! At load the weights section is uploaded once (weights are used in place at their plan offsets), 1-D float
//! weights become f32 copies, and every layer gets a KV cache of `max_context` positions on the device. A step
//! writes its token ids and positions into the device arena, launches the schedule's kernels on one stream, and
//! reads back the logits. Single-token decode steps are captured once as a CUDA graph and replayed: the kernels
//! read positions from device memory, so one graph serves every position.

pub mod device;
mod launch;

use crate::engine::{check_step, Engine, ExecError, Logits};
use crate::plan::PlanFile;
use crate::reference::kernels::weight_f32;
use cudarc::driver::CudaGraph;
use device::{Buffer, Device, DriverContext};
use kiln_ir::cuda_abi::NodeShapes;
use kiln_ir::schedule::Slot;
use kiln_ir::weights::WeightSource;
use kiln_ir::{NodeId, Op};
use launch::{Bound, Env, ScratchNeeds, Step};
use std::collections::HashMap;

pub use device::{driver_available, CudaLoadError};

/// Per-step device buffers, sized for `tokens` tokens.
struct StepBuffers {
    tokens: usize,
    arena: Buffer,
    quantized: Buffer,
    temp: Buffer,
}

pub struct CudaExecutor {
    device: Device,
    steps: Vec<Step>,
    /// Kept alive while `steps` hold addresses into them.
    _weights: Buffer,
    _floats: Vec<Buffer>,
    _caches: Vec<Buffer>,
    buffers: Option<StepBuffers>,
    /// The captured single-token step, valid for the current `buffers`.
    decode_graph: Option<CudaGraph>,
    use_graphs: bool,
    inputs: Vec<(String, Slot)>,
    logits: Slot,
    arena_bytes_per_token: usize,
    scratch: ScratchNeeds,
    vocab: usize,
    embed_rows: usize,
    max_context: usize,
    cached: usize,
}

impl CudaExecutor {
    /// Loads `plan` onto GPU `ordinal` for sequences of up to `max_context` positions.
    pub fn new(plan: &PlanFile, ordinal: usize, max_context: usize) -> Result<Self, CudaLoadError> {
        let device = Device::open(ordinal, plan.cuda())?;
        let weights = device
            .upload(plan.weights_bytes())
            .doing("uploading the weights")?;
        let schedule = &plan.schedule;
        let graph = &plan.graph;
        let layout_of = |name: &str| plan.weight(name).map(|w| w.layout).unwrap_or_default();
        let mut floats = Vec::new();
        let mut float_ptrs: HashMap<String, u64> = HashMap::new();
        let mut caches = Vec::new();
        let mut cache_ptrs: HashMap<usize, (u64, u64)> = HashMap::new();
        let mut steps = Vec::with_capacity(schedule.launches.len());
        let section = plan.weights_bytes().as_ptr() as usize;
        for launch in &schedule.launches {
            let node = graph.node(NodeId::new(launch.node));
            let shapes = NodeShapes::of(graph, node, layout_of);
            let mut ptrs = Vec::with_capacity(launch.operands.len());
            let mut elems = Vec::with_capacity(launch.operands.len());
            for slot in &launch.operands {
                let Slot::Weight(name) = slot else {
                    ptrs.push(None);
                    elems.push(0);
                    continue;
                };
                let view = plan
                    .weight(name)
                    .ok_or_else(|| ExecError::MissingWeight(name.clone()))?;
                elems.push(view.shape.iter().product());
                let ptr = if view.shape.len() == 1 {
                    match float_ptrs.get(name) {
                        Some(&p) => p,
                        None => {
                            let values = weight_f32(&view);
                            let bytes: Vec<u8> =
                                values.iter().flat_map(|v| v.to_le_bytes()).collect();
                            let buffer = device.upload(&bytes).doing("uploading norm weights")?;
                            let p = buffer.ptr;
                            float_ptrs.insert(name.clone(), p);
                            floats.push(buffer);
                            p
                        }
                    }
                } else {
                    // Where the weight lies in the uploaded section: its offset in the mapped one.
                    weights.ptr + (view.data.as_ptr() as usize - section) as u64
                };
                ptrs.push(Some(ptr));
            }
            let cache = match (&node.op, launch.layer) {
                (Op::Attention { .. } | Op::AttentionQkv { .. }, Some(layer)) => {
                    let width = kv_width(&node.op, &shapes);
                    let bytes = max_context * width * 4;
                    let ptr = match cache_ptrs.get(&layer) {
                        Some(&p) => p,
                        None => {
                            let k = device.alloc(bytes).doing("allocating the KV cache")?;
                            let v = device.alloc(bytes).doing("allocating the KV cache")?;
                            let p = (k.ptr, v.ptr);
                            caches.push(k);
                            caches.push(v);
                            cache_ptrs.insert(layer, p);
                            p
                        }
                    };
                    Some(ptr)
                }
                _ => None,
            };
            let bound = Bound {
                weights: ptrs,
                weight_elems: elems,
                cache,
            };
            steps.push(Step::prepare(
                node.op.clone(),
                launch,
                shapes,
                bound,
                &device,
            )?);
        }
        let logits = schedule
            .outputs
            .iter()
            .find(|(name, _)| name == "logits")
            .map(|(_, slot)| slot.clone())
            .ok_or(ExecError::NoOutput("logits"))?;
        let vocab = match &logits {
            Slot::Arena {
                bytes_per_token, ..
            } => bytes_per_token / 4,
            Slot::Weight(_) => 0,
        };
        let scratch =
            steps
                .iter()
                .map(Step::scratch_needs)
                .fold(ScratchNeeds::default(), |a, b| ScratchNeeds {
                    quantized: a.quantized.max(b.quantized),
                    temp: a.temp.max(b.temp),
                });
        let embed_rows = steps
            .iter()
            .find_map(Step::embed_rows)
            .unwrap_or(usize::MAX);
        Ok(CudaExecutor {
            device,
            steps,
            _weights: weights,
            _floats: floats,
            _caches: caches,
            buffers: None,
            decode_graph: None,
            use_graphs: std::env::var_os("KILN_CUDA_GRAPHS").is_none_or(|v| v != "0"),
            inputs: schedule.inputs.clone(),
            logits,
            arena_bytes_per_token: schedule.arena_bytes_per_token,
            scratch,
            vocab,
            embed_rows,
            max_context,
            cached: 0,
        })
    }

    /// The GPU's name and the PTX architecture loaded.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.device.name, self.device.arch)
    }

    /// Buffers for a step of `t` tokens, grown (and the decode graph dropped) when too small.
    fn ensure_buffers(&mut self, t: usize) -> Result<(), ExecError> {
        if self.buffers.as_ref().is_some_and(|b| b.tokens >= t) {
            return Ok(());
        }
        let tokens = t.next_power_of_two();
        let alloc = |bytes: usize| {
            self.device.alloc(bytes).map_err(|e| ExecError::Device {
                doing: "allocating step buffers",
                reason: e.to_string(),
            })
        };
        self.decode_graph = None;
        self.buffers = None;
        self.buffers = Some(StepBuffers {
            tokens,
            arena: alloc(tokens * self.arena_bytes_per_token)?,
            quantized: alloc(tokens * self.scratch.quantized)?,
            temp: alloc(tokens * self.scratch.temp)?,
        });
        Ok(())
    }

    fn run(&mut self, tokens: &[u32], start: usize, last_only: bool) -> Result<Logits, ExecError> {
        check_step(tokens, start, self.cached, self.max_context)?;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= self.embed_rows) {
            return Err(ExecError::BadToken {
                id,
                vocab: self.embed_rows,
            });
        }
        let t = tokens.len();
        self.ensure_buffers(t)?;
        let device_error = |doing: &'static str| {
            move |e: cudarc::driver::DriverError| ExecError::Device {
                doing,
                reason: e.to_string(),
            }
        };
        let buffers = self.buffers.as_mut().expect("sized above");
        for (name, slot) in &self.inputs {
            let values: Vec<u8> = match name.as_str() {
                "tokens" => tokens
                    .iter()
                    .flat_map(|&id| (id as i32).to_le_bytes())
                    .collect(),
                _ => (start..start + t)
                    .flat_map(|p| (p as i32).to_le_bytes())
                    .collect(),
            };
            let Slot::Arena {
                offset_per_token, ..
            } = slot
            else {
                continue;
            };
            self.device
                .write(&mut buffers.arena, t * offset_per_token, &values)
                .map_err(device_error("writing the step's inputs"))?;
        }
        let graphed = self.use_graphs && t == 1 && last_only;
        if graphed && self.decode_graph.is_none() {
            let launches = launches(&self.steps, buffers, t, last_only, &self.logits);
            self.decode_graph = self
                .device
                .capture(&launches)
                .map_err(device_error("capturing the decode step"))?;
        }
        match (&self.decode_graph, graphed) {
            (Some(graph), true) => graph
                .launch()
                .map_err(device_error("replaying the decode step"))?,
            _ => {
                for launch in launches(&self.steps, buffers, t, last_only, &self.logits) {
                    self.device
                        .launch(&launch)
                        .map_err(device_error("launching a kernel"))?;
                }
            }
        }
        self.cached = start + t;
        let (first_row, rows) = if last_only { (t - 1, 1) } else { (0, t) };
        let Slot::Arena {
            offset_per_token,
            bytes_per_token,
        } = &self.logits
        else {
            return Err(ExecError::NoOutput("logits"));
        };
        let mut bytes = vec![0u8; rows * bytes_per_token];
        self.device
            .read(
                &buffers.arena,
                t * offset_per_token + first_row * bytes_per_token,
                &mut bytes,
            )
            .map_err(device_error("reading the logits"))?;
        Ok(Logits {
            vocab: self.vocab,
            data: bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        })
    }
}

/// Every launch of a step of `t` tokens; with `last_only`, the final launch (the LM head) covers only the last
/// row.
fn launches<'s>(
    steps: &'s [Step],
    buffers: &StepBuffers,
    t: usize,
    last_only: bool,
    logits: &Slot,
) -> Vec<device::Launch<'s>> {
    let mut out = Vec::with_capacity(steps.len() * 4);
    let last = steps.len() - 1;
    for (i, step) in steps.iter().enumerate() {
        let (first, rows) = if last_only && i == last && step.writes(logits) {
            (t - 1, 1)
        } else {
            (0, t)
        };
        let env = Env {
            arena: buffers.arena.ptr,
            quantized: buffers.quantized.ptr,
            temp: buffers.temp.ptr,
            t,
            first,
            rows,
        };
        step.launches(&env, &mut out);
    }
    out
}

/// Keys (or values) per position of an attention op.
fn kv_width(op: &Op, shapes: &NodeShapes) -> usize {
    match op {
        Op::AttentionQkv { kv_heads, .. } => kv_heads * shapes.operand_dims[0][1],
        _ => shapes.operand_dims[1].iter().product(),
    }
}

impl Engine for CudaExecutor {
    fn step(&mut self, tokens: &[u32], start: usize, last_only: bool) -> Result<Logits, ExecError> {
        self.run(tokens, start, last_only)
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
