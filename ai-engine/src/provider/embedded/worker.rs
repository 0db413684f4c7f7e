//! The llama.cpp worker thread: loads and warms the model, owns the context, serves queued requests by priority.

use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::watch;

use super::kv::{self, ReusePlan, Slot};
use super::queue::Priority;
use super::text::{Scan, StopScanner, Utf8Buffer};
use super::threads::CpuPicture;
use super::{EmbeddedOptions, FimLayout, Job, LoadState, ModelInfo, RequestMetrics, Shared};
use crate::models::gguf::{check_model_file, total_ram_bytes};
use crate::provider::{
    split_at_middle, ChatRole, GenerationEvent, Prompt, ProviderError, StopReason, TokenUsage,
};

/// llama.cpp's backend may be initialised once per process; every provider shares it.
fn backend() -> Result<&'static LlamaBackend, ProviderError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            load_cpu_variants();
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ProviderError::ModelLoad(format!("cannot initialise llama.cpp: {e}")))
}

/// With runtime CPU dispatch (feature `dynamic-backends`), loads the `libggml-cpu-*` variants shipped next to
/// the engine binary (else those of the build tree); ggml picks the best one this CPU supports.
#[cfg(feature = "dynamic-backends")]
fn load_cpu_variants() {
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|dir| {
            std::fs::read_dir(dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libggml-cpu"))
            })
        });
    match beside_exe {
        Some(dir) => {
            tracing::debug!(dir = %dir.display(), "loading ggml CPU variants");
            llama_cpp_2::llama_backend::load_backends_from_path(&dir);
        }
        None => llama_cpp_2::llama_backend::load_backends(),
    }
}

#[cfg(not(feature = "dynamic-backends"))]
fn load_cpu_variants() {}

pub(super) fn run(
    path: Result<PathBuf, ProviderError>,
    name: String,
    options: EmbeddedOptions,
    load: watch::Sender<LoadState>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let loaded = path.and_then(|p| load_model(&p).map(|m| (p, m)));
    let (path, model) = match loaded {
        Ok(x) => x,
        Err(e) => return fail_all(e, &shared, &load),
    };
    let _ = shared.model.set(Arc::clone(&model));
    let cpu = CpuPicture::read();
    let threads = cpu.decode_threads(options.threads);
    let documents = options.documents.clamp(1, 64);
    let n_ctx = options
        .context_tokens
        .clamp(64, model.n_ctx_train().max(64));
    let n_batch = options.batch_tokens.clamp(16, n_ctx);
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => return fail_all(e, &shared, &load),
    };
    let (cpu_backend, gpu_backend) = hardware();
    // One KV stream per document (not unified): each attends over its own cells only.
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx * documents))
        .with_n_seq_max(documents)
        .with_kv_unified(false)
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32)
        .with_flash_attention_policy(flash_attention(&gpu_backend));
    let ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let e = ProviderError::ModelLoad(format!(
                "cannot create a llama context for {} ({documents} documents x {n_ctx} tokens): {e}; \
                 lower `context_tokens` or `documents`",
                path.display()
            ));
            return fail_all(e, &shared, &load);
        }
    };
    let vocab = model.vocab();
    let has_fim = [vocab.fim_pre(), vocab.fim_suf(), vocab.fim_mid()]
        .iter()
        .all(|t| t.0 >= 0);
    shared.has_fim.store(has_fim, Ordering::Relaxed);
    let architecture = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    let model_name = model.meta_val_str("general.name").unwrap_or_default();
    let fim_layout = match options.fim_layout {
        FimLayout::Auto
            if suffix_first_family(&format!("{name} {model_name} {}", path.display())) =>
        {
            FimLayout::SuffixPrefixMiddle
        }
        FimLayout::Auto => FimLayout::PrefixSuffixMiddle,
        other => other,
    };
    // K-shift is impossible for multi-position RoPE (vision models) and a few architectures.
    let can_shift = !architecture.contains("vl") && architecture != "step35";
    let info = ModelInfo {
        path: path.clone(),
        n_ctx_train: model.n_ctx_train(),
        n_vocab: model.n_vocab(),
        n_params: model.n_params(),
        has_fim,
        context_tokens: n_ctx,
        threads,
        documents,
        cpu_backend,
        gpu_backend,
    };
    let slots = (0..documents as i32)
        .map(|seq| Slot {
            seq,
            ..Slot::default()
        })
        .collect();
    let mut engine = Engine {
        model: &model,
        ctx,
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_ctx,
        n_batch,
        slots,
        paused: Vec::new(),
        tick: 0,
        prompt_tokens_per_sec: 0.0,
        has_fim,
        fim_layout,
        reuse_min_chunk: if can_shift {
            options.cache_reuse_min_chunk as usize
        } else {
            0
        },
        preempt_after: options.preempt_after,
        seed: options.seed,
        shared: &shared,
    };
    engine.warm_up();
    tracing::info!(
        path = %path.display(),
        params = info.n_params,
        n_ctx,
        documents,
        threads,
        cpu = ?cpu,
        has_fim,
        fim_layout = ?fim_layout,
        cpu_backend = %info.cpu_backend,
        load_ms = started.elapsed().as_millis() as u64,
        "embedded model loaded and warm"
    );
    let _ = load.send(LoadState::Ready(info));

    while let Some((priority, job)) = shared.jobs.pop() {
        engine.serve_guarded(priority, job);
    }
    tracing::debug!("embedded model thread exiting");
}

