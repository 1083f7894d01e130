//! Generated tokens to text, incrementally, with stop strings.
//!
//! Each new token's text is found by decoding a short window of recent tokens with and without
//! it (so tokenizers whose text of a token depends on its neighbours, and tokens that end inside
//! a UTF-8 character, come out right: such a token waits for the next one). Text that could be
//! the beginning of a stop string is held back until it is known not to be; when a stop string
//! appears, the text ends just before it (as OpenAI's API does) and the sequence stops.

use anyhow::Result;

use crate::model::tokenizer::Tokenizer;

/// The text of one sequence so far.
#[derive(Debug, Default)]
pub struct TextStream {
    tokens: Vec<u32>,
    /// Decoding window: tokens from `prefix_offset` give the context, tokens from `read_offset`
    /// are those whose text is not yet known.
    prefix_offset: usize,
    read_offset: usize,
    /// All text decoded so far.
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

/// Result of one token.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// New text to hand out (may be empty).
    pub text: String,
    /// A stop string appeared: the sequence is finished and its text ends before it.
    pub stopped: bool,
}

impl TextStream {
    /// A stream ending at any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Adds a token and returns the text that can be handed out now.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<Delta> {
        if self.stopped {
            return Ok(Delta {
                text: String::new(),
                stopped: true,
            });
        }
        self.tokens.push(token);
        let before = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let after = tok.decode(&self.tokens[self.prefix_offset..])?;
        if after.len() > before.len()
            && after.is_char_boundary(before.len())
            && after.starts_with(&before)
            && !after.ends_with('\u{FFFD}')
        {
            self.text.push_str(&after[before.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
        Ok(self.release(false))
    }

    /// The sequence ended (end-of-sequence token or length): everything not yet handed out.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Delta> {
        if self.stopped {
            return Ok(Delta {
                text: String::new(),
                stopped: true,
            });
        }
        if self.read_offset < self.tokens.len() {
            // Tokens still waiting (an incomplete character at the end): their text as it is.
            let before = tok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
            let after = tok.decode(&self.tokens[self.prefix_offset..])?;
            let tail = match after.strip_prefix(before.as_str()) {
                Some(t) => t.to_string(),
                None => tok.decode(&self.tokens[self.read_offset..])?,
            };
            self.text.push_str(&tail);
            self.read_offset = self.tokens.len();
        }
        Ok(self.release(true))
    }

    /// The whole text handed out so far (after `finish`: the sequence's text).
    pub fn text(&self) -> &str {
        &self.text[..self.sent]
    }

    /// Hands out what is safe: up to the first stop string, or (unless `all`) up to the
    /// longest tail that could begin a stop string.
    fn release(&mut self, all: bool) -> Delta {
        let pending = &self.text[self.sent..];
        let found = self
            .stops
            .iter()
            .filter_map(|s| pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            let end = self.sent + at;
            let text = self.text[self.sent..end].to_string();
            self.text.truncate(end);
            self.sent = end;
            self.stopped = true;
            return Delta {
                text,
                stopped: true,
            };
        }
        let mut end = self.text.len();
        if !all {
            // The earliest char boundary from which the rest is a proper prefix of a stop string.
            if let Some(cut) = pending
                .char_indices()
                .map(|(i, _)| i)
                .find(|&i| self.stops.iter().any(|s| s.starts_with(&pending[i..])))
            {
                end = self.sent + cut;
            }
        }
        let text = self.text[self.sent..end].to_string();
        self.sent = end;
        Delta {
            text,
            stopped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's byte-level BPE (r50k): characters outside its merges take several tokens, each
    /// holding part of their UTF-8 bytes.
    fn bytes_tok() -> Tokenizer {
        Tokenizer::r50k().unwrap()
    }

    fn ids(tok: &Tokenizer, s: &str) -> Vec<u32> {
        tok.encode(s).unwrap()
    }

    fn run(stops: &[&str], text: &str) -> (Vec<String>, String, bool) {
        let tok = bytes_tok();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut st = TextStream::new(&stops);
        let mut deltas = Vec::new();
        let mut stopped = false;
        for t in ids(&tok, text) {
            let d = st.push(&tok, t).unwrap();
            deltas.push(d.text);
            if d.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            let d = st.finish(&tok).unwrap();
            deltas.push(d.text);
        }
        (deltas, st.text().to_string(), stopped)
    }

    #[test]
    fn concatenated_deltas_are_the_decoded_text() {
        let tok = bytes_tok();
        for text in [
            "Hello world, café ☕ done.",
            "a\nb\n\n  c",
            "日本語のテキスト",
        ] {
            let (deltas, all, stopped) = run(&[], text);
            assert!(!stopped);
            assert_eq!(deltas.concat(), all);
            assert_eq!(all, tok.decode(&ids(&tok, text)).unwrap(), "{text}");
            // No delta ever holds a replacement character (incomplete UTF-8 waited).
            assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        }
    }

    #[test]
    fn stop_strings_cut_the_text_before_them() {
        let (deltas, all, stopped) = run(&["END"], "one two END three");
        assert!(stopped);
        assert_eq!(all, "one two ");
        assert_eq!(deltas.concat(), "one two ");
        // The earliest of several stop strings wins, wherever it is in the list.
        let (_, all, stopped) = run(&["three", "two"], "one two three");
        assert!(stopped);
        assert_eq!(all, "one ");
        // A stop string spanning several tokens, and one that never completes: its beginning
        // is held back, then released at the end.
        let (deltas, all, stopped) = run(&["wxyz"], "abc wxy");
        assert!(!stopped);
        assert_eq!(all, "abc wxy");
        assert_eq!(deltas.concat(), "abc wxy");
        assert!(
            deltas[..deltas.len() - 1].concat().len() <= "abc ".len(),
            "the possible beginning of a stop string was handed out early: {deltas:?}"
        );
    }
}
