//! Transports: byte streams (TCP, or in-process pipes for tests) carrying frames, with bulk
//! payloads either on the stream itself or through a shared-memory ring when both ends share a
//! host.

pub mod inproc;
pub(crate) mod shm;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::Segment;
use crate::protocol::{parse_header, Reply, Request, FRAME_HEADER};
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use inproc::MemStream;
use shm::ShmRings;

/// How payloads travel between two instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// Shared memory with peers on the same host, TCP otherwise.
    #[default]
    Auto,
    /// Always TCP.
    Tcp,
    /// Shared memory; linking fails if the peer is on another host.
    Shm,
}

impl TransportKind {
    /// Parses `auto`, `tcp` or `shm`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" | "" => Ok(Self::Auto),
            "tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            _ => param_invalid!("unknown transport {s:?} (expected auto, tcp or shm)"),
        }
    }

    /// Whether shared memory may be offered or accepted.
    pub fn allows_shm(self) -> bool {
        self != Self::Tcp
    }
}

/// This host's identity (kernel boot id), for same-host detection; `None` if unknown.
pub(crate) fn host_id() -> Option<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

/// Maps an I/O error to a status: timeouts to `LLM_TIMEOUT`, the rest to `LLM_LINK_FAILED`.
pub(crate) fn io_error(e: io::Error, what: &str) -> LlmException {
    let code = match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => LlmStatusCode::LlmTimeout,
        _ => LlmStatusCode::LlmLinkFailed,
    };
    LlmException::new(code, format!("{what}: {e}"))
}

/// A byte stream.
pub(crate) enum Stream {
    /// Sockets between processes.
    Tcp(TcpStream),
    /// In-process pipes (tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Mem(MemStream),
}

/// A handle that closes a stream from another thread.
#[derive(Clone)]
pub(crate) enum Closer {
    Tcp(Arc<TcpStream>),
    None,
}

