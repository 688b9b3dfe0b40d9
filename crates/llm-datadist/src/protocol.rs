//! The wire protocol: a versioned handshake carrying cluster ids, then length-prefixed frames.
//! Every decoder bounds-checks; a frame that does not parse is a protocol error that drops the
//! link, never a panic.

use crate::keys::SlotKey;
use crate::status::{LlmException, LlmStatusCode, Result};

/// Protocol version; a peer with another version is refused in the handshake.
pub const VERSION: u16 = 1;
const HELLO_MAGIC: [u8; 4] = *b"TDDH";
const ACK_MAGIC: [u8; 4] = *b"TDDA";
/// Largest frame body (block lists of a few hundred thousand blocks fit).
pub const MAX_FRAME: usize = 16 << 20;
const MAX_STR: usize = 4096;
/// Bytes of a frame header: kind, 3 reserved, body length.
pub const FRAME_HEADER: usize = 8;

fn proto(msg: impl Into<String>) -> LlmException {
    LlmException::new(
        LlmStatusCode::LlmLinkFailed,
        format!("protocol error: {}", msg.into()),
    )
}

/// Little-endian encoder.
#[derive(Default)]
pub(crate) struct Enc(pub Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.u64(v as u64)
    }
    fn str(&mut self, s: &str) -> &mut Self {
        let b = &s.as_bytes()[..s.len().min(MAX_STR)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
        self
    }
    fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.u32(v.len() as u32);
        v.iter().for_each(|&x| {
            self.u32(x);
        });
        self
    }
    fn u64s(&mut self, v: &[u64]) -> &mut Self {
        self.u32(v.len() as u32);
        v.iter().for_each(|&x| {
            self.u64(x);
        });
        self
    }
}

/// Bounds-checked little-endian decoder.
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(proto(format!(
                "truncated: {n} bytes needed, {} left",
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(self.u64()? as i64)
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return Err(proto("string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| proto("string is not UTF-8"))
    }
    fn count(&mut self, elem: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(elem) > self.buf.len() {
            return Err(proto(format!("list of {n} items overruns the frame")));
        }
        Ok(n)
    }
    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn u64s(&mut self) -> Result<Vec<u64>> {
        let n = self.count(8)?;
        (0..n).map(|_| self.u64()).collect()
    }
    fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(proto(format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRole {
    /// First connection of a link: creates the link on the server.
    Link = 0,
    /// Further connection carrying the client's requests.
    Forward = 1,
    /// Connection carrying the server's requests to the client.
    Reverse = 2,
    /// One-shot connection that tears the client's link down.
    Unlink = 3,
}

/// A shared-memory offer: the creator's memfd, reachable as `/proc/PID/fd/FD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmOffer {
    /// Creator's pid.
    pub pid: u32,
    /// The memfd number in the creator.
    pub fd: i32,
    /// Its size.
    pub size: u64,
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Channel role.
    pub role: ChannelRole,
    /// The client's cluster id.
    pub cluster_id: u64,
    /// The cluster id the client expects the server to have.
    pub expected_peer: u64,
    /// Identifies the link a Forward/Reverse channel joins.
    pub link_nonce: u64,
    /// Boot id of the client's host (same-host detection for shared memory).
    pub host_id: [u8; 16],
    /// Shared secret ("" if none).
    pub token: String,
    /// Shared-memory ring offer.
    pub shm: Option<ShmOffer>,
}

impl Hello {
    /// Encodes the handshake (magic, version, fields).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(&HELLO_MAGIC);
        e.u16(VERSION)
            .u8(self.role as u8)
            .u64(self.cluster_id)
            .u64(self.expected_peer)
            .u64(self.link_nonce);
        e.0.extend_from_slice(&self.host_id);
        e.str(&self.token);
        match self.shm {
            Some(s) => e.u8(1).u32(s.pid).u32(s.fd as u32).u64(s.size),
            None => e.u8(0),
        };
        let mut out = (e.0.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&e.0);
        out
    }

    /// Decodes a handshake body (after its u32 length).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut d = Dec::new(buf);
        if d.take(4)? != HELLO_MAGIC {
            return Err(proto("bad handshake magic"));
        }
        let version = d.u16()?;
        if version != VERSION {
            return Err(proto(format!(
                "peer speaks protocol version {version}, this side {VERSION}"
            )));
        }
        let role = match d.u8()? {
            0 => ChannelRole::Link,
            1 => ChannelRole::Forward,
            2 => ChannelRole::Reverse,
            3 => ChannelRole::Unlink,
            r => return Err(proto(format!("unknown channel role {r}"))),
        };
        let cluster_id = d.u64()?;
        let expected_peer = d.u64()?;
        let link_nonce = d.u64()?;
        let host_id = d.take(16)?.try_into().unwrap();
        let token = d.str()?;
        let shm = match d.u8()? {
            0 => None,
            1 => Some(ShmOffer {
                pid: d.u32()?,
                fd: d.u32()? as i32,
                size: d.u64()?,
            }),
            _ => return Err(proto("bad shm flag")),
        };
        d.end()?;
        Ok(Self {
            role,
            cluster_id,
            expected_peer,
            link_nonce,
            host_id,
            token,
            shm,
        })
    }
}

/// The server's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// Success or why the link was refused.
    pub status: LlmStatusCode,
    /// Reason when refused.
    pub message: String,
    /// The server's cluster id.
    pub cluster_id: u64,
    /// Whether the shared-memory offer was taken.
    pub shm_accepted: bool,
}

impl HelloAck {
    /// Encodes the answer (length-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(&ACK_MAGIC);
        e.u16(VERSION)
            .i64(self.status.value())
            .str(&self.message)
            .u64(self.cluster_id)
            .u8(self.shm_accepted as u8);
        let mut out = (e.0.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&e.0);
        out
    }

    /// Decodes an answer body.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut d = Dec::new(buf);
        if d.take(4)? != ACK_MAGIC {
            return Err(proto("bad handshake answer magic"));
        }
        if d.u16()? != VERSION {
            return Err(proto("peer answered with another protocol version"));
        }
        let status = LlmStatusCode::from_value(d.i64()?);
        let message = d.str()?;
        let cluster_id = d.u64()?;
        let shm_accepted = d.u8()? != 0;
        d.end()?;
        Ok(Self {
            status,
            message,
            cluster_id,
            shm_accepted,
        })
    }
}

