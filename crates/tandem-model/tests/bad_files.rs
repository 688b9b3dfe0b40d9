//! Missing, truncated and corrupt model files, inconsistent configs and shape mismatches all
//! give typed errors that name the file; nothing panics.

use std::path::{Path, PathBuf};

use tandem_model::{load, ModelError};

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tiny")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-bad-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_model(from: &Path, to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn err(p: &Path) -> ModelError {
    match load(p) {
        Ok(_) => panic!("{} should not load", p.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_paths() {
    let e = err(Path::new("/nonexistent/model.gguf"));
    assert!(
        matches!(e, ModelError::Io { .. }) && e.to_string().contains("/nonexistent/model.gguf"),
        "{e}"
    );
    let d = scratch("empty");
    assert!(matches!(err(&d), ModelError::NotAModel { .. }));
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let d = scratch("trunc");
    copy_model(&tiny("gqa"), &d);
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&d);
    assert!(
        matches!(e, ModelError::Safetensors { .. }) && e.to_string().contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(&f, b"garbage").unwrap();
    assert!(matches!(err(&d), ModelError::Safetensors { .. }));
}

#[test]
fn inconsistent_config_and_shape_mismatch() {
    let d = scratch("shape");
    copy_model(&tiny("gqa"), &d);
    let cfg_path = d.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    // A config whose FFN width disagrees with the stored tensors.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\": 64", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let e = err(&d);
    assert!(
        matches!(e, ModelError::ShapeMismatch { .. }) && e.to_string().contains("mlp"),
        "{e}"
    );
    // A config that is invalid on its own.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    let e = err(&d);
    assert!(
        matches!(e, ModelError::Config { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
    // Bias promised but absent.
    std::fs::write(
        &cfg_path,
        cfg.replace("\"attention_bias\": false", "\"attention_bias\": true"),
    )
    .unwrap();
    assert!(matches!(err(&d), ModelError::MissingTensor { .. }));
}

#[test]
fn truncated_gguf_names_the_file() {
    let src = tandem_model::fetch::ensure_default_model(false).unwrap();
    let d = scratch("gguf");
    let f = d.join("cut.gguf");
    let bytes = std::fs::read(&src).unwrap();
    for cut in [100, 2_000_000, bytes.len() - 1000] {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let e = err(&f);
        assert!(
            matches!(e, ModelError::Gguf { .. }) && e.to_string().contains("cut.gguf"),
            "{e}"
        );
    }
}