/// Model families trained with suffix-first (SPM) fill-in-the-middle as well as prefix-first.
fn suffix_first_family(names: &str) -> bool {
    let names = names.to_ascii_lowercase();
    ["starcoder", "codellama", "code-llama", "code_llama"]
        .iter()
        .any(|family| names.contains(family))
}

/// Flash attention only with a GPU: on the CPU, ggml's flash-attention kernel makes every generated token
/// 2-3x slower (SmolLM2, 2 threads: 36 against 86 tokens/s; `engine-bench --embedded-suite`), for a prompt
/// evaluation gain of under 20%.
fn flash_attention(gpu_backend: &str) -> llama_cpp_sys_2::llama_flash_attn_type {
    if gpu_backend.is_empty() {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
    } else {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO
    }
}

/// The CPU features ggml was built with (or the variant it loaded) and any GPU devices, for `status`.
fn hardware() -> (String, String) {
    // SAFETY: llama_print_system_info returns a pointer to a static, NUL-terminated buffer.
    let info = unsafe {
        let ptr = llama_cpp_sys_2::llama_print_system_info();
        if ptr.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned()
        }
    };
    let features: Vec<&str> = info
        .split('|')
        .filter_map(|f| {
            let (name, value) = f.split_once('=')?;
            let name = name.trim().rsplit(':').next()?.trim();
            (value.trim() == "1" && !name.is_empty()).then_some(name)
        })
        .collect();
    let cpu = match loaded_cpu_variant() {
        Some(variant) => format!("CPU {variant} ({})", features.join(" ")),
        None => format!("CPU ({})", features.join(" ")),
    };
    let gpus: Vec<String> = llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| {
            !matches!(
                d.device_type,
                llama_cpp_2::LlamaBackendDeviceType::Cpu
                    | llama_cpp_2::LlamaBackendDeviceType::Unknown
            )
        })
        .map(|d| format!("{} {}", d.backend, d.description))
        .collect();
    (cpu, gpus.join(", "))
}

/// The `libggml-cpu-<variant>` ggml loaded for this CPU, when CPU variants are loaded at run time (Linux: read
/// from this process's memory map; `None` for a build with one CPU backend linked in).
fn loaded_cpu_variant() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let file = line.rsplit('/').next()?;
        let variant = file.strip_prefix("libggml-cpu-")?;
        Some(variant.split(".so").next()?.to_string())
    })
}

