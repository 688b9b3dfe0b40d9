//! HF safetensors weights: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; f32/f16/bf16 stay as stored.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tandem_kernels::DType;

use crate::error::{ModelError, Result};
use crate::weights::{TensorData, TensorSource};

/// Tensors of one model directory's safetensors file(s).
pub struct SafetensorsFiles {
    dir: PathBuf,
    tensors: BTreeMap<String, TensorData>,
}

fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let f = File::open(path).map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })?;
    // SAFETY: read-only mapping of a model file that is not modified while in use.
    let m = unsafe { Mmap::map(&f) }.map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })?;
    Ok(Arc::new(m))
}

impl SafetensorsFiles {
    /// Opens `dir/model.safetensors` or the shards named by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsFiles> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                    path: index.clone(),
                    why: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Safetensors {
                    path: index.clone(),
                    why: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains('\\') || n == ".." {
                    return Err(ModelError::Safetensors {
                        path: index.clone(),
                        why: format!("shard name {n:?} is not a plain file name"),
                    });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = BTreeMap::new();
        for file in files {
            let map = map_file(&file)?;
            let st = SafeTensors::deserialize(&map[..]).map_err(|e| ModelError::Safetensors {
                path: file.clone(),
                why: e.to_string(),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    Dtype::F32 => DType::F32,
                    Dtype::F16 => DType::F16,
                    Dtype::BF16 => DType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedTensorType {
                            path: file.clone(),
                            tensor: name,
                            ty: format!("{other:?}"),
                        })
                    }
                };
                let start = view.data().as_ptr() as usize - base;
                let range = start..start + view.data().len();
                let shape = view.shape().to_vec();
                tensors.insert(
                    name.clone(),
                    TensorData {
                        name,
                        dtype,
                        shape,
                        map: map.clone(),
                        range,
                    },
                );
            }
        }
        Ok(SafetensorsFiles {
            dir: dir.to_path_buf(),
            tensors,
        })
    }
}

impl TensorSource for SafetensorsFiles {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        self.tensors.get(name).cloned()
    }
    fn path(&self) -> &Path {
        &self.dir
    }
}
