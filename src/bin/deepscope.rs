//! The `deepscope` command line: forward passes, generation, model summaries,
//! the benchmark driver, training, and the Jupyter kernel (`kernel`,
//! `install`). The same executable is evcxr's cell runner, so `main` starts
//! with the runtime hook.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use deepscope::model::tokenizer::StreamDecoder;
use deepscope::model::{
    parse_device, parse_dtype, AttnImpl, Config, DeviceMap, ForwardOptions, GenerateOptions, LoadOptions, MemoryBudget, Model,
    Plan, Sampling,
};
use deepscope::stats::{human_bytes, CacheFootprint, ParamCounts};
use tch::{Kind, Tensor};

#[derive(Parser)]
#[command(name = "deepscope", version, about = "Look inside DeepSeek-style models (MLA + DeepSeekMoE)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// cpu, cuda, cuda:N or auto (CUDA when available).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// Where weights live: budget, host offload, FP8, devices.
#[derive(clap::Args)]
struct MemoryArgs {
    /// Memory the weights may take on each device: auto (what is free, less a
    /// margin), unlimited, or a size such as 8GiB or 512MiB. Weights beyond it
    /// stay on disk and are read as passes need them.
    #[arg(long, default_value = "auto")]
    memory_budget: String,
    /// Host memory for weights offloaded from GPUs (auto, unlimited or a size).
    #[arg(long, default_value = "auto")]
    host_budget: String,
    /// Expand FP8 weights to the compute dtype at load (instead of per use).
    #[arg(long)]
    dequantize: bool,
    /// Layers per device: single (all on --device), auto, balanced, or
    /// ranges such as 0-29=cuda:0,30-60=cuda:1.
    #[arg(long, default_value = "single")]
    device_map: String,
    /// Drop streamed weights from the page cache after reading them
    /// (benchmarks: behave like a checkpoint larger than RAM).
    #[arg(long)]
    drop_page_cache: bool,
}

