//! The paged KV pool the forward pass reads and writes: per layer, a K and a V tensor of
//! `num_blocks` contiguous blocks of `block_size * n_kv_heads * head_dim` elements (laid out
//! inside as `tandem_kernels::PagedLayout::head_offset` says). A block id names the same slot
//! in all of them, so moving a sequence's KV is moving a list of block ids.

use half::f16;
use half::vec::HalfBitsVecExt;
use tandem_kernels::{KvDType, KvMut, KvRef, PagedLayout};

use crate::config::LlamaConfig;

enum Buf {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Buf {
    fn new(dtype: KvDType, n: usize) -> Buf {
        match dtype {
            // From zeroed u16s: the allocator hands out untouched zero pages, so a large pool
            // costs memory only as blocks are written (`vec![f16::ZERO; n]` writes every element).
            KvDType::F16 => Buf::F16(vec![0u16; n].reinterpret_into()),
            KvDType::F32 => Buf::F32(vec![0.0; n]),
        }
    }
    fn as_ref(&self) -> KvRef<'_> {
        match self {
            Buf::F16(v) => KvRef::F16(v),
            Buf::F32(v) => KvRef::F32(v),
        }
    }
    fn as_mut(&mut self) -> KvMut<'_> {
        match self {
            Buf::F16(v) => KvMut::F16(v),
            Buf::F32(v) => KvMut::F32(v),
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: plain-old-data element types; the byte view covers exactly the buffer.
            Buf::F16(v) => unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 2)
            },
            Buf::F32(v) => unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4)
            },
        }
    }
}

/// All layers' K and V block tensors.
pub struct KvCache {
    dtype: KvDType,
    layout: PagedLayout,
    num_blocks: usize,
    layers: Vec<(Buf, Buf)>,
}

impl KvCache {
    /// Allocates a zeroed pool of `num_blocks` blocks of `block_size` tokens for `cfg`'s shape.
    pub fn new(cfg: &LlamaConfig, num_blocks: usize, block_size: usize, dtype: KvDType) -> KvCache {
        let layout = PagedLayout {
            block_size,
            n_kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
        };
        KvCache::with_layout(cfg.num_layers, layout, num_blocks, dtype)
    }

    /// Allocates a zeroed pool of `num_blocks` blocks of `layout` for `num_layers` layers (a
    /// tensor-parallel rank's pool holds only its KV heads).
    pub fn with_layout(
        num_layers: usize,
        layout: PagedLayout,
        num_blocks: usize,
        dtype: KvDType,
    ) -> KvCache {
        let n = num_blocks * layout.block_size * layout.token_width();
        let layers = (0..num_layers)
            .map(|_| (Buf::new(dtype, n), Buf::new(dtype, n)))
            .collect();
        KvCache {
            dtype,
            layout,
            num_blocks,
            layers,
        }
    }

    /// Bytes of KV one token takes across all layers.
    pub fn bytes_per_token(cfg: &LlamaConfig, dtype: KvDType) -> usize {
        2 * cfg.num_layers * cfg.kv_heads() * cfg.head_dim() * dtype.size()
    }

    /// Element type.
    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Block geometry.
    pub fn layout(&self) -> PagedLayout {
        self.layout
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Layers in the pool.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `l`'s K and V for reading.
    pub fn layer(&self, l: usize) -> (KvRef<'_>, KvRef<'_>) {
        let (k, v) = &self.layers[l];
        (k.as_ref(), v.as_ref())
    }

    /// Layer `l`'s K and V for writing.
    pub fn layer_mut(&mut self, l: usize) -> (KvMut<'_>, KvMut<'_>) {
        let (k, v) = &mut self.layers[l];
        (k.as_mut(), v.as_mut())
    }

    /// Layer `l`'s K and V tensors as raw bytes (for registering with a transfer library).
    pub fn layer_bytes_mut(&mut self, l: usize) -> (&mut [u8], &mut [u8]) {
        let (k, v) = &mut self.layers[l];
        (k.bytes_mut(), v.bytes_mut())
    }
}
