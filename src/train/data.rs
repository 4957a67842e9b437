//! Token streams for training and evaluation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::Tensor;

use super::corpus::{Corpus, Doc, Domain};
use crate::error::{Error, Result};
use crate::model::Tokenizer;

/// A document as token ids: `<|bos|> text <|eos|>`.
#[derive(Debug, Clone)]
pub struct TokenDoc {
    pub domain: Domain,
    pub ids: Vec<i64>,
    /// UTF-8 bytes of the text (for bits per byte).
    pub bytes: usize,
}

pub fn tokenize_doc(tok: &Tokenizer, doc: &Doc, eos: i64) -> Result<TokenDoc> {
    let mut ids = tok.encode(&doc.text)?; // starts with <|bos|>
    ids.push(eos);
    Ok(TokenDoc {
        domain: doc.domain,
        ids,
        bytes: doc.text.len(),
    })
}

/// All training tokens in one stream (documents back to back), from which
/// random windows are drawn.
#[derive(Debug)]
pub struct TrainStream {
    pub ids: Vec<i64>,
    /// Domain of each token, for per-domain statistics.
    pub domains: Vec<Domain>,
}

impl TrainStream {
    pub fn new(tok: &Tokenizer, corpus: &Corpus, eos: i64) -> Result<TrainStream> {
        let mut ids = Vec::new();
        let mut domains = Vec::new();
        for d in corpus.train() {
            let t = tokenize_doc(tok, d, eos)?;
            domains.extend(std::iter::repeat_n(t.domain, t.ids.len()));
            ids.extend(t.ids);
        }
        Ok(TrainStream { ids, domains })
    }

    /// The batch of step `step`: `batch` random windows of `seq + 1` tokens,
    /// as inputs and next-token targets [batch, seq]. The windows depend only on
    /// `(seed, step)`, so a resumed run sees exactly the batches it would have.
    pub fn batch(&self, seed: u64, step: u64, batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        if self.ids.len() < seq + 1 {
            return Err(Error::Input(format!(
                "the training stream has {} tokens, fewer than one window of {}",
                self.ids.len(),
                seq + 1
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step);
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let start = rng.random_range(0..=self.ids.len() - seq - 1);
            x.extend_from_slice(&self.ids[start..start + seq]);
            y.extend_from_slice(&self.ids[start + 1..start + seq + 1]);
        }
        let shape = [batch as i64, seq as i64];
        Ok((Tensor::f_from_slice(&x)?.f_view(shape)?, Tensor::f_from_slice(&y)?.f_view(shape)?))
    }
}

/// Evaluation windows over one document: each window holds at most `seq`
/// tokens; consecutive windows overlap by half so every scored token (after
/// the first window) has at least `seq/2` tokens of context.
/// Returns (window start, window len, first scored position in the window).
pub fn eval_windows(len: usize, seq: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    if len < 2 {
        return out;
    }
    let stride = (seq / 2).max(1);
    let mut start = 0;
    loop {
        let end = (start + seq).min(len);
        // positions start+1..end are predicted inside this window; score only
        // the ones the previous window did not
        let first_scored = if start == 0 { 1 } else { seq - stride };
        out.push((start, end - start, first_scored));
        if end == len {
            break;
        }
        start += stride;
    }
    out
}