impl MemoryArgs {
    fn apply(&self, mut o: LoadOptions) -> Result<LoadOptions> {
        o.memory_budget = self.memory_budget.parse::<MemoryBudget>()?;
        o.host_budget = self.host_budget.parse::<MemoryBudget>()?;
        o.dequantize = self.dequantize;
        o.device_map = self.device_map.parse::<DeviceMap>()?;
        o.drop_page_cache = self.drop_page_cache;
        Ok(o)
    }
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        self.memory.apply(LoadOptions::new(parse_device(&self.device)?, parse_dtype(&self.dtype)?))
    }

    fn load(&self) -> Result<Model> {
        self.load_with(self.options()?)
    }

    fn load_with(&self, opts: LoadOptions) -> Result<Model> {
        let model = Model::load(&self.model, opts).with_context(|| format!("loading {}", self.model.display()))?;
        for note in &model.load_notes {
            eprintln!("note: {note}");
        }
        Ok(model)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run one forward pass and write logits and routing to a safetensors file.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids of one sequence; repeat for a batch (equal lengths).
        #[arg(long = "ids", required = true)]
        ids: Vec<String>,
        /// Output file (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Attention path: naive, absorbed, or auto (the cheaper per call: naive for prompts, absorbed for decode steps).
        #[arg(long, default_value = "auto")]
        attn: String,
    },
    /// Generate text after a prompt, streaming tokens as they come.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt text (needs tokenizer.json in the model directory).
        #[arg(long, conflicts_with = "ids")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids (for models without a tokenizer).
        #[arg(long)]
        ids: Option<String>,
        /// Number of new tokens.
        #[arg(short = 'n', long = "max-new-tokens", default_value_t = 32)]
        n: usize,
        /// Sample (instead of greedy) with this seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Sampling temperature (implies sampling).
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling mass (implies sampling).
        #[arg(long = "top-p")]
        top_p: Option<f64>,
        /// Attention path: naive, absorbed or auto.
        #[arg(long, default_value = "auto")]
        attn: String,
    },
    /// Summarise a model: config, parameter counts, KV-cache bytes per token,
    /// and where its weights would live (the plan for --device auto and an
    /// automatic budget).
    Info {
        /// Checkpoint directory (config.json and the weights' headers are
        /// read), or published:NAME (deepseek-v3, deepseek-r1, kimi-k2,
        /// deepseek-v2-lite, moonlight-16b-a3b).
        #[arg(long)]
        model: String,
        /// Bytes per cached element for the cache figures (2 = bf16).
        #[arg(long, default_value_t = 2)]
        cache_bytes_per_elem: usize,
    },
    /// Where each part of a model would live under a memory budget, the bytes
    /// per token read from each tier, and whether it fits, before loading
    /// anything.
    Plan {
        /// Checkpoint directory, or published:NAME.
        #[arg(long)]
        model: String,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Compute dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Plan for this many GPUs (default: the ones this machine has; a
        /// plan for GPUs it lacks needs an explicit --memory-budget).
        #[arg(long)]
        gpus: Option<usize>,
    },
    /// Write a random checkpoint with a real model's dimensions and storage
    /// layout (FP8 with block scales, shards and index), shard by shard.
    Synth {
        /// published:NAME, or a checkpoint directory whose config.json to copy.
        #[arg(long)]
        like: String,
        /// Keep only the first N layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// How matrices are stored: fp8, bf16 or f32 (default: fp8 when the
        /// model is published in FP8, else bf16).
        #[arg(long)]
        dtype: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest shard file.
        #[arg(long, default_value = "4GiB")]
        shard_size: String,
    },
    /// Read a serving engine's routing record into routing statistics (the
    /// JSON `RoutingStats::load_from` reads), print the load imbalance per
    /// layer and, with --eplb, the expert placement EPLB would compute.
    Import {
        /// sglang: expert-distribution dumps (modes stat, per_pass,
        /// per_token); routed-experts: SGLang responses with
        /// meta_info.routed_experts (JSON, JSON lines or base64 lines); vllm:
        /// EPLB state saved from EplbModelState (.pt or .safetensors).
        #[arg(value_enum)]
        engine: ImportEngine,
        /// Files; a directory stands for the files in it (.pt for sglang).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The served model: a checkpoint directory or published:NAME.
        #[arg(long)]
        config: String,
        /// Write the statistics as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Layers whose per-token expert counts to keep (per-token records).
        #[arg(long, value_delimiter = ',')]
        token_layers: Vec<usize>,
        /// Plan EPLB for GPUS[,NODES[,GROUPS[,REDUNDANT]]] (groups default to
        /// the config's n_group).
        #[arg(long)]
        eplb: Option<String>,
        /// tokenizer.json: print the tokens the busiest experts of each
        /// --token-layers layer take most.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Streaming benchmark: load under a budget, prefill a prompt of random
    /// token ids, decode greedily; prints one JSON line with time, weight
    /// traffic and peak resident memory.
    BenchStream {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 0)]
        threads: i32,
        #[arg(long = "prompt-len", default_value_t = 32)]
        prompt_len: i64,
        /// Greedy decode steps after the prompt.
        #[arg(long, default_value_t = 16)]
        decode: usize,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Train a DeepSeek-V3-shaped model on the Debian corpus (bible-kjv,
    /// fortunes, jargon-text); writes OUT/model in the Hugging Face layout.
    Train {
        /// Run directory (tokenizer, checkpoint/, logs, model/).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3000)]
        steps: u64,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        #[arg(long, default_value_t = 100)]
        warmup: u64,
        /// gamma of the aux-loss-free bias update (0 = no balancing).
        #[arg(long, default_value_t = 1e-2)]
        bias_update_rate: f64,
        /// alpha of DeepSeek-V3's sequence-wise balance loss (0 = off; V3 used 1e-4).
        #[arg(long, default_value_t = 0.0)]
        seq_balance_alpha: f64,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 500)]
        eval_every: u64,
        #[arg(long, default_value_t = 250)]
        checkpoint_every: u64,
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Continue from OUT/checkpoint if it exists.
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate a model trained by `deepscope train` on the held-out corpus
    /// split: bits per byte per domain, unigram baseline, load balance, routing
    /// divergence between domains (JSON on stdout).
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Benchmark prefill, decode and load memory; prints one JSON line.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 0)]
        threads: i32,
        #[arg(long, default_value_t = 4)]
        batch: i64,
        #[arg(long, default_value_t = 256)]
        seq: i64,
        #[arg(long, default_value_t = 64)]
        new: usize,
        #[arg(long = "prompt-len", default_value_t = 16)]
        prompt_len: i64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Attention path: naive, absorbed or auto.
        #[arg(long, default_value = "auto")]
        attn: String,
        /// Also time each block of the prefill (embedding, attention, norms
        /// and residuals, dense MLPs, routers, experts, LM head) through
        /// hooks, and add the medians to the JSON as "profile_ms".
        #[arg(long)]
        profile: bool,
    },
    /// Run the Jupyter kernel (started by Jupyter through the kernelspec).
    #[cfg(feature = "kernel")]
    Kernel {
        /// The connection file Jupyter writes.
        #[arg(long, required_unless_present = "prebuild")]
        connection_file: Option<PathBuf>,
        /// Build the library for notebook cells into the kernel's cache and exit.
        #[arg(long)]
        prebuild: bool,
    },
    /// Install the `deepscope` kernelspec for Jupyter.
    #[cfg(feature = "kernel")]
    Install {
        /// Into ~/.local/share/jupyter (the default).
        #[arg(long, conflicts_with_all = ["sys_prefix", "prefix"])]
        user: bool,
        /// Into the active virtual environment (the project's .venv).
        #[arg(long, conflicts_with = "prefix")]
        sys_prefix: bool,
        /// Into DIR/share/jupyter.
        #[arg(long, value_name = "DIR")]
        prefix: Option<PathBuf>,
    },
}

/// SIGINTs received by this process when it runs as evcxr's cell runner.
/// Library operations find it by name (see `deepscope::kernel::cell`); the
/// linker exports it from the executable (build.rs).
#[no_mangle]
#[used]
pub static deepscope_interrupt_count: AtomicU64 = AtomicU64::new(0);
/// The count up to which `check_interrupt` has consumed interrupts.
#[no_mangle]
#[used]
pub static deepscope_interrupt_seen: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigint(_: libc::c_int) {
    // Only an atomic increment: async-signal-safe.
    deepscope_interrupt_count.fetch_add(1, Ordering::SeqCst);
}

