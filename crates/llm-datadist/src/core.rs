//! The state of an initialized instance: its caches, its links, its listener, and the request
//! handler that serves peers' reads and writes against the cache table.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cache::{total_len, CacheEntry, CacheTable, Segment, SlotBinding};
use crate::keys::{LlmClusterInfo, SlotKey, UINT64_MAX};
use crate::link::Link;
use crate::memory::MemoryPool;
use crate::options::InitOptions;
use crate::protocol::{Access, ChannelRole, Hello, HelloAck, Reply, Request, SlotRef, Target};
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use crate::transport::shm::ShmRings;
use crate::transport::{host_id, io_error, Channel, Stream};

/// How long a handshake may take on the accepting side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; connections beyond are closed at once (a flood of idle
/// connections cannot pile up threads).
const MAX_PENDING_HANDSHAKES: usize = 64;

/// A bound socket accepting handshakes on its own thread.
pub(crate) struct Listener {
    pub addr: SocketAddr,
    fd: i32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Stops accepting and joins the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: shutting down our own listening socket wakes the blocked accept.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Memory a resolved request touches, kept alive for the transfer.
pub(crate) struct Resolved {
    pub segs: Vec<Segment>,
    _entries: Vec<Arc<CacheEntry>>,
    taken: Option<(SlotKey, SlotBinding)>,
}

/// Shared state of one initialized `LlmDataDist`.
pub(crate) struct Core {
    pub cluster_id: u64,
    pub opts: InitOptions,
    pub table: Mutex<CacheTable>,
    pub links: Mutex<HashMap<u64, Arc<Link>>>,
    pub device_pool: Option<MemoryPool>,
    pub host_pool: Option<MemoryPool>,
    listener: Mutex<Option<Listener>>,
    /// Two-sided link domains by comm id.
    pub(crate) domains: Mutex<HashMap<u64, crate::comm::Domain>>,
    pub(crate) next_comm_id: AtomicU64,
    host: Option<[u8; 16]>,
    nonce: AtomicU64,
}

impl Core {
    pub fn new(cluster_id: u64, opts: InitOptions) -> Result<Arc<Self>> {
        let device_pool = opts.device_pool.map(MemoryPool::new).transpose()?;
        let host_pool = opts.host_pool.map(MemoryPool::new).transpose()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        let core = Arc::new(Self {
            cluster_id,
            table: Mutex::new(CacheTable::default()),
            links: Mutex::new(HashMap::new()),
            device_pool,
            host_pool,
            listener: Mutex::new(None),
            domains: Mutex::new(HashMap::new()),
            next_comm_id: AtomicU64::new(1),
            host: host_id(),
            nonce: AtomicU64::new(seed),
            opts,
        });
        if let Some((host, port)) = core.opts.listen.clone() {
            core.listen(&host, port)?;
        }
        Ok(core)
    }

    /// Starts listening at `host:port` (port 0 picks a free one), replacing a listener on
    /// another address; the same address is a no-op.
    pub fn listen(self: &Arc<Self>, host: &str, port: u16) -> Result<()> {
        let mut guard = self.listener.lock().expect("listener lock");
        let wanted: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| LlmException::param(format!("listen address {host}:{port}: {e}")))?
            .collect();
        if let Some(l) = guard.as_ref() {
            if port != 0 && wanted.contains(&l.addr) {
                return Ok(());
            }
        }
        if let Some(old) = guard.take() {
            old.stop();
        }
        let listener = self.bind_listener(host, port, wanted.as_slice())?;
        tracing::info!(cluster_id = self.cluster_id, addr = %listener.addr, "llm-datadist listening");
        *guard = Some(listener);
        Ok(())
    }

