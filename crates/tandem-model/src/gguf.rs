//! GGUF (v2/v3) reader: metadata and tensor infos parsed with bounds checks on every read,
//! tensor data memory-mapped and used in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use tandem_kernels::DType;

use crate::error::{ModelError, Result};
use crate::weights::TensorData;

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's entry in the GGUF header.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Row-major shape, outermost first (GGUF lists dimensions innermost first).
    pub shape: Vec<usize>,
    /// Storage format.
    pub dtype: DType,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// An open GGUF file: metadata, tensor infos and the mapped data.
#[derive(Debug)]
pub struct GgufFile {
    /// The file's path (for error messages).
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
    map: Arc<Mmap>,
}

const MAGIC: &[u8; 4] = b"GGUF";
/// More than any real file has; guards allocations driven by hostile counts.
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "truncated: wanted {n} bytes at offset {} of {}",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn count(&mut self, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(format!("{what} count {n} is implausibly large"));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| "string length overflows".to_string())?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("string at offset {} is not UTF-8", self.pos - n))
    }
    fn value(&mut self, ty: u32, depth: u32) -> std::result::Result<GgufValue, String> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>()?[0]),
            1 => GgufValue::I8(self.arr::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("bool value {b} is neither 0 nor 1")),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let ety = self.u32()?;
                let n = self.count("array element")?;
                // Every element takes at least one byte: a count beyond the file is corrupt.
                if n > self.buf.len() - self.pos {
                    return Err(format!("array of {n} elements does not fit in the file"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file; tensor data stays mapped, not copied.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the mapping is read-only; Tandem never writes model files while serving them.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: PathBuf, map: Arc<Mmap>) -> Result<GgufFile> {
        let err = |why: String| ModelError::Gguf {
            path: path.clone(),
            why,
        };
        let mut c = Cursor {
            buf: &map[..],
            pos: 0,
        };
        if c.take(4).map_err(err)? != MAGIC {
            return Err(err("bad magic (not a GGUF file)".into()));
        }
        let version = c.u32().map_err(err)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!(
                "unsupported GGUF version {version} (2 and 3 are supported)"
            )));
        }
        let n_tensors = c.count("tensor").map_err(err)?;
        let n_kv = c.count("metadata").map_err(err)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string().map_err(err)?;
            let ty = c.u32().map_err(err)?;
            let v = c
                .value(ty, 0)
                .map_err(|e| err(format!("metadata `{key}`: {e}")))?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(err(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            },
        };
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string().map_err(err)?;
            let n_dims = c.u32().map_err(err)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(err(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(c.u64().map_err(err)?);
            }
            let ty = c.u32().map_err(err)?;
            let offset = c.u64().map_err(err)?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in infos {
            let dtype =
                DType::from_ggml_id(ty).ok_or_else(|| ModelError::UnsupportedTensorType {
                    path: path.clone(),
                    tensor: name.clone(),
                    ty: format!("ggml type {ty}"),
                })?;
            let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            let elems = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e < 1 << 40);
            let bytes = elems
                .and_then(|e| dtype.row_bytes(e as usize))
                .ok_or_else(|| {
                    err(format!(
                        "tensor `{name}`: shape {shape:?} is not whole {dtype} blocks"
                    ))
                })?;
            if !(dims[0] as usize).is_multiple_of(dtype.block_len()) {
                return Err(err(format!(
                    "tensor `{name}`: rows of {} are not whole {dtype} blocks",
                    dims[0]
                )));
            }
            if !(offset as usize).is_multiple_of(alignment) {
                return Err(err(format!(
                    "tensor `{name}`: offset {offset} is not aligned to {alignment}"
                )));
            }
            let start = (data_start as u64).checked_add(offset).map(|s| s as usize);
            let range = start
                .and_then(|s| s.checked_add(bytes).map(|e| s..e))
                .filter(|r| r.end <= map.len())
                .ok_or_else(|| err(format!("tensor `{name}`: data at offset {offset} ({bytes} bytes) runs past the end of the file ({} bytes): truncated?", map.len())))?;
            if tensors
                .insert(
                    name.clone(),
                    GgufTensorInfo {
                        shape,
                        dtype,
                        range,
                    },
                )
                .is_some()
            {
                return Err(err(format!("tensor `{name}` appears twice")));
            }
        }
        Ok(GgufFile {
            path,
            version,
            metadata,
            tensors,
            map,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The data of tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<TensorData> {
        self.tensors.get(name).map(|t| TensorData {
            dtype: t.dtype,
            shape: t.shape.clone(),
            map: self.map.clone(),
            range: t.range.clone(),
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
pub(crate) mod writer {
    //! A minimal GGUF writer for tests (valid and deliberately broken files).
    use super::GgufValue;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend(x.to_le_bytes()),
            GgufValue::I16(x) => out.extend(x.to_le_bytes()),
            GgufValue::U32(x) => out.extend(x.to_le_bytes()),
            GgufValue::I32(x) => out.extend(x.to_le_bytes()),
            GgufValue::U64(x) => out.extend(x.to_le_bytes()),
            GgufValue::I64(x) => out.extend(x.to_le_bytes()),
            GgufValue::F32(x) => out.extend(x.to_le_bytes()),
            GgufValue::F64(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(b) => out.push(*b as u8),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(a) => {
                // An empty array is written as an array of u8.
                out.extend(a.first().map_or(0, type_id).to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
        }
    }

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// Serializes a GGUF v3 file with the given metadata and (name, ggml shape, type, bytes) tensors.
    pub fn write(
        meta: &[(&str, GgufValue)],
        tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
    ) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = vec![];
        for (name, dims, ty, data) in tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, _, data) in tensors {
            out.extend(data);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        let mut f = tempfile();
        std::io::Write::write_all(&mut f.1, &bytes).unwrap();
        let r = GgufFile::open(&f.0);
        let _ = std::fs::remove_file(&f.0);
        r
    }

    fn tempfile() -> (PathBuf, File) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tandem-gguf-test-{}-{}.gguf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = File::create(&p).unwrap();
        (p, f)
    }

    fn sample() -> Vec<u8> {
        writer::write(
            &[
                ("general.architecture", GgufValue::String("llama".into())),
                ("llama.block_count", GgufValue::U32(1)),
            ],
            &[
                ("t", vec![32, 2], 8, vec![0u8; 68]),
                ("f", vec![4], 0, vec![0u8; 16]),
            ],
        )
    }

    #[test]
    fn every_value_type_round_trips() {
        let values = vec![
            GgufValue::U8(1),
            GgufValue::I8(-2),
            GgufValue::U16(3),
            GgufValue::I16(-4),
            GgufValue::U32(5),
            GgufValue::I32(-6),
            GgufValue::U64(7),
            GgufValue::I64(-8),
            GgufValue::F32(0.5),
            GgufValue::F64(-0.25),
            GgufValue::Bool(true),
            GgufValue::String("s".into()),
            GgufValue::Array(vec![GgufValue::U32(1), GgufValue::U32(2)]),
            GgufValue::Array(vec![]),
        ];
        let names: Vec<String> = (0..values.len()).map(|i| format!("k{i}")).collect();
        let meta: Vec<(&str, GgufValue)> = names
            .iter()
            .map(String::as_str)
            .zip(values.iter().cloned())
            .collect();
        let g = parse_bytes(writer::write(&meta, &[])).unwrap();
        for (k, v) in meta {
            assert_eq!(g.get(k), Some(&v), "{k}");
        }
    }

    #[test]
    fn reads_a_valid_file() {
        let g = parse_bytes(sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("llama.block_count").and_then(|v| v.as_u64()), Some(1));
        let t = g.tensor("t").unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (DType::Q8_0, vec![2, 32]));
        assert_eq!(t.bytes().len(), 68);
    }

    #[test]
    fn truncated_and_corrupt_files_are_typed_errors() {
        let full = sample();
        for cut in [0, 3, 4, 10, 30, full.len() - 20] {
            let e = parse_bytes(full[..cut].to_vec()).expect_err("truncated file must fail");
            assert!(matches!(e, ModelError::Gguf { .. }), "{e}");
        }
        let mut bad = full.clone();
        bad[0] = b'X';
        assert!(parse_bytes(bad)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        let mut v1 = full.clone();
        v1[4] = 1;
        assert!(parse_bytes(v1)
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        // ggml type 16 is IQ2_XXS, which Tandem does not read.
        let unsupported = writer::write(&[], &[("iq2", vec![256], 16, vec![0u8; 66])]);
        assert!(matches!(
            parse_bytes(unsupported).unwrap_err(),
            ModelError::UnsupportedTensorType { .. }
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Random bytes and random corruptions of a valid file never panic.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)) {
            let _ = parse_bytes([b"GGUF".to_vec(), bytes].concat());
            let mut s = sample();
            for (i, b) in flips {
                let n = s.len();
                s[i % n] = b;
            }
            let _ = parse_bytes(s);
        }
    }
}

impl crate::weights::TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        GgufFile::tensor(self, name)
    }
    fn path(&self) -> &Path {
        &self.path
    }
}