/// Makes the cell runner die when the kernel does. A runner busy in a cell
/// reads nothing from the kernel until the cell ends, so without this a
/// kernel killed with SIGKILL left its runner computing (and holding the
/// model's memory) until the cell finished (measured by `make soak`). The
/// signal is tied to the kernel thread that started the runner: evcxr's
/// worker, which lives as long as the kernel. A kernel that died before this
/// call is caught by the parent check.
#[cfg(all(feature = "kernel", target_os = "linux"))]
fn die_with_the_kernel() {
    let Some(kernel) = std::env::var("DEEPSCOPE_KERNEL_PID").ok().and_then(|p| p.parse::<i32>().ok()) else { return };
    // SAFETY: prctl and getppid have no memory-safety preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        if libc::getppid() != kernel {
            std::process::exit(1);
        }
    }
}

#[cfg(all(feature = "kernel", not(target_os = "linux")))]
fn die_with_the_kernel() {}

/// In the cell runner: hands the code pages of cells that have run back to
/// the OS. Every cell is a shared library that stays loaded for good (stored
/// values may point into it), so its pages stayed resident: `make soak`
/// measured the runner's RSS growing ~110 KiB per cell, almost all of it
/// clean, file-backed code of past cells. Once a newer cell has been
/// loaded, a thread advises the kernel (`MADV_PAGEOUT`) to reclaim the
/// read-only mappings of the older cells' libraries. Nothing is lost: a
/// page still needed (a stored closure, a drop) is read back from the file
/// on its next use. Writable mappings (relocated data) are never touched.
#[cfg(all(feature = "kernel", target_os = "linux"))]
fn release_past_cells_code() {
    /// `MADV_PAGEOUT` (Linux 5.4); older kernels answer EINVAL, which only
    /// means the pages stay.
    const MADV_PAGEOUT: libc::c_int = 21;
    /// The number in a cell library's name: evcxr writes `libcode_N.so`.
    fn cell_number(path: &str) -> Option<u64> {
        let name = path.rsplit('/').next()?;
        name.strip_prefix("libcode_")?.strip_suffix(".so")?.parse().ok()
    }
    let spawned = std::thread::Builder::new().name("cell-pages".into()).spawn(|| {
        let mut released = 0u64;
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { continue };
            let regions: Vec<(usize, usize, u64)> = maps
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let (range, perms) = (fields.next()?, fields.next()?);
                    let n = cell_number(fields.nth(3)?)?;
                    let (start, end) = range.split_once('-')?;
                    let start = usize::from_str_radix(start, 16).ok()?;
                    let end = usize::from_str_radix(end, 16).ok()?;
                    (!perms.contains('w')).then_some((start, end, n))
                })
                .collect();
            let Some(newest) = regions.iter().map(|r| r.2).max() else { continue };
            for &(start, end, n) in &regions {
                if n > released && n < newest {
                    // SAFETY: advice on whole pages of a read-only file mapping
                    // this process holds; the kernel re-reads them on access.
                    unsafe {
                        libc::madvise(start as *mut libc::c_void, end - start, MADV_PAGEOUT);
                    }
                }
            }
            released = released.max(newest - 1);
        }
    });
    drop(spawned);
}

#[cfg(all(feature = "kernel", not(target_os = "linux")))]
fn release_past_cells_code() {}