    /// Binds `wanted` and accepts handshakes there on a thread of its own until stopped.
    pub(crate) fn bind_listener(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        wanted: &[SocketAddr],
    ) -> Result<Listener> {
        let listener = TcpListener::bind(wanted).map_err(|e| {
            LlmException::new(
                LlmStatusCode::LlmFailed,
                format!("cannot listen on {host}:{port}: {e}"),
            )
        })?;
        let addr = listener.local_addr().map_err(|e| io_error(e, "listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let fd = listener.as_raw_fd();
        let weak = Arc::downgrade(self);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("llm-datadist-listen-{}", addr.port()))
            .spawn(move || accept_loop(weak, listener, stop2))
            .map_err(|e| LlmException::new(LlmStatusCode::LlmFailed, e.to_string()))?;
        Ok(Listener {
            addr,
            fd,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops listening (a pure client from now on).
    pub fn stop_listening(&self) {
        if let Some(l) = self.listener.lock().expect("listener lock").take() {
            l.stop();
        }
    }

    /// The bound listen address, if listening.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listener
            .lock()
            .expect("listener lock")
            .as_ref()
            .map(|l| l.addr)
    }

    pub fn link(&self, peer: u64) -> Result<Arc<Link>> {
        if peer == self.cluster_id {
            param_invalid!("cluster id {peer} is this instance's own");
        }
        self.links
            .lock()
            .expect("links lock")
            .get(&peer)
            .cloned()
            .ok_or_else(|| {
                LlmException::new(
                    LlmStatusCode::LlmNotYetLink,
                    format!("no link to cluster {peer}"),
                )
            })
    }

    /// Tears down every link and the listener (finalize).
    pub fn shutdown(&self) {
        self.stop_domains();
        self.stop_listening();
        let links: Vec<_> = self.links.lock().expect("links lock").drain().collect();
        for (_, l) in links {
            l.close();
        }
    }

    fn hello(
        &self,
        role: ChannelRole,
        expected_peer: u64,
        nonce: u64,
        shm: Option<&ShmRings>,
    ) -> Hello {
        Hello {
            role,
            cluster_id: self.cluster_id,
            expected_peer,
            link_nonce: nonce,
            host_id: self.host.unwrap_or([0; 16]),
            token: self.opts.auth_token.clone(),
            shm: shm.map(|r| r.offer()),
        }
    }

    /// Opens one connection of a link and runs the handshake. Returns the channel (with rings
    /// when the peer accepted shared memory).
    fn connect(
        &self,
        addr: SocketAddr,
        role: ChannelRole,
        expected_peer: u64,
        nonce: u64,
        timeout: Duration,
    ) -> Result<Channel> {
        let deadline = Instant::now() + timeout;
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
            LlmException::new(LlmStatusCode::LlmLinkFailed, format!("connect {addr}: {e}"))
        })?;
        let _ = stream.set_nodelay(true);
        let rings = if self.opts.transport.allows_shm()
            && self.host.is_some()
            && role != ChannelRole::Unlink
        {
            ShmRings::create().ok()
        } else {
            None
        };
        let hello = self.hello(role, expected_peer, nonce, rings.as_ref());
        let mut ch = Channel::new(Stream::Tcp(stream), None);
        ch.write_raw(&hello.encode(), deadline)?;
        let ack = HelloAck::decode(&ch.read_message(deadline)?)?;
        if ack.status != LlmStatusCode::LlmSuccess {
            return Err(LlmException::new(
                ack.status,
                format!("peer {addr} refused the link: {}", ack.message),
            ));
        }
        if expected_peer != UINT64_MAX && ack.cluster_id != expected_peer {
            return Err(LlmException::new(
                LlmStatusCode::LlmLinkFailed,
                format!("{addr} is cluster {}, not {expected_peer}", ack.cluster_id),
            ));
        }
        if self.opts.transport == crate::TransportKind::Shm
            && !ack.shm_accepted
            && role != ChannelRole::Unlink
        {
            return Err(LlmException::new(
                LlmStatusCode::LlmLinkFailed,
                format!("{addr} cannot share memory with this host (transport shm)"),
            ));
        }
        ch.set_rings(if ack.shm_accepted { rings } else { None });
        Ok(ch)
    }

    /// Client side of `link_clusters` for one peer.
    pub fn link_to(self: &Arc<Self>, info: &LlmClusterInfo, timeout: Duration) -> Result<()> {
        let peer = info.remote_cluster_id;
        if peer == self.cluster_id {
            param_invalid!("cannot link to this instance's own cluster id {peer}");
        }
        let Some(addr) = info.remote_addr() else {
            param_invalid!(
                "link needs exactly one remote ip info, got {}",
                info.remote_ip_info_list().len()
            );
        };
        if self.links.lock().expect("links lock").contains_key(&peer) {
            return Err(LlmException::new(
                LlmStatusCode::LlmAlreadyLink,
                format!("already linked to cluster {peer}"),
            ));
        }
        let addr = SocketAddr::V4(addr);
        let nonce = self
            .nonce
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let link = Link::new(peer, nonce);
        let result = (|| {
            let first = self.connect(addr, ChannelRole::Link, peer, nonce, timeout)?;
            let streams = if first.is_shm() {
                1
            } else {
                self.opts.tcp_streams
            };
            link.add_outgoing(first);
            for _ in 1..streams {
                link.add_outgoing(self.connect(
                    addr,
                    ChannelRole::Forward,
                    peer,
                    nonce,
                    timeout,
                )?);
            }
            for _ in 0..streams {
                let ch = self.connect(addr, ChannelRole::Reverse, peer, nonce, timeout)?;
                link.add_closer(ch.closer());
                self.spawn_handler(link.clone(), ch);
            }
            Ok(())
        })();
        if let Err(e) = result {
            link.close();
            return Err(e);
        }
        let mut links = self.links.lock().expect("links lock");
        if links.contains_key(&peer) {
            link.close();
            return Err(LlmException::new(
                LlmStatusCode::LlmAlreadyLink,
                format!("already linked to cluster {peer}"),
            ));
        }
        links.insert(peer, link);
        tracing::info!(cluster_id = self.cluster_id, peer, %addr, "linked");
        Ok(())
    }

    /// `unlink_clusters` for one peer.
    pub fn unlink_from(&self, info: &LlmClusterInfo, timeout: Duration, force: bool) -> Result<()> {
        let peer = info.remote_cluster_id;
        if force {
            if let Some(link) = self.links.lock().expect("links lock").remove(&peer) {
                link.close();
            }
            return Ok(());
        }
        let addr = info.remote_addr();
        if addr.is_none() && info.remote_ip_info_list().len() > 1 {
            param_invalid!("unlink needs exactly one remote ip info");
        }
        let link = self.link(peer)?;
        let quiet = link.try_quiesce()?;
        // The local end goes whatever the peer answers; its handlers may now see EOF quietly.
        link.begin_close();
        let deadline = Instant::now() + timeout;
        let mut result = link.control(&Request::Unlink, deadline);
        if result.is_err() {
            // The link's own connections are gone: say goodbye on a fresh one.
            result = match addr {
                Some(a) => self
                    .connect(
                        SocketAddr::V4(a),
                        ChannelRole::Unlink,
                        peer,
                        link.nonce,
                        timeout,
                    )
                    .map(drop),
                None => result,
            };
        }
        drop(quiet);
        self.links.lock().expect("links lock").remove(&peer);
        link.close();
        result.map_err(|e| {
            LlmException::new(
                LlmStatusCode::LlmUnlinkFailed,
                format!(
                    "could not notify cluster {peer} of the unlink: {}",
                    e.message
                ),
            )
        })
    }

    fn spawn_handler(self: &Arc<Self>, link: Arc<Link>, ch: Channel) {
        let core = Arc::downgrade(self);
        let name = format!("llm-datadist-peer-{}", link.peer);
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(core, link, ch));
        if let Err(e) = spawned {
            tracing::error!("cannot start a link handler: {e}");
        }
    }

