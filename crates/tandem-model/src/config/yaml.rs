//! MindFormers YAML: the `model.model_config` section (`type: LlamaConfig`), or a bare mapping.

use serde_yaml::{Mapping, Value};

use super::LlamaConfig;
use crate::error::ConfigError;

impl LlamaConfig {
    /// Reads a MindFormers YAML document: a whole run config (its `model.model_config`) or just
    /// the `model_config` mapping.
    pub fn from_mindformers_yaml(text: &str) -> Result<LlamaConfig, ConfigError> {
        let parse = |why: String| ConfigError::Parse {
            format: "MindFormers YAML",
            why,
        };
        let doc: Value = serde_yaml::from_str(text).map_err(|e| parse(e.to_string()))?;
        let section = doc
            .get("model")
            .and_then(|m| m.get("model_config"))
            .unwrap_or(&doc);
        let mut map: Mapping = section
            .as_mapping()
            .cloned()
            .ok_or_else(|| parse("model_config is not a mapping".into()))?;
        if let Some(t) = map.remove("type") {
            if t.as_str() != Some("LlamaConfig") {
                return Err(ConfigError::Unsupported(format!(
                    "model_config type {t:?} (expected LlamaConfig)"
                )));
            }
        }
        let c: LlamaConfig =
            serde_yaml::from_value(Value::Mapping(map)).map_err(|e| parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// This config as a MindFormers YAML document (`model: model_config: type: LlamaConfig ...`).
    pub fn to_mindformers_yaml(&self) -> String {
        let mut inner = Mapping::new();
        inner.insert("type".into(), "LlamaConfig".into());
        if let Value::Mapping(m) = serde_yaml::to_value(self).expect("config serializes") {
            inner.extend(m);
        }
        let mut model = Mapping::new();
        model.insert("model_config".into(), Value::Mapping(inner));
        let mut arch = Mapping::new();
        arch.insert("type".into(), "LlamaForCausalLM".into());
        model.insert("arch".into(), Value::Mapping(arch));
        let mut root = Mapping::new();
        root.insert("model".into(), Value::Mapping(model));
        serde_yaml::to_string(&Value::Mapping(root)).expect("YAML serializes")
    }
}
