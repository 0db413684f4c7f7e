//! flock-held lock files: the engine singleton and client slots. The kernel drops a dead holder's lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An exclusively locked file that is still linked at its path. Dropping it releases the lock.
#[derive(Debug)]
pub struct HeldLock {
    file: File,
    path: PathBuf,
}

/// Result of trying to take a lock.
pub enum TryLock {
    Acquired(HeldLock),
    /// Someone else holds it.
    Busy,
}

impl HeldLock {
    /// Takes an exclusive, non-blocking flock on `path` (created 0600 if missing, close-on-exec). After locking,
    /// checks that the path still names the locked inode, so a concurrent unlink-by-its-holder cannot give two
    /// processes "the same" lock.
    pub fn try_acquire(path: &Path) -> io::Result<TryLock> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(TryLock::Busy),
                Err(TryLockError::Error(e)) => return Err(e),
            }
            let locked_inode = file.metadata()?.ino();
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.ino() == locked_inode => {
                    return Ok(TryLock::Acquired(Self {
                        file,
                        path: path.to_owned(),
                    }))
                }
                // Unlinked (or replaced) between our open and our lock: try again on the current file.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Like [`HeldLock::try_acquire`] but never creates the file and opens it read-only (so the engine's
    /// probes don't trigger the close-after-write events it watches). `None` when the file does not exist.
    pub fn try_acquire_existing(path: &Path) -> io::Result<Option<TryLock>> {
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(Some(TryLock::Busy)),
            Err(TryLockError::Error(e)) => return Err(e),
        }
        let locked_inode = file.metadata()?.ino();
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.ino() == locked_inode => Ok(Some(TryLock::Acquired(Self {
                file,
                path: path.to_owned(),
            }))),
            Ok(_) => Ok(Some(TryLock::Busy)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the path while still holding the lock, then releases it (clean removal, no race: see try_acquire).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!(path = %self.path.display(), error = %e, "removing lock file");
            }
        }
    }
}

/// True if some process holds an exclusive lock on `file` right now. Uses a shared probe lock, released at once.
pub fn is_locked_by_other(file: &File) -> io::Result<bool> {
    match file.try_lock_shared() {
        Ok(()) => {
            file.unlock()?;
            Ok(false)
        }
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Probes whether the lock file at `path` is held, without creating it. Missing file = not held.
pub fn path_is_locked(path: &Path) -> io::Result<bool> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => is_locked_by_other(&file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The pid of the process holding an exclusive flock on `file`, from `/proc/locks` (`None` when nobody does, or
/// the holder is outside this pid namespace). Reads a line per lock on the system: for rare paths only.
pub fn exclusive_holder(file: &File) -> io::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks")?;
    Ok(locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after the number.
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [_, "FLOCK", _, "WRITE", pid, id, ..] if id == wanted => {
                pid.parse().ok().filter(|p| *p != 0)
            }
            _ => None,
        }
    }))
}

/// Waits until nobody holds the lock file at `path` (or it is gone); false if it is still held after `timeout`.
/// Polls every few milliseconds: for shutdowns, not hot paths.
pub fn wait_until_released(path: &Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if !path_is_locked(path).unwrap_or(false) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
