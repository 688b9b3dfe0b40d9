//! Workers on other hosts, found through etcd: a worker registers itself under its
//! deployment's prefix with a lease it keeps alive; the router watches the prefix, puts new
//! workers into rotation and takes out those whose lease expired. etcd is the registry; this
//! module only decides what goes in it and what the router does about it. Tensor-parallel
//! ranks on other hosts find their rank 0 the same way ([`TpGroupRecord`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use super::router::{PdRole, PdRouter, WorkerHandle};

/// Seconds a worker's registration outlives its last keep-alive.
pub const LEASE_TTL_S: i64 = 3;
/// How often the router re-reads the registrations even without a watch event (a worker it
/// could not reach, or that failed its health probes, is tried again).
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Delay before reconnecting to etcd after losing it.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What a worker says of itself in etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its role.
    pub role: PdRole,
    /// Its control URL, reachable from the router.
    pub url: String,
    /// Its llm-datadist cluster id (unique in the deployment).
    pub cluster_id: u64,
}

/// The key prefix of a deployment's workers.
pub fn prefix(deployment: &str) -> String {
    format!("/tandem/deployments/{deployment}/workers/")
}

/// Where rank 0 of a tensor-parallel group waits for its other ranks (the group's record,
/// there while the group is being formed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpGroupRecord {
    /// `host:port` the ranks connect to.
    pub addr: String,
    /// Ranks in the group.
    pub world: usize,
    /// Differs at each forming of the group (a rank joins each forming once).
    pub epoch: u64,
}

/// The key of tensor-parallel group `group`'s record in `deployment`.
pub fn tp_group_key(deployment: &str, group: &str) -> String {
    format!("/tandem/deployments/{deployment}/tp-groups/{group}")
}

/// Reads tensor-parallel group `group`'s record, if rank 0 is waiting for ranks.
pub async fn find_tp_group(
    endpoints: &[String],
    deployment: &str,
    group: &str,
) -> Result<Option<TpGroupRecord>, etcd_client::Error> {
    let mut client = connect(endpoints).await?;
    let resp = client.get(tp_group_key(deployment, group), None).await?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
}

async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    Client::connect(endpoints, Some(opts)).await
}

/// A worker's registration, kept alive by a task of its own (re-registering after losing
/// etcd or its lease, and re-writing the record when the worker's role changes). Dropping it
/// stops the task; [`Registration::revoke`] also removes the record at once.
pub struct Registration {
    task: tokio::task::JoinHandle<()>,
    lease: Arc<std::sync::atomic::AtomicI64>,
    endpoints: Vec<String>,
}

impl Registration {
    /// Registers the worker `record()` describes under `deployment` and keeps it registered.
    /// Fails if etcd cannot be reached at first.
    pub async fn start(
        endpoints: Vec<String>,
        deployment: &str,
        record: impl Fn() -> WorkerRecord + Send + Sync + 'static,
    ) -> Result<Self, etcd_client::Error> {
        let key = format!("{}{}", prefix(deployment), record().cluster_id);
        Self::start_at(endpoints, key, record).await
    }

    /// Keeps `record()` under `key` (any record: a worker's, a tensor-parallel group's).
    pub async fn start_at<R>(
        endpoints: Vec<String>,
        key: String,
        record: impl Fn() -> R + Send + Sync + 'static,
    ) -> Result<Self, etcd_client::Error>
    where
        R: Serialize + PartialEq + Send + Sync + 'static,
    {
        let mut client = connect(&endpoints).await?;
        let first = record();
        let lease = put_with_lease(&mut client, &key, &first).await?;
        tracing::info!(key, record = json(&first), "registered in etcd");
        let lease_id = Arc::new(std::sync::atomic::AtomicI64::new(lease));
        let task = tokio::spawn(keep_alive(
            endpoints.clone(),
            key,
            client,
            lease,
            first,
            record,
            lease_id.clone(),
        ));
        Ok(Self {
            task,
            lease: lease_id,
            endpoints,
        })
    }

