//! A group of ranks on different hosts joined over TCP: a star through rank 0, which adds
//! every rank's values in rank order (the order, hence the bits, of the shared-memory group)
//! and sends the sum back. Rank 0 listens ([`TcpRendezvous`]); the others connect, saying
//! which rank they are, with the group's token. A peer that exits closes its socket; a host
//! that vanishes is noticed by TCP keep-alive within seconds, so a dead rank is an error in
//! every other rank, never a hang.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Collective, CollectiveError};

const MAGIC: u64 = 0x7464_6d74_6370_0001; // "tdmtcp", version 1
/// Ranks one group can hold.
pub const MAX_RANKS: usize = 64;
/// How long a connecting rank may take to say who it is.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting rank 0 looks for new connections and whether to give up.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// The longest broadcast a rank accepts (a step of a full batch is far below).
const MAX_BROADCAST: u64 = 1 << 30;
/// The longest token or hello a rank may send.
const MAX_HELLO: u32 = 1 << 20;

/// How long a rank polls for a peer's message before blocking on it.
const POLL_FOR: Duration = Duration::from_micros(200);

const OP_ALL_REDUCE: u32 = 1;
const OP_GATHER: u32 = 2;
const OP_BROADCAST: u32 = 3;
const OP_ALL_REDUCE_PARTS: u32 = 4;

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> CollectiveError + '_ {
    move |e| CollectiveError::Setup(format!("{what}: {e}"))
}

/// A connected peer: rank 0 has one per other rank, the others one (rank 0).
struct Link {
    rank: usize,
    pid: u32,
    stream: TcpStream,
}

/// One rank's handle on a TCP group.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Peers, in rank order; the lock keeps one rank's collectives from interleaving.
    links: Mutex<Vec<Link>>,
    /// Clones of the peers' sockets, to shut them down from any thread ([`Collective::abort`]).
    shutdown: Vec<TcpStream>,
    /// What each rank said when it joined (rank 0 only; empty for itself).
    hellos: Vec<Vec<u8>>,
    aborted: AtomicBool,
}

/// Rank 0 of a group being formed: listening until every other rank has joined.
pub struct TcpRendezvous {
    listener: TcpListener,
    world: usize,
    token: String,
}

impl TcpRendezvous {
    /// Listens on `addr` (port 0: any free port) for the ranks 1.. of a group of `world`
    /// ranks, which must present `token`.
    pub fn bind(
        addr: impl ToSocketAddrs,
        world: usize,
        token: &str,
    ) -> Result<TcpRendezvous, CollectiveError> {
        if world == 0 || world > MAX_RANKS {
            return Err(CollectiveError::Setup(format!(
                "{world} ranks (1 to {MAX_RANKS} per group)"
            )));
        }
        let listener = TcpListener::bind(addr).map_err(setup("cannot listen"))?;
        listener
            .set_nonblocking(true)
            .map_err(setup("cannot listen"))?;
        Ok(TcpRendezvous {
            listener,
            world,
            token: token.to_string(),
        })
    }

    /// Where the other ranks connect.
    pub fn local_addr(&self) -> Result<SocketAddr, CollectiveError> {
        self.listener
            .local_addr()
            .map_err(setup("cannot read the listening address"))
    }