    /// Accepting side of a handshake.
    fn accept(self: &Arc<Self>, stream: TcpStream) -> Result<()> {
        let _ = stream.set_nodelay(true);
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut ch = Channel::new(Stream::Tcp(stream), None);
        let hello = Hello::decode(&ch.read_message(deadline)?)?;
        let refuse = |ch: &mut Channel, status, message: String| {
            let ack = HelloAck {
                status,
                message: message.clone(),
                cluster_id: self.cluster_id,
                shm_accepted: false,
            };
            let _ = ch.write_raw(&ack.encode(), deadline);
            Err(LlmException::new(status, message))
        };
        if hello.token != self.opts.auth_token {
            return refuse(
                &mut ch,
                LlmStatusCode::LlmLinkFailed,
                "authentication token mismatch".into(),
            );
        }
        if hello.expected_peer != UINT64_MAX && hello.expected_peer != self.cluster_id {
            return refuse(
                &mut ch,
                LlmStatusCode::LlmLinkFailed,
                format!(
                    "this is cluster {}, not {}",
                    self.cluster_id, hello.expected_peer
                ),
            );
        }
        if hello.cluster_id == self.cluster_id {
            return refuse(
                &mut ch,
                LlmStatusCode::LlmParamInvalid,
                "peer has this instance's cluster id".into(),
            );
        }
        let peer = hello.cluster_id;
        let existing = self.links.lock().expect("links lock").get(&peer).cloned();
        let link = match hello.role {
            ChannelRole::Link => {
                // The client holds no link to us (it checked), so any entry here is stale.
                let link = Link::new(peer, hello.link_nonce);
                if let Some(old) = self
                    .links
                    .lock()
                    .expect("links lock")
                    .insert(peer, link.clone())
                {
                    old.close();
                }
                link
            }
            ChannelRole::Unlink => {
                if let Some(l) = existing {
                    let busy = l.try_quiesce().is_err();
                    if busy {
                        return refuse(
                            &mut ch,
                            LlmStatusCode::LlmLinkBusy,
                            "transfer in flight".into(),
                        );
                    }
                    self.links.lock().expect("links lock").remove(&peer);
                    l.close();
                }
                let ack = HelloAck {
                    status: LlmStatusCode::LlmSuccess,
                    message: String::new(),
                    cluster_id: self.cluster_id,
                    shm_accepted: false,
                };
                return ch.write_raw(&ack.encode(), deadline);
            }
            ChannelRole::Forward | ChannelRole::Reverse => match existing {
                Some(l) if l.nonce == hello.link_nonce => l,
                _ => {
                    return refuse(
                        &mut ch,
                        LlmStatusCode::LlmNotYetLink,
                        format!("no link from cluster {peer} to join"),
                    );
                }
            },
        };
        let same_host = self.host.is_some() && self.host == Some(hello.host_id);
        let rings = match hello.shm {
            Some(offer) if same_host && self.opts.transport.allows_shm() => {
                ShmRings::open(&offer).ok()
            }
            _ => None,
        };
        let ack = HelloAck {
            status: LlmStatusCode::LlmSuccess,
            message: String::new(),
            cluster_id: self.cluster_id,
            shm_accepted: rings.is_some(),
        };
        ch.write_raw(&ack.encode(), deadline)?;
        ch.set_rings(rings);
        match hello.role {
            ChannelRole::Reverse => link.add_outgoing(ch),
            _ => {
                link.add_closer(ch.closer());
                self.spawn_handler(link, ch);
            }
        }
        Ok(())
    }

