//! A disaggregated deployment across hosts, each host a network namespace of its own joined by
//! a bridge (addresses the test creates): etcd on one, the router on another, workers on the
//! rest, all found through etcd. Shows: the same greedy outputs as a colocated deployment; a
//! worker added while serving is picked up, and moved between roles by the router; a
//! `kill -9`ed worker leaves rotation (probes, then
//! its lease) while traffic goes on; a worker with the wrong token is refused; a colocated
//! replica on its own host takes requests when the decode worker is gone.
//!
//! Needs root (network namespaces) and etcd (`scripts/test.sh` installs Debian's
//! `etcd-server`); without root it says so and passes, since nothing can be checked.

mod common;

use std::time::Instant;

use common::net::*;
use common::*;
use serde_json::Value;

const TOKEN: &str = "multi-host-secret";

/// (role, url) of each worker in rotation.
fn worker_urls(router: &str) -> Vec<(String, String)> {
    workers_at(router)
        .iter()
        .map(|w| {
            (
                w["role"].as_str().unwrap().to_string(),
                w["url"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn workers_on_other_hosts_are_found_through_etcd_and_survive_failures() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let etcd = etcd_binary();
    let model = model_path();
    let model = model.to_str().unwrap();
    let tandem = env!("CARGO_BIN_EXE_tandem");

    // The reference: the same prompts on a colocated deployment.
    let prompts: Vec<Vec<u32>> = golden_prompts().into_iter().take(6).collect();
    let colocated = start("multihost-colocated", &[]);
    let expected: Vec<String> = prompts.iter().map(|p| complete(&colocated, p)).collect();
    drop(colocated);

    let mut net = Net::new();
    let client_url = net.etcd(2, &etcd);
    let router_addr = net.host(3);
    let common = [
        "serve",
        "--model",
        model,
        "--etcd",
        &client_url,
        "--deployment-name",
        "multihost",
        "--max-batch-tokens",
        "64",
    ];
    let worker = |net: &mut Net, n: u8, name: &str, role: &str, token: &str| {
        let host = net.host(n);
        let mut cmd: Vec<&str> = vec![tandem];
        cmd.extend(common);
        cmd.extend(["--role", role, "--host", &host, "--auth-token", token]);
        net.run(n, name, &cmd)
    };
    let mut cmd: Vec<&str> = vec![tandem];
    cmd.extend(common);
    cmd.extend([
        "--host",
        &router_addr,
        "--port",
        "50050",
        "--restful-api-port",
        "28080",
        "--local-prefill-max",
        "0",
        "--auth-token",
        TOKEN,
    ]);
    net.run(3, "router", &cmd);
    let router = format!("{router_addr}:28080");
    let p1 = worker(&mut net, 4, "prefill-1", "prefill", TOKEN);
    let d1 = worker(&mut net, 5, "decode-1", "decode", TOKEN);
    wait_for(&net, 120, "the workers never joined", || {
        let h = health(&router);
        up(&h, "prefill") == 1 && up(&h, "decode") == 1 && h["status"] == "ok"
    });

    // Served across hosts, with the colocated outputs; the prefill host did the prefills.
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    let ws = serde_json::from_str::<Value>(&http(&router, "GET", "/admin/workers", None).1)
        .unwrap()["workers"]
        .clone();
    let prefill = ws
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["role"] == "prefill")
        .unwrap();
    assert!(stat(prefill, "tokens_computed") > 0, "{ws}");
    let p1_url = prefill["url"].as_str().unwrap().to_string();
    assert!(p1_url.contains(&format!("{}.4:", net.subnet)), "{p1_url}");

    // A second prefill worker is picked up without a restart.
    worker(&mut net, 6, "prefill-2", "prefill", TOKEN);
    wait_for(&net, 60, "the added worker was not picked up", || {
        up(&health(&router), "prefill") == 2
    });

    // The router moves it to decode and back (llm-datadist's switch_role on a remote host);
    // its etcd record follows.
    let p2_url = worker_urls(&router)
        .into_iter()
        .find(|(_, u)| u.contains(&format!("{}.6:", net.subnet)))
        .unwrap()
        .1;
    for (i, (to, prefill, decode)) in [("decode", 1, 2), ("prefill", 2, 1)]
        .into_iter()
        .enumerate()
    {
        let body = serde_json::json!({"url": p2_url, "role": to});
        let (status, text) = http(&router, "POST", "/admin/workers/role", Some(&body));
        assert_eq!(status, 200, "{text}");
        let h = health(&router);
        assert_eq!(
            (up(&h, "prefill"), up(&h, "decode")),
            (prefill, decode),
            "{h}"
        );
        for (p, want) in prompts.iter().zip(&expected).take(3) {
            assert_eq!(&complete_at(&router, p).unwrap(), want);
        }
        wait_for(
            &net,
            10,
            "the switched worker's record was not updated",
            || net.log("prefill-2").matches("registration updated").count() > i,
        );
    }

    // kill -9 of the first: out of rotation, traffic goes on with the same outputs.
    let killed = Instant::now();
    net.kill9(p1);
    let served_again = wait_for(&net, 30, "requests failed after the kill", || {
        complete_at(&router, &prompts[0]).as_deref() == Ok(expected[0].as_str())
    });
    eprintln!(
        "prefill worker killed: requests served elsewhere after {:.2} s",
        served_again.as_secs_f64()
    );
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    // Its lease expires: it leaves the deployment (not just the rotation).
    wait_for(&net, 30, "the dead worker's lease never expired", || {
        let h = health(&router);
        up(&h, "prefill") == 1 && !h.to_string().contains(&p1_url)
    });
    eprintln!(
        "its registration gone after {:.2} s",
        killed.elapsed().as_secs_f64()
    );

    // A worker with the wrong token registers, and is refused.
    worker(&mut net, 7, "intruder", "prefill", "not-the-token");
    wait_for(&net, 60, "the intruder never registered", || {
        net.log("intruder").contains("registered in etcd")
    });
    wait_for(&net, 30, "the router did not refuse the intruder", || {
        net.log("router").contains("registered worker refused")
    });
    assert_eq!(up(&health(&router), "prefill"), 1);
    assert!(
        net.log("intruder")
            .contains("refused a call without the deployment's token"),
        "{}",
        tail(&net.log("intruder"))
    );

    // A colocated replica on its own host carries the traffic when the decode worker dies.
    worker(&mut net, 8, "replica-1", "replica", TOKEN);
    wait_for(&net, 60, "the replica was not picked up", || {
        up(&health(&router), "replica") == 1
    });
    net.kill9(d1);
    wait_for(
        &net,
        30,
        "requests failed after the decode worker died",
        || complete_at(&router, &prompts[1]).as_deref() == Ok(expected[1].as_str()),
    );
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    // Once its lease expired, it has left the deployment: all is well again.
    wait_for(&net, 30, "the decode worker never left", || {
        let h = health(&router);
        up(&h, "decode") == 0 && h["status"] == "ok" && h["failed"] == 0
    });
}
