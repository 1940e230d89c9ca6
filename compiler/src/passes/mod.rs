//! The compiler's pipeline. `compile` is the whole of it, in order: the graph passes of `pipeline()` (each a named
//! `Graph -> Graph` function), then layout, then specialize + memory plan + schedule. A verifier runs after every
//! stage (they are cheap next to compiling, so in release builds too), and each stage can be dumped.

mod canonicalize;
mod fuse;
mod layout;
mod rewrite;
mod schedule;

pub use layout::{choose_layouts, transcode_weights, Layouts, Readers, INTERLEAVE};
pub use schedule::{schedule, specialize, ScheduleError};

use kiln_ir::schedule::Schedule;
use kiln_ir::{verify, Graph, VerifyError};

pub struct Pass {
    pub name: &'static str,
    pub run: fn(Graph) -> Graph,
}

/// Every pass, in the order they run.
pub fn pipeline() -> Vec<Pass> {
    vec![
        Pass {
            name: "canonicalize",
            run: canonicalize::run,
        },
        Pass {
            name: "fuse",
            run: fuse::run,
        },
    ]
}

#[derive(Debug, thiserror::Error)]
#[error("pass `{pass}` produced an invalid graph (a kiln bug): {error}")]
pub struct PassError {
    pub pass: &'static str,
    pub error: VerifyError,
}

/// Runs one pass by name and verifies the result (filetests use this).
pub fn run_pass(name: &str, graph: Graph) -> Option<Result<Graph, PassError>> {
    let pass = pipeline().into_iter().find(|p| p.name == name)?;
    let graph = (pass.run)(graph);
    Some(verify(&graph).map(|()| graph).map_err(|error| PassError {
        pass: pass.name,
        error,
    }))
}

/// Runs the pipeline. `after(index, name, graph)` sees the graph after each pass (for `--dump-ir`).
pub fn run_pipeline(
    mut graph: Graph,
    mut after: impl FnMut(usize, &str, &Graph),
) -> Result<Graph, PassError> {
    for (i, pass) in pipeline().into_iter().enumerate() {
        graph = (pass.run)(graph);
        verify(&graph).map_err(|error| PassError {
            pass: pass.name,
            error,
        })?;
        after(i + 1, pass.name, &graph);
    }
    Ok(graph)
}

/// What `compile` produces: the final graph, how each weight is stored, and the schedule.
pub struct Compiled {
    pub graph: Graph,
    pub layouts: Layouts,
    pub schedule: Schedule,
}

/// The result of one stage, for dumps.
pub enum Stage<'a> {
    Graph(&'a Graph),
    Layouts(&'a Layouts),
    Schedule(&'a Schedule),
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("the schedule fails its check (a kiln bug): {0}")]
    InvalidSchedule(String),
}

/// The whole pipeline, for a plan whose weights (`weights`, as GGUF stores them) `readers` read.
/// `after(index, name, stage)` sees the result of each stage.
pub fn compile(
    graph: Graph,
    readers: Readers,
    weights: &dyn kiln_ir::weights::WeightSource,
    mut after: impl FnMut(usize, &str, Stage),
) -> Result<Compiled, CompileError> {
    let mut graph = run_pipeline(graph, |i, name, graph| after(i, name, Stage::Graph(graph)))?;
    transcode_weights(&mut graph, readers);
    let n = pipeline().len();
    let layouts = choose_layouts(&graph, readers, weights);
    after(n + 1, "layout", Stage::Layouts(&layouts));
    let schedule = schedule(&graph, &layouts)?;
    schedule
        .verify(&graph)
        .map_err(CompileError::InvalidSchedule)?;
    after(n + 2, "schedule", Stage::Schedule(&schedule));
    Ok(Compiled {
        graph,
        layouts,
        schedule,
    })
}