    /// Stops keeping the registration alive and deletes it (its lease) from etcd.
    pub async fn revoke(self) {
        self.task.abort();
        let lease = self.lease.load(std::sync::atomic::Ordering::SeqCst);
        match connect(&self.endpoints).await {
            Ok(mut c) => {
                if let Err(e) = c.lease_revoke(lease).await {
                    tracing::warn!("could not revoke the etcd lease: {e}");
                }
            }
            Err(e) => tracing::warn!("could not reach etcd to deregister: {e}"),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(record: &impl Serialize) -> String {
    serde_json::to_string(record).unwrap_or_default()
}

async fn put_with_lease(
    client: &mut Client,
    key: &str,
    record: &impl Serialize,
) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(LEASE_TTL_S, None).await?.id();
    let value = json(record);
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// Refreshes the lease every third of its TTL; registers again (new lease) when it expired or
/// etcd was lost, and re-writes the record when it changed.
async fn keep_alive<R: Serialize + PartialEq>(
    endpoints: Vec<String>,
    key: String,
    mut client: Client,
    mut lease: i64,
    mut last: R,
    record: impl Fn() -> R,
    lease_id: Arc<std::sync::atomic::AtomicI64>,
) {
    let period = Duration::from_millis(LEASE_TTL_S as u64 * 1000 / 3);
    loop {
        let alive = async {
            let (mut keeper, mut replies) = client.lease_keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match replies.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<_, etcd_client::Error>(()), // expired: register anew
                }
                let now = record();
                if now != last {
                    let value = json(&now);
                    client
                        .put(
                            key.as_str(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await?;
                    tracing::info!(key, record = value, "registration updated");
                    last = now;
                }
                tokio::time::sleep(period).await;
            }
        };
        if let Err(e) = alive.await {
            tracing::warn!(key, "etcd keep-alive failed: {e}");
            tokio::time::sleep(RECONNECT_AFTER).await;
        } else {
            tracing::warn!(key, "etcd lease expired: registering again");
        }
        loop {
            let again = async {
                let mut c = connect(&endpoints).await?;
                let now = record();
                let l = put_with_lease(&mut c, &key, &now).await?;
                Ok::<_, etcd_client::Error>((c, l, now))
            };
            match again.await {
                Ok((c, l, now)) => {
                    (client, lease, last) = (c, l, now);
                    lease_id.store(lease, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(key, "registered in etcd again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(key, "cannot register in etcd: {e}");
                    tokio::time::sleep(RECONNECT_AFTER).await;
                }
            }
        }
    }
}

/// Keeps `router`'s workers in step with the registrations under `deployment`, until the
/// router is gone: runs on the current runtime.
pub fn watch(router: &Arc<PdRouter>, endpoints: Vec<String>, deployment: &str) {
    let weak = Arc::downgrade(router);
    let prefix = prefix(deployment);
    tokio::spawn(async move {
        let mut known = Discovered::default();
        loop {
            if weak.strong_count() == 0 {
                return;
            }
            if let Err(e) = follow(&weak, &endpoints, &prefix, &mut known).await {
                tracing::warn!(prefix, "etcd watch lost: {e}");
            }
            tokio::time::sleep(RECONNECT_AFTER).await;
        }
    });
}

/// The workers this router took from etcd, and the last reason each one was refused (logged
/// once, not at every round).
#[derive(Default)]
struct Discovered {
    urls: HashSet<String>,
    refused: HashMap<String, String>,
}

/// Watches the prefix, reconciling at each event and every [`RECONCILE_EVERY`].
async fn follow(
    router: &Weak<PdRouter>,
    endpoints: &[String],
    prefix: &str,
    known: &mut Discovered,
) -> Result<(), etcd_client::Error> {
    let mut client = connect(endpoints).await?;
    let (_watcher, mut events) = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await?;
    loop {
        let records = registered(&mut client, prefix).await?;
        let Some(r) = router.upgrade() else {
            return Ok(());
        };
        reconcile(&r, records, known).await;
        drop(r);
        match tokio::time::timeout(RECONCILE_EVERY, events.message()).await {
            Ok(Ok(Some(_))) | Err(_) => {}
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn registered(
    client: &mut Client,
    prefix: &str,
) -> Result<Vec<WorkerRecord>, etcd_client::Error> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice::<WorkerRecord>(kv.value()) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(key = ?kv.key_str(), "ignoring a registration: {e}"),
        }
    }
    Ok(out)
}

/// Adds registered workers not in rotation (new, restarted, or back after failed probes);
/// removes discovered workers no longer registered.
async fn reconcile(router: &PdRouter, records: Vec<WorkerRecord>, known: &mut Discovered) {
    let live: HashSet<&str> = records.iter().map(|r| r.url.as_str()).collect();
    for url in known.urls.clone() {
        if !live.contains(url.as_str()) {
            router.remove_worker(&url, "its etcd registration is gone (lease expired)");
            known.urls.remove(&url);
        }
    }
    known.refused.retain(|url, _| live.contains(url.as_str()));
    for r in &records {
        if router.role_of(&r.url).is_some() {
            continue;
        }
        let handle = WorkerHandle::new(r.url.clone(), r.cluster_id);
        let added =
            tokio::time::timeout(Duration::from_secs(10), router.add_worker(r.role, handle))
                .await
                .unwrap_or_else(|_| Err("no answer within 10 s".into()));
        match added {
            Ok(()) => {
                known.urls.insert(r.url.clone());
                known.refused.remove(&r.url);
                tracing::info!(
                    url = r.url,
                    role = r.role.name(),
                    "discovered worker in rotation"
                );
            }
            Err(e) => {
                if known.refused.get(&r.url) != Some(&e) {
                    tracing::warn!(
                        url = r.url,
                        role = r.role.name(),
                        "registered worker refused: {e}"
                    );
                    known.refused.insert(r.url.clone(), e);
                }
            }
        }
    }
}
