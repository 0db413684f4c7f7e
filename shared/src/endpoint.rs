//! Where peers meet: the per-user rendezvous directory of an endpoint, its lock files and shared-memory names.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::TransportError;
use crate::sys;

/// Environment variable selecting the endpoint name.
pub const ENDPOINT_ENV: &str = "LAPCE_AI_ENDPOINT";
/// Environment variable overriding the rendezvous root (tests, sandboxes).
pub const RUNTIME_DIR_ENV: &str = "LAPCE_AI_RUNTIME_DIR";
pub const DEFAULT_ENDPOINT: &str = "default";
const MAX_ENDPOINT_LEN: usize = 64;

/// A named meeting point for one engine and its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    name: String,
    dir: PathBuf,
}

impl Endpoint {
    /// The endpoint named by `LAPCE_AI_ENDPOINT`, else `default`.
    pub fn from_env() -> Result<Self, TransportError> {
        let name = std::env::var(ENDPOINT_ENV).unwrap_or_else(|_| DEFAULT_ENDPOINT.to_owned());
        Self::named(&name)
    }

    /// `$LAPCE_AI_RUNTIME_DIR/<name>`, else `$XDG_RUNTIME_DIR/lapce-ai/<name>`, else `/tmp/lapce-ai-<uid>/<name>`.
    pub fn named(name: &str) -> Result<Self, TransportError> {
        let root = if let Some(dir) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
            PathBuf::from(dir)
        } else if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            PathBuf::from(dir).join("lapce-ai")
        } else {
            PathBuf::from(format!("/tmp/lapce-ai-{}", sys::current_uid()))
        };
        Self::in_root(name, &root)
    }

    /// An endpoint under an explicit root directory.
    pub fn in_root(name: &str, root: &Path) -> Result<Self, TransportError> {
        validate_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            dir: root.join(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The rendezvous root this endpoint lives in.
    pub fn root(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("/"))
    }

    pub fn engine_lock_path(&self) -> PathBuf {
        self.dir.join("engine.lock")
    }

    pub fn slots_dir(&self) -> PathBuf {
        self.dir.join("slots")
    }

    pub fn slot_lock_path(&self, slot: u32) -> PathBuf {
        self.slots_dir().join(format!("{slot}.lock"))
    }

    /// Prefix of the /dev/shm names earlier versions used; tests check nothing with it is ever left there.
    pub fn shm_prefix(&self) -> String {
        format!("lapce-ai-{}-{}-", sys::current_uid(), self.name)
    }

    /// Creates the rendezvous directories (0700) or verifies existing ones belong to us and are private.
    pub fn ensure_dirs(&self) -> Result<(), TransportError> {
        if let Some(root) = self.dir.parent() {
            ensure_private_dir(root)?;
        }
        ensure_private_dir(&self.dir)?;
        ensure_private_dir(&self.slots_dir())
    }

    /// Client side: checks the rendezvous directories as [`Endpoint::ensure_dirs`] does, without creating any.
    /// A missing one means that no engine serves this endpoint.
    pub fn verify_dirs(&self) -> Result<(), TransportError> {
        let uid = sys::current_uid();
        let root = self.dir.parent().into_iter().map(Path::to_path_buf);
        for dir in root.chain([self.dir.clone(), self.slots_dir()]) {
            match fs::symlink_metadata(&dir) {
                Ok(meta) => check_private_dir(&dir, &meta, uid)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(TransportError::NoServer(self.name.clone()))
                }
                Err(e) => {
                    return Err(TransportError::io(
                        format!("inspecting {}", dir.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), TransportError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ENDPOINT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(TransportError::InvalidEndpoint(format!(
            "{name:?}: use 1-{MAX_ENDPOINT_LEN} characters from A-Z a-z 0-9 _ . - (not starting with .)"
        )))
    }
}

/// Creates `dir` with mode 0700 if missing; otherwise refuses it unless it is a real directory owned by the
/// current user with no group/other permissions.
pub fn ensure_private_dir(dir: &Path) -> Result<(), TransportError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // The umask may have removed bits we want; make the mode exact.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
                TransportError::io(format!("setting permissions of {}", dir.display()), e)
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TransportError::io(format!("creating {}", dir.display()), e)),
    }
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| TransportError::io(format!("inspecting {}", dir.display()), e))?;
    check_private_dir(dir, &meta, sys::current_uid())
}

/// Refuses `dir` unless `meta` (from lstat) shows a real directory owned by `uid` with no group/other bits.
fn check_private_dir(dir: &Path, meta: &fs::Metadata, uid: u32) -> Result<(), TransportError> {
    if !meta.file_type().is_dir() {
        return Err(TransportError::UnsafeRendezvous(format!(
            "{} is not a directory (symlinks are refused)",
            dir.display()
        )));
    }
    if meta.uid() != uid {
        return Err(TransportError::UnsafeRendezvous(format!(
            "{} is owned by uid {}, not by you (uid {uid}); remove it or choose another endpoint",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(TransportError::UnsafeRendezvous(format!(
            "{} has mode {:o}; it must not be accessible by group or others (chmod 700 it)",
            dir.display(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(Endpoint::in_root("../etc", Path::new("/tmp")).is_err());
        assert!(Endpoint::in_root("", Path::new("/tmp")).is_err());
        assert!(Endpoint::in_root("a/b", Path::new("/tmp")).is_err());
        assert!(Endpoint::in_root("test_1.x", Path::new("/tmp/r")).is_ok());
    }

    #[test]
    fn verify_dirs_creates_nothing_and_checks_what_exists() {
        let root = tempfile::tempdir().unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let endpoint = Endpoint::in_root("verify", root.path()).unwrap();
        let err = endpoint.verify_dirs().unwrap_err();
        assert!(matches!(err, TransportError::NoServer(_)), "{err}");
        assert!(!endpoint.dir().exists(), "verify_dirs created a directory");
        endpoint.ensure_dirs().unwrap();
        endpoint.verify_dirs().unwrap();
        fs::set_permissions(endpoint.slots_dir(), fs::Permissions::from_mode(0o750)).unwrap();
        let err = endpoint.verify_dirs().unwrap_err().to_string();
        assert!(err.contains("750"), "{err}");
    }

    #[test]
    fn group_accessible_dir_is_refused_with_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("open");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("755") && err.contains("chmod 700"), "{err}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        ensure_private_dir(&dir).unwrap();
    }
}
