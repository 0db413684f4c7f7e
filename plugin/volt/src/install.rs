//! First-start install of the native binaries: which archive a platform needs, its sha256 check, and a
//! safe unpack into the volt folder (through a temporary folder, so nothing is ever half unpacked).

use std::{
    io::Read,
    path::{Component, Path},
};

use sha2::{Digest, Sha256};

/// Base URL of the release the archives come from, baked in by `cargo xtask package`.
pub fn baked_release_url() -> Option<&'static str> {
    option_env!("LAPCE_AI_RELEASE_URL").filter(|s| !s.is_empty())
}

/// `os-arch=sha256,...` of every platform archive, baked in by `cargo xtask package`.
pub fn baked_archive_hashes() -> &'static str {
    option_env!("LAPCE_AI_ARCHIVE_SHA256").unwrap_or("")
}

/// The volt's binaries, shipped as `bin/<name>-<os>-<arch>`.
pub const BRIDGE_NAME: &str = "lapce-ai-lsp";
pub const ENGINE_NAME: &str = "ai-engine";

/// Largest archive the volt accepts (the release archives are a few tens of MB).
pub const MAX_ARCHIVE_BYTES: usize = 512 << 20;

/// What the volt knows about the host from `VOLT_OS`, `VOLT_ARCH` and `VOLT_LIBC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub libc: String,
}

impl Platform {
    /// `Err` carries the one message for a platform lapce-ai has no binaries for.
    pub fn check_supported(&self) -> Result<(), String> {
        if self.os != "linux" {
            return Err(format!(
                "lapce-ai runs on Linux; macOS and Windows are planned (this is {}).",
                self.os
            ));
        }
        if self.arch != "x86_64" && self.arch != "aarch64" {
            return Err(format!(
                "lapce-ai runs on Linux x86_64 and aarch64; {} is not supported.",
                self.arch
            ));
        }
        if self.libc == "musl" {
            return Err(
                "lapce-ai's Linux binaries need glibc; musl systems are not supported yet.".into(),
            );
        }
        Ok(())
    }

    /// `bin/<name>-<os>-<arch>[.exe]`, relative to the volt folder.
    pub fn binary_path(&self, name: &str) -> String {
        let exe = if self.os == "windows" { ".exe" } else { "" };
        format!("bin/{name}-{}-{}{exe}", self.os, self.arch)
    }

    /// `lapce-ai-<version>-<os>-<arch>.tar.gz`, as `cargo xtask package` names it.
    pub fn archive_name(&self) -> String {
        format!(
            "lapce-ai-{}-{}-{}.tar.gz",
            env!("CARGO_PKG_VERSION"),
            self.os,
            self.arch
        )
    }

    /// The sha256 for this platform in a `os-arch=hex,...` table.
    pub fn expected_sha256(&self, table: &str) -> Option<String> {
        let key = format!("{}-{}", self.os, self.arch);
        table.split(',').find_map(|pair| {
            let (platform, hash) = pair.trim().split_once('=')?;
            (platform == key && hash.len() == 64).then(|| hash.to_ascii_lowercase())
        })
    }
}

/// The archive's URL under a base URL (a release folder).
pub fn archive_url(base: &str, platform: &Platform) -> String {
    format!("{}/{}", base.trim_end_matches('/'), platform.archive_name())
}

