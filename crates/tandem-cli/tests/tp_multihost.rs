//! Tensor-parallel workers whose ranks are on other hosts (network namespaces on a bridge):
//! a prefill and a decode worker of two ranks each, rank 1 of each on a host of its own,
//! joined through etcd over TCP. Shows: the outputs of a one-rank colocated deployment (float
//! path), KV handed over rank to rank across hosts; a rank with the wrong token refused; a
//! decode rank killed mid-generation ends the stream with an error (no hang), its worker
//! leaves the deployment, and comes back with the same outputs once the rank is started
//! again; a rank whose rank 0 dies waits for the next group instead of exiting; two replica
//! workers of two ranks each share the traffic (replicas x tensor parallelism).
//!
//! Needs root (network namespaces) and etcd, as the multi-host PD test does.

mod common;

use std::time::{Duration, Instant};

use common::net::*;
use common::*;
use serde_json::Value;

const TOKEN: &str = "tp-multi-host-secret";

/// `/admin/workers`' entry of the worker whose URL is on host `.n`.
fn worker_on(router: &str, net: &Net, n: u8) -> Option<Value> {
    workers_at(router).into_iter().find(|w| {
        w["url"]
            .as_str()
            .is_some_and(|u| u.contains(&format!("{}.{n}:", net.subnet)))
    })
}

