use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferrite::plugins::{Registry, search_dirs};
use ferrite::settings::Settings;

mod caption;
mod convert;
mod import;
mod label;
mod lora;
mod loss_report;
mod mask;
mod model_args;
mod video;

/// Ferrite trains image diffusion models (full fine-tune, LoRA-family adapters, embeddings).
#[derive(Parser)]
#[command(name = "ferrite", version, about)]
struct Cli {
    /// Settings file (default: $XDG_CONFIG_HOME/ferrite/settings.toml).
    #[arg(long, global = true)]
    settings: Option<PathBuf>,
    /// Never download: a Hugging Face repo id must be in the local cache (also HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// List, enable or disable plugins.
    Plugins {
        #[command(subcommand)]
        action: PluginsAction,
    },
    /// Generate an image from a prompt.
    Sample(Box<SampleArgs>),
    /// Adapter files: what one holds, or the same adapters in another key layout.
    Lora {
        #[command(subcommand)]
        action: lora::LoraAction,
    },
    /// Train (LoRA-family adapter or fine-tune) from a TOML config.
    Train(TrainArgs),
    /// Each training image's loss under the config's model (or a LoRA on it) at fixed
    /// timesteps and noise, highest first, as CSV: where mislabelled or broken images show.
    LossReport(loss_report::LossReportArgs),
    /// A model as one single-file checkpoint or as a diffusers folder, in another dtype.
    Convert(convert::ConvertArgs),
    /// A OneTrainer config (JSON, with its concepts and samples) as a Ferrite config (TOML),
    /// listing every setting that has no Ferrite option.
    ImportOnetrainer(import::ImportArgs),
    /// Captions (`<name>.txt`) for a folder of images with a captioner plugin.
    Caption(Box<caption::CaptionArgs>),
    /// Masks (`<name>-masklabel.png`) for a folder of images with a masker plugin.
    Mask(Box<mask::MaskArgs>),
    /// Still frames or short clips from videos, for a dataset (runs the system's ffmpeg).
    Video {
        #[command(subcommand)]
        action: video::VideoAction,
    },
    /// Write a starter config (and an images folder) into DIR.
    Init { dir: PathBuf },
    /// Run data-parallel runs' coordinator on its own, until Ctrl-C (their rank 0 is then
    /// started with --external-coordinator).
    Coordinator {
        /// The port the processes' --coordinator names.
        #[arg(long)]
        port: u16,
    },
    /// Open the desktop app (also what `ferrite` with no command does).
    #[cfg(feature = "gui")]
    Gui {
        /// A config to open.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Capture every tab as a PNG into this folder, print frame times, and close.
        #[arg(long, value_name = "DIR")]
        screenshots: Option<PathBuf>,
        /// Start training the config right away.
        #[arg(long)]
        start: bool,
    },
    /// Train the built-in demo: a tiny model from scratch on generated coloured shapes.
    Demo {
        /// Where the model, data, samples and output go.
        #[arg(long, default_value = "ferrite-demo")]
        dir: PathBuf,
        /// Overrides of presets/demo.toml, e.g. `--set epochs=10`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Checks every op and its gradients on a device against the CPU backend (the device
    /// harness runs it on GPU machines); fails when one differs.
    Selftest {
        /// Compute device: cuda, cuda:N (cpu checks the suite itself).
        #[arg(long, default_value = "cuda")]
        device: String,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(clap::Args)]
struct SampleArgs {
    #[command(flatten)]
    model: model_args::ModelArgs,
    /// Architecture plugin id.
    #[arg(long, default_value = "sd15")]
    arch: String,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Guidance: the classifier-free guidance scale (default 7.5), or for a guidance-distilled
    /// model (Flux.1-dev) its embedded guidance (default 3.5, as diffusers').
    #[arg(long)]
    cfg: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, value_enum, default_value = "euler")]
    sampler: SamplerArg,
    /// Adapter file to apply (kohya, diffusers/PEFT, comfy or LyCORIS naming), optionally with
    /// a strength: `FILE` or `FILE:0.8`. May be repeated.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    loras: Vec<String>,
    /// Textual-inversion embedding to use (A1111/ComfyUI, `string_to_param` or diffusers'
    /// `learned_embeds` file), used in the prompt as `<NAME>` or the word `NAME` (NAME: the
    /// file's stem unless given). May be repeated; a LoRA's bundled embeddings are used too.
    #[arg(long = "embedding", value_name = "FILE[:NAME]")]
    embeddings: Vec<String>,
    /// Initial latent noise from a safetensors file (tensor `noise`), to reproduce a result exactly.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    #[arg(long, default_value = "sample.png")]
    out: PathBuf,
    /// CLIP skip: text states from this many layers before the last (1: the penultimate, as
    /// anime models expect; OneTrainer's text_encoder_layer_skip).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// What the model predicts, when its scheduler config says otherwise or a single file cannot
    /// say (an SD 2.x 512 base file reads as v-prediction, as SD 2.1 768-v).
    #[arg(long, value_enum)]
    prediction_type: Option<PredictionArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PredictionArg {
    Epsilon,
    VPrediction,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The training config (TOML, OneTrainer's option names).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A preset over the config: a name from presets/ or a file.
    #[arg(long)]
    preset: Option<String>,
    /// Overrides, e.g. `--set learning_rate=1e-4 --set unet.train=false`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// The folder relative paths start from [default: the config's] (multi_gpu's processes
    /// get the first one's).
    #[arg(long, hide = true)]
    base: Option<PathBuf>,
    /// Data-parallel: the number of processes (one per GPU or machine) training together; each
    /// takes `batch_size` rows of every batch.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Data-parallel: this process's rank, 0 to nodes − 1 (rank 0 runs the coordinator and
    /// writes samples, backups and the output).
    #[arg(long, default_value_t = 0)]
    node_rank: u32,
    /// Data-parallel: where the processes meet, HOST:PORT (rank 0's machine).
    #[arg(long, value_name = "HOST:PORT")]
    coordinator: Option<String>,
    /// Data-parallel: this machine's address as the others reach it [default: the
    /// coordinator's host when it is this machine's loopback].
    #[arg(long)]
    node_host: Option<String>,
    /// Data-parallel: the port this process's data service listens on [default: the
    /// coordinator's port + 1 + rank].
    #[arg(long)]
    data_port: Option<u16>,
    /// Data-parallel: rank 0 does not start the coordinator (`ferrite coordinator --port P`
    /// runs it, on --coordinator's host).
    #[arg(long)]
    external_coordinator: bool,
    /// Data-parallel (and multi_gpu): seconds to wait for every process to join [default: 300].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    join_timeout: Option<u64>,
    /// Data-parallel (and multi_gpu): seconds to wait for the others at a step before calling
    /// them gone (rank 0 samples and writes backups between steps while the others wait)
    /// [default: 1800].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    peer_timeout: Option<u64>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SamplerArg {
    Ddim,
    Euler,
    EulerA,
    DpmppKarras,
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Every component of every plugin found: id, kind, version, path, enabled.
    List,
    /// Enable the library offering a component (by the component's id).
    Enable { id: String },
    /// Disable the library offering a component: it is no longer loaded at all.
    Disable { id: String },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Per-op overhead through the plugin ABI against calling burn directly.
    Ops {
        /// Compute device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Training steps of one configuration (LoRA rank 16 on `attn-mlp`, or a fine-tune; AdamW)
    /// after a warm-up step: prints one JSON line with the median step time, the peak memory
    /// and the trained parameter count.
    Step(Box<StepArgs>),
    /// The caching pass over `--images` generated images (read, augmented, VAE-encoded in
    /// batches of `--batch`, written) against the bare VAE encode of as many in the same
    /// process: prints one JSON line with both throughputs (images/s) and their ratio.
    Cache {
        #[command(flatten)]
        step: Box<StepArgs>,
        #[arg(long, default_value_t = 8)]
        images: usize,
    },
}

#[derive(clap::Args)]
struct StepArgs {
    /// Model: a diffusers folder or a single-file checkpoint.
    #[arg(
        long,
        required_unless_present = "model_config",
        conflicts_with = "model_config"
    )]
    model: Option<PathBuf>,
    /// A diffusers folder holding only config files (model_index.json, each part's
    /// config.json, the tokenizers, the scheduler's): the model is built with random weights.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Architecture plugin id.
    #[arg(long, default_value = "sd15")]
    arch: String,
    /// lora or fine_tune.
    #[arg(long, default_value = "lora")]
    method: String,
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// float32, float16 or bfloat16.
    #[arg(long, default_value = "float32")]
    train_dtype: String,
    /// The denoiser's frozen weights: float32, float16, bfloat16, float8 or nfloat4 (LoRA only).
    #[arg(long, default_value = "float32")]
    weight_dtype: String,
    /// on or off.
    #[arg(long, default_value = "on")]
    checkpointing: String,
    /// Timed steps (after the warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: u64,
    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Further config overrides, e.g. `--set lora_rank=32`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

fn main() -> Result<()> {
    // Tests make debug builds pause at named points (FAILPOINTS), e.g. mid-way through a backup.
    #[cfg(debug_assertions)]
    let _failpoints = fail::FailScenario::setup();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRITE_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Backend panics inside ops are caught and reported as errors; this only keeps their raw
    // backtraces off the terminal (the panic text still goes to the log).
    std::panic::set_hook(Box::new(|info| tracing::error!("{info}")));
    let cli = Cli::parse();
    let settings_path = match cli.settings {
        Some(p) => p,
        None => Settings::default_path()?,
    };
    // A settings file that does not read is reported by the command that needs it.
    ferrite::hub::configure(ferrite::hub::Access {
        offline: cli.offline,
        token: Settings::load(&settings_path)
            .ok()
            .and_then(|s| s.huggingface_token),
    });
    match cli.command {
        #[cfg(feature = "gui")]
        None => gui(&settings_path, None, None, false)?,
        #[cfg(not(feature = "gui"))]
        None => anyhow::bail!(
            "this ferrite was built without the desktop app (headless): give a command, see `ferrite --help`"
        ),
        Some(Command::Coordinator { port }) => {
            println!("coordinating data-parallel runs on port {port} (Ctrl-C to stop)");
            ferrite::runtime::collective::run_coordinator(port).map_err(anyhow::Error::msg)?;
        }
        #[cfg(feature = "gui")]
        Some(Command::Gui {
            config,
            screenshots,
            start,
        }) => gui(&settings_path, config, screenshots, start)?,
        Some(Command::Plugins { action }) => {
            let mut settings = Settings::load(&settings_path)?;
            match action {
                PluginsAction::List => list_plugins(&settings),
                PluginsAction::Enable { id } | PluginsAction::Disable { id } if id.is_empty() => {
                    anyhow::bail!("give a component id (see `ferrite plugins list`)")
                }
                PluginsAction::Enable { ref id } | PluginsAction::Disable { ref id } => {
                    let on = matches!(action, PluginsAction::Enable { .. });
                    let registry = Registry::discover(&search_dirs(&settings), &settings);
                    let said =
                        ferrite::plugins::set_enabled(registry.components(), &mut settings, id, on)
                            .map_err(anyhow::Error::msg)?;
                    settings.save(&settings_path).context("saving settings")?;
                    println!("{said}");
                }
            }
        }
        Some(Command::Sample(args)) => sample(&Settings::load(&settings_path)?, *args)?,
        Some(Command::Train(args)) => train(&Settings::load(&settings_path)?, args)?,
        Some(Command::LossReport(args)) => {
            loss_report::run(&Settings::load(&settings_path)?, args)?
        }
        Some(Command::Lora { action }) => lora::run(&Settings::load(&settings_path)?, action)?,
        Some(Command::Video { action }) => video::run(action)?,
        Some(Command::Mask(args)) => mask::run(&Settings::load(&settings_path)?, *args)?,
        Some(Command::Caption(args)) => caption::run(&Settings::load(&settings_path)?, *args)?,
        Some(Command::ImportOnetrainer(args)) => import::run(args)?,
        Some(Command::Convert(args)) => convert::run(&Settings::load(&settings_path)?, args)?,
        Some(Command::Init { dir }) => init(&dir)?,
        Some(Command::Demo { dir, sets }) => demo(&Settings::load(&settings_path)?, &dir, &sets)?,
        Some(Command::Selftest { device }) => selftest(&device)?,
        Some(Command::Bench {
            what: BenchWhat::Ops { device },
        }) => ferrite::bench::ops(&device)?,
        Some(Command::Bench {
            what: BenchWhat::Step(args),
        }) => bench_step(&Settings::load(&settings_path)?, *args, None)?,
        Some(Command::Bench {
            what: BenchWhat::Cache { step, images },
        }) => bench_step(&Settings::load(&settings_path)?, *step, Some(images))?,
    }
    Ok(())
}

#[cfg(feature = "gui")]
fn gui(
    settings_path: &std::path::Path,
    config: Option<PathBuf>,
    screenshots: Option<PathBuf>,
    start: bool,
) -> Result<()> {
    let settings = Settings::load(settings_path)?;
    let options = ferrite::gui::AppOptions {
        plugin_dirs: search_dirs(&settings),
        settings_path: Some(settings_path.to_path_buf()),
        config,
        ferrite_bin: None,
    };
    ferrite::gui::run(options, screenshots, start).map_err(|e| {
        anyhow::anyhow!(
            "the window could not open: {e}
(no display? the command-line tools work without              one: `ferrite --help`)"
        )
    })
}

fn selftest(device: &str) -> Result<()> {
    println!(
        "selftest on {device} against cpu: output and gradients, largest relative error, time on {device}"
    );
    let checks = ferrite::runtime::selftest::run(device, |c| {
        let verdict = if c.passed() { "ok" } else { "FAILED" };
        println!(
            "{:<40} {:>10.2e} (≤ {:.0e}) {verdict:<6} {:>8.3} s",
            c.name,
            c.error,
            c.tolerance,
            c.elapsed.as_secs_f64()
        );
    })?;
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed on {device}", checks.len());
    }
    println!("all {} checks passed", checks.len());
    Ok(())
}

/// `bench step`, or `bench cache` over `cache_images` images.
fn bench_step(settings: &Settings, a: StepArgs, cache_images: Option<usize>) -> Result<()> {
    let mut sets = vec![
        format!("train_dtype={}", a.train_dtype),
        format!("gradient_checkpointing={}", a.checkpointing),
        // The denoiser's table, whichever the family has.
        format!("unet.weight_dtype={}", a.weight_dtype),
        format!("transformer.weight_dtype={}", a.weight_dtype),
    ];
    sets.extend(a.sets);
    let Some(model) = a.model.clone().or(a.model_config.clone()) else {
        anyhow::bail!("bench step needs --model or --model-config");
    };
    let bench = ferrite::train::bench::StepBench {
        model_type: a.arch,
        model: std::path::absolute(&model)?,
        random_weights: a.model_config.is_some(),
        method: a.method,
        resolution: a.resolution,
        batch: a.batch,
        steps: a.steps,
        device: a.device,
        sets,
    };
    let registry = Registry::discover(&search_dirs(settings), settings);
    let work = std::env::temp_dir();
    let line = match cache_images {
        Some(n) => {
            serde_json::to_string(&ferrite::train::bench::cache(&bench, n, &work, registry)?)
        }
        None => serde_json::to_string(&ferrite::train::bench::step(&bench, &work, registry)?),
    };
    println!("{}", line?);
    Ok(())
}

fn train(settings: &Settings, a: TrainArgs) -> Result<()> {
    use ferrite::config::TrainConfig;
    let config = TrainConfig::load(a.config.as_deref(), a.preset.as_deref(), &a.sets)?;
    let base = a.base.clone().unwrap_or_else(|| {
        a.config
            .as_deref()
            .and_then(|p| p.parent())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let (join, peer) = ferrite::train::multi_gpu::TIMEOUTS;
    let secs = std::time::Duration::from_secs;
    let timeouts = (
        a.join_timeout.map_or(join, secs),
        a.peer_timeout.map_or(peer, secs),
    );
    let parallel = data_parallel(&a, config.multi_gpu, timeouts)?;
    run_training(settings, config, &base, parallel, timeouts)
}

/// The data-parallel flags as the trainer takes them (none with `--nodes 1`; multi_gpu takes
/// the timeouts only).
fn data_parallel(
    a: &TrainArgs,
    multi_gpu: bool,
    timeouts: (std::time::Duration, std::time::Duration),
) -> Result<Option<ferrite::train::trainer::DataParallel>> {
    if a.nodes <= 1 {
        let given = [
            (a.coordinator.is_some(), "--coordinator"),
            (a.node_rank > 0, "--node-rank"),
            (a.node_host.is_some(), "--node-host"),
            (a.data_port.is_some(), "--data-port"),
            (a.external_coordinator, "--external-coordinator"),
            (a.join_timeout.is_some() && !multi_gpu, "--join-timeout"),
            (a.peer_timeout.is_some() && !multi_gpu, "--peer-timeout"),
        ];
        if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
            anyhow::bail!("{flag} is for a run of --nodes 2 or more");
        }
        return Ok(None);
    }
    if a.node_rank >= a.nodes {
        anyhow::bail!(
            "--node-rank {} of --nodes {}: ranks go from 0 to {}",
            a.node_rank,
            a.nodes,
            a.nodes - 1
        );
    }
    let Some(coordinator) = a.coordinator.clone() else {
        anyhow::bail!(
            "--nodes {} needs --coordinator HOST:PORT (rank 0's machine)",
            a.nodes
        );
    };
    let Some((host, port)) = coordinator
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
    else {
        anyhow::bail!("--coordinator {coordinator}: not HOST:PORT");
    };
    let node_host = match &a.node_host {
        Some(h) => h.clone(),
        None if matches!(host, "127.0.0.1" | "localhost" | "::1") => host.to_string(),
        None => anyhow::bail!(
            "--coordinator {coordinator} is another machine: give --node-host, this machine's \
             address as the others reach it"
        ),
    };
    let data_port = match a.data_port {
        Some(p) => p,
        None => u16::try_from(u32::from(port) + 1 + a.node_rank)
            .context("--coordinator's port is too high for the default --data-port: give one")?,
    };
    Ok(Some(ferrite::train::trainer::DataParallel {
        nodes: a.nodes,
        rank: a.node_rank,
        coordinator,
        host: node_host,
        data_port,
        start_coordinator: !a.external_coordinator,
        join_timeout: timeouts.0,
        peer_timeout: timeouts.1,
    }))
}

fn demo(settings: &Settings, dir: &std::path::Path, sets: &[String]) -> Result<()> {
    use ferrite::{config, train::demo};
    let presets = config::presets_dir();
    if !dir.join("model/model_index.json").exists() {
        demo::build_model(&presets.join("demo-model"), &dir.join("model"), 0)?;
    }
    if !dir.join("data").exists() {
        demo::build_dataset(&dir.join("data"), 16, 4, 0)?;
    }
    let preset = presets.join("demo.toml");
    let config = config::TrainConfig::load(None, Some(&preset.to_string_lossy()), sets)?;
    println!(
        "demo in {}: samples go to {}",
        dir.display(),
        dir.join("workspace/samples").display()
    );
    run_training(
        settings,
        config,
        dir,
        None,
        ferrite::train::multi_gpu::TIMEOUTS,
    )
}

fn run_training(
    settings: &Settings,
    mut config: ferrite::config::TrainConfig,
    base: &std::path::Path,
    mut parallel: Option<ferrite::train::trainer::DataParallel>,
    timeouts: (std::time::Duration, std::time::Duration),
) -> Result<()> {
    use ferrite::train::trainer::{Controls, Event, Trainer};
    // multi_gpu: this process is rank 0 of processes it starts, one per device.
    let mut local_peers = None;
    if config.multi_gpu {
        if parallel.is_some() {
            anyhow::bail!(
                "multi_gpu starts this machine's processes itself: without --nodes, or set \
                 multi_gpu = false and start one process per device with --nodes"
            );
        }
        config.validate()?;
        let exe = std::env::current_exe().context("finding the ferrite binary")?;
        let launched = ferrite::train::multi_gpu::launch(&config, base, &exe, timeouts)?;
        println!(
            "multi_gpu: {} processes on devices {}; ranks 1 and up write their output to {}",
            launched.parallel.nodes,
            config.device_indexes,
            base.join(&config.workspace_dir).join("multi-gpu").display()
        );
        config = launched.config;
        parallel = Some(launched.parallel);
        local_peers = Some(launched.peers);
    }
    let controls = std::sync::Arc::new(Controls::default());
    let cancel = controls.cancel.clone();
    // Only rank 0 of a data-parallel run writes (its TensorBoard file would share the name).
    let follower = parallel.as_ref().is_some_and(|p| p.rank > 0);
    if follower {
        config.tensorboard = false;
        config.debug_mode = false;
    }
    // The first Ctrl-C (or SIGTERM) stops as the app's Stop does: the step ends, a backup and
    // the output model are written. A second one quits at once; the last backup stays whole
    // (backups are built under a temporary name, then renamed).
    let signals = std::sync::atomic::AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if signals.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            eprintln!(
                "\nstopping after this step: {} (press Ctrl-C again to quit at once)",
                if follower {
                    "every process stops; rank 0 writes a backup and the output model"
                } else {
                    "a backup and the output model will be written"
                }
            );
            cancel.cancel();
        } else {
            eprintln!("\nquitting now; the last backup is intact");
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let (device, said) = ferrite::runtime::for_device(&config.train_device)?;
    let registry = Registry::discover(&search_dirs(settings), settings);
    let mut trainer = Trainer::on(device, controls, config, base, registry)?;
    if let Some(p) = parallel {
        trainer.join(p)?;
        println!("{}", trainer.joined().unwrap_or_default());
    }
    let bar = indicatif::ProgressBar::new(trainer.total_steps());
    let step_style = indicatif::ProgressStyle::with_template(
        "{bar:30} step {pos}/{len} {msg} [{elapsed} < {eta}, {per_sec}]",
    )?;
    // The caching pass shows on the same bar.
    let caching_style =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{eta} left]")?;
    bar.set_style(step_style.clone());
    let (total_steps, first_step) = (trainer.total_steps(), trainer.progress.step);
    // Without a terminal the bar draws nothing: then every line goes to stdout instead.
    let say = |m: String| {
        if bar.is_hidden() {
            println!("{m}");
        } else {
            bar.println(m);
        }
    };
    say(said);
    if let Some(from) = trainer.resumed_from() {
        say(format!(
            "resumed from {} at step {}",
            from.display(),
            trainer.progress.step
        ));
        bar.set_position(trainer.progress.step);
    }
    let result = trainer.run(|e| match e {
        Event::Started {
            items, problems, ..
        } => {
            if !problems.is_empty() {
                say(format!(
                    "{} problem(s) in the data (unreadable and tiny images are left out):\n  {}",
                    problems.len(),
                    problems.join("\n  ")
                ));
            }
            say(format!("training on {items} images"));
        }
        Event::Step {
            step,
            epoch,
            loss,
            lr,
            rank_times,
            ..
        } => {
            let mut m = format!("epoch {epoch} loss {loss:.4} lr {lr:.2e}");
            if !rank_times.is_empty() {
                let t: Vec<String> = rank_times.iter().map(|t| format!("{t:.2}")).collect();
                m += &format!(" (ranks {} s)", t.join("/"));
            }
            if bar.is_hidden() && step % 10 == 0 {
                println!("step {step}: {m}");
            }
            bar.set_position(step);
            bar.set_message(m);
        }
        Event::Validation {
            step,
            concept,
            loss,
        } => say(format!(
            "validation loss at step {step}, {concept}: {loss:.4}"
        )),
        Event::Sample(p) => say(format!("sample: {}", p.display())),
        Event::Backup(p) => say(format!("backup: {}", p.display())),
        Event::Saved(p) => say(format!("saved: {}", p.display())),
        Event::Skipped { step, loss_scale } => say(format!(
            "step {step} skipped: float16 gradients overflowed, loss scale now {loss_scale}"
        )),
        Event::Caching { what, done, total } => {
            if done == 0 {
                say(format!("caching {total} {what}"));
                bar.set_style(caching_style.clone());
                bar.set_length(total as u64);
                bar.set_message(format!("{what} cached"));
            }
            bar.set_position(done as u64);
        }
        Event::Cached(c) => {
            bar.set_style(step_style.clone());
            bar.set_length(total_steps);
            bar.set_position(first_step);
            bar.set_message("");
            say(c.to_string());
        }
        Event::Paused(_) => {}
    });
    bar.finish();
    if trainer.config.latent_caching {
        let (latents, texts) = trainer.cache_encoded();
        println!(
            "cache: {latents} latents and {texts} text states encoded (the others were in {})",
            trainer.config.cache_dir
        );
    }
    let peers = local_peers.map(|p| p.finish(result.is_ok()));
    match (result, peers) {
        (Err(e), Some(Err(peers))) => anyhow::bail!("{e}\n{peers}"),
        (Err(e), _) => Err(e.into()),
        (Ok(()), Some(Err(peers))) => anyhow::bail!(peers),
        (Ok(()), _) => Ok(()),
    }
}

/// A starter config: a LoRA on a model to fill in, one concept folder, one sample prompt.
fn init(dir: &std::path::Path) -> Result<()> {
    let config_path = ferrite::config::TrainConfig::write_starter(dir)?;
    println!(
        "wrote {} and {}/: put images (with .txt captions) there, set base_model_name, then\n  \
         ferrite train --config {}",
        config_path.display(),
        dir.join("images").display(),
        config_path.display()
    );
    Ok(())
}

/// A bar with the count and the time left, for the folder tools.
fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what}, {{eta}} left"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    bar
}

