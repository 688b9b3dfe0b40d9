//! `tandem client`: talk to a running deployment by name (MII's `mii.client(name)`).

use clap::{Args, Subcommand};
use tandem_server::client::{Client, KwValue};

/// Arguments of `tandem client`.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The deployment's name (as given to `tandem serve --deployment-name`).
    #[arg(long)]
    deployment_name: String,
    #[command(subcommand)]
    action: ClientAction,
}

/// What to ask the deployment.
#[derive(Subcommand, Debug)]
enum ClientAction {
    /// Generate for one or more prompts (MII's options).
    Generate(ClientGenerate),
    /// Stop the whole deployment (MII's `terminate_server`).
    Terminate,
}

#[derive(Args, Debug)]
struct ClientGenerate {
    /// A prompt; repeat for several.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Stream the (single) prompt's text as it is generated.
    #[arg(long)]
    stream: bool,
    #[arg(long)]
    max_length: Option<i64>,
    #[arg(long)]
    max_new_tokens: Option<i64>,
    #[arg(long)]
    min_new_tokens: Option<i64>,
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<i64>,
    #[arg(long)]
    temperature: Option<f32>,
    /// Greedy decoding (MII's do_sample=False).
    #[arg(long)]
    greedy: bool,
    #[arg(long)]
    return_full_text: bool,
    /// One stop string (MII's gRPC cannot carry lists).
    #[arg(long)]
    stop: Option<String>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<i64>,
    /// Print MII-style JSON records.
    #[arg(long)]
    json: bool,
}

impl ClientGenerate {
    fn kwargs(&self) -> Vec<(String, KwValue)> {
        let mut k = Vec::new();
        let mut put = |name: &str, v: Option<KwValue>| {
            if let Some(v) = v {
                k.push((name.to_string(), v));
            }
        };
        put("max_length", self.max_length.map(KwValue::Int));
        put("max_new_tokens", self.max_new_tokens.map(KwValue::Int));
        put("min_new_tokens", self.min_new_tokens.map(KwValue::Int));
        put("ignore_eos", self.ignore_eos.then_some(KwValue::Bool(true)));
        put("top_p", self.top_p.map(KwValue::Float));
        put("top_k", self.top_k.map(KwValue::Int));
        put("temperature", self.temperature.map(KwValue::Float));
        put("do_sample", self.greedy.then_some(KwValue::Bool(false)));
        put(
            "return_full_text",
            self.return_full_text.then_some(KwValue::Bool(true)),
        );
        put("stop", self.stop.clone().map(KwValue::Str));
        put(
            "repetition_penalty",
            self.repetition_penalty.map(KwValue::Float),
        );
        put("seed", self.seed.map(KwValue::Int));
        k
    }
}

/// Runs `tandem client ...`.
pub fn run(a: ClientArgs) -> anyhow::Result<()> {
    let home = tandem_model::fetch::tandem_home();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut c = Client::connect(&home, &a.deployment_name).await?;
        match a.action {
            ClientAction::Terminate => {
                let pid = c.record.pid;
                c.terminate().await?;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while tandem_server::registry::process_alive(pid) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                anyhow::ensure!(!tandem_server::registry::process_alive(pid), "the deployment did not stop within 30 s");
                println!("deployment {:?} terminated", a.deployment_name);
            }
            ClientAction::Generate(g) => {
                let kwargs = g.kwargs();
                if g.stream {
                    anyhow::ensure!(g.prompts.len() == 1, "--stream takes exactly one --prompt (as MII)");
                    let last = c
                        .generate_stream(&g.prompts[0], &kwargs, |piece| {
                            use std::io::Write;
                            print!("{piece}");
                            let _ = std::io::stdout().flush();
                        })
                        .await?;
                    println!();
                    eprintln!("[{} tokens, {}]", last.generated_tokens, last.finish_reason);
                } else {
                    let replies = c.generate(&g.prompts, &kwargs).await?;
                    if g.json {
                        let recs: Vec<_> = replies
                            .iter()
                            .map(|r| serde_json::json!({"generated_text": r.response, "prompt_length": r.prompt_tokens, "generated_length": r.generated_tokens, "finish_reason": r.finish_reason}))
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&recs)?);
                    } else {
                        for r in replies {
                            println!("{}", r.response);
                        }
                    }
                }
            }
        }
        Ok(())
    })
}
