//! `tandem`: run Llama-family models.

mod bench;
mod bench_datadist;
mod bench_engine;
mod bench_serve;
mod bench_stats;
mod client;
mod engine_args;
mod generate;
mod pd_worker;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: an LLM inference engine for Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one or more prompts.
    Generate(generate::GenerateArgs),
    /// Serve the model over HTTP: OpenAI-compatible /v1 routes and MII's REST route.
    Serve(serve::ServeArgs),
    /// Talk to a running deployment by name: generate, terminate.
    Client(client::ClientArgs),
    /// Internal: one prefill or decode worker of a disaggregated deployment.
    #[command(hide = true)]
    PdWorker(pd_worker::PdWorkerArgs),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Tandem's own startup facts (KV pool size) at info; dependencies only when they warn.
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,tandem=info,tandem_engine=info,tandem_server=info".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Client(a) => client::run(a),
        Command::Bench(b) => bench::run(b),
        Command::PdWorker(a) => pd_worker::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Resolves `--model` (path, default name, or absent) and loads the model.
pub(crate) fn load_model(spec: Option<&str>) -> anyhow::Result<tandem_model::LoadedModel> {
    let path = tandem_model::fetch::resolve_model(spec, true)?;
    Ok(tandem_model::load(&path)?)
}