/// A contiguous slot addressed by key or by (cache id, batch index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotRef {
    Key(SlotKey),
    Id { cache_id: i64, batch: u32 },
}

/// The remote memory a request reads or writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Bytes `[offset, offset + size)` of a slot in each listed tensor.
    Slot { slot: SlotRef, offset: u64 },
    /// Whole blocks of a blocks cache in each listed tensor.
    Blocks { model_id: u64, blocks: Vec<u64> },
    /// Raw addresses inside registered caches, `size` bytes each (TransferConfig).
    Addresses(Vec<u64>),
}

/// A read or write: target, tensors, bytes per tensor (slot/address targets) and the total
/// the requester expects, which the owner checks against its own computation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Access {
    pub target: Target,
    pub tensors: Vec<u32>,
    pub size: u64,
    pub total: u64,
}

/// A request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// Owner streams the bytes to the requester.
    Read(Access),
    /// Requester streams bytes to the owner after a go-ahead.
    Write(Access),
    /// Liveness probe.
    Ping,
    /// Tear the link down (both ends).
    Unlink,
}

/// Frame kinds.
const K_READ: u8 = 1;
const K_WRITE: u8 = 2;
const K_PING: u8 = 3;
const K_UNLINK: u8 = 4;
const K_REPLY: u8 = 0x80;

fn enc_slot_key(e: &mut Enc, k: &SlotKey) {
    match *k {
        SlotKey::Request { req_id, model_id } => e.u8(0).u64(req_id).u64(model_id),
        SlotKey::Prefix {
            prefix_id,
            model_id,
        } => e.u8(1).u64(prefix_id).u64(model_id),
    };
}

fn enc_access(e: &mut Enc, a: &Access) {
    match &a.target {
        Target::Slot { slot, offset } => {
            e.u8(0);
            match slot {
                SlotRef::Key(k) => {
                    e.u8(0);
                    enc_slot_key(e, k);
                }
                SlotRef::Id { cache_id, batch } => {
                    e.u8(1).i64(*cache_id).u32(*batch);
                }
            }
            e.u64(*offset);
        }
        Target::Blocks { model_id, blocks } => {
            e.u8(1).u64(*model_id).u64s(blocks);
        }
        Target::Addresses(addrs) => {
            e.u8(2).u64s(addrs);
        }
    }
    e.u32s(&a.tensors).u64(a.size).u64(a.total);
}

fn dec_access(d: &mut Dec) -> Result<Access> {
    let target = match d.u8()? {
        0 => {
            let slot = match d.u8()? {
                0 => SlotRef::Key(match d.u8()? {
                    0 => SlotKey::Request {
                        req_id: d.u64()?,
                        model_id: d.u64()?,
                    },
                    1 => SlotKey::Prefix {
                        prefix_id: d.u64()?,
                        model_id: d.u64()?,
                    },
                    _ => return Err(proto("bad slot key kind")),
                }),
                1 => SlotRef::Id {
                    cache_id: d.i64()?,
                    batch: d.u32()?,
                },
                _ => return Err(proto("bad slot reference kind")),
            };
            Target::Slot {
                slot,
                offset: d.u64()?,
            }
        }
        1 => Target::Blocks {
            model_id: d.u64()?,
            blocks: d.u64s()?,
        },
        2 => Target::Addresses(d.u64s()?),
        t => return Err(proto(format!("bad target kind {t}"))),
    };
    Ok(Access {
        target,
        tensors: d.u32s()?,
        size: d.u64()?,
        total: d.u64()?,
    })
}

