//! The OpenAI-compatible request and response bodies: a request's JSON checked field by field
//! into a [`GenRequest`] (every error names its field, with OpenAI's error body and the right
//! status), and the JSON of responses and stream chunks (`text_completion`,
//! `chat.completion`, `chat.completion.chunk`).
//!
//! Unknown fields are ignored (as vLLM does); known fields this server does not implement are
//! refused when they ask for something other than their default (e.g. `echo: true`,
//! `presence_penalty: 0.5`), so a client never gets silently different behaviour.
//! Extensions (vLLM's): `top_k`, `ignore_eos`, `return_token_ids` (the generated token ids in
//! every choice).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::chat::{ChatTemplate, Message};
use super::registry::{Registry, Task};
use super::scheduler::{FinishReason, TokenLogprob};
use crate::generate::{Sampling, Strategy};
use crate::model::config::{Arch, ModelConfig};
use crate::model::tokenizer::Tokenizer;
use crate::reference::model::Positions;

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429 / 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 about the field `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(400, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The error body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// The server's limits on a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Prompt + generated tokens of one sequence.
    pub max_context: usize,
    /// Prompt tokens of one sequence.
    pub max_prompt_tokens: usize,
    /// `max_tokens` of one request.
    pub max_tokens: usize,
    /// `n` of one request.
    pub max_n: usize,
    /// Sequences (prompts × n) of one request.
    pub max_sequences: usize,
}

/// What a request needs from the server to be checked.
pub struct ParseContext<'a> {
    pub registry: &'a Registry,
    pub tokenizer: &'a Tokenizer,
    pub chat: Option<&'a ChatTemplate>,
    pub config: &'a ModelConfig,
    /// End-of-sequence tokens (tokenizer's and model's).
    pub eos: &'a [u32],
    pub limits: Limits,
}

/// A checked generation request.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub endpoint: Endpoint,
    /// The `model` as the client wrote it (echoed back).
    pub model: String,
    pub task: Task,
    /// One per prompt (chat: one).
    pub prompts: Vec<Arc<Vec<u32>>>,
    pub n: usize,
    pub max_tokens: usize,
    pub strategy: Strategy,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions: `logprobs` (alternatives per token); chat: `top_logprobs` when `logprobs`.
    pub logprobs: Option<usize>,
    pub return_token_ids: bool,
}

impl GenRequest {
    /// Sequences the request runs: prompts × n.
    pub fn sequences(&self) -> usize {
        self.prompts.len() * self.n
    }

    /// Prompt tokens (each prompt counted once, whatever `n`).
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.len()).sum()
    }
}

/// The fields of a JSON object, read with checks that name the field.
struct Fields<'a>(&'a Map<String, Value>);

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The field, `None` when absent or null.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn string(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::field(
                k,
                format!("'{k}' must be a string, got {}", type_name(v)),
            )),
        }
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::field(
                k,
                format!("'{k}' must be a boolean, got {}", type_name(v)),
            )),
        }
    }

    fn number(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ApiError::field(k, format!("'{k}' must be a finite number"))),
            },
            Some(v) => Err(ApiError::field(
                k,
                format!("'{k}' must be a number, got {}", type_name(v)),
            )),
        }
    }

    /// A whole number (JSON integers, or numbers with no fractional part).
    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        let bad = || ApiError::field(k, format!("'{k}' must be a whole number"));
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i))
                } else if let Some(u) = n.as_u64() {
                    Ok(Some(u.min(i64::MAX as u64) as i64))
                } else {
                    match n.as_f64() {
                        Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(Some(x as i64)),
                        _ => Err(bad()),
                    }
                }
            }
            Some(v) => Err(ApiError::field(
                k,
                format!("'{k}' must be a whole number, got {}", type_name(v)),
            )),
        }
    }

    /// A whole number in `lo..=hi`.
    fn int_in(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.int(k)? {
            Some(x) if x < lo || x > hi => Err(ApiError::field(
                k,
                format!("'{k}' must be between {lo} and {hi}, got {x}"),
            )),
            x => Ok(x),
        }
    }

    /// Refuses a field this server does not implement unless it holds `is_default`.
    fn unsupported(&self, k: &str, is_default: impl Fn(&Value) -> bool) -> Result<(), ApiError> {
        match self.get(k) {
            Some(v) if !is_default(v) => Err(ApiError::field(
                k,
                format!("'{k}' is not supported by this server (got {v})"),
            )),
            _ => Ok(()),
        }
    }
}

/// Parses the body of a completions or chat request.
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    ctx: &ParseContext<'_>,
) -> Result<GenRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
            .code("invalid_json")
    })?;
    let Value::Object(map) = &v else {
        return Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got {}",
            type_name(&v)
        )));
    };
    let f = Fields(map);

    // Fields not implemented: refused unless at their defaults.
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    f.unsupported("presence_penalty", zero)?;
    f.unsupported("frequency_penalty", zero)?;
    f.unsupported("repetition_penalty", |v| v.as_f64() == Some(1.0))?;
    f.unsupported("min_p", zero)?;
    f.unsupported("logit_bias", |v| v.as_object().is_some_and(Map::is_empty))?;
    f.unsupported("echo", |v| v == &Value::Bool(false))?;
    f.unsupported("suffix", |v| v.as_str() == Some(""))?;
    f.unsupported("tools", |v| v.as_array().is_some_and(Vec::is_empty))?;
    f.unsupported("functions", |v| v.as_array().is_some_and(Vec::is_empty))?;
    f.unsupported("tool_choice", |v| v.as_str() == Some("none"))?;
    f.unsupported("response_format", |v| {
        v.get("type").and_then(Value::as_str) == Some("text")
    })?;
    f.string("user")?;

    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::field("model", "'model' is required"))?;
    let task = ctx.registry.resolve(model).ok_or_else(|| {
        let mut known = vec![ctx.registry.base().to_string()];
        known.extend(
            ctx.registry
                .prefix_names()
                .iter()
                .map(|n| format!("{}:{n}", ctx.registry.base())),
        );
        ApiError {
            status: 404,
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                404,
                "invalid_request_error",
                format!(
                    "the model '{model}' does not exist (known: {}; see GET /v1/models)",
                    known.join(", ")
                ),
            )
        }
    })?;

    let prompts: Vec<Vec<u32>> = match endpoint {
        Endpoint::Completions => completion_prompts(&f, ctx)?,
        Endpoint::Chat => vec![chat_prompt(&f, ctx)?],
    };
    for (i, p) in prompts.iter().enumerate() {
        let which = if prompts.len() > 1 {
            format!("prompt {i}")
        } else {
            "the prompt".to_string()
        };
        let param = match endpoint {
            Endpoint::Completions => "prompt",
            Endpoint::Chat => "messages",
        };
        if p.is_empty() {
            return Err(ApiError::field(
                param,
                format!("{which} is empty (no tokens to continue)"),
            ));
        }
        if p.len() > ctx.limits.max_prompt_tokens {
            return Err(ApiError::field(
                param,
                format!(
                    "{which} has {} tokens; this server takes at most {} prompt tokens",
                    p.len(),
                    ctx.limits.max_prompt_tokens
                ),
            )
            .code("context_length_exceeded"));
        }
    }

    let n = f.int_in("n", 1, ctx.limits.max_n as i64)?.unwrap_or(1) as usize;
    let best_of = f.int("best_of")?;
    if best_of.is_some_and(|b| b != n as i64) {
        return Err(ApiError::field(
            "best_of",
            "'best_of' other than n is not supported by this server",
        ));
    }
    let sequences = prompts.len() * n;
    if sequences > ctx.limits.max_sequences {
        return Err(ApiError::field(
            "n",
            format!(
                "{} prompt(s) × n = {n} is {sequences} sequences; this server runs at most {} \
                 per request",
                prompts.len(),
                ctx.limits.max_sequences
            ),
        ));
    }

    let limit = ctx.limits.max_tokens as i64;
    let max_tokens = match endpoint {
        Endpoint::Completions => f.int("max_tokens")?.map(|x| ("max_tokens", x)),
        Endpoint::Chat => match f.int("max_completion_tokens")? {
            Some(x) => Some(("max_completion_tokens", x)),
            None => f.int("max_tokens")?.map(|x| ("max_tokens", x)),
        },
    };
    if let Some((k, x)) = max_tokens {
        if x < 1 || x > limit {
            return Err(ApiError::field(
                k,
                format!("'{k}' must be between 1 and {limit} (this server's limit), got {x}"),
            ));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = ctx.limits.max_context.saturating_sub(longest);
    let max_tokens = match max_tokens {
        Some((k, x)) => {
            let x = x as usize;
            if longest + x > ctx.limits.max_context {
                return Err(ApiError::field(
                    k,
                    format!(
                        "this model's maximum context length is {} tokens; the prompt's {} \
                         tokens and '{k}' = {x} make {}",
                        ctx.limits.max_context,
                        longest,
                        longest + x
                    ),
                )
                .code("context_length_exceeded"));
            }
            x
        }
        None => {
            if room == 0 {
                return Err(ApiError::field(
                    "prompt",
                    format!(
                        "the prompt fills this model's maximum context length of {} tokens",
                        ctx.limits.max_context
                    ),
                )
                .code("context_length_exceeded"));
            }
            let default = match endpoint {
                Endpoint::Completions => 16,
                Endpoint::Chat => ctx.limits.max_tokens,
            };
            default.min(room)
        }
    };
    // GPT-2's learned positions bound prefix + prompt + generation.
    if ctx.config.arch == Arch::Gpt2 {
        let p = match task.positions() {
            Positions::AfterPrefix => task.prefix_len(),
            Positions::FromZero => 0,
        };
        let need = p + longest + max_tokens;
        if need > ctx.config.max_positions {
            return Err(ApiError::field(
                "max_tokens",
                format!(
                    "{p} prefix positions + {longest} prompt tokens + {max_tokens} new tokens = \
                     {need} exceed the model's {} positions",
                    ctx.config.max_positions
                ),
            )
            .code("context_length_exceeded"));
        }
    }

    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            format!("'temperature' must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field(
            "top_p",
            format!("'top_p' must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = f.int("top_k")?.unwrap_or(-1);
    if top_k < -1 {
        return Err(ApiError::field(
            "top_k",
            format!("'top_k' must be -1 or 0 (off) or at least 1, got {top_k}"),
        ));
    }
    let seed = f.int("seed")?;
    let strategy = if temperature == 0.0 {
        Strategy::Greedy
    } else {
        Strategy::Sample(Sampling {
            temperature,
            top_k: (top_k >= 1).then_some(top_k as usize),
            top_p: (top_p < 1.0).then_some(top_p),
            seed: seed.map_or_else(rand::random::<u64>, |s| s as u64),
        })
    };

    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::field(
                    "stop",
                    format!("'stop' takes at most 4 strings, got {}", a.len()),
                ));
            }
            a.iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ApiError::field(
                        "stop",
                        format!("'stop' must hold strings, got {}", type_name(other)),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(ApiError::field(
                "stop",
                format!(
                    "'stop' must be a string or an array of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };

    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("'stream_options' must be an object, got {}", type_name(v)),
            ))
        }
    };
    let logprobs = match endpoint {
        Endpoint::Completions => f.int_in("logprobs", 0, 20)?.map(|k| k as usize),
        Endpoint::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.int_in("top_logprobs", 0, 20)?;
            if top.is_some() && !on {
                return Err(ApiError::field(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs': true",
                ));
            }
            on.then_some(top.unwrap_or(0) as usize)
        }
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let return_token_ids = f.bool("return_token_ids")?.unwrap_or(false);

    Ok(GenRequest {
        endpoint,
        model: model.to_string(),
        task,
        prompts: prompts.into_iter().map(Arc::new).collect(),
        n,
        max_tokens,
        strategy,
        stop,
        ignore_eos,
        stream,
        include_usage,
        logprobs,
        return_token_ids,
    })
}

/// Token ids of a text prompt: BOS when the tokenizer's configuration asks for it, then the
/// text's tokens (what `prefix-tune generate` does).
pub fn text_prompt(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    let mut out = Vec::new();
    if tok.add_bos() {
        out.extend(tok.bos_token_id());
    }
    out.extend(
        tok.encode(text)
            .map_err(|e| ApiError::field("prompt", format!("tokenizing the prompt: {e:#}")))?,
    );
    Ok(out)
}

/// A list of token ids, each inside the vocabulary.
fn token_list(a: &[Value], vocab: usize, what: &str) -> Result<Vec<u32>, ApiError> {
    a.iter()
        .map(|x| match x.as_u64() {
            Some(t) if (t as usize) < vocab => Ok(t as u32),
            Some(t) => Err(ApiError::field(
                "prompt",
                format!("{what}: token id {t} is outside the vocabulary of {vocab} tokens"),
            )),
            None => Err(ApiError::field(
                "prompt",
                format!("{what}: token ids must be whole numbers ≥ 0, got {x}"),
            )),
        })
        .collect()
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
fn completion_prompts(f: &Fields<'_>, ctx: &ParseContext<'_>) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab = ctx.config.vocab_size;
    let tok = ctx.tokenizer;
    match f.get("prompt") {
        None => Err(ApiError::field("prompt", "'prompt' is required")),
        Some(Value::String(s)) => Ok(vec![text_prompt(tok, s)?]),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError::field("prompt", "'prompt' is an empty array"))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => text_prompt(tok, s),
                    other => Err(ApiError::field(
                        "prompt",
                        format!(
                            "prompt {i} must be a string like the first, got {}",
                            type_name(other)
                        ),
                    )),
                })
                .collect(),
            Value::Number(_) => Ok(vec![token_list(a, vocab, "prompt")?]),
            Value::Array(_) => a
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Array(ids) => token_list(ids, vocab, &format!("prompt {i}")),
                    other => Err(ApiError::field(
                        "prompt",
                        format!(
                            "prompt {i} must be a list of token ids like the first, got {}",
                            type_name(other)
                        ),
                    )),
                })
                .collect(),
            other => Err(ApiError::field(
                "prompt",
                format!(
                    "'prompt' must be a string, strings, token ids or lists of token ids; its \
                     first element is {}",
                    type_name(other)
                ),
            )),
        },
        Some(v) => Err(ApiError::field(
            "prompt",
            format!(
                "'prompt' must be a string or an array, got {}",
                type_name(v)
            ),
        )),
    }
}

/// `messages` rendered with the chat template and tokenized (no BOS added: the template
/// writes what the model expects).
fn chat_prompt(f: &Fields<'_>, ctx: &ParseContext<'_>) -> Result<Vec<u32>, ApiError> {
    let list = match f.get("messages") {
        None => return Err(ApiError::field("messages", "'messages' is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::field("messages", "'messages' is empty"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::field(
                "messages",
                format!("'messages' must be an array, got {}", type_name(v)),
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Value::Object(o) = m else {
            return Err(ApiError::field(
                &param,
                format!("{param} must be an object, got {}", type_name(m)),
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) if !r.is_empty() => r.clone(),
            _ => {
                return Err(ApiError::field(
                    &format!("{param}.role"),
                    format!("{param}.role must be a non-empty string"),
                ))
            }
        };
        let content = match o.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::field(
                                &format!("{param}.content[{j}]"),
                                format!(
                                    "{param}.content[{j}]: only text parts \
                                     ({{\"type\": \"text\", \"text\": ...}}) are supported"
                                ),
                            ))
                        }
                    }
                }
                text
            }
            Some(v) => {
                return Err(ApiError::field(
                    &format!("{param}.content"),
                    format!(
                        "{param}.content must be a string or a list of text parts, got {}",
                        type_name(v)
                    ),
                ))
            }
        };
        messages.push(Message { role, content });
    }
    let Some(template) = ctx.chat else {
        return Err(ApiError::bad_request(
            "this model has no chat template (none in its tokenizer configuration or GGUF \
             metadata): use /v1/completions, or start the server with --chat-template FILE",
        )
        .code("no_chat_template"));
    };
    let text = template
        .render(&messages)
        .map_err(|e| ApiError::field("messages", format!("{e:#}")))?;
    ctx.tokenizer
        .encode(&text)
        .map_err(|e| ApiError::field("messages", format!("tokenizing the chat prompt: {e:#}")))
}

/// A finished choice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChoiceResult {
    pub text: String,
    pub finish: Option<FinishReason>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
}

/// `usage`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A token's text for logprobs.
fn token_text(tok: &Tokenizer, t: u32) -> String {
    tok.decode(&[t]).unwrap_or_default()
}

/// Completions' `logprobs` object for `entries` whose text starts at `offset` (characters).
pub fn completion_logprobs(
    tok: &Tokenizer,
    entries: &[(u32, &TokenLogprob)],
    offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut at = offset;
    for (t, lp) in entries {
        let s = token_text(tok, *t);
        offsets.push(at);
        at += s.chars().count();
        tokens.push(s);
        lps.push(lp.logprob);
        let mut top = Map::new();
        for (a, l) in &lp.top {
            top.insert(token_text(tok, *a), json!(l));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat's `logprobs` object.
pub fn chat_logprobs(tok: &Tokenizer, entries: &[(u32, &TokenLogprob)]) -> Value {
    let one = |t: u32, l: f64| {
        let s = token_text(tok, t);
        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|(t, lp)| {
            let mut v = one(*t, lp.logprob);
            v["top_logprobs"] = Value::Array(lp.top.iter().map(|(a, l)| one(*a, *l)).collect());
            v
        })
        .collect();
    json!({ "content": content })
}

/// The whole (non-streamed) response.
pub fn response_body(
    req: &GenRequest,
    tok: &Tokenizer,
    id: &str,
    created: u64,
    choices: &[ChoiceResult],
) -> Value {
    let completion_tokens: usize = choices.iter().map(|c| c.tokens.len()).sum();
    let list: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let entries: Vec<(u32, &TokenLogprob)> =
                c.tokens.iter().copied().zip(&c.logprobs).collect();
            let finish = c.finish.map(FinishReason::as_str);
            let mut v = match req.endpoint {
                Endpoint::Completions => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": req.logprobs.map(|_| completion_logprobs(tok, &entries, 0)),
                    "finish_reason": finish,
                }),
                Endpoint::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": req.logprobs.map(|_| chat_logprobs(tok, &entries)),
                    "finish_reason": finish,
                }),
            };
            if req.return_token_ids {
                v["token_ids"] = json!(c.tokens);
            }
            v
        })
        .collect();
    json!({
        "id": id,
        "object": match req.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion",
        },
        "created": created,
        "model": req.model,
        "choices": list,
        "usage": usage(req.prompt_tokens(), completion_tokens),
    })
}

/// One stream chunk: `choices` already built (see [`chunk_choice`]).
pub fn chunk(req: &GenRequest, id: &str, created: u64, choices: Vec<Value>) -> Value {
    json!({
        "id": id,
        "object": match req.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        },
        "created": created,
        "model": req.model,
        "choices": choices,
    })
}

/// One choice of a stream chunk: new text, its tokens, and the finish reason when it ends.
pub fn chunk_choice(
    req: &GenRequest,
    tok: &Tokenizer,
    index: usize,
    text: &str,
    tokens: &[(u32, Option<TokenLogprob>)],
    offset: usize,
    finish: Option<FinishReason>,
) -> Value {
    let entries: Vec<(u32, &TokenLogprob)> = tokens
        .iter()
        .filter_map(|(t, l)| l.as_ref().map(|l| (*t, l)))
        .collect();
    let finish = finish.map(FinishReason::as_str);
    let mut v = match req.endpoint {
        Endpoint::Completions => json!({
            "index": index,
            "text": text,
            "logprobs": req.logprobs.map(|_| completion_logprobs(tok, &entries, offset)),
            "finish_reason": finish,
        }),
        Endpoint::Chat => {
            let delta = if finish.is_some() && text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({
                "index": index,
                "delta": delta,
                "logprobs": req.logprobs.map(|_| chat_logprobs(tok, &entries)),
                "finish_reason": finish,
            })
        }
    };
    if req.return_token_ids {
        v["token_ids"] = json!(tokens.iter().map(|(t, _)| *t).collect::<Vec<_>>());
    }
    v
}

/// The first chunk of a chat stream's choice: the assistant's role.
pub fn chat_role_choice(index: usize) -> Value {
    json!({
        "index": index,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": null,
        "finish_reason": null,
    })
}