    /// Resolves a peer's access to local memory (owner side).
    pub fn resolve(&self, access: &Access, write: bool) -> Result<Resolved> {
        let not_exist = |what: String| LlmException::new(LlmStatusCode::LlmKvCacheNotExist, what);
        let mut table = self.table.lock().expect("table lock");
        let mut taken = None;
        let (segs, entries) = match &access.target {
            Target::Slot { slot, offset } => {
                let (entry, batch) =
                    match slot {
                        SlotRef::Key(k) => {
                            let binding =
                                table.slots.get(k).cloned().ok_or_else(|| {
                                    not_exist(format!("no cache bound to key {k:?}"))
                                })?;
                            // Pulling a request's slot of an allocated cache consumes the key.
                            if !write
                                && binding.entry.is_allocated()
                                && matches!(k, SlotKey::Request { .. })
                            {
                                table.slots.remove(k);
                                taken = Some((*k, binding.clone()));
                            }
                            (binding.entry, binding.batch)
                        }
                        SlotRef::Id { cache_id, batch } => {
                            let entry =
                                table.by_id.get(cache_id).cloned().ok_or_else(|| {
                                    not_exist(format!("no cache with id {cache_id}"))
                                })?;
                            (entry, *batch)
                        }
                    };
                if entry.is_blocks {
                    param_invalid!(
                        "cache {} is a blocks cache; address it with a BlocksCacheKey",
                        entry.id
                    );
                }
                let segs = entry.slot_segments(&access.tensors, batch as u64, *offset, access.size);
                (segs, vec![entry])
            }
            Target::Blocks { model_id, blocks } => {
                let entry =
                    table.blocks.get(model_id).cloned().ok_or_else(|| {
                        not_exist(format!("no blocks cache for model id {model_id}"))
                    })?;
                (entry.block_segments(&access.tensors, blocks), vec![entry])
            }
            Target::Addresses(addrs) => {
                let mut entries = Vec::new();
                let mut segs = Vec::new();
                for &a in addrs {
                    let entry = table
                        .by_id
                        .values()
                        .find(|e| e.remote_accessible() && e.contains(a, access.size))
                        .cloned()
                        .ok_or_else(|| {
                            LlmException::param(format!(
                                "address {a:#x}+{} is not in a registered cache",
                                access.size
                            ))
                        })?;
                    segs.push(Segment {
                        addr: a,
                        len: access.size,
                    });
                    entries.push(entry);
                }
                (Ok(segs), entries)
            }
        };
        let restore = |table: &mut CacheTable, taken: &Option<(SlotKey, SlotBinding)>| {
            if let Some((k, b)) = taken {
                table.slots.insert(*k, b.clone());
            }
        };
        let segs = match segs {
            Ok(s) => s,
            Err(e) => {
                restore(&mut table, &taken);
                return Err(e);
            }
        };
        if entries.iter().any(|e| !e.remote_accessible()) {
            restore(&mut table, &taken);
            return Err(not_exist("cache is not remotely accessible".into()));
        }
        if total_len(&segs) != access.total || (segs.is_empty() && access.total != 0) {
            restore(&mut table, &taken);
            param_invalid!(
                "size mismatch: requester expects {} bytes, this side has {} (block or slot sizes differ?)",
                access.total,
                total_len(&segs)
            );
        }
        Ok(Resolved {
            segs,
            _entries: entries,
            taken,
        })
    }

