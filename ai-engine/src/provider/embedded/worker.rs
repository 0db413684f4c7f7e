//! The llama.cpp worker thread: loads the model, owns the context, serves queued requests in order.

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

use super::text::{Scan, StopScanner, Utf8Buffer};
use super::{EmbeddedOptions, Job, LoadState, ModelInfo, RequestMetrics, Shared};
use crate::provider::{ChatRole, GenerationEvent, Prompt, ProviderError, StopReason, TokenUsage};

/// llama.cpp's backend may be initialised once per process; every provider shares it.
fn backend() -> Result<&'static LlamaBackend, ProviderError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ProviderError::ModelLoad(format!("cannot initialise llama.cpp: {e}")))
}

pub(super) fn run(
    path: Result<PathBuf, ProviderError>,
    options: EmbeddedOptions,
    jobs: std::sync::mpsc::Receiver<Job>,
    load: watch::Sender<LoadState>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let loaded = path.and_then(|p| load_model(&p).map(|m| (p, m)));
    let (path, model) = match loaded {
        Ok(x) => x,
        Err(e) => return fail_all(e, jobs, &load),
    };
    let _ = shared.model.set(Arc::clone(&model));
    let threads = options.threads.filter(|&t| t > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let n_ctx = options
        .context_tokens
        .clamp(64, model.n_ctx_train().max(64));
    let n_batch = options.batch_tokens.clamp(16, n_ctx);
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => return fail_all(e, jobs, &load),
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let ctx = match model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let e = ProviderError::ModelLoad(format!(
                "cannot create a llama context for {}: {e}",
                path.display()
            ));
            return fail_all(e, jobs, &load);
        }
    };
    let vocab = model.vocab();
    let has_fim = [vocab.fim_pre(), vocab.fim_suf(), vocab.fim_mid()]
        .iter()
        .all(|t| t.0 >= 0);
    shared.has_fim.store(has_fim, Ordering::Relaxed);
    let info = ModelInfo {
        path: path.clone(),
        n_ctx_train: model.n_ctx_train(),
        n_vocab: model.n_vocab(),
        n_params: model.n_params(),
        has_fim,
        context_tokens: n_ctx,
        threads,
    };
    tracing::info!(
        path = %path.display(),
        params = info.n_params,
        n_ctx,
        threads,
        has_fim,
        load_ms = started.elapsed().as_millis() as u64,
        "embedded model loaded"
    );
    let _ = load.send(LoadState::Ready(info));

    let mut engine = Engine {
        model: &model,
        ctx,
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_ctx,
        n_batch,
        cached: Vec::new(),
        has_fim,
        seed: options.seed,
        shared: &shared,
    };
    while let Ok(job) = jobs.recv() {
        let events = job.events.clone();
        let id = job.id;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| engine.serve(job)));
        if outcome.is_err() {
            tracing::error!(id, "embedded model request panicked; KV cache reset");
            engine.reset();
            let _ = events.send(Err(ProviderError::Server(
                "the embedded model failed on this request".to_string(),
            )));
        }
    }
    tracing::debug!("embedded model thread exiting");
}

fn load_model(path: &Path) -> Result<Arc<LlamaModel>, ProviderError> {
    if !path.is_file() {
        return Err(ProviderError::ModelMissing(format!(
            "model file {} does not exist; run `ai-engine models pull` or fix the configured path",
            path.display()
        )));
    }
    let backend = backend()?;
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map(Arc::new)
        .map_err(|e| {
            ProviderError::ModelLoad(format!(
                "{}: {e} (is it a GGUF file this llama.cpp supports?)",
                path.display()
            ))
        })
}

/// Answers every request with the load error until the provider is dropped.
fn fail_all(
    error: ProviderError,
    jobs: std::sync::mpsc::Receiver<Job>,
    load: &watch::Sender<LoadState>,
) {
    tracing::error!(error = %error, "embedded model unavailable");
    let _ = load.send(LoadState::Failed(error.clone()));
    while let Ok(job) = jobs.recv() {
        let _ = job.events.send(Err(error.clone()));
    }
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    n_ctx: u32,
    n_batch: u32,
    /// Tokens whose KV entries are in the context, at positions `0..cached.len()`.
    cached: Vec<LlamaToken>,
    has_fim: bool,
    seed: Option<u32>,
    shared: &'m Shared,
}

/// How a request ended inside the engine.
enum End {
    Finished(StopReason),
    Cancelled,
    Failed(ProviderError),
}