/// Whether the first bytes of a file are an executable for `os` and `arch` (ELF machine checked on
/// Linux). `Err` says why not.
pub fn check_executable(os: &str, arch: &str, head: &[u8]) -> Result<(), String> {
    if head.is_empty() {
        return Err("the file is empty".into());
    }
    let format_ok = match os {
        "linux" => head.starts_with(b"\x7fELF"),
        "macos" => {
            head.starts_with(&[0xcf, 0xfa, 0xed, 0xfe])
                || head.starts_with(&[0xce, 0xfa, 0xed, 0xfe])
                || head.starts_with(&[0xca, 0xfe, 0xba, 0xbe])
        }
        "windows" => head.starts_with(b"MZ"),
        _ => true,
    };
    if !format_ok {
        return Err(format!("it is not a {os} executable"));
    }
    if os == "linux" {
        // e_machine: two little-endian bytes at offset 18 (both release targets are little-endian).
        let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let want = match arch {
            "x86_64" => Some(62),
            "aarch64" => Some(183),
            _ => None,
        };
        if let (Some(want), Some(machine)) = (want, machine) {
            if machine != want {
                return Err(format!(
                    "it is built for another CPU (ELF machine {machine}), not {arch}"
                ));
            }
        } else if want.is_some() {
            return Err("its ELF header is truncated".into());
        }
    }
    Ok(())
}

/// Why the binaries could not be installed; `user_message` is the one `window/showMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallError {
    /// This wasm was built without checksums (a development build), so nothing may be downloaded.
    NoChecksum,
    /// The server could not be reached or the transfer broke off.
    Unreachable {
        url: String,
        detail: String,
    },
    /// The server answered with a non-success status.
    Status {
        url: String,
        status: u16,
    },
    TooLarge {
        url: String,
    },
    HashMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    /// Not a gzip tar, or truncated.
    Corrupt(String),
    /// An entry that is not a plain file in `bin/` (absolute, `..`, link, device...).
    UnsafeEntry(String),
    /// A required binary is missing or is not for this platform.
    WrongBinary(String),
    /// Writing into the volt folder failed.
    Io(String),
}

