//! The deployment registry: a running deployment is recorded by name under
//! `$TANDEM_HOME/deployments/NAME.json` (endpoints, pid), so clients find it by name (MII's
//! `mii.client(name)`). Records of dead processes are detected as stale.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a client needs to reach a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Deployment name.
    pub name: String,
    /// Model id served.
    pub model: String,
    /// Process id of the server.
    pub pid: u32,
    /// gRPC endpoint (`host:port`).
    pub grpc: String,
    /// HTTP endpoint (`host:port`), if the REST/OpenAI server runs.
    pub http: Option<String>,
}

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No record under that name.
    #[error("no deployment named {name:?} is running (no record in {dir})")]
    NotFound { name: String, dir: PathBuf },
    /// A record whose process is gone.
    #[error("deployment {name:?} is stale: its server (pid {pid}) is not running; the record was removed")]
    Stale { name: String, pid: u32 },
    /// Another live deployment already uses the name.
    #[error("a deployment named {name:?} is already running (pid {pid})")]
    NameTaken { name: String, pid: u32 },
    /// The name cannot be a file name.
    #[error("invalid deployment name {0:?} (use letters, digits, '.', '_' and '-')")]
    BadName(String),
    /// Reading or writing the record failed.
    #[error("{path}: {why}")]
    Io { path: PathBuf, why: String },
}

/// The registry directory under a Tandem home.
pub fn dir(home: &Path) -> PathBuf {
    home.join("deployments")
}

fn record_path(home: &Path, name: &str) -> Result<PathBuf, RegistryError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with('.');
    if !ok {
        return Err(RegistryError::BadName(name.into()));
    }
    Ok(dir(home).join(format!("{name}.json")))
}

/// Whether process `pid` is alive (an exited process not yet reaped, a zombie, is not).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X'),
        Err(_) => false,
    }
}

/// Looks a deployment up; a record of a dead process is removed and reported as stale.
pub fn lookup(home: &Path, name: &str) -> Result<DeploymentRecord, RegistryError> {
    let path = record_path(home, name)?;
    let text = std::fs::read_to_string(&path).map_err(|_| RegistryError::NotFound {
        name: name.into(),
        dir: dir(home),
    })?;
    let rec: DeploymentRecord = serde_json::from_str(&text).map_err(|e| RegistryError::Io {
        path: path.clone(),
        why: format!("corrupt record: {e}"),
    })?;
    if !process_alive(rec.pid) {
        let _ = std::fs::remove_file(&path);
        return Err(RegistryError::Stale {
            name: name.into(),
            pid: rec.pid,
        });
    }
    Ok(rec)
}

/// Finds a deployment as MII's `mii.client(name)` does: by deployment name, else as the
/// default deployment of a model named `name` (`<name>-mii-deployment`).
pub fn find(
    home: &Path,
    model_or_deployment_name: &str,
) -> Result<DeploymentRecord, RegistryError> {
    match lookup(home, model_or_deployment_name) {
        Err(RegistryError::NotFound { .. } | RegistryError::Stale { .. }) => {
            let fallback = format!("{model_or_deployment_name}-mii-deployment");
            lookup(home, &fallback).map_err(|e| match e {
                RegistryError::NotFound { dir, .. } => RegistryError::NotFound {
                    name: model_or_deployment_name.into(),
                    dir,
                },
                other => other,
            })
        }
        other => other,
    }
}

/// A registration that removes its record when dropped (the deployment stopped).
pub struct Registration {
    path: PathBuf,
}

/// Records a running deployment; fails if a live deployment already has the name.
pub fn register(home: &Path, rec: &DeploymentRecord) -> Result<Registration, RegistryError> {
    let path = record_path(home, &rec.name)?;
    match lookup(home, &rec.name) {
        Ok(other) if other.pid != rec.pid => {
            return Err(RegistryError::NameTaken {
                name: rec.name.clone(),
                pid: other.pid,
            })
        }
        _ => {}
    }
    let io = |why: String| RegistryError::Io {
        path: path.clone(),
        why,
    };
    std::fs::create_dir_all(dir(home)).map_err(|e| io(e.to_string()))?;
    let tmp = path.with_extension(format!("json.{}", rec.pid));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(rec).expect("record serializes"),
    )
    .map_err(|e| io(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(e.to_string()))?;
    Ok(Registration { path })
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_lookup_stale_and_taken() {
        let home = std::env::temp_dir().join(format!("tandem-registry-{}", std::process::id()));
        let me = DeploymentRecord {
            name: "d1".into(),
            model: "m".into(),
            pid: std::process::id(),
            grpc: "127.0.0.1:1".into(),
            http: None,
        };
        let reg = register(&home, &me).unwrap();
        assert_eq!(lookup(&home, "d1").unwrap(), me);
        // Another live process cannot take the name (pid 1 is always alive).
        let other = DeploymentRecord {
            pid: 1,
            ..me.clone()
        };
        std::fs::write(
            record_path(&home, "d2").unwrap(),
            serde_json::to_vec(&DeploymentRecord {
                name: "d2".into(),
                ..other.clone()
            })
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            register(
                &home,
                &DeploymentRecord {
                    name: "d2".into(),
                    ..me.clone()
                }
            ),
            Err(RegistryError::NameTaken { .. })
        ));
        // The model name finds its default deployment.
        let by_model = DeploymentRecord {
            name: "m-mii-deployment".into(),
            ..me.clone()
        };
        let reg2 = register(&home, &by_model).unwrap();
        assert_eq!(find(&home, "m").unwrap(), by_model);
        assert_eq!(find(&home, "d1").unwrap(), me);
        drop(reg2);
        assert!(
            matches!(find(&home, "m"), Err(RegistryError::NotFound { name, .. }) if name == "m")
        );
        drop(reg);
        assert!(matches!(
            lookup(&home, "d1"),
            Err(RegistryError::NotFound { .. })
        ));
        // A dead pid is stale and its record goes away.
        std::fs::write(
            record_path(&home, "d3").unwrap(),
            serde_json::to_vec(&DeploymentRecord {
                name: "d3".into(),
                pid: u32::MAX - 1,
                ..me.clone()
            })
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            lookup(&home, "d3"),
            Err(RegistryError::Stale { .. })
        ));
        assert!(matches!(
            lookup(&home, "d3"),
            Err(RegistryError::NotFound { .. })
        ));
        assert!(matches!(
            lookup(&home, "../etc"),
            Err(RegistryError::BadName(_))
        ));
        let _ = std::fs::remove_dir_all(&home);
    }
}
