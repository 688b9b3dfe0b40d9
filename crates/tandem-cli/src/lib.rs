//! The `tandem` command as a library: the binary and the Python wheel (`python -m tandem`)
//! both run [`main_with_args`].

mod bench;
mod bench_datadist;
mod bench_engine;
mod bench_pipeline;
mod bench_serve;
mod bench_stats;
mod bench_tp;
mod client;
pub mod engine_args;
mod generate;
mod pd_worker;
pub mod serve;
pub mod tensor_parallel;
mod tp_hosts;

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
    /// One tensor-parallel rank (1 or more) of a worker on another host (`serve --role R
    /// --tensor-parallel N --tp-group G`), joined through etcd; serves every group its rank 0
    /// forms until stopped.
    TpRank(tensor_parallel::TpRankArgs),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// How worker processes re-run this program: the binary re-executes itself; an embedder (the
/// Python wheel) sets its own command line with [`set_self_command`].
static SELF_COMMAND: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

/// Sets the command line that starts this program again (e.g. `python -m tandem`), used to
/// spawn worker processes. Only the first call counts.
pub fn set_self_command(argv: Vec<std::ffi::OsString>) {
    let _ = SELF_COMMAND.set(argv);
}

/// A command that runs this program again, with its own arguments to be appended.
pub(crate) fn self_command() -> std::io::Result<std::process::Command> {
    match SELF_COMMAND.get().and_then(|v| v.split_first()) {
        Some((program, args)) => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args);
            Ok(cmd)
        }
        None => Ok(std::process::Command::new(std::env::current_exe()?)),
    }
}

/// Logs go to stderr: Tandem's own startup facts (KV pool size) at info, dependencies only
/// when they warn; `RUST_LOG` overrides. A second call (an embedder that already set up
/// logging) changes nothing.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,tandem=info,tandem_cli=info,tandem_engine=info,tandem_server=info".into()
            }),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `tandem` with `args` (the first is the program name); returns the exit code. Help,
/// version and usage errors print as clap prints them.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Client(a) => client::run(a),
        Command::Bench(b) => bench::run(b),
        Command::PdWorker(a) => pd_worker::run(a),
        Command::TpRank(a) => tensor_parallel::run_rank(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Resolves `--model` (path, default name, or absent) and loads the model.
pub(crate) fn load_model(spec: Option<&str>) -> anyhow::Result<tandem_model::LoadedModel> {
    let path = tandem_model::fetch::resolve_model(spec, true)?;
    Ok(tandem_model::load(&path)?)
}