    /// Puts back a key whose pull failed, so the consumer can retry.
    pub fn restore(&self, r: &Resolved) {
        if let Some((k, b)) = &r.taken {
            self.table
                .lock()
                .expect("table lock")
                .slots
                .insert(*k, b.clone());
        }
    }
}

fn accept_loop(core: Weak<Core>, listener: TcpListener, stop: Arc<AtomicBool>) {
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(stream) = conn else { continue };
        let Some(core) = core.upgrade() else { break };
        if pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_HANDSHAKES {
            pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("too many handshakes in progress; connection closed");
            continue;
        }
        let done = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("llm-datadist-accept".into())
            .spawn(move || {
                let result = core.accept(stream);
                done.fetch_sub(1, Ordering::AcqRel);
                if let Err(e) = result {
                    tracing::warn!("refused a connection: {e}");
                }
            });
        if let Err(e) = spawned {
            pending.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("cannot start a handshake thread: {e}");
        }
    }
}

/// Serves a peer's requests on one channel until the link goes; a protocol error or a failed
/// payload breaks the link.
fn serve(core: Weak<Core>, link: Arc<Link>, mut ch: Channel) {
    let err = loop {
        let (kind, body) = match ch.recv_frame(None) {
            Ok(f) => f,
            Err(e) => break e,
        };
        let Some(core) = core.upgrade() else { return };
        let req = match Request::decode(kind, &body) {
            Ok(r) => r,
            Err(e) => {
                let deadline = Instant::now() + core.opts.sync_kv_timeout;
                let _ = ch.send_reply(&Reply::err(&e), deadline);
                break e;
            }
        };
        let deadline = Instant::now() + core.opts.sync_kv_timeout;
        let outcome = match req {
            Request::Ping => ch.send_reply(&Reply::ok(), deadline),
            Request::Unlink => {
                {
                    let mut links = core.links.lock().expect("links lock");
                    if links.get(&link.peer).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                        links.remove(&link.peer);
                    }
                }
                link.begin_close();
                let _ = ch.send_reply(&Reply::ok(), deadline);
                link.close();
                return;
            }
            Request::Read(access) => match core.resolve(&access, false) {
                Err(e) => ch.send_reply(&Reply::err(&e), deadline),
                Ok(r) => {
                    let sent = ch
                        .send_reply(&Reply::ok(), deadline)
                        .and_then(|_| ch.send_payload(&r.segs, deadline));
                    if sent.is_err() {
                        core.restore(&r);
                    }
                    sent
                }
            },
            Request::Write(access) => match core.resolve(&access, true) {
                Err(e) => ch.send_reply(&Reply::err(&e), deadline),
                Ok(r) => ch
                    .send_reply(&Reply::ok(), deadline)
                    .and_then(|_| ch.recv_payload(&r.segs, deadline))
                    .and_then(|_| ch.send_reply(&Reply::ok(), deadline)),
            },
        };
        if let Err(e) = outcome {
            break e;
        }
    };
    if !link.is_closed() {
        link.mark_broken(&err.message);
        link.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Options;
    use crate::protocol::Access;
    use crate::transport::mem_pair;
    use crate::types::{CacheDesc, DataType};
    use proptest::prelude::*;
    use std::io::Write;

    const GUARD: u8 = 0xA5;
    const PAD: usize = 4096;

    /// A core with one registered blocks cache (model 0) and one contiguous cache bound to
    /// request 9, both inside `mem` between guard bytes.
    fn core_with_caches(mem: &mut [u8]) -> Arc<Core> {
        let opts: Options = [("ge.exec.deviceId", "0"), ("llm.EnableCacheManager", "1")]
            .into_iter()
            .collect();
        let core = Core::new(7, InitOptions::parse(&opts).unwrap()).unwrap();
        let cm = crate::CacheManager { core: core.clone() };
        let base = mem.as_mut_ptr() as u64 + PAD as u64;
        let blocks = CacheDesc::new(2, vec![8, 64], DataType::DtUint8).unwrap();
        let slots = CacheDesc::new(2, vec![2, 128], DataType::DtUint8).unwrap();
        // SAFETY: `mem` outlives the core in every test, and the ranges lie inside it.
        unsafe {
            cm.register_blocks_cache(
                &blocks,
                &[base, base + 512],
                Some(crate::BlocksCacheKey::new(7, 0)),
                None,
            )
            .unwrap();
            cm.register_cache(
                &slots,
                &[base + 1024, base + 1280],
                &[crate::CacheKey::new(7, 9)],
                None,
            )
            .unwrap();
        }
        core
    }

    fn arb_request() -> impl Strategy<Value = Vec<u8>> {
        let target = prop_oneof![
            (proptest::collection::vec(0u64..12, 0..6), any::<u64>()).prop_map(|(blocks, m)| {
                Target::Blocks {
                    model_id: m % 2,
                    blocks,
                }
            }),
            (0i64..4, 0u32..4, 0u64..200).prop_map(|(cache_id, batch, offset)| Target::Slot {
                slot: SlotRef::Id { cache_id, batch },
                offset
            }),
            (0u64..12, 0u64..2).prop_map(|(req_id, model_id)| Target::Slot {
                slot: SlotRef::Key(SlotKey::Request { req_id, model_id }),
                offset: 0
            }),
            proptest::collection::vec(any::<u64>(), 0..3).prop_map(Target::Addresses),
        ];
        let access = (
            target,
            proptest::collection::vec(0u32..4, 0..4),
            0u64..300,
            0u64..2000,
        )
            .prop_map(|(target, tensors, size, total)| Access {
                target,
                tensors,
                size,
                total,
            });
        prop_oneof![
            access.clone().prop_map(|a| Request::Read(a).encode()),
            access.prop_map(|a| Request::Write(a).encode()),
            Just(Request::Ping.encode()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Random and half-valid frames (with whatever follows taken as payload) never panic
        /// the handler, and it never writes outside the registered caches.
        #[test]
        fn handler_survives_random_frames(frames in proptest::collection::vec(arb_request(), 1..8)) {
            let mut mem = vec![GUARD; PAD + 2048 + PAD];
            let core = core_with_caches(&mut mem);
            let (mut client, server) = mem_pair();
            let link = Link::new(3, 1);
            let weak = Arc::downgrade(&core);
            let handler = std::thread::spawn(move || serve(weak, link, server));
            for f in &frames {
                let _ = client_write(&mut client, f);
            }
            if let crate::transport::Stream::Mem(m) = client.raw_stream() {
                m.close_write();
            }
            handler.join().expect("handler must not panic");
            drop(client);
            prop_assert!(mem[..PAD].iter().all(|&b| b == GUARD));
            prop_assert!(mem[PAD + 2048..].iter().all(|&b| b == GUARD));
        }
    }

    fn client_write(ch: &mut Channel, bytes: &[u8]) -> std::io::Result<()> {
        ch.raw_stream().write_all(bytes)
    }
}