impl Engine<'_> {
    fn reset(&mut self) {
        self.ctx.clear_kv_cache();
        self.cached.clear();
    }

    fn serve(&mut self, job: Job) {
        let dequeued = Instant::now();
        let mut metrics = RequestMetrics {
            queue_wait: dequeued - job.submitted,
            ..RequestMetrics::default()
        };
        let end = if job.events.is_closed() {
            tracing::debug!(id = job.id, "request cancelled while queued; skipped");
            End::Cancelled
        } else {
            self.generate(&job, &mut metrics)
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
            End::Cancelled => metrics.cancelled = true,
            End::Failed(e) => {
                let _ = job.events.send(Err(e));
            }
        }
        tracing::debug!(
            id = job.id,
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

    fn generate(&mut self, job: &Job, metrics: &mut RequestMetrics) -> End {
        let request = &job.request;
        let max_tokens = request.max_tokens.min(self.n_ctx / 2);
        if max_tokens == 0 {
            return End::Finished(StopReason::Length);
        }
        let prompt = match self.tokenize_prompt(&request.prompt, self.n_ctx - max_tokens) {
            Ok(p) => p,
            Err(e) => return End::Failed(e),
        };
        metrics.prompt_tokens = prompt.tokens.len() as u32;
        metrics.truncated_tokens = prompt.truncated as u32;
        if prompt.tokens.is_empty() {
            return End::Failed(ProviderError::BadRequest("empty prompt".to_string()));
        }

        // Reuse the KV cache of the longest common token prefix; decode only the rest.
        let started = Instant::now();
        let mut common = common_prefix(&self.cached, &prompt.tokens);
        if common == prompt.tokens.len() {
            // Identical prompt: the last token must be decoded again to get its logits.
            common -= 1;
        }
        if common < self.cached.len() {
            let removed = self
                .ctx
                .clear_kv_cache_seq(Some(0), Some(common as u32), None)
                .unwrap_or(false);
            if removed {
                self.cached.truncate(common);
            } else {
                tracing::debug!("partial KV cache removal unsupported; clearing it");
                self.reset();
                common = 0;
            }
        }
        metrics.reused_tokens = common as u32;
        let mut last_logits = 0;
        for chunk in prompt.tokens[common..].chunks(self.n_batch as usize) {
            if job.events.is_closed() {
                return End::Cancelled;
            }
            let is_final = self.cached.len() + chunk.len() == prompt.tokens.len();
            self.batch.clear();
            for (i, &token) in chunk.iter().enumerate() {
                let pos = (self.cached.len() + i) as i32;
                let logits = is_final && i + 1 == chunk.len();
                if let Err(e) = self.batch.add(token, pos, &[0], logits) {
                    self.reset();
                    return End::Failed(ProviderError::Server(format!("llama batch: {e}")));
                }
            }
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                self.reset();
                return End::Failed(ProviderError::Server(format!("llama decode failed: {e}")));
            }
            self.cached.extend_from_slice(chunk);
            last_logits = chunk.len() as i32 - 1;
        }
        metrics.prompt_eval = started.elapsed();
        tracing::debug!(
            id = job.id,
            prompt_tokens = prompt.tokens.len(),
            reused_tokens = common,
            decoded_tokens = prompt.tokens.len() - common,
            prompt_eval_ms = metrics.prompt_eval.as_millis() as u64,
            "prompt decoded"
        );

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
            if metrics.generated_tokens >= max_tokens || self.cached.len() as u32 >= self.n_ctx {
                send(flush(&mut utf8, &mut scanner));
                return End::Finished(StopReason::Length);
            }
            if job.events.is_closed() {
                return End::Cancelled;
            }
            self.batch.clear();
            let pos = self.cached.len() as i32;
            if let Err(e) = self.batch.add(token, pos, &[0], true) {
                self.reset();
                return End::Failed(ProviderError::Server(format!("llama batch: {e}")));
            }
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                self.reset();
                return End::Failed(ProviderError::Server(format!("llama decode failed: {e}")));
            }
            self.cached.push(token);
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
            Prompt::FillInTheMiddle { prefix, suffix } if self.has_fim => {
                let prefix = plain(prefix);
                let mut suffix = plain(suffix);
                let fixed = bos.len() + 3;
                let room = budget.saturating_sub(fixed);
                // The suffix gets at most a quarter of the room; the prefix keeps its tail.
                suffix.truncate((room / 4).max(room.saturating_sub(prefix.len())));
                let prefix_room = room.saturating_sub(suffix.len());
                let truncated = prefix.len().saturating_sub(prefix_room);
                let mut tokens = bos;
                tokens.push(vocab.fim_pre());
                tokens.extend_from_slice(&prefix[truncated..]);
                tokens.push(vocab.fim_suf());
                tokens.extend_from_slice(&suffix);
                tokens.push(vocab.fim_mid());
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

/// `bos` followed by the last `budget - bos.len()` tokens of `tokens`.
fn keep_tail(bos: Vec<LlamaToken>, tokens: Vec<LlamaToken>, budget: usize) -> Tokens {
    let room = budget.saturating_sub(bos.len()).max(1);
    let truncated = tokens.len().saturating_sub(room);
    let mut out = bos;
    out.extend_from_slice(&tokens[truncated..]);
    Tokens {
        tokens: out,
        truncated,
    }
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn flush(utf8: &mut Utf8Buffer, scanner: &mut StopScanner) -> String {
    let mut out = match scanner.push(&utf8.finish()) {
        Scan::Continue(t) | Scan::Stop(t) => t,
    };
    out.push_str(&scanner.finish());
    out
}