impl Closer {
    pub fn close(&self) {
        match self {
            Closer::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Closer::None => {}
        }
    }
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        // A zero duration means "no timeout" to the OS: round up.
        let t = t.map(|d| d.max(Duration::from_millis(1)));
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Mem(s) => {
                s.set_read_timeout(t);
                Ok(())
            }
        }
    }

    pub fn closer(&self) -> Closer {
        match self {
            Stream::Tcp(s) => s
                .try_clone()
                .map(|c| Closer::Tcp(Arc::new(c)))
                .unwrap_or(Closer::None),
            Stream::Mem(_) => Closer::None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Mem(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Mem(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Mem(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Mem(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Mem(s) => s.flush(),
        }
    }
}

/// Segments per vectored syscall (below the usual IOV_MAX of 1024).
const IOV_BATCH: usize = 256;

fn remaining(deadline: Instant) -> Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(LlmException::new(
            LlmStatusCode::LlmTimeout,
            "transfer exceeded sync_kv_timeout",
        ));
    }
    Ok(deadline - now)
}

/// One connection: frames on the stream, payloads on the stream or its shared-memory rings.
pub(crate) struct Channel {
    stream: Stream,
    rings: Option<ShmRings>,
}

impl Channel {
    pub fn new(stream: Stream, rings: Option<ShmRings>) -> Self {
        Self { stream, rings }
    }

    /// Whether payloads use shared memory.
    pub fn is_shm(&self) -> bool {
        self.rings.is_some()
    }

    pub fn closer(&self) -> Closer {
        self.stream.closer()
    }

    fn write_all(&mut self, bytes: &[u8], deadline: Option<Instant>) -> Result<()> {
        let t = deadline.map(remaining).transpose()?;
        self.stream
            .set_timeout(t)
            .map_err(|e| io_error(e, "socket"))?;
        self.stream
            .write_all(bytes)
            .map_err(|e| io_error(e, "send to peer"))
    }

    fn read_exact(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> Result<()> {
        let t = deadline.map(remaining).transpose()?;
        self.stream
            .set_timeout(t)
            .map_err(|e| io_error(e, "socket"))?;
        self.stream.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                LlmException::new(LlmStatusCode::LlmLinkFailed, "peer closed the connection")
            } else {
                io_error(e, "receive from peer")
            }
        })
    }

    /// Reads one frame: `(kind, body)`. `deadline` None waits forever (idle handler).
    pub fn recv_frame(&mut self, deadline: Option<Instant>) -> Result<(u8, Vec<u8>)> {
        let mut h = [0u8; FRAME_HEADER];
        self.read_exact(&mut h, deadline)?;
        let (kind, len) = parse_header(&h)?;
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, deadline)?;
        Ok((kind, body))
    }

    pub fn send_request(&mut self, req: &Request, deadline: Instant) -> Result<()> {
        self.write_all(&req.encode(), Some(deadline))
    }

    pub fn send_reply(&mut self, reply: &Reply, deadline: Instant) -> Result<()> {
        self.write_all(&reply.encode(), Some(deadline))
    }

    pub fn recv_reply(&mut self, deadline: Instant) -> Result<Reply> {
        let (kind, body) = self.recv_frame(Some(deadline))?;
        Reply::decode(kind, &body)
    }

    /// Sends the bytes of `segs` (local memory the caller validated).
    pub fn send_payload(&mut self, segs: &[Segment], deadline: Instant) -> Result<()> {
        if let Some(rings) = &mut self.rings {
            return rings.send(segs, deadline);
        }
        // Vectored writes: blocks are a few KiB, so one syscall per block would dominate.
        for group in segs.chunks(IOV_BATCH) {
            let t = remaining(deadline)?;
            self.stream
                .set_timeout(Some(t))
                .map_err(|e| io_error(e, "socket"))?;
            let mut slices: Vec<io::IoSlice> = group
                .iter()
                // SAFETY: segments come from validated caches whose memory is valid (pool
                // memory kept alive by the entry; registered memory by the caller's contract).
                .map(|s| {
                    io::IoSlice::new(unsafe {
                        std::slice::from_raw_parts(s.addr as *const u8, s.len as usize)
                    })
                })
                .collect();
            let mut bufs = slices.as_mut_slice();
            while !bufs.is_empty() {
                match self.stream.write_vectored(bufs) {
                    Ok(0) => {
                        return Err(LlmException::new(
                            LlmStatusCode::LlmLinkFailed,
                            "peer closed the connection",
                        ))
                    }
                    Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_error(e, "send to peer")),
                }
            }
        }
        Ok(())
    }

    /// Receives exactly the bytes of `segs` into local memory.
    pub fn recv_payload(&mut self, segs: &[Segment], deadline: Instant) -> Result<()> {
        if let Some(rings) = &mut self.rings {
            return rings.recv(segs, deadline);
        }
        for group in segs.chunks(IOV_BATCH) {
            let t = remaining(deadline)?;
            self.stream
                .set_timeout(Some(t))
                .map_err(|e| io_error(e, "socket"))?;
            let mut slices: Vec<io::IoSliceMut> = group
                .iter()
                // SAFETY: as in send_payload; the transfer owns these bytes for its duration.
                .map(|s| {
                    io::IoSliceMut::new(unsafe {
                        std::slice::from_raw_parts_mut(s.addr as *mut u8, s.len as usize)
                    })
                })
                .collect();
            let mut bufs = slices.as_mut_slice();
            while !bufs.is_empty() {
                match self.stream.read_vectored(bufs) {
                    Ok(0) => {
                        return Err(LlmException::new(
                            LlmStatusCode::LlmLinkFailed,
                            "peer closed the connection",
                        ))
                    }
                    Ok(n) => io::IoSliceMut::advance_slices(&mut bufs, n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_error(e, "receive from peer")),
                }
            }
        }
        Ok(())
    }

    /// Raw handshake I/O (length-prefixed messages of at most 8 KiB).
    pub fn write_raw(&mut self, bytes: &[u8], deadline: Instant) -> Result<()> {
        self.write_all(bytes, Some(deadline))
    }

    pub fn read_message(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len, Some(deadline))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > 8192 {
            return Err(LlmException::new(
                LlmStatusCode::LlmLinkFailed,
                format!("protocol error: handshake of {len} bytes"),
            ));
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, Some(deadline))?;
        Ok(body)
    }

    /// The underlying stream (tests write raw bytes through it).
    #[cfg(test)]
    pub fn raw_stream(&mut self) -> &mut Stream {
        &mut self.stream
    }

    pub fn set_rings(&mut self, rings: Option<ShmRings>) {
        self.rings = rings;
    }
}

/// A connected in-process channel pair (tests and fuzzing).
#[cfg(test)]
pub(crate) fn mem_pair() -> (Channel, Channel) {
    let (a, b) = MemStream::pair();
    (
        Channel::new(Stream::Mem(a), None),
        Channel::new(Stream::Mem(b), None),
    )
}