    /// Waits until every rank 1.. has joined and returns rank 0's group. A connection with
    /// the wrong token, group size or a rank already taken is refused (and told why) while
    /// waiting goes on; `give_up` is asked every few tens of milliseconds.
    pub fn accept(self, give_up: &dyn Fn() -> bool) -> Result<TcpGroup, CollectiveError> {
        let mut links: Vec<Link> = Vec::with_capacity(self.world.saturating_sub(1));
        let mut hellos = vec![Vec::new(); self.world];
        while links.len() + 1 < self.world {
            if give_up() {
                return Err(CollectiveError::Aborted);
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL);
                    continue;
                }
                Err(e) => return Err(setup("cannot accept a rank")(e)),
            };
            let taken: Vec<usize> = links.iter().map(|l| l.rank).collect();
            match self.handshake(stream, &taken) {
                Ok((link, hello)) => {
                    hellos[link.rank] = hello;
                    links.push(link);
                }
                Err(why) => {
                    // A stray or misconfigured process: it was told; keep waiting.
                    tracing::warn!(%peer, "tensor-parallel group: refused a connection: {why}");
                }
            }
        }
        links.sort_by_key(|l| l.rank);
        TcpGroup::new(0, self.world, links, hellos)
    }

    /// Reads a joining rank's hello and answers it.
    fn handshake(&self, mut stream: TcpStream, taken: &[usize]) -> Result<(Link, Vec<u8>), String> {
        let io = |e: std::io::Error| e.to_string();
        stream.set_nonblocking(false).map_err(io)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io)?;
        let mut head = [0u8; 20];
        stream.read_exact(&mut head).map_err(io)?;
        let magic = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let rank = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        let world = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
        let pid = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err("not a tensor-parallel rank".into());
        }
        let token = read_blob(&mut stream).map_err(io)?;
        let hello = read_blob(&mut stream).map_err(io)?;
        let refusal = if token != self.token.as_bytes() {
            Some("wrong token".to_string())
        } else if world != self.world {
            Some(format!(
                "it expects {world} ranks, the group has {}",
                self.world
            ))
        } else if rank == 0 || rank >= self.world {
            Some(format!("no rank {rank} in a group of {}", self.world))
        } else if taken.contains(&rank) {
            Some(format!("rank {rank} has already joined"))
        } else {
            None
        };
        let answer = refusal.clone().unwrap_or_default();
        let mut reply = vec![u8::from(refusal.is_none())];
        reply.extend_from_slice(&(answer.len() as u32).to_le_bytes());
        reply.extend_from_slice(answer.as_bytes());
        stream.write_all(&reply).map_err(io)?;
        if let Some(r) = refusal {
            return Err(format!("rank {rank}: {r}"));
        }
        stream.set_read_timeout(None).map_err(io)?;
        Ok((Link { rank, pid, stream }, hello))
    }
}

fn read_blob(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HELLO {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "hello too long",
        ));
    }
    let mut b = vec![0u8; len as usize];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Makes a dead peer host an error within seconds: keep-alive probes on an idle socket, and
