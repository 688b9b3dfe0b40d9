//! Roles, placements, data types and cache descriptions (`LLMRole`, `Placement`, `DataType`,
//! `CacheDesc`, `MemInfo`).

use crate::status::{param_invalid, LlmException, Result};

/// Role of an instance. In CacheManager mode it only labels the instance (and `switch_role`
/// toggles the listener); it restricts no call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlmRole {
    /// Prefill ("full") side.
    Prompt = 1,
    /// Decode ("incremental") side.
    Decoder = 2,
    /// Both.
    Mix = 3,
}

impl LlmRole {
    /// The string passed to the native layer as `llm.Role`.
    pub fn as_option(self) -> &'static str {
        match self {
            Self::Prompt => "Prompt",
            Self::Decoder => "Decoder",
            Self::Mix => "Mix",
        }
    }

    /// Parses `Prompt` / `Decoder` / `Mix` (any case) or the numeric value.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "prompt" | "1" => Ok(Self::Prompt),
            "decoder" | "2" => Ok(Self::Decoder),
            "mix" | "3" => Ok(Self::Mix),
            _ => param_invalid!("unknown role {s:?} (expected Prompt, Decoder or Mix)"),
        }
    }
}

impl std::fmt::Display for LlmRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::Prompt => "PROMPT",
            Self::Decoder => "DECODER",
            Self::Mix => "MIX",
        };
        write!(f, "LLMRole.{name}")
    }
}

/// Where a cache lives. On these hosts both are host memory of the `device_id` domain; the
/// distinction selects the pool (`mem_pool_cfg` vs `host_mem_pool_cfg`) and the swap direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// Host memory.
    Host = 0,
    /// Device memory (the default everywhere).
    #[default]
    Device = 1,
}

/// Memory type of a [`MemInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemType {
    /// Device memory.
    Device = 0,
    /// Host memory.
    Host = 1,
}

/// A memory range, for `remap_registered_memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// Memory type.
    pub mem_type: MemType,
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Status of a two-sided link's memory exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterMemStatus {
    /// Exchange done; transfers allowed.
    Ok = 0,
    /// Still exchanging.
    Preparing = 1,
    /// Failed.
    Failed = 2,
}

/// Element types, with GE's `ge::DataType` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// f32.
    DtFloat = 0,
    /// f16.
    DtFloat16 = 1,
    /// i8.
    DtInt8 = 2,
    /// i32.
    DtInt32 = 3,
    /// u8.
    DtUint8 = 4,
    /// i16.
    DtInt16 = 6,
    /// u16.
    DtUint16 = 7,
    /// u32.
    DtUint32 = 8,
    /// i64.
    DtInt64 = 9,
    /// u64.
    DtUint64 = 10,
    /// f64.
    DtDouble = 11,
    /// bool.
    DtBool = 12,
    /// Variable-length strings: cannot describe cache memory.
    DtString = 13,
    /// bf16.
    DtBf16 = 27,
}

impl DataType {
    /// Every type, for lookups by value.
    pub const ALL: [DataType; 14] = [
        Self::DtFloat,
        Self::DtFloat16,
        Self::DtInt8,
        Self::DtInt32,
        Self::DtUint8,
        Self::DtInt16,
        Self::DtUint16,
        Self::DtUint32,
        Self::DtInt64,
        Self::DtUint64,
        Self::DtDouble,
        Self::DtBool,
        Self::DtString,
        Self::DtBf16,
    ];

    /// Bytes per element; `None` for strings.
    pub fn size(self) -> Option<usize> {
        match self {
            Self::DtInt8 | Self::DtUint8 | Self::DtBool => Some(1),
            Self::DtFloat16 | Self::DtBf16 | Self::DtInt16 | Self::DtUint16 => Some(2),
            Self::DtFloat | Self::DtInt32 | Self::DtUint32 => Some(4),
            Self::DtInt64 | Self::DtUint64 | Self::DtDouble => Some(8),
            Self::DtString => None,
        }
    }

    /// The type with GE number `value`.
    pub fn from_value(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == value)
    }
}

