//! Re-quantizing a GGUF model to another format (`kiln quantize`): each weight matrix whose rows are whole blocks
//! of the target is dequantized with the reference dequantizer and quantized with the reference quantizer
//! (`kiln_ir::quantize`); everything else is copied as it is. The result is an ordinary GGUF file that llama.cpp
//! reads too.

use crate::gguf::{write_gguf, GgufWriteError, MetaValue, TensorSpec};
use crate::GgufFile;
use kiln_ir::dequant::dequantize;
use kiln_ir::QuantFormat;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("kiln cannot write {0}; it writes {targets}", targets = targets())]
    Target(String),
    #[error(transparent)]
    Write(#[from] GgufWriteError),
}

fn targets() -> String {
    let names: Vec<&str> = kiln_ir::quantize::TARGETS
        .iter()
        .map(|f| f.name())
        .collect();
    names.join(", ")
}

/// What happens to one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Quantize,
    /// Copied as it is, with the reason.
    Keep(&'static str),
}

/// The plan for one tensor of `format` named `name` with row-major `shape`, for `target`.
pub fn action(name: &str, shape: &[usize], format: QuantFormat, target: QuantFormat) -> Action {
    let ternary = matches!(
        target,
        QuantFormat::TQ1_0
            | QuantFormat::TQ2_0
            | QuantFormat::I2_S
            | QuantFormat::TL1
            | QuantFormat::TL2
    );
    let tiled = matches!(target, QuantFormat::TL1 | QuantFormat::TL2);
    if shape.len() != 2 {
        Action::Keep("not a matrix")
    } else if format == target {
        Action::Keep("already in the format")
    } else if ternary && (name == "token_embd.weight" || name == "output.weight") {
        // BitNet keeps the embeddings and the LM head in higher precision.
        Action::Keep("embeddings and the LM head stay as they are in ternary models")
    } else if !kiln_ir::quantize::fits(target, shape[1]) {
        Action::Keep("its rows are not whole blocks of the target")
    } else if tiled && kiln_ir::tl::Tiling::choose(target, shape[0], shape[1]).is_none() {
        Action::Keep("its shape has no TL tiling")
    } else {
        Action::Quantize
    }
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a model mostly in `format`.
fn file_type(format: QuantFormat) -> Option<u32> {
    Some(match format {
        QuantFormat::F32 => 0,
        QuantFormat::F16 => 1,
        QuantFormat::Q4_0 => 2,
        QuantFormat::Q8_0 => 7,
        QuantFormat::TQ1_0 => 36,
        QuantFormat::TQ2_0 => 37,
        _ => return None,
    })
}

/// What was written.
pub struct QuantizeSummary {
    pub quantized: usize,
    pub kept: Vec<(String, &'static str)>,
    pub bytes: u64,
}

/// Writes `gguf` re-quantized to `target` at `out`. `on_tensor(done, total)` reports progress.
pub fn quantize_model(
    gguf: &GgufFile,
    target: QuantFormat,
    out: &Path,
    mut on_tensor: impl FnMut(usize, usize),
) -> Result<QuantizeSummary, QuantizeError> {
    if !kiln_ir::quantize::TARGETS.contains(&target) {
        return Err(QuantizeError::Target(target.name().to_string()));
    }
    let mut metadata: Vec<(String, MetaValue)> = gguf.metadata().to_vec();
    if let Some(ftype) = file_type(target) {
        match metadata.iter_mut().find(|(k, _)| k == "general.file_type") {
            Some((_, v)) => *v = MetaValue::U32(ftype),
            None => metadata.push(("general.file_type".into(), MetaValue::U32(ftype))),
        }
    }
    let infos = gguf.tensors();
    let actions: Vec<Action> = infos
        .iter()
        .map(|t| action(&t.name, &t.shape, t.format, target))
        .collect();
    let specs: Vec<TensorSpec> = infos
        .iter()
        .zip(&actions)
        .map(|(t, a)| TensorSpec {
            name: t.name.clone(),
            format: if *a == Action::Quantize {
                target
            } else {
                t.format
            },
            shape: t.shape.clone(),
        })
        .collect();
    let total = infos.len();
    let bytes = write_gguf(out, &metadata, &specs, |i| {
        let (info, action) = (&infos[i], actions[i]);
        let data = gguf.tensor_data(info);
        let bytes = match action {
            Action::Keep(_) => data.to_vec(),
            Action::Quantize => {
                let mut values = vec![0f32; info.elements()];
                dequantize(info.format, data, &mut values);
                kiln_ir::quantize::quantize(target, &values)
            }
        };
        on_tensor(i + 1, total);
        Ok(bytes)
    })?;
    Ok(QuantizeSummary {
        quantized: actions.iter().filter(|a| **a == Action::Quantize).count(),
        kept: infos
            .iter()
            .zip(&actions)
            .filter_map(|(t, a)| match a {
                Action::Keep(why) => Some((t.name.clone(), *why)),
                Action::Quantize => None,
            })
            .collect(),
        bytes,
    })
}
