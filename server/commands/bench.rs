//! `kiln bench PLAN`: prefill and decode throughput, time to first token and peak memory, like llama-bench.

use super::EngineArgs;
use crate::model::Model;
use anyhow::Result;
use clap::Args;
use kiln_runtime::{Engine, KernelTime, SeqTokens};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    pub model: PathBuf,
    /// Prompt lengths to time prefill at.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 512])]
    pub prefill: Vec<usize>,
    /// Tokens to decode one at a time (per sequence).
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Tokens already in the sequence's cache before each timed prefill and decode (decode: at least 8), as
    /// llama-bench's `-d`: attention then reads that many more positions per token.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Sequences decoded together, one token each per step (the server's continuous batching); decode tok/s is
    /// their total. Above 1 it needs an executor that batches (the CPU executor).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also time every kernel of the schedule and report where prefill and decode spend their time (the CPU
    /// executor times its launches; the others refuse).
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Serialize)]
struct Report {
    prefill_tok_s: BTreeMap<String, f64>,
    decode_tok_s: f64,
    depth: usize,
    batch: usize,
    ttft_ms: f64,
    peak_rss_bytes: u64,
    threads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Profile>,
}

/// Time per kernel over all prefill runs and over all decode runs.
#[derive(Serialize)]
struct Profile {
    prefill: Vec<KernelShare>,
    decode: Vec<KernelShare>,
}

#[derive(Serialize)]
struct KernelShare {
    kernel: String,
    spec: String,
    launches: usize,
    seconds: f64,
    share: f64,
}

fn shares(times: Vec<KernelTime>) -> Vec<KernelShare> {
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    times
        .into_iter()
        .map(|t| KernelShare {
            kernel: format!("k{}", t.kernel),
            spec: t.spec,
            launches: t.launches,
            seconds: t.seconds,
            share: t.seconds / total.max(f64::MIN_POSITIVE),
        })
        .collect()
}

fn print_profile(phase: &str, kernels: &[KernelShare]) {
    println!("\n{phase}: time per kernel (all runs)");
    println!(
        "{:<6} {:>9} {:>10} {:>7}  spec",
        "kernel", "launches", "ms", "share"
    );
    for k in kernels {
        println!(
            "{:<6} {:>9} {:>10.1} {:>6.1}%  {}",
            k.kernel,
            k.launches,
            k.seconds * 1e3,
            k.share * 100.0,
            k.spec
        );
    }
}

/// Token ids for a synthetic prompt: ordinary vocabulary entries, no special tokens.
fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (1000 + 37 * i) as u32 % vocab as u32)
        .collect()
}

