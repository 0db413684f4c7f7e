//! Release artifacts: per-platform binary archives, the checksum manifest and the registry archive
//! (`volts publish` layout) whose wasm carries the release URL and the archives' sha256.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::{platform_name, Workspace, BRIDGE, ENGINE, VOLT_NAME};

/// File name of the checksum manifest (`sha256sum` format).
pub const CHECKSUMS: &str = "SHA256SUMS";
/// Environment variables the volt's build reads (see `plugin/volt/src/install.rs`).
pub const RELEASE_URL_ENV: &str = "LAPCE_AI_RELEASE_URL";
pub const ARCHIVE_SHA256_ENV: &str = "LAPCE_AI_ARCHIVE_SHA256";

/// `lapce-ai-<version>-<os>-<arch>.tar.gz`: the name the volt downloads for a platform.
pub fn platform_archive_name(os: &str, arch: &str) -> String {
    format!(
        "{VOLT_NAME}-{}-{os}-{arch}.tar.gz",
        env!("CARGO_PKG_VERSION")
    )
}

/// `lapce-ai-<version>.volt`: what `volts publish` uploads.
pub fn registry_archive_name() -> String {
    format!("{VOLT_NAME}-{}.volt", env!("CARGO_PKG_VERSION"))
}

/// Where the release workflow publishes the archives: the GitHub release of this version.
pub fn default_release_url(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("volt.toml")).context("reading volt.toml")?;
    let repository = manifest
        .lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("repository")?.trim_start();
            Some(value.strip_prefix('=')?.trim().trim_matches('"').to_owned())
        })
        .context("volt.toml has no repository")?;
    Ok(format!(
        "{}/releases/download/v{}",
        repository.trim_end_matches('/'),
        env!("CARGO_PKG_VERSION")
    ))
}

/// Builds the bridge and the engine for any CPU of this platform and writes their archive into `out_dir`:
/// `bin/lapce-ai-lsp-<os>-<arch>`, `bin/ai-engine-<os>-<arch>`, and the llama.cpp/ggml libraries the
/// engine loads, among them one `libggml-cpu-*` per CPU generation (the engine picks the best at start).
pub fn write_platform_archive(ws: &Workspace, out_dir: &Path) -> Result<PathBuf> {
    let build = ws.build_native(crate::Cpu::Any)?;
    let mut files = vec![
        (format!("bin/{}", platform_name(BRIDGE)), build.bridge),
        (format!("bin/{}", platform_name(ENGINE)), build.engine),
    ];
    files.extend(
        build
            .libraries
            .into_iter()
            .map(|(name, file)| (format!("bin/{name}"), file)),
    );
    let out = out_dir.join(platform_archive_name(
        std::env::consts::OS,
        std::env::consts::ARCH,
    ));
    write_tar_gz(&files, &out)?;
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A gzipped tar of `(name in archive, file)` pairs; executables keep mode 0755, others 0644.
pub fn write_tar_gz(files: &[(String, PathBuf)], out: &Path) -> Result<()> {
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = out.with_extension("partial");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    for (name, path) in files {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(if name.starts_with("bin/") {
            0o755
        } else {
            0o644
        });
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data.as_slice())
            .with_context(|| format!("archiving {name}"))?;
    }
    tar.into_inner()?.finish()?.sync_all()?;
    fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// sha256 of every platform archive (`lapce-ai-<version>-<os>-<arch>.tar.gz`) in `dir`, keyed `<os>-<arch>`.
pub fn platform_hashes(dir: &Path) -> Result<BTreeMap<String, String>> {
    let prefix = format!("{VOLT_NAME}-{}-", env!("CARGO_PKG_VERSION"));
    let mut hashes = BTreeMap::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = file_name(&path);
        if let Some(platform) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tar.gz"))
        {
            hashes.insert(platform.to_owned(), sha256_file(&path)?);
        }
    }
    Ok(hashes)
}

