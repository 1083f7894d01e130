//! Tokenizers: HF `tokenizer.json`, byte-level BPE rebuilt from GGUF metadata, and GPT-2's r50k.
//!
//! [`Tokenizer::encode`] returns plain tokens: it never adds BOS/EOS itself. Callers prepend
//! [`Tokenizer::bos_token_id`] when [`Tokenizer::add_bos`] says the tokenizer's own configuration
//! asks for it. Special tokens written literally in the text (e.g. `<|im_start|>`) are recognized,
//! as HF's `encode(text, add_special_tokens=False)` does.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::gguf::GgufFile;

enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    Tiktoken(Box<tiktoken_rs::CoreBPE>),
}

/// A text tokenizer with its special-token conventions.
pub struct Tokenizer {
    backend: Backend,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    vocab_size: usize,
    description: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// Llama-3-style split regex (also used by several other BPE vocabularies).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's byte → printable character table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).expect("valid code point");
            n += 1;
            c
        };
    }
    table
}

impl Tokenizer {
    fn finish(
        backend: Backend,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        vocab_size: usize,
        kind: &str,
    ) -> Self {
        let description = format!(
            "{kind}, {vocab_size} tokens, bos {}, eos {eos:?}, add_bos {add_bos}",
            bos.map_or("none".to_string(), |b| b.to_string())
        );
        Tokenizer {
            backend,
            bos,
            eos,
            add_bos,
            vocab_size,
            description,
        }
    }

