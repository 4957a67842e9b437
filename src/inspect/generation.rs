//! Generation with interventions, and its trace: steering a generation (a
//! forced expert, a vector added to the residual stream from some token on,
//! any hook) is one call, and what the passes recorded comes back as one
//! [`Trace`] of the sequence the model read, routing per generated token
//! included, so every view of a trace works on a generation too.
//!
//! ```
//! use deepscope::prelude::*;
//! # fn main() -> deepscope::Result<()> {
//! let model = Model::load_default()?;
//! // your own code at a hook point (a name, a glob, or a HookPoint)
//! let halve = Interventions::new().hook("blocks.2.attn.hook_c_kv", |_ctx, x| Ok(x * 0.5));
//! let h = model.trace_with("And God said, Let there be light", &Capture::default(), &halve)?;
//! assert_eq!(h.interventions, vec!["hook at `blocks.2.attn.hook_c_kv`".to_string()]);
//!
//! // steer a generation: add a vector to the residual stream from position 10 on
//! let v = Tensor::randn([model.config.hidden_size as i64], (Kind::Float, Device::Cpu));
//! let steer = Interventions::new().add_vector_from("blocks.1.hook_resid_post", &v, 10);
//! let g = model.generate_with("In the beginning", &GenerateOptions::greedy(&model, 20), &Capture::routing_only(), &steer)?;
//! // one trace of every token read, routing per generated token included
//! assert_eq!(g.trace.seq_len() as usize, g.generation.prompt.len() + g.generation.tokens.len() - 1);
//! # Ok(()) }
//! ```

use std::fmt;

use tch::Tensor;

use super::capture::Capture;
use super::interventions::Interventions;
use super::trace::{Input, Probe, Trace};
use crate::error::{Error, Result};
use crate::model::{GenerateOptions, Generation, Model};
use crate::plot::MimeBundle;

/// A generation and the trace of its passes.
#[derive(Debug)]
pub struct TracedGeneration {
    pub generation: Generation,
    /// The trace of every token the model read: the prompt and each new
    /// token but the last (which no pass read), so `trace.logits` at
    /// position `i` is what chose token `i + 1`.
    pub trace: Trace,
    /// The new tokens as text (when the model has a tokenizer).
    pub text: Option<String>,
}

impl Model {
    /// Generates after `prompt` (text or token ids, one sequence) with
    /// `interventions` applied in every pass, recording what `capture` asks
    /// for. The passes are the prompt's and then one per new token over the
    /// compressed cache, so a hook sees `ctx.positions` `0..P` and then one
    /// position at a time ([`HookCtx`](super::HookCtx)). Position-wise
    /// interventions give the same result as in one pass over the whole
    /// sequence; the ones computed over a pass's tokens (`truncate_latent`'s
    /// basis, a patch of a fixed shape) apply per pass.
    pub fn generate_with(
        &self,
        prompt: impl Into<Input>,
        opts: &GenerateOptions,
        capture: &Capture,
        interventions: &Interventions,
    ) -> Result<TracedGeneration> {
        let prompt: Vec<i64> = match prompt.into() {
            Input::Batch(t) if t.size().first() != Some(&1) => {
                return Err(Error::Input(format!("generation runs one sequence; the batch has shape {:?}", t.size())))
            }
            input => Vec::<i64>::try_from(input.ids(self)?.f_select(0, 0)?)?,
        };
        if opts.max_new_tokens == 0 {
            return Err(Error::Input("max_new_tokens is 0: there is nothing to generate".into()));
        }
        let compiled = interventions.compile(self)?;
        let mut probe = Probe::new(self, capture, &compiled, true)?;
        let generation = self.generate_hooked(&prompt, opts, &mut probe, |p, out| p.end_pass(out), |_| true)?;
        let read: Vec<i64> = prompt.iter().chain(&generation.tokens[..generation.tokens.len() - 1]).copied().collect();
        let trace = probe.finish(Tensor::f_from_slice(&read)?.f_unsqueeze(0)?, interventions)?;
        let text = self.tokenizer.as_ref().map(|t| t.decode(&generation.tokens)).transpose()?;
        Ok(TracedGeneration { generation, trace, text })
    }
}

impl fmt::Display for TracedGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.generation;
        write!(f, "{} new tokens after a {}-token prompt (stopped by {}): ", g.tokens.len(), g.prompt.len(), g.stop)?;
        match &self.text {
            Some(t) => writeln!(f, "{t:?}")?,
            None => writeln!(f, "{:?}", g.tokens)?,
        }
        write!(f, "{}", self.trace)
    }
}

impl TracedGeneration {
    /// The text line, then the trace's own display (routing of every token
    /// read, prompt and generated).
    pub fn mime_bundle(&self) -> MimeBundle {
        let mut b = self.trace.mime_bundle();
        let text = self.to_string();
        let head = text.lines().next().unwrap_or_default();
        if let Some(html) = b.get(crate::plot::MimeType::TextHtml).map(str::to_string) {
            b.insert(crate::plot::MimeType::TextHtml, format!("<p>{}</p>{html}", crate::plot::svg::escape(head)));
        }
        b.insert(crate::plot::MimeType::TextPlain, text);
        b
    }

    /// Shows the generation inline in a notebook (evcxr's display hook).
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }
}

impl crate::kernel::cell::RichDisplay for TracedGeneration {
    fn mime_bundle(&self) -> MimeBundle {
        TracedGeneration::mime_bundle(self)
    }
}
