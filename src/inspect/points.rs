//! Choosing hook points: one [`HookPoint`], a name, a glob over names
//! (`blocks.*.mlp.hook_router_logits`, `blocks.3.*`), or a predicate. Hooks
//! and captures take any of them; the choice is resolved against a model's
//! own points when a pass starts, so a pattern that matches nothing is an
//! error then, not a silent no-op.
//!
//! Globs are `glob::Pattern`s over the names (`*` matches any characters,
//! dots included; `?` one character; `[..]` a set), the same rules as
//! Python's `fnmatch`.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{HookPoint, Model};

/// Which hook points something applies to.
#[derive(Clone)]
pub enum Points {
    One(HookPoint),
    /// A point name or a glob over names.
    Pattern(String),
    /// Every point the predicate accepts.
    Matching(Arc<dyn Fn(HookPoint) -> bool + Send + Sync>),
}

/// The glob in `name`, compiled, or `None` when `name` is a plain point
/// name (no `*`, `?` or `[`).
pub(crate) fn glob_of(name: &str) -> Result<Option<glob::Pattern>> {
    if !name.contains(['*', '?', '[']) {
        return Ok(None);
    }
    glob::Pattern::new(name).map(Some).map_err(|e| Error::Input(format!("`{name}` is not a valid hook-point pattern: {e}")))
}

impl Points {
    /// Every point `f` accepts (e.g. `|p| p.layer() == Some(3)`).
    pub fn matching(f: impl Fn(HookPoint) -> bool + Send + Sync + 'static) -> Points {
        Points::Matching(Arc::new(f))
    }

    /// The points of `model` chosen, in the order a pass visits them. With
    /// `writable_only`, a pattern or predicate skips read-only points (the
    /// kept groups, per-expert outputs: see [`HookPoint::is_read_only`]) and
    /// naming one outright is an error.
    pub fn resolve(&self, model: &Model, writable_only: bool) -> Result<Vec<HookPoint>> {
        let one = |p: HookPoint| -> Result<Vec<HookPoint>> {
            model.check_hook_point(p).map_err(|e| e.in_context(p))?;
            if writable_only && p.is_read_only() {
                return Err(Error::Input(format!(
                    "{p} is read-only: its value is used before it is visited (hook the top-k indices or weights, or the MLP output, to change what follows)"
                )));
            }
            Ok(vec![p])
        };
        let chosen: Vec<HookPoint> = match self {
            Points::One(p) => return one(*p),
            Points::Pattern(s) => match glob_of(s)? {
                None => return one(s.parse()?),
                Some(pattern) => model.hook_points().into_iter().filter(|p| pattern.matches(&p.to_string())).collect(),
            },
            Points::Matching(f) => model.hook_points().into_iter().filter(|p| f(*p)).collect(),
        };
        let kept: Vec<HookPoint> = chosen.iter().copied().filter(|p| !(writable_only && p.is_read_only())).collect();
        if kept.is_empty() {
            let skipped = if chosen.is_empty() { String::new() } else { format!(" that can be changed (it matches only read-only points such as {})", chosen[0]) };
            return Err(Error::Input(format!(
                "{self} matches no hook point of this model{skipped}; names look like blocks.3.mlp.hook_topk_indices, and `*` matches any characters"
            )));
        }
        Ok(kept)
    }
}

impl From<HookPoint> for Points {
    fn from(p: HookPoint) -> Self {
        Points::One(p)
    }
}
impl From<&str> for Points {
    fn from(s: &str) -> Self {
        Points::Pattern(s.to_string())
    }
}
impl From<String> for Points {
    fn from(s: String) -> Self {
        Points::Pattern(s)
    }
}
impl From<&String> for Points {
    fn from(s: &String) -> Self {
        Points::Pattern(s.clone())
    }
}

impl fmt::Display for Points {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Points::One(p) => write!(f, "{p}"),
            Points::Pattern(s) => write!(f, "`{s}`"),
            Points::Matching(_) => write!(f, "the predicate"),
        }
    }
}

impl fmt::Debug for Points {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}
