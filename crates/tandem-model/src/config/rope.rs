//! RoPE frequencies for every `extend_method`, as MindFormers' `FreqsMgr` and HF transformers'
//! rope initializers compute them.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::LlamaConfig;
use crate::error::ConfigError;

/// MindFormers' `SeqExtendMethod` (spelled as in its YAML files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ExtendMethod {
    /// Plain RoPE (the string "None").
    #[default]
    None,
    /// Position interpolation: positions divided by `scaling_factor`.
    #[serde(rename = "PI")]
    Pi,
    /// Base scaling: `theta *= scaling_factor`.
    #[serde(rename = "NTK")]
    Ntk,
    /// Dynamic NTK (validated, but no Llama implementation, as in MindFormers).
    #[serde(rename = "DYNAMIC_NTK")]
    DynamicNtk,
    /// Llama 3.1 piecewise wavelength scaling (dict `scaling_factor`).
    #[serde(rename = "LLAMA3")]
    Llama3,
    /// YaRN (dict `scaling_factor`).
    #[serde(rename = "YARN")]
    Yarn,
    /// Linear: `inv_freq /= factor` (dict `{factor}`, or a number).
    #[serde(rename = "linear")]
    Linear,
}

impl ExtendMethod {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtendMethod::None => "None",
            ExtendMethod::Pi => "PI",
            ExtendMethod::Ntk => "NTK",
            ExtendMethod::DynamicNtk => "DYNAMIC_NTK",
            ExtendMethod::Llama3 => "LLAMA3",
            ExtendMethod::Yarn => "YARN",
            ExtendMethod::Linear => "linear",
        }
    }
}

/// `scaling_factor`: a number for PI/NTK, a dict for LLAMA3/YARN/linear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScalingFactor {
    /// A plain factor.
    Float(f64),
    /// Named parameters.
    Dict(BTreeMap<String, f64>),
}

/// The per-dimension inverse frequencies and the cos/sin multiplier of a model's RoPE.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    /// `head_dim / 2` inverse frequencies, scaling applied.
    pub inv_freq: Vec<f64>,
    /// Multiplier on cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f64,
}

impl RopeParams {
    /// Writes `cos` and `sin` of `position * inv_freq` (times the attention factor).
    pub fn angles(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        // f32 products, as HF computes them, so long contexts round the same way.
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = (position as f32 * f as f32) as f64;
            *c = (a.cos() * self.attention_factor) as f32;
            *s = (a.sin() * self.attention_factor) as f32;
        }
    }

    /// Divides each inverse frequency by the matching factor (GGUF's `rope_freqs` tensor).
    pub fn apply_freq_factors(&mut self, factors: &[f32]) {
        for (f, &d) in self.inv_freq.iter_mut().zip(factors) {
            *f /= d as f64;
        }
    }
}

fn bad(method: ExtendMethod, why: impl Into<String>) -> ConfigError {
    ConfigError::BadRopeScaling {
        method: method.as_str().into(),
        why: why.into(),
    }
}

impl LlamaConfig {
    fn scaling_dict(&self, keys: &[&str]) -> Result<&BTreeMap<String, f64>, ConfigError> {
        let m = self.extend_method;
        let ScalingFactor::Dict(d) = &self.scaling_factor else {
            return Err(bad(
                m,
                format!("scaling_factor must be a dict with keys {keys:?}"),
            ));
        };
        let mut have: Vec<&str> = d.keys().map(String::as_str).collect();
        let mut want = keys.to_vec();
        have.sort_unstable();
        want.sort_unstable();
        if have != want {
            return Err(bad(
                m,
                format!("scaling_factor must have exactly the keys {want:?}, found {have:?}"),
            ));
        }
        Ok(d)
    }

    fn scaling_float(&self) -> Result<f64, ConfigError> {
        match &self.scaling_factor {
            ScalingFactor::Float(f) if f.is_finite() && *f > 0.0 => Ok(*f),
            other => Err(bad(
                self.extend_method,
                format!("scaling_factor must be a number above zero, found {other:?}"),
            )),
        }
    }

    /// RoPE frequencies for this config; errors on inconsistent scaling parameters.
    pub fn rope_params(&self) -> Result<RopeParams, ConfigError> {
        let dim = self.head_dim();
        let base_freqs = |theta: f64| -> Vec<f64> {
            (0..dim / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
                .collect()
        };
        let m = self.extend_method;
        let mut attention_factor = 1.0;
        let inv_freq = match m {
            ExtendMethod::None => base_freqs(self.theta),
            ExtendMethod::Pi => {
                let s = self.scaling_float()?;
                base_freqs(self.theta).into_iter().map(|f| f / s).collect()
            }
            ExtendMethod::Ntk => base_freqs(self.theta * self.scaling_float()?),
            ExtendMethod::Linear => {
                let factor = match &self.scaling_factor {
                    ScalingFactor::Float(_) => self.scaling_float()?,
                    ScalingFactor::Dict(_) => self.scaling_dict(&["factor"])?["factor"],
                };
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(bad(m, "factor must be above zero"));
                }
                base_freqs(self.theta).into_iter().map(|f| f / factor).collect()
            }
            ExtendMethod::Llama3 => {
                let d = self.scaling_dict(&["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"])?;
                let (factor, low, high, old) =
                    (d["factor"], d["low_freq_factor"], d["high_freq_factor"], d["original_max_position_embeddings"]);
                if factor.is_nan() || factor < 1.0 {
                    return Err(bad(m, "factor must be at least 1"));
                }
                if !(high > low && low > 0.0) {
                    return Err(bad(m, "need 0 < low_freq_factor < high_freq_factor"));
                }
                if !(old > 0.0 && old < self.max_positions() as f64) {
                    return Err(bad(m, "original_max_position_embeddings must be below max_position_embedding"));
                }
                let (low_wl, high_wl) = (old / low, old / high);
                base_freqs(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wl - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            ExtendMethod::Yarn => {
                let d = self.scaling_dict(&["factor", "original_max_position_embeddings", "beta_slow", "beta_fast", "mscale", "mscale_all_dim"])?;
                let (factor, old) = (d["factor"], d["original_max_position_embeddings"]);
                if factor.is_nan() || factor < 1.0 || old.is_nan() || old <= 0.0 {
                    return Err(bad(m, "need factor >= 1 and original_max_position_embeddings > 0"));
                }
                let get_mscale = |s: f64, ms: f64| if s <= 1.0 { 1.0 } else { 0.1 * ms * s.ln() + 1.0 };
                attention_factor = if d["mscale"] != 0.0 && d["mscale_all_dim"] != 0.0 {
                    get_mscale(factor, d["mscale"]) / get_mscale(factor, d["mscale_all_dim"])
                } else {
                    get_mscale(factor, 1.0)
                };
                let dimf = dim as f64;
                let correction = |rot: f64| dimf * (old / (rot * 2.0 * PI)).ln() / (2.0 * self.theta.ln());
                let lo = correction(d["beta_fast"]).floor().max(0.0);
                let mut hi = correction(d["beta_slow"]).ceil().min(dimf - 1.0);
                if lo == hi {
                    hi += 0.001;
                }
                base_freqs(self.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
            ExtendMethod::DynamicNtk => {
                return Err(ConfigError::Unsupported(
                    "extend_method DYNAMIC_NTK: MindFormers' Llama has no implementation either (it needs is_dynamic and a per-length base)".into(),
                ))
            }
        };
        Ok(RopeParams {
            inv_freq,
            attention_factor,
        })
    }
}