/// Description of a cache: `num_tensors` tensors of one shape and type (K0, V0, K1, V1, ...).
///
/// For a blocks (PagedAttention) cache the batch dimension is the block dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDesc {
    /// Number of tensors.
    pub num_tensors: u32,
    /// Shape of each tensor.
    pub shape: Vec<i64>,
    /// Element type.
    pub data_type: DataType,
    /// Placement.
    pub placement: Placement,
    /// Index of the batch (or block) dimension.
    pub batch_dim_index: usize,
    /// Index of the sequence dimension, or -1.
    pub seq_len_dim_index: i64,
    /// Optional layout tag, carried and not interpreted.
    pub kv_tensor_format: Option<String>,
}

impl CacheDesc {
    /// A description with the reference defaults (device placement, batch dim 0, no seq dim).
    pub fn new(num_tensors: u32, shape: Vec<i64>, data_type: DataType) -> Result<Self> {
        let desc = Self {
            num_tensors,
            shape,
            data_type,
            placement: Placement::Device,
            batch_dim_index: 0,
            seq_len_dim_index: -1,
            kv_tensor_format: None,
        };
        desc.validate()?;
        Ok(desc)
    }

    /// Same description with another placement.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Checks rank 1..=32, positive dims, dim indices in range and a sized type.
    pub fn validate(&self) -> Result<()> {
        if self.shape.is_empty() || self.shape.len() > 32 {
            param_invalid!("cache shape rank must be 1..=32, got {}", self.shape.len());
        }
        if let Some(d) = self.shape.iter().find(|&&d| d <= 0) {
            param_invalid!("cache shape {:?} has a non-positive dim {d}", self.shape);
        }
        if self.batch_dim_index >= self.shape.len() {
            param_invalid!(
                "batch_dim_index {} out of range for rank {}",
                self.batch_dim_index,
                self.shape.len()
            );
        }
        if self.seq_len_dim_index != -1
            && !(0..self.shape.len() as i64).contains(&self.seq_len_dim_index)
        {
            param_invalid!("seq_len_dim_index {} out of range", self.seq_len_dim_index);
        }
        if self.data_type.size().is_none() {
            param_invalid!(
                "data type {:?} cannot describe cache memory",
                self.data_type
            );
        }
        self.checked_size()?;
        Ok(())
    }

    fn checked_size(&self) -> Result<u64> {
        let elem = self.data_type.size().unwrap_or(0) as u64;
        self.shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&s| s <= isize::MAX as u64)
            .ok_or_else(|| LlmException::param(format!("cache shape {:?} overflows", self.shape)))
    }

    /// Bytes of ONE tensor.
    pub fn size(&self) -> u64 {
        self.checked_size().unwrap_or(0)
    }

    /// Size of the batch (or block) dimension.
    pub fn batch_size(&self) -> u64 {
        self.shape[self.batch_dim_index] as u64
    }

    /// Bytes of one batch slot (or block) of one tensor. Slots are contiguous only when the
    /// batch dimension is the outermost one, which transfers require.
    pub fn slot_size(&self) -> u64 {
        self.size() / self.batch_size()
    }

    /// Sets dimension `dim_index` to `value` (the reference's `update_dim`).
    pub fn update_dim(&mut self, dim_index: usize, value: i64) -> Result<()> {
        if dim_index >= self.shape.len() {
            param_invalid!(
                "dim index {dim_index} out of range for rank {}",
                self.shape.len()
            );
        }
        let old = std::mem::replace(&mut self.shape[dim_index], value);
        if let Err(e) = self.validate() {
            self.shape[dim_index] = old;
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desc_sizes_and_checks() {
        let d = CacheDesc::new(4, vec![8, 16, 2, 64], DataType::DtFloat16).unwrap();
        assert_eq!(d.size(), 8 * 16 * 2 * 64 * 2);
        assert_eq!(d.batch_size(), 8);
        assert_eq!(d.slot_size(), 16 * 2 * 64 * 2);
        assert!(CacheDesc::new(1, vec![], DataType::DtFloat).is_err());
        assert!(CacheDesc::new(1, vec![0, 3], DataType::DtFloat).is_err());
        assert!(CacheDesc::new(1, vec![3], DataType::DtString).is_err());
        assert!(CacheDesc::new(1, vec![i64::MAX, 4], DataType::DtFloat).is_err());
        let mut d = d;
        assert!(d.update_dim(7, 3).is_err());
        assert!(d.update_dim(0, -1).is_err());
        assert_eq!(d.shape[0], 8);
        d.update_dim(0, 4).unwrap();
        assert_eq!(d.batch_size(), 4);
    }
}
