//! The k-quant formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), and IQ4_XS, whose 256-element
//! super-blocks have the same structure, decoded into one common shape.
//!
//! Every k-quant block holds 256 values in 16-element groups `g`, each value
//! `(d * sc[g]) * (u - offset) - dmin * mn[g]` with small unsigned integers `u` (2 to 6 bits;
//! IQ4_XS: its table's values + 128), integer group scales `sc` and minimums `mn`. Decoding each
//! format into [`KBlock`] lets one dequantizer and one scalar dot product serve all six (and the
//! repacking into tiles, [`crate::packed`], the k-quants).

use crate::dtype::{f16_at, DType, QK_K};
use crate::iq4;

/// One k-quant block in the common shape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KBlock {
    /// Super-block scale.
    pub d: f32,
    /// Super-block scale of the minimums (0 for formats without them).
    pub dmin: f32,
    /// Group scales.
    pub sc: [i8; 16],
    /// Group minimums.
    pub mn: [i8; 16],
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
/// See [`K_Q2`].
pub(crate) const K_IQ4_XS: u8 = 5;

/// The format of a const-generic id.
pub(crate) const fn k_format(id: u8) -> DType {
    match id {
        K_Q2 => DType::Q2_K,
        K_Q3 => DType::Q3_K,
        K_Q4 => DType::Q4_K,
        K_Q5 => DType::Q5_K,
        K_Q6 => DType::Q6_K,
        _ => DType::IQ4_XS,
    }
}

/// The constant subtracted from every unsigned value of `dtype` (Q3_K: 4, Q6_K: 32, IQ4_XS:
/// 128, its table values being stored as `u = value + 128`).
pub(crate) const fn offset(dtype: DType) -> i32 {
    match dtype {
        DType::Q3_K => 4,
        DType::Q6_K => 32,
        DType::IQ4_XS => 128,
        _ => 0,
    }
}

/// The super-block scales and the group scales and minimums of a k-quant block
/// (`(d, dmin, sc, mn)`), without its values. Every format's group scales and minimums fit
/// in an `i8`.
#[inline(always)]
pub(crate) fn scales(dtype: DType, b: &[u8]) -> (f32, f32, [i8; 16], [i8; 16]) {
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let bytes = |w: [u32; 4]| -> [i8; 16] {
        let mut out = [0i8; 16];
        for (o, v) in out.iter_mut().zip(w.iter().flat_map(|w| w.to_le_bytes())) {
            *o = v as i8;
        }
        out
    };
    match dtype {
        DType::Q2_K => {
            let lo = 0x0f0f_0f0f;
            let w = [word(0), word(4), word(8), word(12)];
            let sc = bytes(w.map(|w| w & lo));
            let mn = bytes(w.map(|w| (w >> 4) & lo));
            (f16_at(b, 80), f16_at(b, 82), sc, mn)
        }
        DType::Q3_K => {
            let (a0, a1, t) = (word(96), word(100), word(104));
            let (lo, hi) = (0x0f0f_0f0f, 0x0303_0303);
            let sc = bytes([
                (a0 & lo) | ((t & hi) << 4),
                (a1 & lo) | (((t >> 2) & hi) << 4),
                ((a0 >> 4) & lo) | (((t >> 4) & hi) << 4),
                ((a1 >> 4) & lo) | (((t >> 6) & hi) << 4),
            ]);
            // Stored as 0..63 with +32.
            (f16_at(b, 108), 0.0, sc.map(|v| v - 32), [0; 16])
        }
        DType::Q4_K | DType::Q5_K => {
            // ggml's get_scale_min_k4 for all eight 32-element sub-blocks at once.
            let (w0, w1, w2) = (word(4), word(8), word(12));
            let (m6, m4, m2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
            let sc8 = bytes([w0 & m6, (w2 & m4) | (((w0 >> 6) & m2) << 4), 0, 0]);
            let mn8 = bytes([w1 & m6, ((w2 >> 4) & m4) | (((w1 >> 6) & m2) << 4), 0, 0]);
            let spread = |v: [i8; 16]| std::array::from_fn(|g| v[g / 2]);
            (f16_at(b, 0), f16_at(b, 2), spread(sc8), spread(mn8))
        }
        DType::Q6_K => {
            let sc = std::array::from_fn(|g| b[192 + g] as i8);
            (f16_at(b, 208), 0.0, sc, [0; 16])
        }
        DType::IQ4_XS => {
            // One scale per 32 elements: both of its 16-element groups.
            let sc = std::array::from_fn(|g| iq4::xs_scale(b, g / 2));
            (f16_at(b, 0), 0.0, sc, [0; 16])
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
        DType::IQ4_XS => {
            for (blk, qs) in b[8..136].chunks_exact(16).enumerate() {
                for (e, i) in iq4::indices(qs).into_iter().enumerate() {
                    u[32 * blk + e] = iq4::UNSIGNED[i as usize];
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
