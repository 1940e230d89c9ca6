//! The text form of a graph: one declaration or op per line, SSA style. `print(parse(t)) == t` for every
//! printed graph.
//!
//! ```text
//! graph llama
//! weight @blk.0.attn_q.weight : q4_1[576, 576]
//! %0 = input {name=tokens} : i32[tokens]
//! %7 = matmul %6, @blk.0.attn_q.weight : f32[tokens, 576]
//! output logits = %42
//! ```
//! Blank lines and lines starting with `;` are ignored by the parser.

use crate::graph::{Graph, NodeId, Operand, WeightId};
use crate::op::{Activation, Op, RopeParams, RopeStyle};
use crate::types::{DType, Dim, TensorType};
use std::collections::HashMap;
use std::fmt::Write;

/// An attribute value as it appears in `{key=value}`.
#[derive(Clone, Debug, PartialEq)]
enum Attr {
    Float(f32),
    Int(usize),
    Ident(String),
    None,
}

impl std::fmt::Display for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // `{:?}` prints the shortest text that parses back to the same f32.
            Attr::Float(x) => write!(f, "{x:?}"),
            Attr::Int(n) => write!(f, "{n}"),
            Attr::Ident(s) => f.write_str(s),
            Attr::None => f.write_str("none"),
        }
    }
}

fn attrs_of(op: &Op) -> Vec<(&'static str, Attr)> {
    let float_or_none = |x: Option<f32>| x.map_or(Attr::None, Attr::Float);
    let window = |w: Option<usize>| w.map_or(Attr::None, Attr::Int);
    match op {
        Op::Input { name } => vec![("name", Attr::Ident(name.clone()))],
        Op::RmsNorm { eps } | Op::NormMatMul { eps } => vec![("eps", Attr::Float(*eps))],
        Op::Scale { factor } => vec![("factor", Attr::Float(*factor))],
        Op::Rope(rope) => rope_attrs(rope),
        Op::Attention {
            layer,
            scale,
            window: w,
        } => {
            vec![
                ("layer", Attr::Int(*layer)),
                ("scale", Attr::Float(*scale)),
                ("window", window(*w)),
            ]
        }
        Op::QkvRope {
            eps,
            heads,
            kv_heads,
            head_dim,
            rope,
            bias,
            qk_norm,
        } => {
            let mut attrs = vec![
                ("eps", Attr::Float(*eps)),
                ("heads", Attr::Int(*heads)),
                ("kv_heads", Attr::Int(*kv_heads)),
                ("head_dim", Attr::Int(*head_dim)),
            ];
            attrs.extend(rope_attrs(rope));
            attrs.push(("bias", Attr::Ident(bias.to_string())));
            attrs.push(("qk_norm", float_or_none(*qk_norm)));
            attrs
        }
        Op::AttentionQkv {
            layer,
            scale,
            window: w,
            heads,
            kv_heads,
        } => vec![
            ("layer", Attr::Int(*layer)),
            ("scale", Attr::Float(*scale)),
            ("window", window(*w)),
            ("heads", Attr::Int(*heads)),
            ("kv_heads", Attr::Int(*kv_heads)),
        ],
        Op::GatedFfn { eps, act } => vec![
            ("eps", Attr::Float(*eps)),
            ("act", Attr::Ident(act.name().into())),
        ],
        Op::MatMulResidual { post_norm } => vec![("post_norm", float_or_none(*post_norm))],
        Op::Embed | Op::MatMul | Op::Add | Op::Mul | Op::Activation(_) | Op::Reshape => vec![],
    }
}

fn rope_attrs(rope: &RopeParams) -> Vec<(&'static str, Attr)> {
    vec![
        ("base", Attr::Float(rope.base)),
        ("dims", Attr::Int(rope.dims)),
        ("freq_scale", Attr::Float(rope.freq_scale)),
        ("style", Attr::Ident(rope.style.name().into())),
    ]
}