/// Encodes a frame header and body.
fn frame(kind: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.push(kind);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Parses a frame header: (kind, body length), rejecting oversized frames.
pub(crate) fn parse_header(h: &[u8; FRAME_HEADER]) -> Result<(u8, usize)> {
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        return Err(proto(format!("frame of {len} bytes exceeds {MAX_FRAME}")));
    }
    if h[1..4] != [0, 0, 0] {
        return Err(proto("reserved header bytes are not zero"));
    }
    Ok((h[0], len))
}

impl Request {
    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        let kind = match self {
            Request::Read(a) => {
                enc_access(&mut e, a);
                K_READ
            }
            Request::Write(a) => {
                enc_access(&mut e, a);
                K_WRITE
            }
            Request::Ping => K_PING,
            Request::Unlink => K_UNLINK,
        };
        frame(kind, e.0)
    }

    /// Decodes a request of `kind` from `body`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self> {
        let mut d = Dec::new(body);
        let req = match kind {
            K_READ => Request::Read(dec_access(&mut d)?),
            K_WRITE => Request::Write(dec_access(&mut d)?),
            K_PING => Request::Ping,
            K_UNLINK => Request::Unlink,
            k => return Err(proto(format!("unknown request kind {k:#x}"))),
        };
        d.end()?;
        Ok(req)
    }
}

/// A status reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub code: LlmStatusCode,
    pub message: String,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            code: LlmStatusCode::LlmSuccess,
            message: String::new(),
        }
    }

    pub fn err(e: &LlmException) -> Self {
        Self {
            code: e.status_code,
            message: e.message.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.i64(self.code.value()).str(&self.message);
        frame(K_REPLY, e.0)
    }

    pub fn decode(kind: u8, body: &[u8]) -> Result<Self> {
        if kind != K_REPLY {
            return Err(proto(format!("expected a reply, got frame kind {kind:#x}")));
        }
        let mut d = Dec::new(body);
        let code = LlmStatusCode::from_value(d.i64()?);
        let message = d.str()?;
        d.end()?;
        Ok(Self { code, message })
    }

    /// `Ok` on success, else the peer's error (a remote failure keeps its status code).
    pub fn into_result(self) -> Result<()> {
        if self.code == LlmStatusCode::LlmSuccess {
            Ok(())
        } else {
            Err(LlmException::new(
                self.code,
                format!("peer: {}", self.message),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_requests() -> Vec<Request> {
        vec![
            Request::Read(Access {
                target: Target::Blocks {
                    model_id: 1,
                    blocks: vec![3, 9, 27],
                },
                tensors: vec![0, 1, 2, 3],
                size: 0,
                total: 4096,
            }),
            Request::Write(Access {
                target: Target::Slot {
                    slot: SlotRef::Key(SlotKey::Prefix {
                        prefix_id: 4,
                        model_id: 0,
                    }),
                    offset: 16,
                },
                tensors: vec![5],
                size: 64,
                total: 64,
            }),
            Request::Read(Access {
                target: Target::Slot {
                    slot: SlotRef::Id {
                        cache_id: 7,
                        batch: 2,
                    },
                    offset: 0,
                },
                tensors: vec![],
                size: 8,
                total: 0,
            }),
            Request::Write(Access {
                target: Target::Addresses(vec![1 << 40, 12]),
                tensors: vec![],
                size: 8,
                total: 16,
            }),
            Request::Ping,
            Request::Unlink,
        ]
    }

    fn roundtrip(frame: &[u8]) -> Result<Request> {
        let h: [u8; FRAME_HEADER] = frame[..FRAME_HEADER].try_into().unwrap();
        let (kind, len) = parse_header(&h)?;
        let body = frame
            .get(FRAME_HEADER..FRAME_HEADER + len)
            .ok_or_else(|| proto("frame shorter than its header says"))?;
        Request::decode(kind, body)
    }

    #[test]
    fn requests_roundtrip() {
        for r in sample_requests() {
            assert_eq!(roundtrip(&r.encode()).unwrap(), r);
        }
        let hello = Hello {
            role: ChannelRole::Reverse,
            cluster_id: 5,
            expected_peer: 9,
            link_nonce: 77,
            host_id: [3; 16],
            token: "secret".into(),
            shm: Some(ShmOffer {
                pid: 10,
                fd: 4,
                size: 1 << 20,
            }),
        };
        assert_eq!(Hello::decode(&hello.encode()[4..]).unwrap(), hello);
    }

    proptest! {
        /// Random bytes never panic the decoders.
        #[test]
        fn random_frames_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Request::decode(kind, &body);
            let _ = Reply::decode(kind, &body);
            let _ = Hello::decode(&body);
            let _ = HelloAck::decode(&body);
        }

        /// Valid frames with random corruption either decode or fail cleanly; truncations fail.
        #[test]
        fn corrupted_frames_fail_cleanly(which in 0usize..6, pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
            let frame = sample_requests()[which].encode();
            let mut bad = frame.clone();
            let p = pos % bad.len();
            bad[p] = byte;
            let _ = roundtrip(&bad);
            let body = &frame[FRAME_HEADER..];
            if !body.is_empty() {
                let c = cut % body.len();
                prop_assert!(Request::decode(frame[0], &body[..c]).is_err());
            }
        }
    }
}
