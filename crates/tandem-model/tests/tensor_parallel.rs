//! Tensor parallelism on real models: ranks (threads here, each with its own shard, KV pool
//! and compute thread, joined through a shared-memory group, or a TCP one as between hosts)
//! against the whole model: on the fast and the float path, the same logits bit for bit at
//! every prefill and decode position.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_collective::{Collective, ShmGroup, TcpGroup, TcpRendezvous};
use tandem_model::*;

fn model_path(name: &str) -> PathBuf {
    let model = fetch::named_model(name).expect("a named model");
    fetch::ensure_model(model, false).expect("model fetched")
}

/// Prompts of the golden file.
fn prompts(golden: &str) -> Vec<Vec<u32>> {
    let g: serde_json::Value = serde_json::from_str(golden).unwrap();
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("greedy_ids").is_some())
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// Rank 0 of a group of `world` whose other ranks follow on threads until it is dropped.
struct Group {
    rank0: LlamaModel,
    followers: Vec<std::thread::JoinHandle<Result<(), ModelError>>>,
}

/// Every rank's end of one group: shared memory (one host) or TCP (between hosts).
fn comms(world: usize, tcp: bool) -> Vec<Arc<dyn Collective>> {
    if !tcp {
        let root = ShmGroup::create(world, 1 << 16).unwrap();
        let mut out: Vec<Arc<dyn Collective>> = (1..world)
            .map(|r| Arc::new(ShmGroup::join(root.path(), r).unwrap()) as Arc<dyn Collective>)
            .collect();
        root.unlink();
        out.insert(0, Arc::new(root));
        return out;
    }
    let rv = TcpRendezvous::bind("127.0.0.1:0", world, "t").unwrap();
    let addr = rv.local_addr().unwrap();
    let joining: Vec<_> = (1..world)
        .map(|r| std::thread::spawn(move || TcpGroup::connect(addr, r, world, "t", b"").unwrap()))
        .collect();
    let mut out: Vec<Arc<dyn Collective>> = vec![Arc::new(rv.accept(&|| false).unwrap())];
    out.extend(
        joining
            .into_iter()
            .map(|j| Arc::new(j.join().unwrap()) as Arc<dyn Collective>),
    );
    out
}

impl Group {
    fn start(path: &Path, world: usize, precision: Precision) -> Group {
        Group::start_over(path, world, precision, false)
    }

    fn start_over(path: &Path, world: usize, precision: Precision, tcp: bool) -> Group {
        let mut comms = comms(world, tcp);
        let root = comms.remove(0);
        let followers = comms
            .into_iter()
            .map(|comm| {
                let path = path.to_path_buf();
                std::thread::spawn(move || {
                    let m = load_shard(&path, comm).unwrap().model;
                    let m = m.with_precision(precision).with_threads(1).unwrap();
                    let mut kv = m.new_kv_cache(64, 16, KvDType::F32);
                    m.follow(&mut kv)
                })
            })
            .collect();
        let rank0 = load_shard(path, root).unwrap().model;
        let rank0 = rank0.with_precision(precision).with_threads(1).unwrap();
        Group { rank0, followers }
    }

    fn stop(self) {
        let Group { rank0, followers } = self;
        drop(rank0);
        for f in followers {
            f.join().unwrap().expect("followers stop cleanly");
        }
    }
}

/// Prefill then `steps` greedy decode steps; every step's logits (the last row).
fn run(model: &LlamaModel, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut kv = model.new_kv_cache(64, 16, KvDType::F32);
    let table: Vec<u32> = (0..64).collect();
    let mut out: Vec<Vec<f32>> = Vec::new();
    let (mut tokens, mut ctx) = (prompt.to_vec(), 0);
    for _ in 0..=steps {
        let seq = SeqInput {
            n_tokens: tokens.len(),
            context_len: ctx,
            block_table: &table,
            logits: LogitsMode::Last,
        };
        let l = model.forward(&tokens, &[seq], &mut kv).unwrap();
        ctx += tokens.len();
        let row = l.row(0).to_vec();
        tokens = vec![argmax(&row)];
        out.push(row);
    }
    out
}

/// Every prompt's prefill and greedy decode through groups of `worlds` ranks gives the whole
/// model's logits bit for bit on path `p`: every rank computes its parts of each sum as the
/// whole model computes them, and the parts are added in the same order. (The float path,
/// slower, on the first four prompts.)
fn group_gives_the_whole_models_bits(name: &str, golden: &str, worlds: &[usize], p: Precision) {
    let path = model_path(name);
    let whole = load(&path).unwrap().model.with_precision(p);
    let mut prompts = prompts(golden);
    if p == Precision::Exact {
        prompts.truncate(4);
    }
    let want: Vec<_> = prompts.iter().map(|p| run(&whole, p, 8)).collect();
    for &world in worlds {
        let g = Group::start(&path, world, p);
        for (i, (prompt, want)) in prompts.iter().zip(&want).enumerate() {
            let got = run(&g.rank0, prompt, 8);
            let step = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(
                step.is_none(),
                "{name} {p:?} TP={world}: prompt {i} differs from the whole model at step {step:?}"
            );
        }
        g.stop();
    }
}

const SMOL: &str = "SmolLM2-135M-Instruct";
const QWEN: &str = "Qwen2.5-Coder-0.5B-Instruct";
const SMOL_GOLDEN: &str = include_str!("data/real_golden.json");
const QWEN_GOLDEN: &str = include_str!("data/qwen2.5-coder-0.5b_golden.json");

#[test]
fn reference_model_float_path_tp2_tp3() {
    // 3 KV heads: two ranks hold 1 and 2, three hold one each.
    group_gives_the_whole_models_bits(SMOL, SMOL_GOLDEN, &[2, 3], Precision::Exact);
}

#[test]
fn qwen_float_path_tp2() {
    group_gives_the_whole_models_bits(QWEN, QWEN_GOLDEN, &[2], Precision::Exact);
}

#[test]
fn reference_model_fast_path_tp2_tp3() {
    group_gives_the_whole_models_bits(SMOL, SMOL_GOLDEN, &[2, 3], Precision::Fast);
}

#[test]
fn qwen_fast_path_tp2() {
    group_gives_the_whole_models_bits(QWEN, QWEN_GOLDEN, &[2], Precision::Fast);
}

#[test]
fn ranks_over_tcp_give_the_shared_memory_groups_bits() {
    // The same shards and the same rank-order sums: the transport changes no bit.
    let path = model_path(SMOL);
    for precision in [Precision::Fast, Precision::Exact] {
        let (shm, tcp) = (
            Group::start_over(&path, 3, precision, false),
            Group::start_over(&path, 3, precision, true),
        );
        for p in prompts(SMOL_GOLDEN).iter().take(3) {
            assert!(run(&shm.rank0, p, 6) == run(&tcp.rank0, p, 6));
        }
        shm.stop();
        tcp.stop();
    }
}

#[test]
fn groups_larger_than_the_kv_heads_are_refused() {
    let root = ShmGroup::create(3, 4096).unwrap();
    let err = load_shard(&model_path(QWEN), Arc::new(root)).err().unwrap();
    assert!(
        err.to_string().contains("exceeds the model's 2 KV heads"),
        "{err}"
    );
}