fn main() {
    #[cfg(feature = "kernel")]
    {
        if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
            // The cell runner: count SIGINTs instead of dying on them, so an
            // interrupt stops the running operation and keeps the variables.
            // SAFETY: installing an async-signal-safe handler before any thread starts.
            unsafe {
                libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
            }
            die_with_the_kernel();
            release_past_cells_code();
        }
        // Must come first: evcxr re-runs this executable as the cell runner
        // and as a rustc wrapper; in those roles this call never returns.
        evcxr::runtime_hook();
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Forward { model, ids, out, attn } => forward(&model, &ids, &out, &attn),
        Command::Generate {
            model,
            prompt,
            ids,
            n,
            seed,
            temperature,
            top_p,
            attn,
        } => {
            let sampling = if seed.is_some() || temperature.is_some() || top_p.is_some() {
                Sampling::TopP {
                    temperature: temperature.unwrap_or(1.0),
                    top_p: top_p.unwrap_or(1.0),
                    seed: seed.unwrap_or(0),
                }
            } else {
                Sampling::Greedy
            };
            generate(&model, prompt.as_deref(), ids.as_deref(), n, sampling, &attn)
        }
        Command::Info {
            model,
            cache_bytes_per_elem,
        } => info(&model, cache_bytes_per_elem),
        Command::Plan { model, device, dtype, memory, json, gpus } => {
            let device = match device.as_str() {
                "auto" => tch::Device::cuda_if_available(),
                d => deepscope::model::budget::parse_device_name(d).map_err(|e| anyhow::anyhow!("--device `{d}` {e}"))?,
            };
            let opts = memory.apply(LoadOptions::new(device, parse_dtype(&dtype)?))?;
            let mut popts = opts.plan_options();
            popts.gpus = gpus;
            let plan = plan_of(&model, &popts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
            } else {
                println!("{plan}");
            }
            Ok(())
        }
        Command::Import { engine, paths, config, out, token_layers, eplb, tokenizer } => {
            import(engine, &paths, &config, out.as_deref(), token_layers, eplb.as_deref(), tokenizer.as_deref())
        }
        Command::Synth { like, layers, out, dtype, seed, shard_size } => synth(&like, layers, &out, dtype.as_deref(), seed, &shard_size),
        Command::BenchStream { model, threads, prompt_len, decode, seed } => bench_stream(&model, threads, prompt_len, decode, seed),
        #[cfg(feature = "kernel")]
        Command::Kernel { connection_file, prebuild } => {
            if prebuild {
                deepscope::kernel::prebuild()?;
            } else if let Some(connection_file) = connection_file {
                deepscope::kernel::run_kernel(deepscope::kernel::KernelOptions { connection_file })?;
            }
            Ok(())
        }
        #[cfg(feature = "kernel")]
        Command::Install { user: _, sys_prefix, prefix } => {
            use deepscope::kernel::install::{install, InstallTarget};
            let target = match (sys_prefix, prefix) {
                (true, _) => InstallTarget::SysPrefix,
                (false, Some(dir)) => InstallTarget::Prefix(dir),
                (false, None) => InstallTarget::User,
            };
            let dir = install(&target)?;
            println!("installed kernelspec `deepscope` in {}", dir.display());
            Ok(())
        }
        Command::Eval { model, seq_len, device } => {
            let report = deepscope::train::evaluate_model(&model, seq_len, parse_device(&device)?, &Default::default())?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Train {
            out,
            steps,
            batch_size,
            seq_len,
            lr,
            warmup,
            bias_update_rate,
            seq_balance_alpha,
            vocab_size,
            seed,
            eval_every,
            checkpoint_every,
            threads,
            device,
            resume,
        } => {
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let settings = deepscope::train::trainer::TrainSettings {
                steps,
                batch_size,
                seq_len,
                lr,
                min_lr: lr / 10.0,
                warmup_steps: warmup,
                bias_update_rate,
                seq_balance_alpha,
                seed,
                checkpoint_every,
                ..Default::default()
            };
            let job = deepscope::train::TrainJob {
                out,
                settings,
                vocab_size,
                init_std: 0.02,
                eval_every,
                eval_docs_per_domain: 8,
                device: parse_device(&device)?,
                resume,
                sources: Default::default(),
                command: std::iter::once("deepscope".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" "),
            };
            deepscope::train::run(&job)?;
            Ok(())
        }
        Command::Bench {
            model,
            threads,
            batch,
            seq,
            new,
            prompt_len,
            repeats,
            attn,
            profile,
        } => bench(&model, threads, batch, seq, new, prompt_len, repeats, &attn, profile),
    }
}

/// `"1,5,9"` -> `[1, 5, 9]`, naming the offending item on error.
fn parse_ids(s: &str) -> Result<Vec<i64>> {
    let ids = s
        .split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<i64>().with_context(|| format!("`{x}` in --ids `{s}` is not a token id")))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids `{s}` holds no token ids");
    }
    Ok(ids)
}

