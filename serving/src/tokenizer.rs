//! Our own tokenizer, built from a GGUF's embedded vocabulary or a `tokenizer.json`: byte-level
//! BPE with merges (GPT-2 style, used by SmolLM2, Llama 3, Qwen2) and SentencePiece-style
//! score-merging with byte fallback (`llama`), plus special tokens.

use std::collections::HashMap;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};

/// Whether special-token text such as `<|im_start|>` in the input becomes the special token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Specials {
    /// Recognise special tokens written in the text (use for trusted, templated prompts).
    Parse,
    /// Treat all text as plain text (use for untrusted user input).
    Plain,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Byte-level BPE: `(left, right) -> (rank, merged)`.
    Bpe {
        merges: HashMap<(u32, u32), (u32, u32)>,
        split_digits: bool,
        /// Llama 3 / Qwen2 pre-tokenizer with runs of at most this many digits, instead of
        /// GPT-2's.
        llama3_digits: Option<usize>,
    },
    /// SentencePiece: merge the adjacent pair whose result has the best score.
    Spm { scores: Vec<f32> },
}

/// Token type values from GGUF's `tokenizer.ggml.token_type`.
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// A tokenizer for one model: text to token ids and back.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    kind: Kind,
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    types: Vec<i32>,
    /// Special tokens recognised in text, longest first.
    specials: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
    /// GPT-2 byte-to-char table and its inverse.
    byte_chars: [char; 256],
    char_bytes: HashMap<char, u8>,
    chat: Option<ChatTemplate>,
    stop_ids: Vec<u32>,
}

/// The raw parts a tokenizer is built from, as read from a model file.
#[derive(Debug, Default)]
pub(crate) struct TokenizerParts {
    pub(crate) model: String,
    pub(crate) pre: Option<String>,
    pub(crate) tokens: Vec<String>,
    pub(crate) types: Vec<i32>,
    pub(crate) scores: Vec<f32>,
    pub(crate) merges: Vec<String>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) add_bos: Option<bool>,
    pub(crate) add_space_prefix: Option<bool>,
    pub(crate) chat_template: Option<String>,
    pub(crate) split_digits: Option<bool>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::InvalidTokenizer {
        reason: reason.into(),
    }
}

pub(crate) fn gpt2_byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