#[test]
fn ranks_on_other_hosts_join_through_etcd_and_recover_from_a_dead_rank() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let etcd = etcd_binary();
    let model = model_path();
    let model = model.to_str().unwrap();
    let tandem = env!("CARGO_BIN_EXE_tandem");

    // The reference: one rank, colocated (the ranks add the same parts in the same order, so
    // the outputs are the same bit for bit).
    let prompts: Vec<Vec<u32>> = golden_prompts().into_iter().take(5).collect();
    let colocated = start("tp-multihost-colocated", &[]);
    let expected: Vec<String> = prompts.iter().map(|p| complete(&colocated, p)).collect();
    drop(colocated);

    let mut net = Net::new();
    let etcd_url = net.etcd(2, &etcd);
    let router_addr = net.host(3);
    let deployment = ["--etcd", &etcd_url, "--deployment-name", "tpmulti"];
    let engine = ["--max-batch-tokens", "64", "--kv-memory-fraction", "0.02"];
    let mut cmd = vec![tandem, "serve", "--model", model];
    cmd.extend(deployment);
    cmd.extend(engine);
    cmd.extend([
        "--host",
        &router_addr,
        "--restful-api-port",
        "28080",
        "--local-prefill-max",
        "0",
        "--auth-token",
        TOKEN,
    ]);
    net.run(3, "router", &cmd);
    let router = format!("{router_addr}:28080");
    // Rank 0 of each worker: the worker; rank 1: `tandem tp-rank` on the next host.
    let worker = |net: &mut Net, n: u8, role: &str, group: &str, name: &str| {
        let host = net.host(n);
        let mut cmd = vec![tandem, "serve", "--model", model];
        cmd.extend(deployment);
        cmd.extend(engine);
        cmd.extend(["--role", role, "--host", &host, "--auth-token", TOKEN]);
        cmd.extend(["--tensor-parallel", "2", "--tp-group", group]);
        net.run(n, name, &cmd)
    };
    let rank = |net: &mut Net, n: u8, name: &str, group: &str, token: &str| {
        let host = format!("{}.{n}", net.subnet);
        let mut cmd = vec![tandem, "tp-rank", "--model", model, "--rank", "1"];
        cmd.extend(deployment);
        cmd.extend(["--tp-group", group, "--host", &host, "--auth-token", token]);
        net.run(n, name, &cmd)
    };
    let prefill_worker = worker(&mut net, 4, "prefill", "prefill-group", "prefill-rank0");
    net.host(5);
    let prefill_rank = rank(&mut net, 5, "prefill-rank1", "prefill-group", TOKEN);
    let decode_worker = worker(&mut net, 6, "decode", "decode-group", "decode-rank0");
    net.host(7);
    // A rank with the wrong token is refused; its worker keeps waiting.
    let intruder = rank(&mut net, 7, "intruder", "decode-group", "not-the-token");
    wait_for(&net, 60, "the intruder was not refused", || {
        net.log("decode-rank0").contains("wrong token")
    });
    net.kill9(intruder);
    let decode_rank = rank(&mut net, 7, "decode-rank1", "decode-group", TOKEN);
    wait_for(&net, 120, "the workers never joined", || {
        let h = health(&router);
        up(&h, "prefill") == 1 && up(&h, "decode") == 1
    });

    // The one-rank outputs, prefilled on the prefill worker's two hosts.
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    let prefill = worker_on(&router, &net, 4).unwrap();
    assert!(stat(&prefill, "tokens_computed") > 0, "{prefill}");
    assert_eq!(
        prefill["worker"]["rank_hosts"],
        serde_json::json!([format!("{}.5", net.subnet)]),
        "{prefill}"
    );
    // Every rank's KV was handed over: nothing stays held for a consumer.
    wait_for(&net, 10, "KV blocks stayed held", || {
        [4, 6]
            .iter()
            .all(|&n| worker_on(&router, &net, n).is_some_and(|w| stat(&w, "blocks_held") == 0))
    });

    // Decode rank 1 killed mid-generation: the stream ends with an error, soon.
    let addr = router.clone();
    let long = prompts[0].clone();
    let streaming = std::thread::spawn(move || stream_completion(&addr, &long, 400));
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    net.kill9(decode_rank);
    let streamed = streaming.join().unwrap();
    assert!(
        matches!(streamed, Streamed::Error(_)),
        "the stream did not end with an error: {streamed:?}"
    );
    assert!(killed.elapsed() < Duration::from_secs(20));
    // Its worker leaves the deployment; requests fail with a JSON error, not a hang.
    wait_for(
        &net,
        30,
        "the broken decode worker stayed in rotation",
        || up(&health(&router), "decode") == 0,
    );
    let t = Instant::now();
    let err = complete_at(&router, &prompts[1]).unwrap_err();
    assert!(err.starts_with("503"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // The surviving rank logs that it forms its group again once it has dropped the broken
    // worker, which can come after the router took that worker out (a CI run saw the 503
    // first; here it comes ~0.1 s after the kill).
    let t = Instant::now();
    while !net.log("decode-rank0").contains("forming the group again") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "decode rank 0 did not start forming its group again\n--- its log:\n{}",
            tail(&net.log("decode-rank0"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "decode rank 0 forming its group again {:.2} s after the kill",
        killed.elapsed().as_secs_f64()
    );

    // The rank is started again: the worker forms its group, registers, same outputs.
    let back = Instant::now();
    rank(&mut net, 7, "decode-rank1-again", "decode-group", TOKEN);
    wait_for(&net, 60, "the decode worker did not come back", || {
        up(&health(&router), "decode") == 1
    });
    eprintln!(
        "decode rank restarted: worker back in {:.2} s",
        back.elapsed().as_secs_f64()
    );
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }

    // A rank whose rank 0 dies goes back to waiting for the next group: no exit, no hang.
    net.kill9(prefill_worker);
    wait_for(
        &net,
        30,
        "the prefill rank did not go back to waiting",
        || {
            net.log("prefill-rank1")
                .rsplit_once("joined the group")
                .is_some_and(|(_, after)| after.contains("waiting for the group's rank 0"))
        },
    );
    assert!(net.alive(prefill_rank), "{}", net.log("prefill-rank1"));

    // Replicas of tensor-parallel engines (MII's replica_num x tensor_parallel, across hosts):
    // two replica workers of two ranks each carry the traffic once the decode worker is gone.
    for (n, name) in [(8, "replica-a"), (10, "replica-b")] {
        let group = format!("{name}-group");
        worker(&mut net, n, "replica", &group, &format!("{name}-rank0"));
        net.host(n + 1);
        rank(&mut net, n + 1, &format!("{name}-rank1"), &group, TOKEN);
    }
    wait_for(&net, 60, "the replicas never joined", || {
        up(&health(&router), "replica") == 2
    });
    net.kill9(decode_worker);
    wait_for(&net, 30, "the decode worker never left", || {
        up(&health(&router), "decode") == 0
    });
    let served: Vec<_> = prompts
        .iter()
        .chain(&prompts)
        .map(|p| {
            let (addr, p) = (router.clone(), p.clone());
            std::thread::spawn(move || complete_at(&addr, &p))
        })
        .collect();
    for (got, want) in served.into_iter().zip(expected.iter().chain(&expected)) {
        assert_eq!(&got.join().unwrap().unwrap(), want);
    }
    for n in [8, 10] {
        let r = worker_on(&router, &net, n).unwrap();
        assert!(stat(&r, "tokens_computed") > 0, "{r}");
    }
}