fn load_model(path: &Path) -> Result<Arc<LlamaModel>, ProviderError> {
    if !path.is_file() {
        return Err(ProviderError::ModelMissing(format!(
            "model file {} does not exist; run `ai-engine models pull` or fix the configured path",
            path.display()
        )));
    }
    let size = check_model_file(path, total_ram_bytes())
        .map_err(|e| ProviderError::ModelLoad(e.to_string()))?;
    let backend = backend()?;
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map(Arc::new)
        .map_err(|e| {
            ProviderError::ModelLoad(format!(
                "{} ({size} bytes): {e}; the file may be truncated or corrupt, or made for a newer llama.cpp \
                 (download it again with `ai-engine models pull`)",
                path.display()
            ))
        })
}

/// Answers every request with the load error until the provider is dropped.
fn fail_all(error: ProviderError, shared: &Shared, load: &watch::Sender<LoadState>) {
    tracing::error!(error = %error, "embedded model unavailable");
    let _ = load.send(LoadState::Failed(error.clone()));
    while let Some((_, job)) = shared.jobs.pop() {
        let _ = job.events.send(Err(error.clone()));
    }
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Context window of each document's sequence.
    n_ctx: u32,
    n_batch: u32,
    /// One per llama sequence: the tokens whose KV entries it holds.
    slots: Vec<Slot>,
    /// Sequences of requests paused for a more urgent one (never evicted meanwhile).
    paused: Vec<i32>,
    tick: u64,
    /// Recent prompt decoding speed, to size batches that can be interrupted in time.
    prompt_tokens_per_sec: f64,
    has_fim: bool,
    fim_layout: FimLayout,
    reuse_min_chunk: usize,
    preempt_after: std::time::Duration,
    seed: Option<u32>,
    shared: &'m Shared,
}

/// How a request ended inside the engine.
enum End {
    Finished(StopReason),
    Cancelled,
    /// A prefill gave way to a more urgent request (what it decoded stays cached).
    Preempted,
    Failed(ProviderError),
}