/// An op's attributes as the text form writes them (`{eps=1e-5}`), leaving out those named in `skip`; empty when
/// none remain.
pub fn print_attrs(op: &Op, skip: &[&str]) -> String {
    let list: Vec<String> = attrs_of(op)
        .iter()
        .filter(|(k, _)| !skip.contains(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    match list.is_empty() {
        true => String::new(),
        false => format!("{{{}}}", list.join(", ")),
    }
}

/// Prints a graph in the text form.
pub fn print(graph: &Graph) -> String {
    let mut out = String::new();
    writeln!(out, "graph {}", graph.name).unwrap();
    for w in graph.weights() {
        writeln!(out, "weight @{} : {}", w.name, w.ty).unwrap();
    }
    for id in graph.node_ids() {
        out.push_str(&print_node(graph, id));
        out.push('\n');
    }
    for (name, id) in graph.outputs() {
        writeln!(out, "output {name} = %{}", id.index()).unwrap();
    }
    out
}

/// One node's line, without the newline (also used by the verifier's messages).
pub fn print_node(graph: &Graph, id: NodeId) -> String {
    let node = graph.node(id);
    let mut line = format!("%{} = {}", id.index(), node.op.name());
    for (i, operand) in node.operands.iter().enumerate() {
        line.push_str(if i == 0 { " " } else { ", " });
        line.push_str(&print_operand(graph, *operand));
    }
    let attrs = print_attrs(&node.op, &[]);
    if !attrs.is_empty() {
        write!(line, " {attrs}").unwrap();
    }
    write!(line, " : {}", node.ty).unwrap();
    line
}

/// An operand as written in the text form: `%3` or `@name`.
pub fn print_operand(graph: &Graph, operand: Operand) -> String {
    match operand {
        Operand::Value(v) => format!("%{}", v.index()),
        Operand::Weight(w) => format!("@{}", graph.weight(w).name),
    }
}

/// A parse failure: the 1-based line and what is wrong there.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parses the text form. The result is not verified: run `verify` for that.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut parser = Parser {
        graph: None,
        values: HashMap::new(),
        weights: HashMap::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        parser.line(line).map_err(|message| ParseError {
            line: i + 1,
            message,
        })?;
    }
    parser.graph.ok_or(ParseError {
        line: 1,
        message: "empty input: expected `graph NAME`".into(),
    })
}

struct Parser {
    graph: Option<Graph>,
    values: HashMap<String, NodeId>,
    weights: HashMap<String, WeightId>,
}

impl Parser {
    fn line(&mut self, line: &str) -> Result<(), String> {
        let Some(graph) = self.graph.as_mut() else {
            let name = line
                .strip_prefix("graph ")
                .ok_or("expected `graph NAME` first")?;
            self.graph = Some(Graph::new(ident(name.trim())?));
            return Ok(());
        };
        if let Some(rest) = line.strip_prefix("weight ") {
            let (name, ty) = rest
                .split_once(" : ")
                .ok_or("expected `weight @NAME : TYPE`")?;
            let name = name
                .trim()
                .strip_prefix('@')
                .ok_or("weight names start with `@`")?;
            if self.weights.contains_key(name) {
                return Err(format!("weight @{name} declared twice"));
            }
            let id = graph.declare_weight(ident(name)?, parse_type(ty)?);
            self.weights.insert(name.to_string(), id);
        } else if let Some(rest) = line.strip_prefix("output ") {
            let (name, value) = rest
                .split_once(" = ")
                .ok_or("expected `output NAME = %N`")?;
            let id = *self
                .values
                .get(value.trim())
                .ok_or_else(|| format!("undefined value {}", value.trim()))?;
            graph.set_output(ident(name.trim())?, id);
        } else {
            let (lhs, rhs) = line
                .split_once(" = ")
                .ok_or("expected `%N = OP ... : TYPE`")?;
            let lhs = lhs.trim();
            if !lhs.starts_with('%') || self.values.contains_key(lhs) {
                return Err(format!("`{lhs}` must be a new value name like %3"));
            }
            let (body, ty) = rhs.rsplit_once(" : ").ok_or("missing ` : TYPE`")?;
            let ty = parse_type(ty)?;
            let (body, attrs) = split_attrs(body)?;
            let (op_name, operand_text) = body.split_once(' ').unwrap_or((body, ""));
            let mut operands = Vec::new();
            for text in operand_text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                operands.push(if let Some(w) = text.strip_prefix('@') {
                    Operand::Weight(
                        *self
                            .weights
                            .get(w)
                            .ok_or_else(|| format!("undeclared weight @{w}"))?,
                    )
                } else {
                    Operand::Value(
                        *self
                            .values
                            .get(text)
                            .ok_or_else(|| format!("undefined value {text}"))?,
                    )
                });
            }
            let op = build_op(op_name, attrs)?;
            let id = graph.add(op, operands, ty);
            self.values.insert(lhs.to_string(), id);
        }
        Ok(())
    }
}

fn ident(s: &str) -> Result<&str, String> {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(s)
    } else {
        Err(format!("`{s}` is not a valid name"))
    }
}

fn parse_type(text: &str) -> Result<TensorType, String> {
    let text = text.trim();
    let (dtype, dims) = text
        .strip_suffix(']')
        .and_then(|t| t.split_once('['))
        .ok_or_else(|| format!("`{text}` is not a type like f32[tokens, 576]"))?;
    let dtype = DType::parse(dtype).ok_or_else(|| format!("unknown dtype `{dtype}`"))?;
    let mut shape = Vec::new();
    for d in dims.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        shape.push(match d.parse::<usize>() {
            Ok(n) => Dim::Fixed(n),
            Err(_) => Dim::Sym(ident(d)?.to_string()),
        });
    }
    Ok(TensorType { dtype, shape })
}