impl Tokenizer {
    pub(crate) fn from_parts(p: TokenizerParts) -> Result<Self> {
        if p.tokens.is_empty() {
            return Err(bad("the vocabulary is empty"));
        }
        let n = p.tokens.len();
        let mut types = p.types;
        if types.is_empty() {
            types = vec![1; n];
        }
        if types.len() != n {
            return Err(bad(format!("{} token types for {} tokens", types.len(), n)));
        }
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in p.tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let byte_chars = gpt2_byte_chars();
        let char_bytes = byte_chars
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let kind = match p.model.as_str() {
            "gpt2" | "bpe" | "BPE" => {
                let mut merges = HashMap::with_capacity(p.merges.len());
                for (rank, m) in p.merges.iter().enumerate() {
                    let (a, b) = m
                        .split_once(' ')
                        .ok_or_else(|| bad(format!("merge {rank} ({m:?}) has no space")))?;
                    let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) else {
                        continue;
                    };
                    let Some(&im) = ids.get(&format!("{a}{b}")) else {
                        continue;
                    };
                    merges.entry((ia, ib)).or_insert((rank as u32, im));
                }
                let split_digits = p.split_digits.unwrap_or(matches!(
                    p.pre.as_deref(),
                    Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell")
                ));
                let llama3_digits = match p.pre.as_deref() {
                    Some("llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe") => Some(3),
                    Some("qwen2" | "deepseek-r1-qwen") => Some(1),
                    _ => None,
                };
                Kind::Bpe {
                    merges,
                    split_digits,
                    llama3_digits,
                }
            }
            "llama" | "spm" => {
                let scores = if p.scores.len() == n {
                    p.scores
                } else {
                    vec![0.0; n]
                };
                Kind::Spm { scores }
            }
            other => {
                return Err(bad(format!(
                    "tokenizer model {other:?} is not supported (gpt2 or llama)"
                )));
            }
        };
        let mut specials: Vec<(String, u32)> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TYPE_CONTROL || **t == TYPE_USER_DEFINED)
            .filter_map(|(i, _)| {
                let s = &p.tokens[i];
                (!s.is_empty()).then(|| (s.clone(), i as u32))
            })
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        for id in [p.bos, p.eos].into_iter().flatten() {
            if id as usize >= n {
                return Err(bad(format!(
                    "special token id {id} is outside the vocabulary"
                )));
            }
        }
        let chat = match &p.chat_template {
            Some(t) => Some(ChatTemplate::detect(t)?),
            None => None,
        };
        let is_spm = matches!(kind, Kind::Spm { .. });
        let mut stop_ids: Vec<u32> = p.eos.into_iter().collect();
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
        ] {
            if let Some(&id) = ids.get(name)
                && types.get(id as usize) == Some(&TYPE_CONTROL)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Ok(Self {
            kind,
            tokens: p.tokens,
            ids,
            types,
            specials,
            bos: p.bos,
            eos: p.eos,
            add_bos: p.add_bos.unwrap_or(is_spm),
            add_space_prefix: p.add_space_prefix.unwrap_or(is_spm),
            byte_chars,
            char_bytes,
            chat,
            stop_ids,
        })
    }

    /// Reads the tokenizer of a `.gguf` file (without loading its weights) or a
    /// `tokenizer.json` (with the chat template from a `tokenizer_config.json` beside it).
    ///
    /// # Errors
    /// The loader's errors for a missing or malformed file, [`Error::InvalidTokenizer`].
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.extension().is_some_and(|e| e == "json") {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            crate::loader::tokenizer_json(path, dir)
        } else {
            crate::loader::gguf_tokenizer(path)
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_token(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos_token(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end generation by default: end-of-sequence plus end-of-turn markers.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The id of a token given its exact vocabulary string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The chat template detected from the model's metadata, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Converts text to token ids, adding the beginning-of-sequence token when the model asks
    /// for it (`tokenizer.ggml.add_bos_token`), as llama.cpp does.
    ///
    /// # Errors
    /// Returns [`Error::InvalidTokenizer`] if the vocabulary lacks a byte the text needs.
    pub fn encode(&self, text: &str, specials: Specials) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let pieces = self.split_specials(text, specials);
        // A templated prompt that spells out the BOS token itself (as Llama 2, Llama 3 and
        // Mistral templates do) gets it once, not twice.
        let spelled_bos =
            matches!(pieces.first(), Some(Piece::Special(id)) if Some(*id) == self.bos);
        if self.add_bos
            && !spelled_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        let mut first_text = true;
        for piece in pieces {
            match piece {
                Piece::Special(id) => out.push(id),
                Piece::Text(t) => {
                    self.encode_text(t, first_text, &mut out)?;
                    first_text = false;
                }
            }
        }
        Ok(out)
    }

    fn split_specials<'a>(&self, text: &'a str, specials: Specials) -> Vec<Piece<'a>> {
        let mut out = Vec::new();
        if specials == Specials::Plain || self.specials.is_empty() {
            out.push(Piece::Text(text));
            return out;
        }
        let mut rest = text;
        let mut start_plain = 0usize;
        let mut i = 0usize;
        while i < rest.len() {
            let hit = self
                .specials
                .iter()
                .find(|(s, _)| rest[i..].starts_with(s.as_str()));
            if let Some((s, id)) = hit {
                if i > start_plain {
                    out.push(Piece::Text(&rest[start_plain..i]));
                }
                out.push(Piece::Special(*id));
                rest = &rest[i + s.len()..];
                i = 0;
                start_plain = 0;
            } else {
                i += rest[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
        if start_plain < rest.len() {
            out.push(Piece::Text(&rest[start_plain..]));
        }
        out
    }

    fn encode_text(&self, text: &str, first: bool, out: &mut Vec<u32>) -> Result<()> {
        match &self.kind {
            Kind::Bpe {
                merges,
                split_digits,
                llama3_digits,
            } => {
                let chunks = match llama3_digits {
                    Some(d) => {
                        let mut v = Vec::new();
                        llama3_split(text, *d, &mut v);
                        v
                    }
                    None => pretokenize(text, *split_digits),
                };
                for chunk in chunks {
                    self.bpe_chunk(chunk, merges, out)?;
                }
                Ok(())
            }
            Kind::Spm { scores } => {
                let mut s = String::with_capacity(text.len() + 3);
                if first && self.add_space_prefix {
                    s.push(' ');
                }
                s.push_str(text);
                let s = s.replace(' ', "\u{2581}");
                self.spm(&s, scores, out)
            }
        }
    }

    fn bpe_chunk(
        &self,
        chunk: &str,
        merges: &HashMap<(u32, u32), (u32, u32)>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut syms = Vec::with_capacity(chunk.len());
        for b in chunk.bytes() {
            let c = self.byte_chars[b as usize];
            let id = self
                .ids
                .get(c.encode_utf8(&mut [0u8; 4]) as &str)
                .ok_or_else(|| bad(format!("vocabulary has no token for byte {b:#04x}")))?;
            syms.push(*id);
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = merges.get(&(syms[i], syms[i + 1]))
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, merged));
                }
            }
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend(syms);
        Ok(())
    }

    fn spm(&self, text: &str, scores: &[f32], out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                let merged = format!("{}{}", syms[i], syms[i + 1]);
                if let Some(&id) = self.ids.get(&merged) {
                    let score = scores.get(id as usize).copied().unwrap_or(0.0);
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        for s in syms {
            if let Some(&id) = self.ids.get(&s) {
                out.push(id);
                continue;
            }
            for b in s.bytes() {
                let name = format!("<0x{b:02X}>");
                let id = self
                    .ids
                    .get(&name)
                    .ok_or_else(|| bad(format!("vocabulary has no byte-fallback token {name}")))?;
                out.push(*id);
            }
        }
        Ok(())
    }

    /// The bytes a token stands for in output text; control tokens give none.
    ///
    /// # Errors
    /// Returns [`Error::UnknownToken`] if `id` is outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        let tok = self.tokens.get(id as usize).ok_or(Error::UnknownToken {
            id,
            vocab_size: self.tokens.len(),
        })?;
        let ty = self.types.get(id as usize).copied().unwrap_or(1);
        if ty == TYPE_CONTROL {
            return Ok(Vec::new());
        }
        match &self.kind {
            Kind::Bpe { .. } => {
                if ty == TYPE_USER_DEFINED {
                    return Ok(tok.as_bytes().to_vec());
                }
                Ok(tok
                    .chars()
                    .flat_map(|c| match self.char_bytes.get(&c) {
                        Some(b) => vec![*b],
                        None => c.to_string().into_bytes(),
                    })
                    .collect())
            }
            Kind::Spm { .. } => {
                if ty == TYPE_BYTE
                    && let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
                    && let Ok(b) = u8::from_str_radix(hex, 16)
                {
                    return Ok(vec![b]);
                }
                Ok(tok.replace('\u{2581}', " ").into_bytes())
            }
        }
    }

    /// Converts token ids back to text, leaving out control tokens. Invalid UTF-8 (a multi-byte
    /// character cut off at the end) is replaced with U+FFFD.
    ///
    /// # Errors
    /// Returns [`Error::UnknownToken`] if an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let b = self.token_bytes(id)?;
            // SentencePiece models encode the leading space of the first word; drop it as
            // llama.cpp does when the tokenizer added it.
            let skip = i == 0
                && matches!(self.kind, Kind::Spm { .. })
                && self.add_space_prefix
                && b.first() == Some(&b' ');
            bytes.extend_from_slice(if skip { &b[1..] } else { &b });
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[derive(Debug)]
enum Piece<'a> {
    Text(&'a str),
    Special(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// Splits text like GPT-2's pre-tokenizer regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// optionally after first isolating every digit (`\p{N}`), as llama.cpp does for SmolLM.
pub(crate) fn pretokenize(text: &str, split_digits: bool) -> Vec<&str> {
    let mut out = Vec::new();
    if split_digits {
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                if i > start {
                    gpt2_split(&text[start..i], &mut out);
                }
                out.push(&text[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        if start < text.len() {
            gpt2_split(&text[start..], &mut out);
        }
    } else {
        gpt2_split(text, &mut out);
    }
    out
}

/// Splits text like Llama 3's pre-tokenizer regex (Qwen2's, with `max_digits` 1):
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`, the alternatives tried in order at
/// each position.
fn llama3_split<'a>(text: &'a str, max_digits: usize, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let off = |i: usize| chars.get(i).map_or(text.len(), |&(o, _)| o);
    let is_nl = |c: char| c == '\r' || c == '\n';
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        let end = 'found: {
            // Contractions, any case.
            if c == '\'' {
                let rest = text[off(i + 1)..].to_lowercase();
                if let Some(l) = ["re", "ve", "ll", "s", "t", "m", "d"]
                    .iter()
                    .find(|s| rest.starts_with(*s))
                    .map(|s| s.chars().count())
                {
                    break 'found i + 1 + l;
                }
            }
            // An optional non-letter, non-number, non-newline char, then letters.
            let lead =
                usize::from(class(c) != Class::Letter && class(c) != Class::Number && !is_nl(c));
            if at(i + lead).is_some_and(|d| class(d) == Class::Letter) {
                let mut j = i + lead;
                while j < n && class(chars[j].1) == Class::Letter {
                    j += 1;
                }
                break 'found j;
            }
            // One to `max_digits` numbers.
            if class(c) == Class::Number {
                let mut j = i;
                while j < n && j - i < max_digits && class(chars[j].1) == Class::Number {
                    j += 1;
                }
                break 'found j;
            }
            // An optional space, symbols, then any newlines.
            let sp = usize::from(c == ' ');
            if at(i + sp).is_some_and(|d| class(d) == Class::Other) {
                let mut j = i + sp;
                while j < n && class(chars[j].1) == Class::Other {
                    j += 1;
                }
                while j < n && is_nl(chars[j].1) {
                    j += 1;
                }
                break 'found j;
            }
            // Whitespace up to and including its last newline.
            let mut j = i;
            let mut last_nl = None;
            while j < n && class(chars[j].1) == Class::Space {
                if is_nl(chars[j].1) {
                    last_nl = Some(j);
                }
                j += 1;
            }
            if let Some(l) = last_nl {
                break 'found l + 1;
            }
            // `\s+(?!\S)`, else `\s+`: leave the last space for a following word.
            if j < n && j - i > 1 {
                break 'found j - 1;
            }
            j.max(i + 1)
        };
        out.push(&text[off(i)..off(end)]);
        i = end;
    }
}

fn gpt2_split<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let off = |i: usize| chars.get(i).map_or(text.len(), |&(o, _)| o);
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions.
        if c == '\'' {
            let rest = &text[off(i + 1)..];
            let len = ["re", "ve", "ll", "s", "t", "m", "d"]
                .iter()
                .find(|s| rest.starts_with(*s))
                .map(|s| s.len());
            if let Some(l) = len {
                let end = off(i + 1) + l;
                out.push(&text[off(i)..end]);
                while i < n && off(i) < end {
                    i += 1;
                }
                continue;
            }
        }
        // An optional leading space joins a following letter, number or symbol run.
        let (lead, first) = if c == ' ' {
            match at(i + 1) {
                Some(d) if class(d) != Class::Space => (1, class(d)),
                _ => (0, class(c)),
            }
        } else {
            (0, class(c))
        };
        let mut j = i + lead;
        match first {
            Class::Letter | Class::Number | Class::Other => {
                while j < n && class(chars[j].1) == first {
                    j += 1;
                }
            }
            Class::Space => {
                while j < n && class(chars[j].1) == Class::Space {
                    j += 1;
                }
                // `\s+(?!\S)`: leave the last space to join the next word.
                if j < n && j - i > 1 {
                    j -= 1;
                }
            }
        }
        out.push(&text[off(i)..off(j)]);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretokenize_like_gpt2() {
        assert_eq!(
            pretokenize("Hello world's  big\n\nend 42!", false),
            vec![
                "Hello", " world", "'s", " ", " big", "\n", "\n", "end", " 42", "!"
            ]
        );
        assert_eq!(pretokenize("a 123", true), vec!["a", " ", "1", "2", "3"]);
        assert_eq!(pretokenize("x  ", false), vec!["x", "  "]);
    }

    #[test]
    fn llama3_and_qwen2_pre_tokenizer_splits() {
        fn split(text: &str, digits: usize) -> Vec<&str> {
            let mut v = Vec::new();
            llama3_split(text, digits, &mut v);
            v
        }
        assert_eq!(split("Hello world", 3), ["Hello", " world"]);
        assert_eq!(split("I'M here", 3), ["I", "'M", " here"]);
        assert_eq!(split("12345", 3), ["123", "45"]);
        assert_eq!(split("12345", 1), ["1", "2", "3", "4", "5"]);
        assert_eq!(split("a  b", 3), ["a", " ", " b"]);
        assert_eq!(split("x\n\n  y", 3), ["x", "\n\n", " ", " y"]);
        assert_eq!(split("(hi)!!\n", 3), ["(hi", ")!!\n"]);
        assert_eq!(split("\tword 42", 3), ["\tword", " ", "42"]);
        // Every split covers the text exactly.
        for t in [
            "",
            " ",
            "  \n \t",
            "don't STOP!! 2024-11-28",
            "Äpfel über 3½ km",
        ] {
            assert_eq!(split(t, 3).concat(), t);
        }
    }

    #[test]
    fn a_spelled_out_bos_is_not_doubled() {
        let t = Tokenizer::from_parts(TokenizerParts {
            model: "gpt2".into(),
            pre: None,
            tokens: ["<s>", "</s>", "h", "i"].map(String::from).to_vec(),
            types: vec![3, 3, 1, 1],
            scores: Vec::new(),
            merges: Vec::new(),
            bos: Some(0),
            eos: Some(1),
            add_bos: Some(true),
            add_space_prefix: None,
            chat_template: None,
            split_digits: None,
        })
        .unwrap();
        assert_eq!(t.encode("hi", Specials::Parse).unwrap(), vec![0, 2, 3]);
        assert_eq!(t.encode("<s>hi", Specials::Parse).unwrap(), vec![0, 2, 3]);
        assert_eq!(
            t.encode("hi</s>", Specials::Parse).unwrap(),
            vec![0, 2, 3, 1]
        );
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = gpt2_byte_chars();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], '\u{120}');
    }
}