fn forward(args: &ModelArgs, ids: &[String], out: &PathBuf, attn: &str) -> Result<()> {
    let attn: AttnImpl = attn.parse()?;
    let seqs = ids.iter().map(|s| parse_ids(s)).collect::<Result<Vec<_>>>()?;
    let t = seqs[0].len();
    if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.len() != t) {
        bail!(
            "sequences must have equal lengths: sequence 0 has {t} ids, sequence {i} has {}",
            s.len()
        );
    }
    let model = args.load()?;
    let flat: Vec<i64> = seqs.concat();
    let input = Tensor::from_slice(&flat).view([seqs.len() as i64, t as i64]);
    let fwd = model.forward_with(
        &input,
        None,
        ForwardOptions {
            attn,
            ..Default::default()
        },
    )?;
    let mut tensors: Vec<(String, Tensor)> = vec![("logits".into(), fwd.logits.to_kind(Kind::Float).to_device(tch::Device::Cpu))];
    for (layer, r) in fwd.routing.iter().enumerate() {
        if let Some(r) = r {
            // ascending expert ids per token, weights in the same order
            let (sorted, order) = r.topk_indices.sort(-1, false);
            let weights = r.topk_weights.gather(1, &order, false);
            tensors.push((format!("layers.{layer}.topk_indices"), sorted.to_device(tch::Device::Cpu)));
            tensors.push((format!("layers.{layer}.topk_weights"), weights.to_device(tch::Device::Cpu)));
        }
    }
    Tensor::write_safetensors(&tensors, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn generate(
    args: &ModelArgs,
    prompt: Option<&str>,
    ids: Option<&str>,
    n: usize,
    sampling: Sampling,
    attn: &str,
) -> Result<()> {
    let attn: AttnImpl = attn.parse()?;
    let model = args.load()?;
    let prompt_ids = match (prompt, ids) {
        (Some(text), _) => model.encode(text)?,
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => bail!("give a --prompt (text) or --ids (token ids)"),
    };
    let mut opts = GenerateOptions::greedy(&model, n);
    opts.sampling = sampling;
    opts.attn = attn;
    let stdout = std::io::stdout();
    let tokenizer = model.tokenizer.as_ref();
    if let Some(text) = prompt {
        print!("{text}");
    }
    let mut stream = StreamDecoder::new();
    let mut failure = None;
    let start = Instant::now();
    let g = model.generate(&prompt_ids, &opts, |tok| {
        let mut out = stdout.lock();
        let piece = match tokenizer {
            Some(t) => match stream.push(t, tok) {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            },
            None => Some(format!("{tok} ")),
        };
        if let Some(p) = piece {
            let _ = write!(out, "{p}");
            let _ = out.flush();
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    let secs = start.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "[{} prompt + {} new tokens in {:.2} s ({:.1} tok/s), stopped by {}; compressed KV cache {} for {} positions]",
        g.prompt.len(),
        g.tokens.len(),
        secs,
        g.tokens.len() as f64 / secs.max(1e-9),
        g.stop,
        human_bytes(g.cache_bytes as u64),
        g.cache_len
    );
    Ok(())
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImportEngine {
    Sglang,
    RoutedExperts,
    Vllm,
}

fn import(
    engine: ImportEngine,
    paths: &[PathBuf],
    config: &str,
    out: Option<&std::path::Path>,
    token_layers: Vec<usize>,
    eplb: Option<&str>,
    tokenizer: Option<&std::path::Path>,
) -> Result<()> {
    use deepscope::inspect::import::{EplbOptions, ImportOptions};
    use deepscope::inspect::RoutingStats;
    let (cfg, _) = config_of(config).with_context(|| format!("--config {config}"))?;
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && (!matches!(engine, ImportEngine::Sglang) || f.extension().is_some_and(|x| x == "pt" || x == "json")))
                .collect();
            inside.sort();
            if inside.is_empty() {
                bail!("{} holds no record files", p.display());
            }
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    let tok = tokenizer.map(deepscope::model::tokenizer::Tokenizer::from_file).transpose()?;
    let opts = ImportOptions::default().token_layers(token_layers.clone());
    let t0 = Instant::now();
    let stats = match engine {
        ImportEngine::Sglang => RoutingStats::from_sglang(&files, &cfg, &opts)?,
        ImportEngine::RoutedExperts => RoutingStats::from_routed_experts(&files, &cfg, &opts)?,
        ImportEngine::Vllm => RoutingStats::from_vllm(&files, &cfg, &opts)?,
    };
    let took = t0.elapsed().as_secs_f64();
    print!("{stats}");
    println!("({} file(s) read in {took:.2} s)", files.len());
    if let Some(tok) = &tok {
        for &l in &token_layers {
            let Some(load) = stats.load.get(&l) else { bail!("--token-layers {l}: the record has no MoE layer {l}") };
            let mut busiest: Vec<usize> = (0..load.len()).collect();
            busiest.sort_by_key(|&e| std::cmp::Reverse(load[e]));
            println!("\nlayer {l}: what the busiest experts take most (token, count, share of its occurrences)");
            for &e in busiest.iter().take(5) {
                let top = stats.top_token_strings(l, e, 8, tok)?;
                let shown: Vec<String> = top.iter().map(|(t, c, sh)| format!("{t} {c} ({:.0}%)", 100.0 * sh)).collect();
                println!("  e{e:<4} {}", shown.join(", "));
            }
        }
    }
    if let Some(spec) = eplb {
        let n: Vec<usize> = spec
            .split(',')
            .map(|x| x.trim().parse::<usize>().with_context(|| format!("--eplb `{spec}`: `{x}` is not a number (GPUS[,NODES[,GROUPS[,REDUNDANT]]])")))
            .collect::<Result<_>>()?;
        if n.is_empty() || n.len() > 4 {
            bail!("--eplb `{spec}`: expected GPUS[,NODES[,GROUPS[,REDUNDANT]]]");
        }
        let o = EplbOptions::new(n[0]).nodes(n.get(1).copied().unwrap_or(1)).groups(n.get(2).copied().unwrap_or(cfg.n_group.max(1))).redundant(n.get(3).copied().unwrap_or(0));
        print!("\n{}", stats.eplb(o)?);
    }
    if let Some(out) = out {
        stats.save(out)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// A checkpoint directory or `published:NAME`.
enum ModelSource {
    Dir(PathBuf),
    Published(String),
}

fn model_source(s: &str) -> ModelSource {
    match s.strip_prefix("published:") {
        Some(name) => ModelSource::Published(name.to_string()),
        None => ModelSource::Dir(PathBuf::from(s)),
    }
}

/// The config of `s` and the dtype its non-FP8 weights are stored in
/// (`torch_dtype` of config.json; bf16 when absent).
fn config_of(s: &str) -> Result<(Config, Kind)> {
    match model_source(s) {
        ModelSource::Published(name) => Ok(deepscope::model::published::by_name(&name)?),
        ModelSource::Dir(dir) => {
            let cfg = Config::from_dir(&dir)?;
            let text = std::fs::read_to_string(dir.join("config.json"))?;
            let raw: serde_json::Value = serde_json::from_str(&text)?;
            let dtype = raw.get("torch_dtype").or_else(|| raw.get("dtype")).and_then(|v| v.as_str()).unwrap_or("bfloat16");
            Ok((cfg, parse_dtype(dtype).unwrap_or(Kind::BFloat16)))
        }
    }
}

/// The plan for `s`: from the weights' headers when the directory has
/// weights, else from its config (storage assumed as published).
fn plan_of(s: &str, opts: &deepscope::model::PlanOptions) -> Result<Plan> {
    if let ModelSource::Dir(dir) = model_source(s) {
        let has_weights = dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists();
        if has_weights {
            return Ok(Model::plan_with(&dir, opts)?);
        }
    }
    let (cfg, dtype) = config_of(s)?;
    Ok(Plan::for_config(&cfg, dtype, opts)?)
}

fn synth(like: &str, layers: Option<usize>, out: &PathBuf, dtype: Option<&str>, seed: u64, shard_size: &str) -> Result<()> {
    use deepscope::model::synth::{synth as write, SynthDtype, SynthOptions};
    let (cfg, _) = config_of(like)?;
    let dtype = match dtype {
        Some(d) => d.parse::<SynthDtype>()?,
        None if cfg.quantization.is_some() => SynthDtype::Fp8,
        None => SynthDtype::Bf16,
    };
    let shard_bytes = match shard_size.parse::<MemoryBudget>()? {
        MemoryBudget::Bytes(b) => b,
        _ => bail!("--shard-size needs a size such as 4GiB, got `{shard_size}`"),
    };
    let opts = SynthOptions { layers, dtype, seed, shard_bytes };
    let started = Instant::now();
    let report = write(&cfg, out, &opts, |path, done, total| {
        eprintln!("wrote {} ({} of {})", path.display(), human_bytes(done), human_bytes(total));
    })?;
    eprintln!(
        "{}: {} tensors in {} shard(s), {} in {:.0} s ({} layers, {:?})",
        report.dir.display(),
        report.tensors,
        report.shards.len(),
        human_bytes(report.bytes),
        started.elapsed().as_secs_f64(),
        report.config.num_hidden_layers,
        dtype
    );
    Ok(())
}

fn info(model: &str, bytes_per_elem: usize) -> Result<()> {
    let (cfg, _) = config_of(model)?;
    let p = ParamCounts::of(&cfg);
    let c = CacheFootprint::of(&cfg, bytes_per_elem);
    let moe = cfg.moe_layers();
    println!("model        {model} ({:?} family)", cfg.family);
    println!(
        "layers       {} ({} dense, {} MoE), hidden {}, vocab {}",
        cfg.num_hidden_layers,
        cfg.num_hidden_layers - moe.len(),
        moe.len(),
        cfg.hidden_size,
        cfg.vocab_size
    );
    println!(
        "attention    MLA, {} heads, q_lora_rank {}, kv_lora_rank {}, qk_nope {}, qk_rope {}, v {}, rope {:?}{}",
        cfg.num_attention_heads,
        cfg.q_lora_rank.map_or("none".into(), |r| r.to_string()),
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.rope_scaling,
        if cfg.rope_interleave { ", interleaved" } else { "" }
    );
    println!(
        "moe          {} routed + {} shared experts, top-{}, {} groups / top {}, router {:?} {:?}, norm_topk_prob {}, scale {}",
        cfg.n_routed_experts,
        cfg.n_shared_experts,
        cfg.num_experts_per_tok,
        cfg.n_group,
        cfg.topk_group,
        cfg.scoring_func,
        cfg.topk_method,
        cfg.norm_topk_prob,
        cfg.routed_scaling_factor
    );
    println!(
        "parameters   total {} ({}), active per token {} ({})",
        p.total,
        deepscope::stats::human_count(p.total),
        p.active_per_token,
        deepscope::stats::human_count(p.active_per_token)
    );
    let (a, n, m) = c.bytes_per_token();
    println!("kv cache     per token, all {} layers, {} bytes/element:", cfg.num_hidden_layers, bytes_per_elem);
    println!("  mla absorbed  {:>12} B  ({} elements/layer)", a, c.absorbed_elems);
    println!("  naive         {:>12} B  ({} elements/layer, {:.1}x)", n, c.naive_elems, c.naive_ratio());
    println!("  plain mha     {:>12} B  ({} elements/layer, {:.1}x)", m, c.mha_elems, c.mha_ratio());
    let opts = LoadOptions::new(tch::Device::cuda_if_available(), Kind::BFloat16);
    match plan_of(model, &opts.plan_options()) {
        Ok(plan) => println!("\n{plan}"),
        Err(e) => println!("\nplan (bf16 compute, automatic budget): {e}"),
    }
    Ok(())
}

/// Resident set size now and at its peak, from /proc/self/status (bytes).
fn rss() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

#[allow(clippy::too_many_arguments)]
fn bench(
    args: &ModelArgs,
    threads: i32,
    batch: i64,
    seq: i64,
    new: usize,
    prompt_len: i64,
    repeats: usize,
    attn: &str,
    profile: bool,
) -> Result<()> {
    let attn: AttnImpl = attn.parse()?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    // resolve the device (which may initialise CUDA) and touch libtorch first,
    // so their own start-up memory is not counted as load
    let opts = args.options()?;
    // (a 1M-element op also starts the intra-op thread pool)
    let _ = Tensor::ones([1 << 20], (Kind::Float, opts.device)).sum(Kind::Float).double_value(&[]);
    let (before, _) = rss();
    // reset the peak (VmHWM) to the current RSS, so the peak below is the load's
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let model = args.load_with(opts)?;
    let (_, peak) = rss();
    let weight_bytes = model.weight_bytes();
    let _guard = tch::no_grad_guard();
    let vocab = model.config.vocab_size as i64;
    tch::manual_seed(0);
    let ids = Tensor::randint(vocab, [batch, seq], (Kind::Int64, tch::Device::Cpu));
    let fwd = ForwardOptions {
        attn,
        ..Default::default()
    };
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let s = Instant::now();
        f()?;
        Ok(s.elapsed().as_secs_f64())
    };
    let mut prefill = || -> Result<()> {
        let out = model.forward_with(&ids, None, fwd)?;
        let _ = out.logits.double_value(&[0, 0, 0]);
        Ok(())
    };
    time(&mut prefill)?; // warm-up
    let prefill_s = median((0..repeats).map(|_| time(&mut prefill)).collect::<Result<Vec<_>>>()?);

    // corpus routing statistics over the same tokens: each row a document,
    // windows of 256 (Model::routing_stats without the tokenizer)
    let docs = Vec::<Vec<i64>>::try_from(&ids)?;
    let mut corpus = || -> Result<()> {
        let mut stats = deepscope::inspect::RoutingStats::default();
        model.routing_stats_of_ids(&docs, docs.len() as u64, &mut stats, deepscope::inspect::CorpusRun::default())?;
        Ok(())
    };
    let routing_stats_s = if model.layers.iter().any(|l| l.moe().is_some()) {
        time(&mut corpus)?;
        Some(median((0..repeats).map(|_| time(&mut corpus)).collect::<Result<Vec<_>>>()?))
    } else {
        None
    };

    let prompt = ids.narrow(0, 0, 1).narrow(1, 0, prompt_len);
    let mut decode_times = Vec::new();
    for rep in 0..=repeats {
        let mut cache = model.new_cache();
        let out = model.forward_with(&prompt, Some(&mut cache), fwd)?;
        let mut next = out.logits.select(1, -1).argmax(-1, true); // [1, 1]
        let start = Instant::now();
        for _ in 0..new {
            let out = model.forward_with(&next, Some(&mut cache), fwd)?;
            next = out.logits.select(1, -1).argmax(-1, true);
        }
        let _ = next.int64_value(&[0, 0]);
        if rep > 0 {
            decode_times.push(start.elapsed().as_secs_f64());
        }
    }
    let decode_s = median(decode_times);

    // capture overhead: one 1 x seq sequence, plain forward vs traced
    let one = ids.narrow(0, 0, 1);
    let none = deepscope::inspect::Interventions::new();
    let mut plain = || -> Result<()> {
        model.forward_with(&one, None, fwd)?;
        Ok(())
    };
    let traced = |capture: &deepscope::inspect::Capture| -> Result<()> {
        model.trace_with(&one, capture, &none)?;
        Ok(())
    };
    let default_capture = deepscope::inspect::Capture::default();
    let routing_capture = deepscope::inspect::Capture::routing_only();
    time(&mut plain)?;
    time(&mut || traced(&default_capture))?;
    let reps = repeats.max(5);
    // interleave the runs so drift in machine load hits all three alike
    let (mut tp, mut td, mut tr) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        tp.push(time(&mut plain)?);
        td.push(time(&mut || traced(&default_capture))?);
        tr.push(time(&mut || traced(&routing_capture))?);
    }
    let (tp, td, tr) = (median(tp), median(td), median(tr));
    let profile_ms = if profile { Some(profile_prefill(&model, &ids, repeats)?) } else { None };
    println!(
        "{}",
        serde_json::json!({
            "profile_ms": profile_ms,
            "load_rss_delta_bytes": peak.saturating_sub(before),
            "weight_bytes": weight_bytes,
            "prefill_tokens_per_s": (batch * seq) as f64 / prefill_s,
            "routing_stats_tokens_per_s": routing_stats_s.map(|s| (batch * seq) as f64 / s),
            "decode_tokens_per_s": new as f64 / decode_s,
            "attn": format!("{attn:?}").to_lowercase(),
            "threads": tch::get_num_threads(),
            "capture_seq": seq,
            "plain_forward_ms": tp * 1e3,
            "trace_default_ms": td * 1e3,
            "trace_routing_only_ms": tr * 1e3,
        })
    );
    Ok(())
}

/// Where a prefill's time goes, block by block: an identity hook at the
/// block boundaries stamps the time as the pass reaches each one (CPU ops
/// are synchronous, so a stamp marks the end of the ops before it), and the
/// gaps are summed by kind over the layers. The pass with the median total
/// of `repeats`, in ms.
fn profile_prefill(model: &Model, ids: &Tensor, repeats: usize) -> Result<serde_json::Value> {
    use deepscope::inspect::{Capture, Interventions, Points};
    use deepscope::model::HookPoint as H;
    use std::sync::{Arc, Mutex};
    let marks: Arc<Mutex<Vec<(H, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let log = marks.clone();
    let wanted = |p: H| matches!(p, H::Embed | H::AttnIn(_) | H::AttnOut(_) | H::MlpIn(_) | H::TopkWeights(_) | H::MlpOut(_));
    let iv = Interventions::new().hook(Points::matching(wanted), move |ctx, x| {
        if let Ok(mut m) = log.lock() {
            m.push((ctx.point, Instant::now()));
        }
        Ok(x)
    });
    const KINDS: [&str; 7] = ["embedding", "attention", "norms and residuals", "dense MLP", "router", "routed + shared experts", "final norm + LM head"];
    let mut runs: Vec<[f64; 8]> = Vec::new();
    for rep in 0..=repeats {
        marks.lock().map_err(|_| anyhow::anyhow!("profile marks poisoned"))?.clear();
        let start = Instant::now();
        let t = model.trace_with(ids, &Capture::none(), &iv)?;
        let _ = t.logits.double_value(&[0, 0, 0]);
        let end = Instant::now();
        let m = marks.lock().map_err(|_| anyhow::anyhow!("profile marks poisoned"))?.clone();
        let mut acc = [0.0f64; 8];
        let mut prev = (None::<H>, start);
        for &(p, at) in &m {
            let gap = at.duration_since(prev.1).as_secs_f64() * 1e3;
            let kind = match (prev.0, p) {
                (None, H::Embed) => 0,
                (Some(H::AttnIn(_)), H::AttnOut(_)) => 1,
                (Some(H::MlpIn(_)), H::MlpOut(_)) => 3,
                (Some(H::MlpIn(_)), H::TopkWeights(_)) => 4,
                (Some(H::TopkWeights(_)), H::MlpOut(_)) => 5,
                _ => 2, // norm before attention or MLP, residual adds
            };
            acc[kind] += gap;
            prev = (Some(p), at);
        }
        acc[6] += end.duration_since(prev.1).as_secs_f64() * 1e3;
        acc[7] = end.duration_since(start).as_secs_f64() * 1e3;
        if rep > 0 {
            runs.push(acc);
        }
    }
    // the run with the median total, whole: medians taken block by block
    // need not add up to a run
    runs.sort_by(|a, b| a[7].total_cmp(&b[7]));
    let run = runs.get(runs.len() / 2).copied().unwrap_or([0.0; 8]);
    let mut out = serde_json::Map::new();
    for (i, k) in KINDS.iter().enumerate() {
        out.insert(k.to_string(), serde_json::json!(run[i]));
    }
    out.insert("total".into(), serde_json::json!(run[7]));
    Ok(serde_json::Value::Object(out))
}

/// `deepscope bench-stream`: load under the budget, then a prefill and greedy
/// decode steps, with the weight traffic of each and the peak RSS.
fn bench_stream(args: &ModelArgs, threads: i32, prompt_len: i64, decode: usize, seed: i64) -> Result<()> {
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let opts = args.options()?;
    let _ = Tensor::ones([1 << 20], (Kind::Float, opts.device)).sum(Kind::Float).double_value(&[]);
    let (baseline, _) = rss();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let model = args.load_with(opts.clone())?;
    let load_s = started.elapsed().as_secs_f64();
    let (after_load, load_peak) = rss();
    let _guard = tch::no_grad_guard();
    tch::manual_seed(seed);
    let vocab = model.config.vocab_size as i64;
    let prompt = Tensor::randint(vocab, [1, prompt_len], (Kind::Int64, tch::Device::Cpu));
    let mut cache = model.new_cache();
    let out = model.forward_with(&prompt, Some(&mut cache), ForwardOptions::default())?;
    let prefill = out.cost;
    let mut next = out.logits.select(1, -1).argmax(-1, true);
    let mut steps = Vec::new();
    for _ in 0..decode {
        let out = model.forward_with(&next, Some(&mut cache), ForwardOptions::default())?;
        next = out.logits.select(1, -1).argmax(-1, true);
        steps.push(out.cost);
    }
    let (_, peak) = rss();
    let sum = |f: &dyn Fn(&deepscope::model::ForwardCost) -> f64| steps.iter().map(f).sum::<f64>();
    let decode_s = sum(&|c| c.seconds);
    let plan = &model.plan;
    println!(
        "{}",
        serde_json::json!({
            "model": args.model.display().to_string(),
            "memory_budget": opts.memory_budget.to_string(),
            "budget_bytes": plan.devices.first().and_then(|d| d.budget),
            "streaming": plan.streaming(),
            "stored_bytes": plan.stored_bytes(),
            "planned_resident_bytes": plan.resident_bytes(),
            "cache_capacity_bytes": plan.devices.first().map_or(0, |d| d.cache_capacity),
            "threads": tch::get_num_threads(),
            "load_seconds": load_s,
            "baseline_rss_bytes": baseline,
            "rss_after_load_bytes": after_load,
            "peak_rss_load_bytes": load_peak,
            "peak_rss_bytes": peak,
            "prefill_tokens": prompt_len,
            "prefill_seconds": prefill.seconds,
            "prefill_tokens_per_s": prompt_len as f64 / prefill.seconds.max(1e-9),
            "prefill_disk_bytes": prefill.traffic.disk_bytes,
            "prefill_load_seconds": prefill.traffic.load_seconds,
            "prefill_expert_hits": prefill.traffic.expert_hits,
            "prefill_expert_misses": prefill.traffic.expert_misses,
            "decode_steps": decode,
            "decode_seconds": decode_s,
            "decode_tokens_per_s": decode as f64 / decode_s.max(1e-9),
            "decode_disk_bytes": sum(&|c| c.traffic.disk_bytes as f64),
            "decode_load_seconds": sum(&|c| c.traffic.load_seconds),
            "decode_expert_hits": sum(&|c| c.traffic.expert_hits as f64),
            "decode_expert_misses": sum(&|c| c.traffic.expert_misses as f64),
            "decode_expert_evictions": sum(&|c| c.traffic.expert_evictions as f64),
            "weight_bytes_after": model.weight_bytes(),
        })
    );
    Ok(())
}