/// The value of `LAPCE_AI_ARCHIVE_SHA256`: `os-arch=hex` pairs separated by commas.
pub fn hashes_env_value(hashes: &BTreeMap<String, String>) -> String {
    hashes
        .iter()
        .map(|(platform, hash)| format!("{platform}={hash}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The registry archive exactly as `volts publish` packs it: a zstd (level 0 = default) tar with
/// `volt.toml`, the wasm, `README.md` and the icon, in that order, under their plain names.
pub fn write_registry_archive(
    volt_toml: &Path,
    wasm: &Path,
    readme: &Path,
    icon: &Path,
    out: &Path,
) -> Result<()> {
    let manifest: toml::Value = toml::from_str(
        &fs::read_to_string(volt_toml)
            .with_context(|| format!("reading {}", volt_toml.display()))?,
    )
    .context("parsing volt.toml")?;
    let field = |key: &str| -> Result<String> {
        manifest
            .get(key)
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("volt.toml has no {key}"))
    };
    let entries = [
        ("volt.toml".to_owned(), volt_toml),
        (field("wasm")?, wasm),
        ("README.md".to_owned(), readme),
        (field("icon")?, icon),
    ];
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let encoder = zstd::Encoder::new(file, 0)?;
    let mut tar = tar::Builder::new(encoder);
    for (name, path) in entries {
        let mut file =
            fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        tar.append_file(&name, &mut file)
            .with_context(|| format!("archiving {}", path.display()))?;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(())
}

/// `SHA256SUMS` for every file in `dir` except itself.
pub fn write_checksums(dir: &Path) -> Result<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| file_name(&e.path()))
        .filter(|n| n != CHECKSUMS && !n.ends_with(".partial"))
        .collect();
    names.sort();
    let mut text = String::new();
    for name in names {
        text.push_str(&format!("{}  {name}\n", sha256_file(&dir.join(&name))?));
    }
    let out = dir.join(CHECKSUMS);
    fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// Fails unless `dir` holds at least one platform archive (the registry wasm needs their hashes).
pub fn require_platform_archives(dir: &Path) -> Result<BTreeMap<String, String>> {
    let hashes = platform_hashes(dir)?;
    if hashes.is_empty() {
        bail!(
            "{} has no {} archive; run `cargo xtask package --platform-only --out-dir {}` first",
            dir.display(),
            platform_archive_name("<os>", "<arch>"),
            dir.display()
        );
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in_tar(reader: impl Read) -> Vec<String> {
        tar::Archive::new(reader)
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn registry_archive_is_a_zstd_tar_with_the_four_volt_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let wasm = dir.path().join("built.wasm");
        fs::write(&wasm, b"\0asm").expect("write");
        let out = dir.path().join("out.volt");
        write_registry_archive(
            &root.join("volt.toml"),
            &wasm,
            &root.join("README.md"),
            &root.join("icon.svg"),
            &out,
        )
        .expect("archive");
        let decoder = zstd::Decoder::new(fs::File::open(&out).expect("open")).expect("zstd");
        assert_eq!(
            names_in_tar(decoder),
            ["volt.toml", "lapce-ai.wasm", "README.md", "icon.svg"]
        );
    }

    #[test]
    fn platform_archive_holds_bin_files_and_hashes_are_listed() {
        let dir = tempfile::tempdir().expect("tmp");
        let bridge = dir.path().join("bridge");
        fs::write(&bridge, b"\x7fELF bridge").expect("write");
        let out_dir = dir.path().join("dist");
        let archive = out_dir.join(platform_archive_name("linux", "x86_64"));
        write_tar_gz(
            &[("bin/lapce-ai-lsp-linux-x86_64".to_owned(), bridge)],
            &archive,
        )
        .expect("archive");
        let gz = flate2::read::GzDecoder::new(fs::File::open(&archive).expect("open"));
        assert_eq!(names_in_tar(gz), ["bin/lapce-ai-lsp-linux-x86_64"]);

        let hashes = platform_hashes(&out_dir).expect("hashes");
        let hash = sha256_file(&archive).expect("hash");
        assert_eq!(hashes.get("linux-x86_64"), Some(&hash));
        assert_eq!(hash.len(), 64);
        assert_eq!(hashes_env_value(&hashes), format!("linux-x86_64={hash}"));

        let sums = fs::read_to_string(write_checksums(&out_dir).expect("sums")).expect("read");
        assert_eq!(
            sums,
            format!("{hash}  {}\n", platform_archive_name("linux", "x86_64"))
        );
    }

    #[test]
    fn release_url_comes_from_the_repository() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let url = default_release_url(&root).expect("url");
        assert!(url.starts_with("https://github.com/"), "{url}");
        assert!(
            url.ends_with(&format!(
                "/releases/download/v{}",
                env!("CARGO_PKG_VERSION")
            )),
            "{url}"
        );
    }
}