/// a bound on how long sent data may stay unacknowledged.
fn tune(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let fd = s.as_raw_fd();
    let set = |level, name, value: libc::c_int| {
        // SAFETY: a valid socket and a c_int option value of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 5000)
}

impl TcpGroup {
    /// Joins the group whose rank 0 listens at `addr` as `rank` of `world`, presenting
    /// `token`; rank 0 reads `hello` with [`TcpGroup::hello`].
    pub fn connect(
        addr: SocketAddr,
        rank: usize,
        world: usize,
        token: &str,
        hello: &[u8],
    ) -> Result<TcpGroup, CollectiveError> {
        if rank == 0 || rank >= world || world > MAX_RANKS {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} of {world} cannot join (ranks 1 to {} join rank 0)",
                world.saturating_sub(1)
            )));
        }
        let mut s = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)
            .map_err(setup("cannot reach rank 0"))?;
        let mut msg = Vec::with_capacity(32 + token.len() + hello.len());
        msg.extend_from_slice(&MAGIC.to_le_bytes());
        msg.extend_from_slice(&(rank as u32).to_le_bytes());
        msg.extend_from_slice(&(world as u32).to_le_bytes());
        msg.extend_from_slice(&std::process::id().to_le_bytes());
        for blob in [token.as_bytes(), hello] {
            msg.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            msg.extend_from_slice(blob);
        }
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(setup("cannot join"))?;
        s.write_all(&msg).map_err(setup("cannot join"))?;
        let mut ok = [0u8; 5];
        s.read_exact(&mut ok)
            .map_err(setup("rank 0 did not answer"))?;
        let len = u32::from_le_bytes(ok[1..5].try_into().expect("4 bytes")).min(MAX_HELLO);
        let mut why = vec![0u8; len as usize];
        s.read_exact(&mut why)
            .map_err(setup("rank 0 did not answer"))?;
        if ok[0] != 1 {
            return Err(CollectiveError::Setup(format!(
                "rank 0 refused rank {rank}: {}",
                String::from_utf8_lossy(&why)
            )));
        }
        s.set_read_timeout(None).map_err(setup("cannot join"))?;
        let link = Link {
            rank: 0,
            pid: 0,
            stream: s,
        };
        TcpGroup::new(rank, world, vec![link], Vec::new())
    }

    fn new(
        rank: usize,
        world: usize,
        links: Vec<Link>,
        hellos: Vec<Vec<u8>>,
    ) -> Result<TcpGroup, CollectiveError> {
        let mut shutdown = Vec::with_capacity(links.len());
        for l in &links {
            tune(&l.stream).map_err(setup("cannot configure a rank's socket"))?;
            shutdown.push(
                l.stream
                    .try_clone()
                    .map_err(setup("cannot configure a rank's socket"))?,
            );
        }
        Ok(TcpGroup {
            rank,
            world,
            links: Mutex::new(links),
            shutdown,
            hellos,
            aborted: AtomicBool::new(false),
        })
    }

    /// What rank `rank` sent when it joined (on rank 0; empty elsewhere).
    pub fn hello(&self, rank: usize) -> &[u8] {
        self.hellos.get(rank).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The remote address of rank `rank`'s socket (on rank 0), to reach its host.
    pub fn peer_addr(&self, rank: usize) -> Option<SocketAddr> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .iter()
            .find(|l| l.rank == rank)
            .and_then(|l| l.stream.peer_addr().ok())
    }

    /// Runs `op` on the peers under the lock; a failure aborts the group (its messages are
    /// out of step from then on).
    fn op(
        &self,
        op: impl FnOnce(&mut [Link]) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if self.aborted.load(Ordering::Acquire) {
            return Err(CollectiveError::Aborted);
        }
        let result = op(&mut links);
        if result.is_err() {
            self.abort();
        }
        result
    }

    /// Turns an I/O failure on `link` into the error every rank reports.
    fn lost(&self, link: &Link, _closed: std::io::Error) -> CollectiveError {
        if self.aborted.load(Ordering::Acquire) {
            return CollectiveError::Aborted;
        }
        CollectiveError::PeerLost {
            rank: link.rank,
            pid: link.pid,
        }
    }

    fn send(&self, link: &mut Link, op: u32, payload: &[u8]) -> Result<(), CollectiveError> {
        let mut frame = Vec::with_capacity(16 + payload.len());
        frame.extend_from_slice(&op.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(payload);
        link.stream
            .write_all(&frame)
            .map_err(|e| self.lost(link, e))
    }

    /// Reads a frame of `op` into `buf`; its length must be `want` bytes when given.
    fn recv(
        &self,
        link: &mut Link,
        op: u32,
        want: Option<usize>,
        buf: &mut Vec<u8>,
    ) -> Result<(), CollectiveError> {
        poll_briefly(&link.stream);
        let mut head = [0u8; 16];
        link.stream
            .read_exact(&mut head)
            .map_err(|e| self.lost(link, e))?;
        let got = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let fits = match want {
            Some(w) => len == w as u64,
            None => len <= MAX_BROADCAST,
        };
        if got != op || !fits {
            return Err(CollectiveError::Protocol(format!(
                "rank {} sent operation {got} of {len} bytes where operation {op} of {want:?} was expected",
                link.rank
            )));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        link.stream.read_exact(buf).map_err(|e| self.lost(link, e))
    }
}

/// Polls `s` for data for up to [`POLL_FOR`] before the blocking read that follows: a peer in
/// the same forward pass answers within microseconds, and a blocked read's wake-up costs tens
/// of them. A rank waiting longer (between requests) then blocks, costing nothing.
fn poll_briefly(s: &TcpStream) {
    let start = std::time::Instant::now();
    let mut b = 0u8;
    loop {
        // SAFETY: a one-byte peek into a valid buffer, without waiting.
        let r = unsafe {
            libc::recv(
                s.as_raw_fd(),
                &mut b as *mut u8 as *mut libc::c_void,
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // Data, end of stream or an error: the read that follows sees it.
        if r >= 0 || std::io::Error::last_os_error().kind() != ErrorKind::WouldBlock {
            return;
        }
        if start.elapsed() >= POLL_FOR {
            return;
        }
        std::hint::spin_loop();
    }
}

fn floats_to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_to_floats(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = x.len() * 4;
        self.op(|links| {
            let mut buf = Vec::new();
            if self.rank == 0 {
                // Added in rank order, as the shared-memory group does.
                for link in links.iter_mut() {
                    self.recv(link, OP_ALL_REDUCE, Some(bytes), &mut buf)?;
                    for (a, b) in x.iter_mut().zip(bytes_to_floats(&buf)) {
                        *a += b;
                    }
                }
                let sum = floats_to_bytes(x);
                for link in links.iter_mut() {
                    self.send(link, OP_ALL_REDUCE, &sum)?;
                }
            } else {
                self.send(&mut links[0], OP_ALL_REDUCE, &floats_to_bytes(x))?;
                self.recv(&mut links[0], OP_ALL_REDUCE, Some(bytes), &mut buf)?;
                for (a, b) in x.iter_mut().zip(bytes_to_floats(&buf)) {
                    *a = b;
                }
            }
            Ok(())
        })
    }

    fn all_reduce_parts(
        &self,
        mine: &[f32],
        held: &[usize],
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let len = out.len();
        if let Err(e) = crate::check_parts(self.rank, self.world, mine, held, len) {
            self.abort();
            return Err(e);
        }
        if self.world == 1 {
            crate::fold_parts(mine.chunks_exact(len.max(1)), out);
            return Ok(());
        }
        self.op(|links| {
            let mut buf = Vec::new();
            if self.rank == 0 {
                // Every rank's parts in rank order, then one sum in part order.
                let mut all = mine.to_vec();
                for link in links.iter_mut() {
                    let bytes = held[link.rank] * len * 4;
                    self.recv(link, OP_ALL_REDUCE_PARTS, Some(bytes), &mut buf)?;
                    all.extend(bytes_to_floats(&buf));
                }
                crate::fold_parts(all.chunks_exact(len.max(1)), out);
                let sum = floats_to_bytes(out);
                for link in links.iter_mut() {
                    self.send(link, OP_ALL_REDUCE_PARTS, &sum)?;
                }
            } else {
                self.send(&mut links[0], OP_ALL_REDUCE_PARTS, &floats_to_bytes(mine))?;
                self.recv(&mut links[0], OP_ALL_REDUCE_PARTS, Some(len * 4), &mut buf)?;
                for (a, b) in out.iter_mut().zip(bytes_to_floats(&buf)) {
                    *a = b;
                }
            }
            Ok(())
        })
    }

    fn gather(
        &self,
        part: &[f32],
        lens: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<(), CollectiveError> {
        if let Err(e) = crate::check_gather(self.rank, self.world, part, lens) {
            self.abort();
            return Err(e);
        }
        out.clear();
        if self.world == 1 {
            out.extend_from_slice(part);
            return Ok(());
        }
        self.op(|links| {
            if self.rank != 0 {
                return self.send(&mut links[0], OP_GATHER, &floats_to_bytes(part));
            }
            out.reserve(lens.iter().sum());
            out.extend_from_slice(part);
            let mut buf = Vec::new();
            for link in links.iter_mut() {
                self.recv(link, OP_GATHER, Some(lens[link.rank] * 4), &mut buf)?;
                out.extend(bytes_to_floats(&buf));
            }
            Ok(())
        })
    }

    fn broadcast(&self, msg: &mut Vec<u8>) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.op(|links| {
            if self.rank == 0 {
                for link in links.iter_mut() {
                    self.send(link, OP_BROADCAST, msg)?;
                }
                Ok(())
            } else {
                self.recv(&mut links[0], OP_BROADCAST, None, msg)
            }
        })
    }

    fn check(&self) -> Result<(), CollectiveError> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(CollectiveError::Aborted);
        }
        // A collective in flight on another thread will see any failure itself.
        let Ok(links) = self.links.try_lock() else {
            return Ok(());
        };
        for link in links.iter() {
            // Between collectives nothing is due from a peer: a readable socket means it
            // closed (or a dead host's keep-alive timed out).
            let mut pfd = libc::pollfd {
                fd: link.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no wait.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
            if ready > 0 {
                let mut b = [0u8; 1];
                let closed = match link.stream.peek(&mut b) {
                    Ok(0) | Err(_) => true,
                    Ok(_) => false,
                };
                if closed || pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    let err = CollectiveError::PeerLost {
                        rank: link.rank,
                        pid: link.pid,
                    };
                    drop(links);
                    self.abort();
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        // Peers blocked on this rank see their socket close.
        for s in &self.shutdown {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpGroup {
    fn drop(&mut self) {
        // Rank 0 leaving ends the group.
        self.abort();
    }
}