    /// Plain tokens of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
            Backend::Tiktoken(t) => Ok(t.encode_with_special_tokens(text)),
        }
    }

    /// Text of `ids` (special tokens are kept; invalid UTF-8 is replaced).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            );
        }
        match &self.backend {
            Backend::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| anyhow!("decoding tokens: {e}")),
            Backend::Tiktoken(t) => {
                let bytes = t
                    .decode_bytes(ids)
                    .map_err(|e| anyhow!("decoding tokens: {e:?}"))?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }
    /// Whether the tokenizer's configuration asks for a BOS before the text.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// One line saying what this tokenizer is.
    pub fn describe(&self) -> String {
        self.description.clone()
    }
    /// Id of a token given by its (vocabulary) spelling, where the backend can tell.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Tiktoken(_) => (token == "<|endoftext|>").then_some(50256),
        }
    }

    /// GPT-2's tokenizer (tiktoken r50k), for GPT-2 directories without `tokenizer.json`. EOS 50256.
    pub fn r50k() -> Result<Self> {
        let bpe =
            tiktoken_rs::r50k_base().map_err(|e| anyhow!("building the r50k tokenizer: {e}"))?;
        Ok(Self::finish(
            Backend::Tiktoken(Box::new(bpe)),
            Some(50256),
            vec![50256],
            false,
            50257,
            "GPT-2 r50k (tiktoken)",
        ))
    }

    /// An HF `tokenizer.json`. `tokenizer_config.json` next to it (optional) says whether BOS is
    /// added; without it, the post-processor is asked. `bos`/`eos` come from the model's config when
    /// known, else from `tokenizer_config.json`'s token strings.
    pub fn from_hf_file(path: &Path, bos: Option<u32>, eos: &[u32]) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read the tokenizer", path.display()))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            let b = std::fs::read(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            Some((cfg_path, b))
        } else {
            None
        };
        let cfg = cfg.as_ref().map(|(p, b)| (p.as_path(), b.as_slice()));
        Self::from_hf_bytes(path, &bytes, cfg, bos, eos)
    }

    /// [`Tokenizer::from_hf_file`] on the files' bytes: `tokenizer.json` at `path`, and
    /// `tokenizer_config.json` when there is one; the paths name the files in errors.
    pub fn from_hf_bytes(
        path: &Path,
        bytes: &[u8],
        config: Option<(&Path, &[u8])>,
        bos: Option<u32>,
        eos: &[u32],
    ) -> Result<Self> {
        // Parsed to a JSON value first: tokenizers 0.22 panics instead of failing on some
        // malformed JSON inside "decoder" (its deserializer `expect`s there); from an already
        // parsed value that step cannot fail (fuzz finding, RELIABILITY.md).
        let json: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            anyhow!(
                "{}: cannot load tokenizer: invalid JSON: {e}",
                path.display()
            )
        })?;
        let tok: tokenizers::Tokenizer = serde_json::from_value(json)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let cfg: Option<serde_json::Value> = match config {
            Some((cfg_path, b)) => Some(
                serde_json::from_slice(b)
                    .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?,
            ),
            None => None,
        };
        let token_id = |key: &str| -> Option<u32> {
            let v = cfg.as_ref()?.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tok.token_to_id(s)
        };
        let bos = bos.or_else(|| token_id("bos_token"));
        let eos = if eos.is_empty() {
            token_id("eos_token").into_iter().collect()
        } else {
            eos.to_vec()
        };
        let add_bos = match cfg
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
        {
            Some(b) => b,
            None => {
                // Does the post-processor put BOS in front?
                let with = tok
                    .encode("a", true)
                    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
                let without = tok
                    .encode("a", false)
                    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
                bos.is_some()
                    && with.get_ids().len() > without.get_ids().len()
                    && with.get_ids().first().copied() == bos
            }
        };
        let vocab_size = tok.get_vocab_size(true);
        Ok(Self::finish(
            Backend::Hf(Box::new(tok)),
            bos,
            eos,
            add_bos,
            vocab_size,
            &format!("HF tokenizer.json ({})", path.display()),
        ))
    }

    /// The byte-level BPE described by a GGUF file's `tokenizer.ggml.*` metadata, built as HF
    /// transformers builds it (vocabulary + merges, control tokens as special tokens), with the
    /// pre-tokenizer that `tokenizer.ggml.pre` names (`smollm`: digits one by one, then GPT-2's regex).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let file = g.path.display().to_string();
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model != "gpt2" {
            bail!("{file}: unsupported tokenizer.ggml.model '{model}' (supported: gpt2 byte-level BPE)");
        }
        let str_array = |key: &str| -> Result<&[String]> {
            g.get(key)
                .and_then(|v| v.as_array())
                .and_then(|a| a.as_strs())
                .ok_or_else(|| anyhow!("{file}: missing or non-string-array metadata '{key}'"))
        };
        let tokens = str_array("tokenizer.ggml.tokens")?;
        let merges = str_array("tokenizer.ggml.merges")?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            bail!("{file}: tokenizer.ggml.tokens has {} entries", tokens.len());
        }
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => {
                let t = v.as_array().and_then(|a| a.to_i64s()).ok_or_else(|| {
                    anyhow!("{file}: tokenizer.ggml.token_type is not an integer array")
                })?;
                if t.len() != tokens.len() {
                    bail!(
                        "{file}: tokenizer.ggml.token_type has {} entries for {} tokens",
                        t.len(),
                        tokens.len()
                    );
                }
                t
            }
        };

        let table = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            let spelled = if in_alphabet(t) {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            };
            vocab.insert(spelled, id as u32);
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("{file}: merge '{m}' has no space"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("{file}: invalid BPE vocabulary/merges: {e}"))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);

        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "roberta-bpe" => byte_level.into(),
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
                let split = Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| anyhow!("building the split regex: {e}"))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
            other => bail!("{file}: unsupported tokenizer.ggml.pre '{other}'"),
        };
        tok.with_pre_tokenizer(Some(pre_tok));
        tok.with_decoder(Some(ByteLevel::default()));

        // 3 = CONTROL: special tokens (skipped when not spelled in the byte alphabet, as HF does);
        // 4 = USER_DEFINED: plain added tokens matched whole.
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, &ty)| ty == 3 && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&control);
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, &ty)| ty == 4 && tok.token_to_id(t).is_some())
            .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        tok.add_tokens(&user);

        let cfg = g.llama_config().ok();
        let bos = cfg.as_ref().and_then(|c| c.bos_token_id);
        let eos = cfg.map(|c| c.eos_token_ids).unwrap_or_default();
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let vocab_size = tok.get_vocab_size(true);
        if let Some(&bad) = bos.iter().chain(&eos).find(|&&i| i as usize >= vocab_size) {
            bail!(
                "{file}: special token id {bad} is outside the vocabulary of {vocab_size} tokens"
            );
        }
        Ok(Self::finish(
            Backend::Hf(Box::new(tok)),
            bos,
            eos,
            add_bos,
            vocab_size,
            &format!("byte-level BPE from GGUF (pre-tokenizer '{pre}')"),
        ))
    }
}
