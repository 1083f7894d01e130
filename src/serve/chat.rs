//! Chat templates: the Jinja template that turns a list of messages into the model's prompt
//! text, from `--chat-template FILE`, a GGUF file's `tokenizer.chat_template` metadata, or an HF
//! directory's `chat_template.jinja` / `tokenizer_config.json` (`chat_template`). Rendered as
//! HF transformers renders it (`trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`), with `messages`, `add_generation_prompt = true`, `bos_token`
//! and `eos_token`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::model::gguf::GgufFile;
use crate::model::tokenizer::Tokenizer;

/// One chat message (text only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from (for messages).
    pub source: String,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.source)
    }
}

/// The template text a model carries, and where it was found; `None` when it has none.
pub fn model_template(model: &Path) -> Result<Option<(String, String)>> {
    if model.is_file() {
        let g = GgufFile::open(model)?;
        return Ok(g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(|s| {
                (
                    s.to_string(),
                    format!("{} (tokenizer.chat_template)", model.display()),
                )
            }));
    }
    let jinja = model.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    let cfg_path = model.join("tokenizer_config.json");
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let where_ = format!("{} (chat_template)", cfg_path.display());
    Ok(match cfg.get("chat_template") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some((s.clone(), where_)),
        // A list of named templates: "default", else the first.
        Some(serde_json::Value::Array(list)) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|v| v.as_str()) == Some(n))
            };
            named("default")
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(|s| (s.to_string(), where_))
        }
        Some(other) => bail!(
            "{}: chat_template must be a string or a list of named templates, got {other}",
            cfg_path.display()
        ),
    })
}

impl ChatTemplate {
    /// Compiles `source_text`; `bos`/`eos` strings come from the tokenizer.
    pub fn new(source_text: &str, source: &str, tok: &Tokenizer) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source_text.to_string())
            .map_err(|e| anyhow!("chat template {source}: {e:#}"))?;
        let name = |id: Option<u32>| -> String {
            id.and_then(|i| tok.decode(&[i]).ok()).unwrap_or_default()
        };
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos: name(tok.bos_token_id()),
            eos: name(tok.eos_token_ids().first().copied()),
        })
    }

    /// The template of `model` (or `override_file`), compiled; `None` when there is none.
    pub fn for_model(
        model: &Path,
        override_file: Option<&Path>,
        tok: &Tokenizer,
    ) -> Result<Option<Self>> {
        let found = match override_file {
            Some(f) => Some((
                std::fs::read_to_string(f)
                    .with_context(|| format!("--chat-template {}", f.display()))?,
                f.display().to_string(),
            )),
            None => model_template(model)?,
        };
        found
            .map(|(text, source)| Self::new(&text, &source, tok))
            .transpose()
    }

    /// The prompt text of `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| anyhow!("chat template {}: {e:#}", self.source))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| {
            anyhow!(
                "the chat template ({}) failed on these messages: {e:#}",
                self.source
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(list: &[(&str, &str)]) -> Vec<Message> {
        list.iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn renders_chatml_with_hf_whitespace_rules() {
        let tok = Tokenizer::r50k().unwrap();
        // A template written over several lines: trim_blocks drops the newline after a block
        // tag, lstrip_blocks the indentation before one, `-` the whitespace on its side (a
        // newline after `}}` stays, as in Jinja2 with HF's settings).
        let src = "{% for m in messages %}\n    {{- '<|im_start|>' + m['role'] + '\\n' + m['content'].strip() + '<|im_end|>\\n' }}\n{%- endfor %}\n  {% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src, "test", &tok).unwrap();
        let out = t
            .render(&msgs(&[("system", "Be brief."), ("user", "  Hi!  ")]))
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.eos, "<|endoftext|>");
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            "test",
            &tok,
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "a"), ("user", "b")])).unwrap(),
            "a\nb\n"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let tok = Tokenizer::r50k().unwrap();
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            "test",
            &tok,
        )
        .unwrap();
        assert_eq!(t.render(&msgs(&[("user", "x")])).unwrap(), "ok");
        let e = t.render(&msgs(&[("system", "x")])).unwrap_err();
        assert!(format!("{e:#}").contains("first must be user"), "{e:#}");
        assert!(ChatTemplate::new("{% for %}", "bad", &tok).is_err());
    }
}
