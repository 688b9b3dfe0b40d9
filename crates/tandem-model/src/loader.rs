//! Opening a model from a path: a `.gguf` file, or a directory with HF `config.json`,
//! safetensors and `tokenizer.json` (or a directory holding exactly one `.gguf`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_collective::Collective;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::model::LlamaModel;
use crate::safetensors_files::SafetensorsFiles;
use crate::tokenizer::Tokenizer;
use crate::weights::{LlamaWeights, WeightLayout};

/// A model with its tokenizer, loaded from one path.
pub struct LoadedModel {
    /// The network.
    pub model: LlamaModel,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub path: PathBuf,
}

fn single_gguf_in(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.into(),
        source,
    })?;
    let ggufs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(ggufs.into_iter().next()),
        n => Err(ModelError::NotAModel {
            path: dir.into(),
            why: format!("{n} .gguf files; name the one to load"),
        }),
    }
}

/// Loads the model at `path`.
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_with(path, None)
}

/// Loads rank `comm.rank()`'s tensor-parallel shard of the model at `path` (see
/// [`ShardPlan`](crate::shard::ShardPlan)); every rank of the group loads the same path.
/// Returns once every rank has loaded its shard.
pub fn load_shard(path: &Path, comm: Arc<dyn Collective>) -> Result<LoadedModel> {
    let loaded = load_with(path, Some(comm.clone()));
    if loaded.is_err() {
        // The other ranks are told instead of waiting for this one.
        comm.abort();
    }
    let loaded = loaded?;
    comm.barrier()?;
    Ok(loaded)
}

fn load_with(path: &Path, comm: Option<Arc<dyn Collective>>) -> Result<LoadedModel> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return hf_dir(path, comm);
        }
        if let Some(g) = single_gguf_in(path)? {
            return gguf(&g, comm);
        }
        return Err(ModelError::NotAModel {
            path: path.into(),
            why: "no config.json and no .gguf file".into(),
        });
    }
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    gguf(path, comm)
}

/// The configuration of the model at `path`, without loading its weights.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    let gguf_config = |p: &Path| {
        let g = GgufFile::open(p)?;
        LlamaConfig::from_gguf_metadata(&g.metadata).map_err(|error| ModelError::Config {
            path: p.into(),
            error,
        })
    };
    if path.is_dir() && !path.join("config.json").exists() {
        if let Some(g) = single_gguf_in(path)? {
            return gguf_config(&g);
        }
    }
    if !path.is_dir() {
        return gguf_config(path);
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    LlamaConfig::from_hf_json(&text).map_err(|error| ModelError::Config {
        path: cfg_path,
        error,
    })
}

/// The whole model, or a shard of it.
fn build(
    config: LlamaConfig,
    weights: LlamaWeights,
    comm: Option<Arc<dyn Collective>>,
) -> std::result::Result<LlamaModel, crate::error::ConfigError> {
    match comm {
        Some(c) => LlamaModel::sharded(config, weights, c),
        None => LlamaModel::new(config, weights),
    }
}

/// Loads a GGUF file: config from its metadata, tokenizer from its vocabulary.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    gguf(path, None)
}

fn gguf(path: &Path, comm: Option<Arc<dyn Collective>>) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let config =
        LlamaConfig::from_gguf_metadata(&g.metadata).map_err(|error| ModelError::Config {
            path: path.into(),
            error,
        })?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let mut weights = LlamaWeights::load(&g, &config, WeightLayout::Gguf)?;
    if LlamaConfig::gguf_neox_rope(&g.metadata) {
        weights.rope_style = tandem_kernels::RopeStyle::Half;
    }
    let model = build(config, weights, comm).map_err(|error| ModelError::Config {
        path: path.into(),
        error,
    })?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.into(),
    })
}

/// Loads an HF model directory.
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    hf_dir(dir, None)
}

fn hf_dir(dir: &Path, comm: Option<Arc<dyn Collective>>) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let config = LlamaConfig::from_hf_json(&text).map_err(|error| ModelError::Config {
        path: cfg_path.clone(),
        error,
    })?;
    let files = SafetensorsFiles::open_dir(dir)?;
    let weights = LlamaWeights::load(&files, &config, WeightLayout::Hf)?;
    let tokenizer = Tokenizer::from_hf_dir(dir, &config.eos_ids())?;
    let model = build(config, weights, comm).map_err(|error| ModelError::Config {
        path: cfg_path,
        error,
    })?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: dir.into(),
    })
}
