//! The IQ4 formats' non-linear 4-bit values (IQ4_NL, IQ4_XS): every 4-bit index selects one of
//! sixteen int8 values, denser near zero, where weights are.

/// ggml's `kvalues_iq4nl`: the value of each 4-bit index.
pub(crate) const VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// [`VALUES`] offset by +128 (as unsigned bytes): the unsigned values the packed kernels and
/// the k-quant shape work with, `value = u - 128`.
pub(crate) const UNSIGNED: [u8; 16] = {
    let mut u = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        u[i] = (VALUES[i] as i16 + 128) as u8;
        i += 1;
    }
    u
};

/// The 32 indices of one 32-element block from its 16 bytes: low nibbles are elements
/// 0..16, high nibbles 16..32 (ggml's pairing).
#[inline(always)]
pub(crate) fn indices(qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|e| {
        let q = qs[e % 16];
        if e < 16 {
            q & 0x0f
        } else {
            q >> 4
        }
    })
}

/// The 6-bit scale of 32-element block `ib` of an IQ4_XS super-block, less its +32 (so
/// `-32..32`): four low bits from `scales_l` (bytes 4..8), two high bits from `scales_h`
/// (bytes 2..4).
#[inline(always)]
pub(crate) fn xs_scale(b: &[u8], ib: usize) -> i8 {
    let high = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0f;
    (low | (((high >> (2 * ib)) & 3) as u8) << 4) as i8 - 32
}