fn split_attrs(body: &str) -> Result<(&str, HashMap<String, Attr>), String> {
    let body = body.trim();
    let Some(open) = body.find('{') else {
        return Ok((body, HashMap::new()));
    };
    let inner = body[open..]
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or("unclosed `{`")?;
    let mut attrs = HashMap::new();
    for pair in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("attribute `{pair}` is not key=value"))?;
        let value = if v == "none" {
            Attr::None
        } else if let Ok(n) = v.parse::<usize>() {
            Attr::Int(n)
        } else if let Ok(x) = v.parse::<f32>() {
            Attr::Float(x)
        } else {
            Attr::Ident(ident(v)?.to_string())
        };
        if attrs.insert(k.to_string(), value).is_some() {
            return Err(format!("attribute `{k}` given twice"));
        }
    }
    Ok((body[..open].trim(), attrs))
}

/// Takes the attributes an op needs out of the parsed set; unknown or missing ones are errors.
struct Attrs(HashMap<String, Attr>);

impl Attrs {
    fn take(&mut self, key: &str) -> Result<Attr, String> {
        self.0
            .remove(key)
            .ok_or_else(|| format!("missing attribute `{key}`"))
    }

    fn float(&mut self, key: &str) -> Result<f32, String> {
        match self.take(key)? {
            Attr::Float(x) => Ok(x),
            Attr::Int(n) => Ok(n as f32),
            other => Err(format!("attribute `{key}` must be a number, got {other}")),
        }
    }

    fn int(&mut self, key: &str) -> Result<usize, String> {
        match self.take(key)? {
            Attr::Int(n) => Ok(n),
            other => Err(format!("attribute `{key}` must be an integer, got {other}")),
        }
    }

    fn ident(&mut self, key: &str) -> Result<String, String> {
        match self.take(key)? {
            Attr::Ident(s) => Ok(s),
            other => Err(format!("attribute `{key}` must be a name, got {other}")),
        }
    }

    fn optional_float(&mut self, key: &str) -> Result<Option<f32>, String> {
        match self.take(key)? {
            Attr::None => Ok(None),
            Attr::Float(x) => Ok(Some(x)),
            Attr::Int(n) => Ok(Some(n as f32)),
            other => Err(format!(
                "attribute `{key}` must be a number or none, got {other}"
            )),
        }
    }

    fn rope(&mut self) -> Result<RopeParams, String> {
        let style = self.ident("style")?;
        Ok(RopeParams {
            base: self.float("base")?,
            dims: self.int("dims")?,
            freq_scale: self.float("freq_scale")?,
            style: RopeStyle::parse(&style)
                .ok_or_else(|| format!("unknown rope style `{style}` (interleaved, neox)"))?,
        })
    }

    fn optional_int(&mut self, key: &str) -> Result<Option<usize>, String> {
        match self.take(key)? {
            Attr::None => Ok(None),
            Attr::Int(n) => Ok(Some(n)),
            other => Err(format!(
                "attribute `{key}` must be an integer or none, got {other}"
            )),
        }
    }
}

fn build_op(name: &str, attrs: HashMap<String, Attr>) -> Result<Op, String> {
    let mut a = Attrs(attrs);
    let op = match name {
        "input" => Op::Input {
            name: a.ident("name")?,
        },
        "embed" => Op::Embed,
        "rms_norm" => Op::RmsNorm {
            eps: a.float("eps")?,
        },
        "matmul" => Op::MatMul,
        "add" => Op::Add,
        "mul" => Op::Mul,
        "scale" => Op::Scale {
            factor: a.float("factor")?,
        },
        "reshape" => Op::Reshape,
        "rope" => Op::Rope(a.rope()?),
        "attention" => Op::Attention {
            layer: a.int("layer")?,
            scale: a.float("scale")?,
            window: a.optional_int("window")?,
        },
        "norm_matmul" => Op::NormMatMul {
            eps: a.float("eps")?,
        },
        "qkv_rope" => Op::QkvRope {
            eps: a.float("eps")?,
            heads: a.int("heads")?,
            kv_heads: a.int("kv_heads")?,
            head_dim: a.int("head_dim")?,
            rope: a.rope()?,
            bias: match a.ident("bias")?.as_str() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(format!(
                        "attribute `bias` must be true or false, got {other}"
                    ))
                }
            },
            qk_norm: a.optional_float("qk_norm")?,
        },
        "attention_qkv" => Op::AttentionQkv {
            layer: a.int("layer")?,
            scale: a.float("scale")?,
            window: a.optional_int("window")?,
            heads: a.int("heads")?,
            kv_heads: a.int("kv_heads")?,
        },
        "gated_ffn" => Op::GatedFfn {
            eps: a.float("eps")?,
            act: {
                let s = a.ident("act")?;
                Activation::parse(&s)
                    .ok_or_else(|| format!("unknown activation `{s}` (silu, gelu, relu_sqr)"))?
            },
        },
        "matmul_residual" => Op::MatMulResidual {
            post_norm: a.optional_float("post_norm")?,
        },
        other => match Activation::parse(other) {
            Some(act) => Op::Activation(act),
            None => return Err(format!("unknown op `{other}`")),
        },
    };
    if let Some(extra) = a.0.keys().next() {
        return Err(format!("op `{name}` has no attribute `{extra}`"));
    }
    Ok(op)
}