impl InstallError {
    pub fn user_message(&self, platform: &Platform) -> String {
        let archive = platform.archive_name();
        let retry = "then reload the plugin (or restart Lapce)";
        match self {
            Self::NoChecksum => format!(
                "lapce-ai: this build of the plugin carries no checksum for {}-{} and its bin/ folder \
                 lacks the binaries, so nothing was downloaded. Install a released version from the \
                 plugin panel, or build and install it with `cargo xtask install`.",
                platform.os, platform.arch
            ),
            Self::Unreachable { url, detail } => format!(
                "lapce-ai: could not download its engine from {url} ({detail}). Check the network \
                 connection (or the lapce-ai `download-url` setting), {retry}."
            ),
            Self::Status { url, status } => format!(
                "lapce-ai: downloading {url} failed with HTTP status {status}. The release may not \
                 have a {archive} archive; check the lapce-ai `download-url` setting, {retry}."
            ),
            Self::TooLarge { url } => format!(
                "lapce-ai: {url} is larger than {} MB, so it was not used. Check the lapce-ai \
                 `download-url` setting, {retry}.",
                MAX_ARCHIVE_BYTES >> 20
            ),
            Self::HashMismatch { url, expected, actual } => format!(
                "lapce-ai: the download from {url} does not match its checksum (expected sha256 \
                 {expected}, got {actual}), so nothing was installed or run. It may be corrupt, \
                 incomplete or tampered with; {retry} to try again."
            ),
            Self::Corrupt(detail) => format!(
                "lapce-ai: the archive {archive} is damaged ({detail}); nothing was installed. {retry}."
            ),
            Self::UnsafeEntry(path) => format!(
                "lapce-ai: the archive {archive} holds {path:?}, which would land outside the plugin's \
                 bin/ folder; nothing was installed. Report this to the lapce-ai maintainers."
            ),
            Self::WrongBinary(detail) => format!(
                "lapce-ai: the archive {archive} cannot run on this {}-{} machine ({detail}); nothing \
                 was installed. Report this to the lapce-ai maintainers.",
                platform.os, platform.arch
            ),
            Self::Io(detail) => format!(
                "lapce-ai: could not write its binaries into the plugin folder ({detail}). Check the \
                 free disk space and permissions, {retry}."
            ),
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Name of the temporary folder an install unpacks into (inside the volt folder).
pub const STAGING_DIR: &str = ".lapce-ai-installing";
/// Where a previous `bin/` is moved while the new one takes its place.
const OLD_BIN_DIR: &str = ".lapce-ai-old-bin";

/// Verifies `archive` against `expected_sha256`, checks every entry (plain files directly under `bin/`,
/// the bridge and engine for `platform`), writes them into a staging folder inside `volt_root` and only
/// then renames it to `bin/`. On any failure the staging folder is removed and `bin/` is untouched.
pub fn install_archive(
    archive: &[u8],
    expected_sha256: &str,
    url: &str,
    platform: &Platform,
    volt_root: &Path,
) -> Result<(), InstallError> {
    let actual = sha256_hex(archive);
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(InstallError::HashMismatch {
            url: url.to_owned(),
            expected: expected_sha256.to_owned(),
            actual,
        });
    }
    let files = read_entries(archive)?;
    for name in [BRIDGE_NAME, ENGINE_NAME] {
        let path = platform.binary_path(name);
        let file_name = path.trim_start_matches("bin/");
        let (_, bytes) = files
            .iter()
            .find(|(n, _)| n == file_name)
            .ok_or_else(|| InstallError::WrongBinary(format!("it has no {path}")))?;
        check_executable(&platform.os, &platform.arch, bytes)
            .map_err(|why| InstallError::WrongBinary(format!("{path}: {why}")))?;
    }
    let staging = volt_root.join(STAGING_DIR);
    let result = stage_and_swap(&files, &staging, volt_root);
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map_err(|err| InstallError::Io(err.to_string()))
}

fn stage_and_swap(
    files: &[(String, Vec<u8>)],
    staging: &Path,
    volt_root: &Path,
) -> std::io::Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging)?;
    }
    let staged_bin = staging.join("bin");
    std::fs::create_dir_all(&staged_bin)?;
    for (name, bytes) in files {
        std::fs::write(staged_bin.join(name), bytes)?;
    }
    let bin = volt_root.join("bin");
    let old = volt_root.join(OLD_BIN_DIR);
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if bin.exists() {
        std::fs::rename(&bin, &old)?;
    }
    if let Err(err) = std::fs::rename(&staged_bin, &bin) {
        if old.exists() {
            let _ = std::fs::rename(&old, &bin);
        }
        return Err(err);
    }
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The archive's files as (`name` inside `bin/`, bytes). Directory entries for `bin/` itself are allowed;
/// anything else (paths outside `bin/`, nested folders, links, devices) is refused.
fn read_entries(archive: &[u8]) -> Result<Vec<(String, Vec<u8>)>, InstallError> {
    let corrupt = |e: std::io::Error| InstallError::Corrupt(e.to_string());
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut total = 0usize;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        let name = bin_file_name(Path::new(&raw));
        match (kind, name) {
            (tar::EntryType::Directory, None) if is_bin_dir(Path::new(&raw)) => continue,
            (tar::EntryType::Regular | tar::EntryType::Continuous, Some(name)) => {
                if files.iter().any(|(n, _)| *n == name) {
                    return Err(InstallError::Corrupt(format!("{raw} appears twice")));
                }
                let size =
                    usize::try_from(entry.header().size().map_err(corrupt)?).unwrap_or(usize::MAX);
                total = total.saturating_add(size);
                if total > MAX_ARCHIVE_BYTES * 4 {
                    return Err(InstallError::Corrupt(
                        "it unpacks to an implausible size".into(),
                    ));
                }
                let mut bytes = Vec::with_capacity(size.min(MAX_ARCHIVE_BYTES));
                entry.read_to_end(&mut bytes).map_err(corrupt)?;
                files.push((name, bytes));
            }
            _ => return Err(InstallError::UnsafeEntry(raw)),
        }
    }
    if files.is_empty() {
        return Err(InstallError::Corrupt("it holds no files".into()));
    }
    Ok(files)
}

