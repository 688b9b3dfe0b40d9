//! MII's generate options given as a JSON object (the REST body, gRPC's `query_kwargs`, the
//! Python `**kwargs`), checked by name and type into [`GenerateParams`] with MII's defaults.
//! Every front end goes through here, so an option means the same everywhere.

use serde_json::{Map, Value};

use crate::error::ParamError;
use crate::params::GenerateParams;

/// The options MII's `GenerateParamsConfig` has, plus Tandem's `repetition_penalty` and
/// `seed`.
pub const MII_OPTIONS: &[&str] = &[
    "max_length",
    "max_new_tokens",
    "min_new_tokens",
    "ignore_eos",
    "top_p",
    "top_k",
    "temperature",
    "do_sample",
    "return_full_text",
    "stop",
    "repetition_penalty",
    "seed",
];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn wrong(name: &'static str, expected: &str, v: &Value) -> ParamError {
    ParamError::Invalid {
        name,
        why: format!("expected {expected}, got {} ({v})", kind(v)),
    }
}

fn count(name: &'static str, v: &Value) -> Result<usize, ParamError> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| wrong(name, "a non-negative integer", v))
}

fn opt_count(name: &'static str, v: &Value) -> Result<Option<usize>, ParamError> {
    if v.is_null() {
        return Ok(None);
    }
    count(name, v).map(Some)
}

fn number(name: &'static str, v: &Value) -> Result<f32, ParamError> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| wrong(name, "a number", v))
}

fn flag(name: &'static str, v: &Value) -> Result<bool, ParamError> {
    v.as_bool().ok_or_else(|| wrong(name, "a bool", v))
}

fn stops(v: &Value) -> Result<Vec<String>, ParamError> {
    let bad = || wrong("stop", "a string or a list of strings", v);
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|s| s.as_str().map(String::from).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

impl GenerateParams {
    /// MII's options from a JSON object: MII's defaults for what is absent, an error naming
    /// the option for an unknown key or a value of the wrong type. (Ranges are checked later,
    /// against the prompt, by [`GenerateParams::validate`].)
    pub fn from_mii_options(opts: &Map<String, Value>) -> Result<Self, ParamError> {
        let mut p = GenerateParams::default();
        for (key, v) in opts {
            let Some(&name) = MII_OPTIONS.iter().find(|n| **n == key) else {
                return Err(ParamError::Unknown(key.clone()));
            };
            match name {
                "max_length" => p.max_length = opt_count(name, v)?,
                "max_new_tokens" => p.max_new_tokens = opt_count(name, v)?,
                "min_new_tokens" => p.min_new_tokens = count(name, v)?,
                "ignore_eos" => p.ignore_eos = flag(name, v)?,
                "top_p" => p.top_p = number(name, v)?,
                "top_k" => p.top_k = opt_count(name, v)?,
                "temperature" if v.is_null() => p.temperature = None,
                "temperature" => p.temperature = Some(number(name, v)?),
                "do_sample" => p.do_sample = flag(name, v)?,
                "return_full_text" => p.return_full_text = flag(name, v)?,
                "stop" => p.stop = stops(v)?,
                "repetition_penalty" => p.repetition_penalty = number(name, v)?,
                "seed" if v.is_null() => p.seed = None,
                "seed" => {
                    p.seed = Some(
                        v.as_u64()
                            .ok_or_else(|| wrong(name, "a non-negative integer", v))?,
                    )
                }
                _ => unreachable!("every MII option has an arm"),
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<GenerateParams, ParamError> {
        GenerateParams::from_mii_options(v.as_object().unwrap())
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse(json!({})).unwrap(), GenerateParams::default());
        let p = parse(
            json!({"max_new_tokens": 8, "top_p": 1, "temperature": 0.5, "do_sample": false,
            "stop": ["a", "b"], "seed": 7, "top_k": null, "return_full_text": true}),
        )
        .unwrap();
        assert_eq!(p.max_new_tokens, Some(8));
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.temperature, Some(0.5));
        assert!(!p.do_sample && p.return_full_text);
        assert_eq!(p.stop, vec!["a", "b"]);
        assert_eq!(p.seed, Some(7));
        assert_eq!(parse(json!({"stop": "x"})).unwrap().stop, vec!["x"]);
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(
            parse(json!({"max_tokens": 3})).unwrap_err(),
            ParamError::Unknown("max_tokens".into())
        );
        for (body, name) in [
            (json!({"top_p": "high"}), "top_p"),
            (json!({"max_new_tokens": -1}), "max_new_tokens"),
            (json!({"max_new_tokens": 1.5}), "max_new_tokens"),
            (json!({"do_sample": 1}), "do_sample"),
            (json!({"stop": [1]}), "stop"),
            (json!({"seed": "x"}), "seed"),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.param(), Some(name), "{body}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }
}
