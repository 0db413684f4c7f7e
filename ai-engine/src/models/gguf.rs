//! Checks a model file before llama.cpp sees it: GGUF magic and version, and whether it fits in this machine's RAM.

use std::io::Read;
use std::path::Path;

/// Why a file cannot be a usable model; the message names the file and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufProblem {
    #[error("{path}: cannot read the model file: {message}")]
    Unreadable { path: String, message: String },
    #[error("{path}: not a GGUF model file (it starts with {found:?}, a GGUF file starts with \"GGUF\"); point the profile's model_path at a .gguf file")]
    NotGguf { path: String, found: String },
    #[error("{path}: the file is truncated ({size} bytes, shorter than a GGUF header); download it again")]
    Truncated { path: String, size: u64 },
    #[error("{path}: GGUF version {version} is not supported (1 to 3 are)")]
    Version { path: String, version: u32 },
    #[error("{path}: the model needs {size_mb} MB but this machine has {ram_mb} MB of RAM; choose a smaller model (`ai-engine models list`)")]
    TooBig {
        path: String,
        size_mb: u64,
        ram_mb: u64,
    },
}

/// Size of the fixed GGUF header: magic, version, tensor count, metadata count.
const HEADER_BYTES: u64 = 4 + 4 + 8 + 8;

/// Reads the header of `path` and compares its size with `ram_bytes` (total RAM; `None` = unknown).
pub fn check_model_file(path: &Path, ram_bytes: Option<u64>) -> Result<u64, GgufProblem> {
    let name = path.display().to_string();
    let unreadable = |e: std::io::Error| GgufProblem::Unreadable {
        path: name.clone(),
        message: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    let mut header = [0u8; HEADER_BYTES as usize];
    let got = read_up_to(&mut file, &mut header).map_err(unreadable)?;
    if got >= 4 && &header[..4] != b"GGUF" {
        return Err(GgufProblem::NotGguf {
            path: name,
            found: String::from_utf8_lossy(&header[..4]).into_owned(),
        });
    }
    if (got as u64) < HEADER_BYTES {
        return Err(GgufProblem::Truncated { path: name, size });
    }
    let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(1..=3).contains(&version) {
        return Err(GgufProblem::Version {
            path: name,
            version,
        });
    }
    if let Some(ram) = ram_bytes {
        if size > ram {
            return Err(GgufProblem::TooBig {
                path: name,
                size_mb: size >> 20,
                ram_mb: ram >> 20,
            });
        }
    }
    Ok(size)
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Total RAM from `/proc/meminfo` (`None` where it cannot be read).
pub fn total_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        std::io::Write::write_all(&mut f, bytes).expect("write");
        f
    }

    #[test]
    fn bad_files_get_clear_messages() {
        let text = file_with(b"<html>not a model</html>");
        let e = check_model_file(text.path(), None).expect_err("not gguf");
        assert!(matches!(e, GgufProblem::NotGguf { .. }), "{e}");
        assert!(e.to_string().contains("not a GGUF model file"));

        let short = file_with(b"GGUF\x03\x00");
        let e = check_model_file(short.path(), None).expect_err("truncated");
        assert!(matches!(e, GgufProblem::Truncated { size: 6, .. }), "{e}");

        let mut header = b"GGUF".to_vec();
        header.extend_from_slice(&9u32.to_le_bytes());
        header.extend_from_slice(&[0; 16]);
        let e = check_model_file(file_with(&header).path(), None).expect_err("version");
        assert!(matches!(e, GgufProblem::Version { version: 9, .. }), "{e}");

        let mut good = b"GGUF".to_vec();
        good.extend_from_slice(&3u32.to_le_bytes());
        good.extend_from_slice(&[0; 16]);
        let ok = file_with(&good);
        assert_eq!(check_model_file(ok.path(), Some(1 << 30)), Ok(24));
        let e = check_model_file(ok.path(), Some(10)).expect_err("too big");
        assert!(e.to_string().contains("MB of RAM"), "{e}");

        let e = check_model_file(Path::new("/nonexistent/x.gguf"), None).expect_err("missing");
        assert!(matches!(e, GgufProblem::Unreadable { .. }));
        assert!(total_ram_bytes().is_some_and(|r| r > 0));
    }
}