fn sample(settings: &Settings, a: SampleArgs) -> Result<()> {
    use ferrite::sample::{Sampler, generate};
    let (device, _) = ferrite::runtime::for_device(&a.device)?;
    let mut scope = ferrite::runtime::Scope::new(device);
    let _loading = scope.enter();
    let registry = Registry::discover(&search_dirs(settings), settings);
    // CLIP skip is asked for only when set: not every architecture has it.
    let mut extra = if a.clip_skip > 0 {
        serde_json::json!({ "text_encoder_layer_skip": a.clip_skip })
    } else {
        serde_json::json!({})
    };
    let (mut prompt, mut negative_prompt) = (a.prompt, a.negative_prompt);
    // Kept until the model is made: it takes its own handles to the files' tensors.
    let given = embeddings_given(&a.embeddings, &a.loras, [&mut prompt, &mut negative_prompt])?;
    if !given.is_empty() {
        extra["embeddings"] = ferrite::embeddings::option(&given);
    }
    let arch = a.model.open(&registry, &a.arch, extra)?;
    drop(given);
    let model = std::sync::Arc::new(ferrite::adapters::ModelLayers::of(&arch)?);
    scope = scope.with_adapters(model.clone());
    let _scope = scope.enter();
    if !a.loras.is_empty() {
        for spec in &a.loras {
            let (path, weight) = lora::lora_spec(spec);
            let n = model
                .load(&registry, &path, weight)
                .with_context(|| format!("--lora {spec}"))?;
            tracing::info!("{}: {n} adapted layers, strength {weight}", path.display());
        }
    }
    let req = generate::SampleRequest {
        prompt,
        negative_prompt,
        steps: a.steps,
        cfg: a.cfg,
        seed: a.seed,
        width: a.width,
        height: a.height,
        sampler: match a.sampler {
            SamplerArg::Ddim => Sampler::Ddim,
            SamplerArg::Euler => Sampler::Euler,
            SamplerArg::EulerA => Sampler::EulerAncestral,
            SamplerArg::DpmppKarras => Sampler::DpmPp2mKarras,
        },
        init_noise: a.init_noise,
        prediction_type: a.prediction_type.map(|p| {
            match p {
                PredictionArg::Epsilon => "epsilon",
                PredictionArg::VPrediction => "v_prediction",
            }
            .to_string()
        }),
    };
    let bar = indicatif::ProgressBar::new(req.steps as u64).with_message("sampling");
    let rgb = generate::generate(&arch, &req, || bar.inc(1))?;
    bar.finish_and_clear();
    generate::write_png(&a.out, req.width, req.height, rgb)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The `--embedding` files and the `--lora` files' bundled embeddings as the model is given
/// them (the placeholder `<NAME>`), and the prompts with their bare-word uses written as it.
fn embeddings_given(
    specs: &[String],
    loras: &[String],
    prompts: [&mut String; 2],
) -> Result<Vec<ferrite::embeddings::Given>> {
    use ferrite::embeddings::{self, Given, Source, files};
    let mut given = Vec::new();
    for spec in specs {
        // `FILE:NAME`, unless the whole spec is a file (a path may hold a colon).
        let (path, name) = match spec.rsplit_once(':') {
            Some((p, n)) if !Path::new(spec).exists() && !n.contains(['/', '\\']) => {
                (PathBuf::from(p), n.to_string())
            }
            _ => {
                let p = PathBuf::from(spec);
                let stem = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                (p, stem)
            }
        };
        let tensors = files::read(&path).with_context(|| format!("--embedding {spec}"))?;
        given.push((format!("--embedding {spec}"), name, tensors));
    }
    for spec in loras {
        let (path, _) = lora::lora_spec(spec);
        for (name, tensors) in
            files::read_bundled(&path).with_context(|| format!("--lora {spec}"))?
        {
            given.push((format!("--lora {spec} (bundled `{name}`)"), name, tensors));
        }
    }
    for p in prompts {
        for (_, name, _) in &given {
            *p = embeddings::mark_words(p, name);
        }
    }
    Ok(given
        .into_iter()
        .map(|(what, name, tensors)| Given {
            name: what,
            placeholder: embeddings::placeholder_for(&name),
            source: Source::Tensors(tensors),
        })
        .collect())
}

fn list_plugins(settings: &Settings) {
    let registry = Registry::discover(&search_dirs(settings), settings);
    let rows: Vec<[String; 5]> = registry
        .components()
        .iter()
        .map(|c| {
            [
                c.id.clone(),
                c.kind.to_string(),
                c.version.clone(),
                if c.enabled { "yes".into() } else { "no".into() },
                c.path.display().to_string(),
            ]
        })
        .collect();
    let header = ["ID", "KIND", "VERSION", "ENABLED", "PATH"].map(String::from);
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in std::iter::once(&header).chain(&rows) {
        println!(
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    if rows.is_empty() {
        println!("(no plugins found)");
    }
    for p in &registry.problems {
        eprintln!("error: {p}");
    }
}
