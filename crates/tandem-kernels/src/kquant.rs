//! The k-quant formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) decoded into one common shape.
//!
//! Every k-quant block holds 256 values in 16-element groups `g`, each value
//! `(d * sc[g]) * (u - offset) - dmin * mn[g]` with small unsigned integers `u` (2 to 6 bits),
//! integer group scales `sc` and minimums `mn`. Decoding each format into [`KBlock`] lets one
//! dequantizer and one dot product serve all five; the SIMD kernels share the scale decoding
//! and unpack only the values themselves.

use crate::dtype::{f16_at, DType, QK_K};

/// One k-quant block in the common shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KBlock {
    /// Super-block scale.
    pub d: f32,
    /// Super-block scale of the minimums (0 for formats without them).
    pub dmin: f32,
    /// Group scales.
    pub sc: [i16; 16],
    /// Group minimums.
    pub mn: [i16; 16],
    /// Unsigned values, element order.
    pub u: [u8; QK_K],
}

/// Const-generic ids of the k-quant formats (for kernels instantiated per format).
pub(crate) const K_Q2: u8 = 0;
/// See [`K_Q2`].
pub(crate) const K_Q3: u8 = 1;
/// See [`K_Q2`].
pub(crate) const K_Q4: u8 = 2;
/// See [`K_Q2`].
pub(crate) const K_Q5: u8 = 3;
/// See [`K_Q2`].
pub(crate) const K_Q6: u8 = 4;

/// The format of a const-generic id.
pub(crate) const fn k_format(id: u8) -> DType {
    match id {
        K_Q2 => DType::Q2_K,
        K_Q3 => DType::Q3_K,
        K_Q4 => DType::Q4_K,
        K_Q5 => DType::Q5_K,
        _ => DType::Q6_K,
    }
}

/// The constant subtracted from every unsigned value of `dtype` (Q3_K: 4, Q6_K: 32).
pub(crate) const fn offset(dtype: DType) -> i32 {
    match dtype {
        DType::Q3_K => 4,
        DType::Q6_K => 32,
        _ => 0,
    }
}

/// The 6-bit scale and min of 32-element sub-block `j` of a Q4_K / Q5_K block (ggml's
/// `get_scale_min_k4`), from the 12 scale bytes `q`.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The super-block scales and the group scales and minimums of a k-quant block
/// (`(d, dmin, sc, mn)`), without its values.
#[inline(always)]
pub(crate) fn scales(dtype: DType, b: &[u8]) -> (f32, f32, [i16; 16], [i16; 16]) {
    let mut sc = [0i16; 16];
    let mut mn = [0i16; 16];
    match dtype {
        DType::Q2_K => {
            for g in 0..16 {
                sc[g] = (b[g] & 0x0f) as i16;
                mn[g] = (b[g] >> 4) as i16;
            }
            (f16_at(b, 80), f16_at(b, 82), sc, mn)
        }
        DType::Q3_K => {
            let word = |i: usize| u32::from_le_bytes([b[96 + i], b[97 + i], b[98 + i], b[99 + i]]);
            let (a0, a1, t) = (word(0), word(4), word(8));
            let (lo, hi) = (0x0f0f_0f0f, 0x0303_0303);
            let packed = [
                (a0 & lo) | ((t & hi) << 4),
                (a1 & lo) | (((t >> 2) & hi) << 4),
                ((a0 >> 4) & lo) | (((t >> 4) & hi) << 4),
                ((a1 >> 4) & lo) | (((t >> 6) & hi) << 4),
            ];
            for (g, s) in packed.iter().flat_map(|w| w.to_le_bytes()).enumerate() {
                sc[g] = s as i16 - 32;
            }
            (f16_at(b, 108), 0.0, sc, mn)
        }
        DType::Q4_K | DType::Q5_K => {
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &b[4..16]);
                sc[2 * j..2 * j + 2].fill(s as i16);
                mn[2 * j..2 * j + 2].fill(m as i16);
            }
            (f16_at(b, 0), f16_at(b, 2), sc, mn)
        }
        DType::Q6_K => {
            for g in 0..16 {
                sc[g] = b[192 + g] as i8 as i16;
            }
            (f16_at(b, 208), 0.0, sc, mn)
        }
        _ => unreachable!("{dtype} is not a k-quant format"),
    }
}

/// Decodes one block of `dtype` (a k-quant format).
pub(crate) fn decode(dtype: DType, b: &[u8]) -> KBlock {
    let (d, dmin, sc, mn) = scales(dtype, b);
    let mut u = [0u8; QK_K];
    match dtype {
        DType::Q2_K => {
            for half in 0..2 {
                let q = &b[16 + 32 * half..48 + 32 * half];
                for j in 0..4 {
                    for l in 0..32 {
                        u[128 * half + 32 * j + l] = (q[l] >> (2 * j)) & 3;
                    }
                }
            }
        }
        DType::Q3_K => {
            let hm = &b[0..32];
            for half in 0..2 {
                let q = &b[32 + 32 * half..64 + 32 * half];
                for j in 0..4 {
                    for l in 0..32 {
                        let high = (hm[l] >> (4 * half + j)) & 1;
                        u[128 * half + 32 * j + l] = ((q[l] >> (2 * j)) & 3) | (high << 2);
                    }
                }
            }
        }
        DType::Q4_K => {
            for (c, q) in b[16..144].chunks_exact(32).enumerate() {
                for l in 0..32 {
                    u[64 * c + l] = q[l] & 0x0f;
                    u[64 * c + 32 + l] = q[l] >> 4;
                }
            }
        }
        DType::Q5_K => {
            let qh = &b[16..48];
            for (c, q) in b[48..176].chunks_exact(32).enumerate() {
                for l in 0..32 {
                    u[64 * c + l] = (q[l] & 0x0f) | (((qh[l] >> (2 * c)) & 1) << 4);
                    u[64 * c + 32 + l] = (q[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
                }
            }
        }
        DType::Q6_K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                let o = &mut u[128 * half..];
                for l in 0..32 {
                    o[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                    o[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                    o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        _ => unreachable!("{dtype} is not a k-quant format"),
    }
    KBlock { d, dmin, sc, mn, u }
}

/// Dequantizes one block of `dtype` into `y` (256 values), as gguf-py does.
pub(crate) fn dequantize(dtype: DType, b: &[u8], y: &mut [f32]) {
    let k = decode(dtype, b);
    let off = offset(dtype);
    for (g, (u, y)) in k.u.chunks_exact(16).zip(y.chunks_exact_mut(16)).enumerate() {
        let dl = k.d * k.sc[g] as f32;
        let ml = k.dmin * k.mn[g] as f32;
        for (o, &u) in y.iter_mut().zip(u) {
            *o = dl * (u as i32 - off) as f32 - ml;
        }
    }
}