/// `bin/NAME` (optionally `./bin/NAME`) with a plain `NAME`: that name, else `None`.
fn bin_file_name(path: &Path) -> Option<String> {
    let parts: Vec<Component> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    match parts.as_slice() {
        [Component::Normal(dir), Component::Normal(name)] if *dir == "bin" => {
            let name = name.to_str()?;
            (!name.starts_with('.')).then(|| name.to_owned())
        }
        _ => None,
    }
}

fn is_bin_dir(path: &Path) -> bool {
    let parts: Vec<Component> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    matches!(parts.as_slice(), [Component::Normal(dir)] if *dir == "bin")
}

/// The bytes of `rel` in the volt folder, or `None`.
pub fn read_head(volt_root: &Path, rel: &str, max: usize) -> Option<Vec<u8>> {
    let file = std::fs::File::open(volt_root.join(rel)).ok()?;
    let mut head = Vec::with_capacity(max);
    file.take(max as u64).read_to_end(&mut head).ok()?;
    Some(head)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn linux() -> Platform {
        Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            libc: "glibc".into(),
        }
    }

    /// A minimal ELF header for `machine` (62 = x86_64, 183 = aarch64).
    pub fn elf(machine: u16) -> Vec<u8> {
        let mut head = b"\x7fELF\x02\x01\x01".to_vec();
        head.resize(18, 0);
        head.extend_from_slice(&machine.to_le_bytes());
        head.extend_from_slice(b"rest of the binary");
        head
    }

    /// A gzip tar of (path, entry type, bytes).
    pub fn archive(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, bytes) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(bytes.len() as u64);
            header.set_mode(0o755);
            // `set_path` refuses `..`; write the raw name like a hostile archive would.
            let name = header.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            tar.append(&header, *bytes).expect("append");
        }
        tar.into_inner().expect("tar").finish().expect("gz")
    }

    pub fn good_archive() -> Vec<u8> {
        let bridge = elf(62);
        let engine = elf(62);
        archive(&[
            ("bin/", tar::EntryType::Directory, b""),
            (
                "bin/lapce-ai-lsp-linux-x86_64",
                tar::EntryType::Regular,
                &bridge,
            ),
            (
                "bin/ai-engine-linux-x86_64",
                tar::EntryType::Regular,
                &engine,
            ),
            (
                "bin/libggml-cpu-haswell.so",
                tar::EntryType::Regular,
                b"lib",
            ),
        ])
    }

    fn entries_of(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn platforms() {
        assert!(linux().check_supported().is_ok());
        let mac = Platform {
            os: "macos".into(),
            ..linux()
        };
        assert_eq!(
            mac.check_supported().unwrap_err(),
            "lapce-ai runs on Linux; macOS and Windows are planned (this is macos)."
        );
        let musl = Platform {
            libc: "musl".into(),
            ..linux()
        };
        assert!(musl.check_supported().unwrap_err().contains("musl"));
        let riscv = Platform {
            arch: "riscv64".into(),
            ..linux()
        };
        assert!(riscv.check_supported().is_err());
        let table = format!(
            "linux-aarch64={},linux-x86_64={}",
            "b".repeat(64),
            "A".repeat(64)
        );
        assert_eq!(linux().expected_sha256(&table), Some("a".repeat(64)));
        assert_eq!(linux().expected_sha256("linux-x86_64=short"), None);
        assert_eq!(linux().expected_sha256(""), None);
        assert_eq!(
            archive_url("http://h/rel/", &linux()),
            format!(
                "http://h/rel/lapce-ai-{}-linux-x86_64.tar.gz",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn executables_are_checked_for_format_and_cpu() {
        assert!(check_executable("linux", "x86_64", &elf(62)).is_ok());
        assert!(check_executable("linux", "aarch64", &elf(183)).is_ok());
        let err = check_executable("linux", "x86_64", &elf(183)).unwrap_err();
        assert!(err.contains("another CPU"), "{err}");
        assert!(check_executable("linux", "x86_64", b"\x7fELF").is_err());
        assert!(check_executable("linux", "x86_64", b"MZ\x90\0").is_err());
        assert!(check_executable("linux", "x86_64", b"").is_err());
        assert!(check_executable("windows", "x86_64", b"MZ").is_ok());
    }

    #[test]
    fn a_verified_archive_is_unpacked_into_bin() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = good_archive();
        install_archive(&data, &sha256_hex(&data), "u", &linux(), dir.path()).expect("install");
        assert_eq!(entries_of(dir.path()), ["bin"]);
        assert_eq!(
            entries_of(&dir.path().join("bin")),
            [
                "ai-engine-linux-x86_64",
                "lapce-ai-lsp-linux-x86_64",
                "libggml-cpu-haswell.so"
            ]
        );
        // Again over an existing bin/ (a stale file there is replaced with the folder).
        std::fs::write(dir.path().join("bin/stale"), b"x").expect("write");
        install_archive(&data, &sha256_hex(&data), "u", &linux(), dir.path()).expect("again");
        assert_eq!(entries_of(dir.path()), ["bin"]);
        assert!(!dir.path().join("bin/stale").exists());
    }

    fn refused(data: &[u8], hash: &str, platform: &Platform) -> InstallError {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("bin")).expect("bin");
        std::fs::write(dir.path().join("bin/keep"), b"old").expect("write");
        let err = install_archive(data, hash, "http://x/a", platform, dir.path()).unwrap_err();
        assert_eq!(
            entries_of(dir.path()),
            ["bin"],
            "nothing half unpacked: {err:?}"
        );
        assert_eq!(
            entries_of(&dir.path().join("bin")),
            ["keep"],
            "bin/ untouched"
        );
        err
    }

    #[test]
    fn bad_archives_are_refused_and_leave_nothing() {
        let good = good_archive();
        let err = refused(&good, &"0".repeat(64), &linux());
        assert!(matches!(err, InstallError::HashMismatch { .. }), "{err:?}");
        assert!(err.user_message(&linux()).contains("checksum"));

        let partial = &good[..good.len() / 2];
        let err = refused(partial, &sha256_hex(partial), &linux());
        assert!(matches!(err, InstallError::Corrupt(_)), "{err:?}");

        let bridge = elf(62);
        for evil in [
            "../evil",
            "/etc/evil",
            "bin/../../evil",
            "bin/sub/evil",
            "volt.toml",
        ] {
            let data = archive(&[
                (
                    "bin/lapce-ai-lsp-linux-x86_64",
                    tar::EntryType::Regular,
                    &bridge,
                ),
                (evil, tar::EntryType::Regular, b"x"),
            ]);
            let err = refused(&data, &sha256_hex(&data), &linux());
            assert_eq!(err, InstallError::UnsafeEntry(evil.into()));
        }
        let link = archive(&[("bin/ai-engine-linux-x86_64", tar::EntryType::Symlink, b"")]);
        assert!(matches!(
            refused(&link, &sha256_hex(&link), &linux()),
            InstallError::UnsafeEntry(_)
        ));

        let arm = archive(&[
            (
                "bin/lapce-ai-lsp-linux-x86_64",
                tar::EntryType::Regular,
                &elf(183),
            ),
            (
                "bin/ai-engine-linux-x86_64",
                tar::EntryType::Regular,
                &elf(183),
            ),
        ]);
        let err = refused(&arm, &sha256_hex(&arm), &linux());
        assert!(matches!(err, InstallError::WrongBinary(_)), "{err:?}");
        assert!(err
            .user_message(&linux())
            .contains("cannot run on this linux-x86_64"));

        let no_engine = archive(&[(
            "bin/lapce-ai-lsp-linux-x86_64",
            tar::EntryType::Regular,
            &bridge,
        )]);
        let err = refused(&no_engine, &sha256_hex(&no_engine), &linux());
        assert!(matches!(err, InstallError::WrongBinary(_)), "{err:?}");
    }
}
