//! Run-time choice of SIMD paths. Every path has a scalar twin that tests compare against.

use std::sync::OnceLock;

/// An instruction-set level the kernels can use, in increasing order of capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust; the reference.
    Scalar,
    /// AVX2 + FMA + F16C (integer dot products through `maddubs`).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd` integer dot products).
    Avx512Vnni,
}

impl SimdLevel {
    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512Vnni => {
                SimdLevel::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// All levels this CPU supports, scalar first.
    pub fn supported() -> Vec<SimdLevel> {
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni]
            .into_iter()
            .filter(|l| l.is_supported())
            .collect()
    }

    /// The best level this CPU supports.
    pub fn best() -> SimdLevel {
        *Self::supported()
            .last()
            .expect("scalar is always supported")
    }

    /// Parses `scalar`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx512vnni" => Some(SimdLevel::Avx512Vnni),
            _ => None,
        }
    }
}

/// The level used by default: the best supported, or `TANDEM_SIMD` (`scalar`, `avx2`,
/// `avx512`) capped at what the CPU supports.
pub fn active() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = SimdLevel::best();
        match std::env::var("TANDEM_SIMD")
            .ok()
            .and_then(|s| SimdLevel::parse(&s))
        {
            Some(l) => l.min(best),
            None => best,
        }
    })
}

/// Whether the packed kernels prefetch the weight stream in software, a few KiB ahead. On
/// Intel's cores it pays (a Xeon with AVX-512 VNNI: 16.5 -> 21 GB/s on one weight stream); on
/// AMD's Zen 4 it costs (one core decoding the 1.5B model: 15.5 tok/s with it, 19.5 without),
/// its L2 stream prefetcher already runs ahead of a sequential read and the software
/// prefetches take the miss buffers it would use.
pub fn prefetch_weights() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| cpu_vendor() != *b"AuthenticAMD")
}

/// The CPU's vendor string (`GenuineIntel`, `AuthenticAMD`, ...).
fn cpu_vendor() -> [u8; 12] {
    let mut v = [0u8; 12];
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unused_unsafe)] // `__cpuid` is safe on newer toolchains
        // SAFETY: leaf 0 exists on every x86-64 CPU.
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    }
    v
}