/// The middle value, or the mean of the two middle values of an even count (with `--repeat 2`, the slower run
/// alone would stand for both).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len().is_multiple_of(2) {
        (xs[mid - 1] + xs[mid]) / 2.0
    } else {
        xs[mid]
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    anyhow::ensure!(args.repeat >= 1, "--repeat must be at least 1");
    anyhow::ensure!(args.decode >= 1, "--decode must be at least 1");
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let model = Model::open_to_run(&args.model, &args.engine)?;
    let longest = args.prefill.iter().copied().max().unwrap_or(0);
    let ctx = args.depth + longest.max(16 + args.decode);
    let trained = model.info.context_length;
    anyhow::ensure!(
        ctx <= trained,
        "the longest run needs {ctx} positions (--depth {}, then a prefill of {longest} or a decode of {}), but the model was trained for {trained}",
        args.depth,
        args.decode
    );
    let mut engine = model.executor(ctx, &args.engine, args.batch, 0)?;
    anyhow::ensure!(
        engine.slots() >= args.batch,
        "--batch {} needs an executor that decodes several sequences at once; this one decodes {} (the CPU executor batches)",
        args.batch,
        engine.slots()
    );
    let vocab = engine.vocab_size();
    // Warm-up, as llama-bench's: fault in the weights and the KV pages of the deepest run, and size the buffers for
    // the longest prompt, so no measured run pays for first touches. Its first `depth` tokens are `prompt(depth)`
    // (a shorter prompt is a prefix of a longer one), the cached tokens every timed prefill follows: each run
    // replaces only what came after them.
    engine.forward_last(&prompt(args.depth + longest.max(16), vocab), 0)?;
    anyhow::ensure!(
        !args.profile || engine.set_profiling(true),
        "--profile needs an executor that times its kernels (the CPU executor)"
    );

    let mut prefill_tok_s = BTreeMap::new();
    let mut ttft_ms = 0.0;
    for &len in &args.prefill {
        anyhow::ensure!(len >= 1, "prefill lengths must be at least 1");
        let tokens = prompt(len, vocab);
        let mut times = Vec::new();
        for _ in 0..args.repeat {
            let started = Instant::now();
            engine.forward_last(&tokens, args.depth)?;
            times.push(started.elapsed().as_secs_f64());
        }
        let t = median(times);
        eprintln!(
            "prefill {len:>4} tokens{}: {:8.1} tok/s",
            at_depth(args.depth),
            len as f64 / t
        );
        prefill_tok_s.insert(len.to_string(), len as f64 / t);
        if len == args.prefill[0] {
            ttft_ms = t * 1e3;
        }
    }

    let prefill_profile = engine.take_profile();
    let mut rates = Vec::new();
    for _ in 0..args.repeat {
        rates.push(decode_rate(
            engine.as_mut(),
            args.decode,
            args.batch,
            args.depth,
            vocab,
        )?);
    }
    let decode_tok_s = median(rates);
    eprintln!(
        "decode {:>5} tokens x {} sequences{}: {decode_tok_s:8.1} tok/s",
        args.decode,
        args.batch,
        at_depth(args.depth)
    );

    let report = Report {
        prefill_tok_s,
        decode_tok_s,
        depth: args.depth,
        batch: args.batch,
        ttft_ms,
        peak_rss_bytes: peak_rss_bytes(),
        threads: args.engine.threads(),
        profile: args.profile.then(|| Profile {
            prefill: shares(prefill_profile),
            decode: shares(engine.take_profile()),
        }),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{:<28} {:>12}", "measure", "value");
        let depth = at_depth(args.depth);
        for (len, v) in &report.prefill_tok_s {
            println!("{:<28} {v:>12.1}", format!("prefill {len}{depth} (tok/s)"));
        }
        println!(
            "{:<28} {:>12.1}",
            format!("decode {} x{}{depth} (tok/s)", args.decode, args.batch),
            report.decode_tok_s
        );
        println!(
            "{:<28} {:>12.1}",
            format!("ttft, {} tokens (ms)", args.prefill.first().unwrap_or(&0)),
            report.ttft_ms
        );
        println!(
            "{:<28} {:>12.1}",
            "peak RSS (MiB)",
            report.peak_rss_bytes as f64 / (1 << 20) as f64
        );
        println!("{:<28} {:>12}", "threads", report.threads);
        if let Some(profile) = &report.profile {
            print_profile("prefill", &profile.prefill);
            print_profile("decode", &profile.decode);
        }
    }
    Ok(())
}

/// How a measure's label names a depth, as llama-bench's `@ d512` does.
fn at_depth(depth: usize) -> String {
    match depth {
        0 => String::new(),
        d => format!(" @ d{d}"),
    }
}

/// Decodes `n` tokens one at a time in each of `batch` sequences (slots `0..batch`, one step for all) after a
/// prompt of `depth` tokens each (at least 8), feeding back each argmax; returns the tokens per second of all of
/// them.
fn decode_rate(
    engine: &mut dyn Engine,
    n: usize,
    batch: usize,
    depth: usize,
    vocab: usize,
) -> Result<f64> {
    let first = prompt(depth.max(8), vocab);
    let mut logits = Vec::with_capacity(batch);
    for slot in 0..batch {
        let seq = SeqTokens {
            slot,
            tokens: &first,
            start: 0,
        };
        logits.extend(engine.step_batch(&[seq])?);
    }
    let started = Instant::now();
    for pos in first.len()..first.len() + n {
        let next: Vec<[u32; 1]> = logits
            .iter()
            .map(|row| [kiln_runtime::argmax(row)])
            .collect();
        let seqs: Vec<SeqTokens> = next
            .iter()
            .enumerate()
            .map(|(slot, token)| SeqTokens {
                slot,
                tokens: token,
                start: pos,
            })
            .collect();
        logits = engine.step_batch(&seqs)?;
    }
    Ok((n * batch) as f64 / started.elapsed().as_secs_f64())
}

/// The process's peak resident set size.
fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage.ru_maxrss as u64 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_its_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(vec![5.0]), 5.0);
    }
}
