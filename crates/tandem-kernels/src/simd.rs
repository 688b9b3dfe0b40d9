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
    /// [`SimdLevel::Avx512Vnni`] with AMX-INT8 tile multiplies for the k-quants' matmuls of 10
    /// activation rows or more, sixteen at a time (their results are the same bits: integer
    /// sums).
    Amx,
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
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Amx => SimdLevel::Avx512Vnni.is_supported() && amx_usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// All levels this CPU supports, scalar first.
    pub fn supported() -> Vec<SimdLevel> {
        [
            SimdLevel::Scalar,
            SimdLevel::Avx2,
            SimdLevel::Avx512Vnni,
            SimdLevel::Amx,
        ]
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

    /// Parses `scalar`, `avx2`, `avx512` or `amx`.
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx512vnni" => Some(SimdLevel::Avx512Vnni),
            "amx" => Some(SimdLevel::Amx),
            _ => None,
        }
    }
}

/// Whether the CPU has AMX-INT8 tiles (CPUID leaf 7: AMX-TILE and AMX-INT8) and Linux lets
/// this process use them: their 8 KiB of register state is off until a process asks for it
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and a VM may refuse. Asked once, for the process.
#[cfg(target_arch = "x86_64")]
fn amx_usable() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[allow(unused_unsafe)] // `__cpuid_count` is safe on newer toolchains
        // SAFETY: leaf 7 exists on every CPU with AVX-512 (checked by the caller first).
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        let (tile, int8) = (edx & (1 << 24) != 0, edx & (1 << 25) != 0);
        tile && int8 && request_amx_state()
    })
}

/// Asks Linux for the AMX tile data state (`XFEATURE_XTILEDATA`, 18) for this process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this code only changes which register state the process may use.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_amx_state() -> bool {
    false
}

/// The level used by default: the best supported, or `TANDEM_SIMD` (`scalar`, `avx2`,
/// `avx512`, `amx`) capped at what the CPU supports.
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

/// Whether the packed kernels prefetch the weight stream in software, a few KiB ahead. It pays
/// on Intel's cores (a Xeon with AVX-512 VNNI: 16.5 -> 21 GB/s on one weight stream) and on
/// AMD's Zen 3 (an EPYC without AVX-512: the 1.5B model decoded at 25.3-30.8 tok/s with it,
/// 21.9-24.7 without, in alternating runs); it costs on Zen 4 (one core decoding the 1.5B
/// model: 15.5 tok/s with it, 19.5 without), whose L2 stream prefetcher already runs ahead of
/// a sequential read and whose miss buffers the software prefetches take. Later AMD cores are
/// taken to behave as Zen 4 (not measured).
pub fn prefetch_weights() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !(cpu_vendor() == *b"AuthenticAMD" && amd_zen4_or_later()))
}

/// Whether an AMD CPU is a Zen 4 core or later, by its family and model (a VM may hide
/// AVX-512, never these): family 0x19 holds Zen 3 and Zen 4, the latter at models 0x10-0x1f,
/// 0x60-0x7f and 0xa0-0xaf; family 0x1a (Zen 5) and up are later.
fn amd_zen4_or_later() -> bool {
    let (family, model) = cpu_family_model();
    family > 0x19 || (family == 0x19 && matches!(model, 0x10..=0x1f | 0x60..=0x7f | 0xa0..=0xaf))
}

/// The CPU's display family and model (CPUID leaf 1, extended fields folded in as the vendors
/// specify); (0, 0) off x86-64.
fn cpu_family_model() -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unused_unsafe)] // `__cpuid` is safe on newer toolchains
        // SAFETY: leaf 1 exists on every x86-64 CPU.
        let eax = unsafe { std::arch::x86_64::__cpuid(1) }.eax;
        let (base_family, base_model) = ((eax >> 8) & 0xf, (eax >> 4) & 0xf);
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0xf || base_family == 0x6 {
            ((eax >> 16) & 0xf) << 4 | base_model
        } else {
            base_model
        };
        (family, model)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (0, 0)
}

/// The CPU's vendor string (`GenuineIntel`, `AuthenticAMD`, ...).
fn cpu_vendor() -> [u8; 12] {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
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

#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod tests {
    /// The family and model read from CPUID are the ones Linux reports.
    #[test]
    fn family_and_model_match_proc_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let field = |name: &str| -> u32 {
            let line = info
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .expect("the field in /proc/cpuinfo");
            line.split(':').nth(1).unwrap().trim().parse().unwrap()
        };
        assert_eq!(
            super::cpu_family_model(),
            (field("cpu family"), field("model"))
        );
    }
}
