//! The pass pipeline. `pipeline()` is the whole of it, in order; each pass is a named `Graph -> Graph`
//! function, and the verifier runs after every one (it is cheap next to compiling, so in release builds too).

mod canonicalize;
mod fuse;
mod layout;
mod rewrite;
mod schedule;

pub use layout::{choose_layouts, Layouts, INTERLEAVE};
pub use schedule::{schedule, specialize, ScheduleError};

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