impl Engine<'_> {
    fn reset(&mut self) {
        self.ctx.clear_kv_cache();
        for slot in &mut self.slots {
            slot.tokens.clear();
        }
    }

    /// Decodes one token so the weights are paged in and the compute buffers exist before the first request.
    fn warm_up(&mut self) {
        let vocab = self.model.vocab();
        let token = if vocab.should_add_bos() {
            vocab.bos()
        } else {
            vocab.eos()
        };
        self.batch.clear();
        let warmed = self
            .batch
            .add(token, 0, &[0], true)
            .map_err(|e| e.to_string())
            .and_then(|()| self.ctx.decode(&mut self.batch).map_err(|e| e.to_string()));
        if let Err(e) = warmed {
            tracing::warn!(error = %e, "embedded model warm-up decode failed");
        }
        self.reset();
    }

    /// Serves `job`, turning a panic inside llama.cpp bindings into that request's error.
    fn serve_guarded(&mut self, priority: Priority, job: Job) {
        let events = job.events.clone();
        let id = job.id;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve(priority, job)));
        if outcome.is_err() {
            tracing::error!(id, "embedded model request panicked; KV cache reset");
            self.reset();
            let _ = events.send(Err(ProviderError::Server(
                "the embedded model failed on this request".to_string(),
            )));
        }
    }

    fn serve(&mut self, priority: Priority, job: Job) {
        let dequeued = Instant::now();
        let mut metrics = RequestMetrics {
            queue_wait: dequeued - job.submitted,
            ..RequestMetrics::default()
        };
        let end = if job.events.is_closed() {
            tracing::debug!(id = job.id, "request cancelled while queued; skipped");
            End::Cancelled
        } else {
            self.generate(priority, &job, &mut metrics)
        };
        metrics.total = job.submitted.elapsed();
        match end {
            End::Finished(reason) => {
                let _ = job.events.send(Ok(GenerationEvent::Finished {
                    reason,
                    usage: TokenUsage {
                        prompt_tokens: metrics.prompt_tokens,
                        completion_tokens: metrics.generated_tokens,
                    },
                }));
            }
            End::Preempted => {
                metrics.cancelled = true;
                let _ = job.events.send(Ok(GenerationEvent::Finished {
                    reason: StopReason::Stop,
                    usage: TokenUsage {
                        prompt_tokens: metrics.prompt_tokens,
                        completion_tokens: 0,
                    },
                }));
            }
            End::Cancelled => metrics.cancelled = true,
            End::Failed(e) => {
                let _ = job.events.send(Err(e));
            }
        }
        tracing::debug!(
            id = job.id,
            ?priority,
            prompt_tokens = metrics.prompt_tokens,
            reused_tokens = metrics.reused_tokens,
            truncated_tokens = metrics.truncated_tokens,
            generated_tokens = metrics.generated_tokens,
            queue_ms = metrics.queue_wait.as_millis() as u64,
            prompt_eval_ms = metrics.prompt_eval.as_millis() as u64,
            ttft_ms = metrics.ttft.map(|d| d.as_millis() as u64),
            total_ms = metrics.total.as_millis() as u64,
            cancelled = metrics.cancelled,
            "embedded request done"
        );
        if let Ok(mut last) = self.shared.last_metrics.lock() {
            *last = Some(metrics);
        }
        if let Some(tx) = job.metrics {
            let _ = tx.send(metrics);
        }
    }

    /// Serves every queued request more urgent than `priority` while the current one (on `seq`) waits.
    /// Call only where the current request needs no logits from its last decode.
    fn yield_to_urgent(&mut self, priority: Priority, seq: i32) {
        if priority == Priority::Completion || !self.shared.jobs.has_more_urgent(priority) {
            return;
        }
        self.paused.push(seq);
        while let Some((urgent, job)) = self.shared.jobs.pop_more_urgent(priority) {
            self.serve_guarded(urgent, job);
        }
        self.paused.pop();
    }

    /// Prompt tokens per batch: the whole batch size, or about `preempt_after` worth while another request
    /// waits, so a cancel or a more urgent request gets its turn soon.
    fn chunk_size(&self, priority: Priority) -> usize {
        let full = self.n_batch as usize;
        if !self.shared.jobs.has_waiting(priority) || self.prompt_tokens_per_sec <= 0.0 {
            return full;
        }
        let quick = (self.prompt_tokens_per_sec * self.preempt_after.as_secs_f64()) as usize;
        quick.clamp(8, full)
    }

    /// Applies `plan` to `slot`'s KV sequence: drops what the prompt does not keep, shifts moved chunks.
    fn apply_plan(&mut self, slot: usize, plan: &ReusePlan) -> Result<usize, String> {
        let seq = self.slots[slot].seq;
        let mem_err = |e: llama_cpp_2::context::kv_cache::KvCacheConversionError| e.to_string();
        for shift in &plan.shifts {
            self.ctx
                .kv_cache_seq_rm(seq, Some(shift.to as u32), Some(shift.from as u32))
                .map_err(mem_err)?;
            self.ctx
                .kv_cache_seq_add(
                    seq,
                    Some(shift.from as u32),
                    Some((shift.from + shift.len) as u32),
                    shift.to as i32 - shift.from as i32,
                )
                .map_err(mem_err)?;
            let tokens = &mut self.slots[slot].tokens;
            tokens.copy_within(shift.from..shift.from + shift.len, shift.to);
        }
        self.ctx
            .kv_cache_seq_rm(seq, Some(plan.kept as u32), None)
            .map_err(mem_err)?;
        self.slots[slot].tokens.truncate(plan.kept);
        Ok(plan.kept)
    }

    fn generate(&mut self, priority: Priority, job: &Job, metrics: &mut RequestMetrics) -> End {
        let request = &job.request;
        let max_tokens = request.max_tokens.min(self.n_ctx / 2);
        let prefill = priority == Priority::Prefill;
        if max_tokens == 0 && !prefill {
            return End::Finished(StopReason::Length);
        }
        let budget = self.n_ctx - max_tokens.max(1);
        let prompt = match self.tokenize_prompt(&request.prompt, budget) {
            Ok(p) => p,
            Err(e) => return End::Failed(e),
        };
        metrics.prompt_tokens = prompt.tokens.len() as u32;
        metrics.truncated_tokens = prompt.truncated as u32;
        if prompt.tokens.is_empty() {
            return End::Failed(ProviderError::BadRequest("empty prompt".to_string()));
        }

        // The document's own sequence (or a free / least recently used one), keeping what it can.
        let started = Instant::now();
        let ids: Vec<i32> = prompt.tokens.iter().map(|t| t.0).collect();
        let Some((slot, plan)) =
            kv::choose_slot(&self.slots, &ids, self.reuse_min_chunk, &self.paused)
        else {
            return End::Failed(ProviderError::Server(
                "every KV sequence is in use by paused requests".to_string(),
            ));
        };
        self.tick += 1;
        self.slots[slot].last_used = self.tick;
        let seq = self.slots[slot].seq;
        let mut prompt = prompt;
        if plan.dropped > 0 {
            plan.drop_seam(&mut prompt.tokens);
            metrics.prompt_tokens = prompt.tokens.len() as u32;
        }
        let kept = match self.apply_plan(slot, &plan) {
            Ok(kept) => kept,
            Err(e) => {
                tracing::debug!(error = %e, "KV cache edit failed; clearing the sequence");
                let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
                self.slots[slot].tokens.clear();
                0
            }
        };
        metrics.reused_tokens = kept as u32;
        let mut last_logits = 0;
        let mut position = kept;
        while position < prompt.tokens.len() {
            if job.events.is_closed() {
                return End::Cancelled;
            }
            if prefill && self.shared.jobs.has_more_urgent(Priority::Prefill) {
                return End::Preempted;
            }
            self.yield_to_urgent(priority, seq);
            let size = self.chunk_size(priority);
            let end = (position + size).min(prompt.tokens.len());
            let chunk = &prompt.tokens[position..end];
            let is_final = end == prompt.tokens.len();
            self.batch.clear();
            for (i, &token) in chunk.iter().enumerate() {
                let logits = is_final && i + 1 == chunk.len() && !prefill;
                if let Err(e) = self.batch.add(token, (position + i) as i32, &[seq], logits) {
                    self.reset();
                    return End::Failed(ProviderError::Server(format!("llama batch: {e}")));
                }
            }
            let decode_started = Instant::now();
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                self.reset();
                return End::Failed(ProviderError::Server(format!("llama decode failed: {e}")));
            }
            let rate = chunk.len() as f64 / decode_started.elapsed().as_secs_f64().max(1e-6);
            self.prompt_tokens_per_sec = if self.prompt_tokens_per_sec > 0.0 {
                0.7 * self.prompt_tokens_per_sec + 0.3 * rate
            } else {
                rate
            };
            self.slots[slot].tokens.extend(chunk.iter().map(|t| t.0));
            metrics.decoded_tokens += chunk.len() as u32;
            position = end;
            last_logits = chunk.len() as i32 - 1;
        }
        metrics.prompt_eval = started.elapsed();
        tracing::debug!(
            id = job.id,
            seq,
            prompt_tokens = prompt.tokens.len(),
            reused_tokens = kept,
            shifted_chunks = plan.shifts.len(),
            decoded_tokens = prompt.tokens.len() - kept,
            prompt_eval_ms = metrics.prompt_eval.as_millis() as u64,
            "prompt decoded"
        );
        if prefill {
            return End::Finished(StopReason::Stop);
        }

        let mut sampler = self.sampler(request.temperature);
        let model = self.model;
        let vocab = model.vocab();
        let mut utf8 = Utf8Buffer::default();
        let mut scanner = StopScanner::new(&request.stop);
        let mut piece = Vec::with_capacity(32);
        let send = |text: String| {
            if !text.is_empty() {
                let _ = job.events.send(Ok(GenerationEvent::Text(text)));
            }
        };
        loop {
            if job.events.is_closed() {
                return End::Cancelled;
            }
            let token = sampler.sample(&self.ctx, last_logits);
            metrics.generated_tokens += 1;
            if metrics.ttft.is_none() {
                metrics.ttft = Some(job.submitted.elapsed());
            }
            if vocab.is_eog(token) {
                break;
            }
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            match scanner.push(&utf8.push(&piece)) {
                Scan::Continue(text) => send(text),
                Scan::Stop(text) => {
                    send(text);
                    return End::Finished(StopReason::Stop);
                }
            }
            let cached = self.slots[slot].tokens.len();
            if metrics.generated_tokens >= max_tokens || cached as u32 >= self.n_ctx {
                send(flush(&mut utf8, &mut scanner));
                return End::Finished(StopReason::Length);
            }
            // The sampled token is out; the next decode recomputes the logits, so others may run now.
            self.yield_to_urgent(priority, seq);
            if job.events.is_closed() {
                return End::Cancelled;
            }
            let pos = self.slots[slot].tokens.len() as i32;
            self.batch.clear();
            if let Err(e) = self.batch.add(token, pos, &[seq], true) {
                self.reset();
                return End::Failed(ProviderError::Server(format!("llama batch: {e}")));
            }
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                self.reset();
                return End::Failed(ProviderError::Server(format!("llama decode failed: {e}")));
            }
            self.slots[slot].tokens.push(token.0);
            last_logits = 0;
        }
        send(flush(&mut utf8, &mut scanner));
        End::Finished(StopReason::Stop)
    }

    fn sampler(&self, temperature: f32) -> LlamaSampler {
        if temperature <= 0.0 || !temperature.is_finite() {
            return LlamaSampler::greedy();
        }
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        });
        LlamaSampler::chain_simple([
            LlamaSampler::top_k(40),
            LlamaSampler::top_p(0.95, 1),
            LlamaSampler::temp(temperature),
            LlamaSampler::dist(seed),
        ])
    }

    /// Tokenizes the prompt, keeping at most `budget` tokens (the tail of the text).
    fn tokenize_prompt(&self, prompt: &Prompt, budget: u32) -> Result<Tokens, ProviderError> {
        let vocab = self.model.vocab();
        let budget = budget as usize;
        let bos: Vec<LlamaToken> = if vocab.should_add_bos() {
            vec![vocab.bos()]
        } else {
            Vec::new()
        };
        let plain = |text: &str| vocab.tokenize(text.as_bytes(), false, false);
        match prompt {
            Prompt::Raw(text) => {
                // Templates applied upstream may contain special tokens (FIM markers).
                let tokens = vocab.tokenize(text.as_bytes(), false, true);
                Ok(keep_tail(bos, tokens, budget))
            }
            Prompt::FillInTheMiddle {
                prefix,
                suffix,
                middle_start,
            } if self.has_fim => {
                let fixed = bos.len() + 3;
                let room = budget.saturating_sub(fixed);
                // Prefix-first: the prefix's last lines start the middle, so typing appends tokens and the
                // cached suffix stays valid (`completion::anchor`). Suffix-first has the prefix last already.
                let (mut head, mut tail) = match self.fim_layout {
                    FimLayout::SuffixPrefixMiddle => (plain(prefix), Vec::new()),
                    FimLayout::PrefixSuffixMiddle | FimLayout::Auto => {
                        let (head, tail) = split_at_middle(prefix, *middle_start);
                        (plain(head), plain(tail))
                    }
                };
                if tail.len() > room / 2 {
                    // A tail that would crowd out the rest goes back in front of the suffix.
                    head = plain(prefix);
                    tail.clear();
                }
                let mut suffix = plain(suffix);
                let prefix_tokens = head.len() + tail.len();
                // The suffix gets at most a quarter of the room; the prefix keeps its tail, cut in steps.
                suffix.truncate((room / 4).max(room.saturating_sub(prefix_tokens)));
                let head_room = room.saturating_sub(suffix.len() + tail.len());
                let excess = head.len().saturating_sub(head_room);
                let truncated = kv::window_start(excess, window_step(head_room), head.len());
                let mut tokens = bos;
                match self.fim_layout {
                    FimLayout::SuffixPrefixMiddle => {
                        tokens.push(vocab.fim_suf());
                        tokens.extend_from_slice(&suffix);
                        tokens.push(vocab.fim_pre());
                        tokens.extend_from_slice(&head[truncated..]);
                        tokens.push(vocab.fim_mid());
                    }
                    FimLayout::PrefixSuffixMiddle | FimLayout::Auto => {
                        tokens.push(vocab.fim_pre());
                        tokens.extend_from_slice(&head[truncated..]);
                        tokens.push(vocab.fim_suf());
                        tokens.extend_from_slice(&suffix);
                        tokens.push(vocab.fim_mid());
                        tokens.extend_from_slice(&tail);
                    }
                }
                Ok(Tokens { tokens, truncated })
            }
            Prompt::FillInTheMiddle { prefix, .. } => {
                tracing::debug!("model has no FIM tokens; completing from the prefix only");
                Ok(keep_tail(bos, plain(prefix), budget))
            }
            Prompt::Chat { system, messages } => {
                let text = self.chat_text(system.as_deref(), messages)?;
                Ok(keep_tail(
                    bos,
                    vocab.tokenize(text.as_bytes(), false, true),
                    budget,
                ))
            }
        }
    }

    fn chat_text(
        &self,
        system: Option<&str>,
        messages: &[crate::provider::ChatTurn],
    ) -> Result<String, ProviderError> {
        let turns: Vec<(&str, &str)> = system
            .map(|s| ("system", s))
            .into_iter()
            .chain(messages.iter().map(|m| {
                let role = match m.role {
                    ChatRole::User => "user",
                    ChatRole::Assistant => "assistant",
                };
                (role, m.content.as_str())
            }))
            .collect();
        let templated = self.model.chat_template(None).ok().and_then(|template| {
            let chat = turns
                .iter()
                .map(|(r, c)| LlamaChatMessage::new((*r).to_string(), (*c).to_string()))
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            self.model.apply_chat_template(&template, &chat, true).ok()
        });
        Ok(templated.unwrap_or_else(|| {
            // ChatML, understood by most small instruct models.
            let mut text = String::new();
            for (role, content) in &turns {
                text.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
            }
            text.push_str("<|im_start|>assistant\n");
            text
        }))
    }
}

struct Tokens {
    tokens: Vec<LlamaToken>,
    truncated: usize,
}

/// `bos` followed by a tail of `tokens` that fits `budget`. The start of the kept window moves in steps of a
/// quarter of the room, so typing at the end of a long text keeps the same start (and its KV cache) for a while.
fn keep_tail(bos: Vec<LlamaToken>, tokens: Vec<LlamaToken>, budget: usize) -> Tokens {
    let room = budget.saturating_sub(bos.len()).max(1);
    let excess = tokens.len().saturating_sub(room);
    let truncated = kv::window_start(excess, window_step(room), tokens.len());
    let mut out = bos;
    out.extend_from_slice(&tokens[truncated..]);
    Tokens {
        tokens: out,
        truncated,
    }
}

/// How far a truncated window's start jumps when it has to move.
fn window_step(room: usize) -> usize {
    (room / 4).max(1)
}

fn flush(utf8: &mut Utf8Buffer, scanner: &mut StopScanner) -> String {
    let mut out = match scanner.push(&utf8.finish()) {
        Scan::Continue(t) | Scan::Stop(t) => t,
    };
    out.push_str(&scanner.finish());
    out
}
