//! Byte-level BPE tokenizer training with the `tokenizers` crate.
//!
//! Special tokens: `<|bos|>` (0), `<|eos|>` (1), `<|pad|>` (2). Encoding a
//! text prepends `<|bos|>` (a template post-processor), so prompts look like
//! the start of a training document.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::error::{Error, Result};

pub const BOS: &str = "<|bos|>";
pub const EOS: &str = "<|eos|>";
pub const PAD: &str = "<|pad|>";

/// Trains a byte-level BPE of `vocab_size` entries on `texts` and writes
/// `tokenizer.json` to `path`.
pub fn train_bpe<'a>(texts: impl Iterator<Item = &'a str> + Send, vocab_size: usize, path: &Path) -> Result<()> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer {
        file: path.to_path_buf(),
        message: e.to_string(),
    };
    let specials: Vec<AddedToken> = [BOS, EOS, PAD].iter().map(|s| AddedToken::from(*s, true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| err(e.into()))?
        .special_tokens(vec![(BOS, 0u32)])
        .build()
        .map_err(|e| err(e.to_string().into()))?;
    let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, TemplateProcessing, ByteLevelDecoder>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(template))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .build()
        .map_err(err)?;
    tokenizer.train(&mut trainer, texts).map_err(err)?;
    for (i, s) in [BOS, EOS, PAD].iter().enumerate() {
        if tokenizer.token_to_id(s) != Some(i as u32) {
            return Err(err(format!("special token {s} did not get id {i}").into()));
        }
    }
    tokenizer.save(path, false).map_err(err)?;
    Ok(())
}
