//! `tokenizer.json` from the model directory, through the `tokenizers` crate.
//! Models without one work on token ids.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tokenizer {
    /// `Ok(None)` when `dir/tokenizer.json` does not exist.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Tokenizer>> {
        let path = dir.as_ref().join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        Tokenizer::from_file(path).map(Some)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref().to_path_buf();
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            file: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer { inner, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            file: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds itself.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = to_u32(ids)?;
        self.inner.decode(&ids, true).map_err(|e| self.err(e))
    }

    /// The vocabulary entry of each id (`None` for ids the tokenizer lacks).
    pub fn tokens(&self, ids: &[i64]) -> Vec<Option<String>> {
        ids.iter()
            .map(|&i| u32::try_from(i).ok().and_then(|i| self.inner.id_to_token(i)))
            .collect()
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}

fn to_u32(ids: &[i64]) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&i| u32::try_from(i).map_err(|_| Error::Input(format!("token id {i} is not a valid id"))))
        .collect()
}

/// Turns a growing list of ids into text pieces as soon as they decode to
/// whole characters (byte-level BPE can split a character across tokens).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<i64>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: i64) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}
