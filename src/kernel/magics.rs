//! Magics: one-line shortcuts for the common moves. Each expands to the Rust
//! a user could type themselves (`%help` shows the expansions), so nothing a
//! magic does is out of reach of plain cells.

/// What a magic cell turns into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Magic {
    /// Rust code to run in place of the cell, and the variables it uses that
    /// the user must have defined first (the kernel checks them before it
    /// compiles, so a missing one is a sentence, not a compile error).
    Rust { code: String, needs: Vec<Need> },
    /// Text to print (help).
    Text(String),
}

pub const HELP: &str = "\
DeepScope magics (each is a shortcut for the Rust shown after =>):

  %model                     => let model = Model::load_default()?; model
  %model default             => the same
  %model load PATH [DEVICE] [DTYPE] [--memory-budget SIZE]
                             => let model = Model::load(PATH, LoadOptions { device, kind,
                                    memory_budget, ..Default::default() })?; model
                                (DEVICE: auto | cpu | cuda | cuda:N, DTYPE: f32 | bf16 | f16,
                                 SIZE: auto | unlimited | 8GiB | 512MiB ...: weights beyond it
                                 stay on disk and stream in as passes need them)
  %trace TEXT                => let trace = model.trace(TEXT)?; trace
  %routing                   => trace.routing_map()?
  %routing LAYER             => trace.routing_strip(LAYER)?
  %attention LAYER           => trace.attention_figure(LAYER)?
                                (%routing and %attention use the trace of the last
                                 %trace; name another one after the layer, e.g.
                                 `%routing 2 t2` => t2.routing_strip(2)?)
  %help                      => this text

Everything in `deepscope::prelude` is already imported. evcxr's own commands
(:vars, :dep, :help, ...) work as usual. Interrupt (the stop button) stops
long DeepScope operations with an `interrupted` error and keeps your values.";

/// A variable a magic's code uses, and what to tell the user when it is not
/// defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub variable: String,
    pub hint: String,
}

impl Need {
    /// The message for a missing variable.
    pub fn missing(&self) -> String {
        format!("`{}` is not defined: {}", self.variable, self.hint)
    }
}

fn needs_model(magic: &str) -> Need {
    Need { variable: "model".into(), hint: format!("run `%model` (or `%model load PATH`) before `%{magic}`") }
}

fn needs_trace(magic: &str, variable: &str, usage: &str) -> Need {
    let hint = if variable == "trace" {
        format!("run `%trace TEXT` before `%{magic}`, or name a trace you made: `{usage}`")
    } else {
        format!("`%{magic}` takes the name of a trace you made: `{usage}`")
    };
    Need { variable: variable.into(), hint }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// Splits `[LAYER] [TRACE]` in either order: a number is the layer, a name
/// the trace variable (default `trace`).
fn layer_and_trace(name: &str, args: &str, usage: &str) -> Result<(Option<usize>, String), String> {
    let mut layer = None;
    let mut trace = None;
    for word in args.split_whitespace() {
        if word.chars().all(|c| c.is_ascii_digit()) {
            if layer.replace(layer_arg(name, word)?).is_some() {
                return Err(format!("%{name}: two layer numbers; use `{usage}`"));
            }
        } else if is_identifier(word) {
            if trace.replace(word.to_string()).is_some() {
                return Err(format!("%{name}: two trace names; use `{usage}`"));
            }
        } else {
            return Err(format!("%{name}: `{word}` is neither a layer number nor a variable name; use `{usage}`"));
        }
    }
    Ok((layer, trace.unwrap_or_else(|| "trace".into())))
}

/// A Rust raw string literal holding `s` exactly.
fn raw_literal(s: &str) -> String {
    let mut hashes = 1;
    while s.contains(&format!("\"{}", "#".repeat(hashes))) {
        hashes += 1;
    }
    let h = "#".repeat(hashes);
    format!("r{h}\"{s}\"{h}")
}

fn layer_arg(name: &str, arg: &str) -> Result<usize, String> {
    arg.trim().parse::<usize>().map_err(|_| format!("%{name}: `{}` is not a layer number", arg.trim()))
}

/// Expands a cell whose first non-blank character is `%`. `Ok(None)` for a
/// cell that is not a magic. The error names the magic and what is wrong.
pub fn expand(cell: &str) -> Result<Option<Magic>, String> {
    let line = cell.trim();
    let Some(rest) = line.strip_prefix('%') else { return Ok(None) };
    if line.lines().count() > 1 {
        return Err(format!("a magic takes one line; this cell has {}", line.lines().count()));
    }
    let (name, args) = match rest.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (rest, ""),
    };
    let mut needs = Vec::new();
    let code = match name {
        "help" => return Ok(Some(Magic::Text(HELP.to_string()))),
        "model" => {
            let words: Vec<&str> = args.split_whitespace().collect();
            match words.as_slice() {
                [] | ["default"] => "let model = Model::load_default()?;\nmodel".to_string(),
                ["load", path, rest @ ..] => {
                    let usage = || format!("%model: cannot read `{args}`; use `%model`, `%model default` or `%model load PATH [DEVICE] [DTYPE] [--memory-budget SIZE]`");
                    let mut positional = Vec::new();
                    let mut budget = "auto".to_string();
                    let mut i = 0;
                    while i < rest.len() {
                        if let Some(v) = rest[i].strip_prefix("--memory-budget=") {
                            budget = v.to_string();
                        } else if rest[i] == "--memory-budget" {
                            i += 1;
                            budget = rest.get(i).ok_or_else(|| "%model: --memory-budget needs a size, e.g. 8GiB".to_string())?.to_string();
                        } else {
                            positional.push(rest[i]);
                        }
                        i += 1;
                    }
                    if positional.len() > 2 {
                        return Err(usage());
                    }
                    let device = positional.first().copied().unwrap_or("auto");
                    let dtype = positional.get(1).copied().unwrap_or("f32");
                    format!(
                        "let model = Model::load({}, LoadOptions {{ device: deepscope::model::parse_device({})?, kind: deepscope::model::parse_dtype({})?, memory_budget: {}.parse::<deepscope::model::MemoryBudget>()?, ..Default::default() }})?;\nmodel",
                        raw_literal(path),
                        raw_literal(device),
                        raw_literal(dtype),
                        raw_literal(&budget)
                    )
                }
                _ => return Err(format!("%model: cannot read `{args}`; use `%model`, `%model default` or `%model load PATH [DEVICE] [DTYPE] [--memory-budget SIZE]`")),
            }
        }
        "trace" => {
            if args.is_empty() {
                return Err("%trace needs the text to trace, e.g. `%trace In the beginning`".into());
            }
            needs.push(needs_model("trace"));
            format!("let trace = model.trace({})?;\ntrace", raw_literal(args))
        }
        "routing" => {
            let usage = "%routing [LAYER] [TRACE]";
            let (layer, trace) = layer_and_trace("routing", args, usage)?;
            needs.push(needs_trace("routing", &trace, usage));
            match layer {
                None => format!("{trace}.routing_map()?"),
                Some(l) => format!("{trace}.routing_strip({l})?"),
            }
        }
        "attention" => {
            let usage = "%attention LAYER [TRACE]";
            let (layer, trace) = layer_and_trace("attention", args, usage)?;
            let layer = layer.ok_or_else(|| format!("%attention needs a layer number: `{usage}`"))?;
            needs.push(needs_trace("attention", &trace, usage));
            format!("{trace}.attention_figure({layer})?")
        }
        other => return Err(format!("unknown magic `%{other}`; `%help` lists them")),
    };
    Ok(Some(Magic::Rust { code, needs }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansions() {
        assert_eq!(expand("let x = 1;"), Ok(None));
        assert!(matches!(expand("%help"), Ok(Some(Magic::Text(_)))));
        assert_eq!(expand("%model").unwrap(), Some(Magic::Rust { code: "let model = Model::load_default()?;\nmodel".into(), needs: vec![] }));
        let Some(Magic::Rust { code, needs }) = expand("%trace He said \"#hi\"").unwrap() else { panic!() };
        assert_eq!(code, "let trace = model.trace(r##\"He said \"#hi\"\"##)?;\ntrace");
        assert_eq!(needs.len(), 1);
        assert!(needs[0].variable == "model" && needs[0].missing().contains("run `%model`"), "{needs:?}");
        let Some(Magic::Rust { code, .. }) = expand("%model load /m cpu bf16").unwrap() else { panic!() };
        assert!(code.contains("Model::load(r#\"/m\"#") && code.contains("parse_dtype(r#\"bf16\"#)"));
        let Some(Magic::Rust { code, .. }) = expand("%model load /m cpu --memory-budget 8GiB").unwrap() else { panic!() };
        assert!(code.contains("r#\"8GiB\"#.parse::<deepscope::model::MemoryBudget>()?") && code.contains("parse_dtype(r#\"f32\"#)"), "{code}");
        let Some(Magic::Rust { code, .. }) = expand("%model load /m --memory-budget=512MiB").unwrap() else { panic!() };
        assert!(code.contains("r#\"512MiB\"#") && code.contains("parse_device(r#\"auto\"#)"), "{code}");
        let code_of = |cell: &str| match expand(cell) {
            Ok(Some(Magic::Rust { code, needs })) => (code, needs.into_iter().map(|n| n.variable).collect::<Vec<_>>()),
            other => panic!("{cell}: {other:?}"),
        };
        assert_eq!(code_of("%routing 2"), ("trace.routing_strip(2)?".into(), vec!["trace".into()]));
        assert_eq!(code_of("%routing"), ("trace.routing_map()?".into(), vec!["trace".into()]));
        assert_eq!(code_of("%routing t2"), ("t2.routing_map()?".into(), vec!["t2".into()]));
        assert_eq!(code_of("%routing 1 t2"), ("t2.routing_strip(1)?".into(), vec!["t2".into()]));
        assert_eq!(code_of("%routing t2 1"), ("t2.routing_strip(1)?".into(), vec!["t2".into()]));
        assert_eq!(code_of("%attention 0 my_trace"), ("my_trace.attention_figure(0)?".into(), vec!["my_trace".into()]));
    }

    #[test]
    fn a_missing_trace_says_what_to_run() {
        let Ok(Some(Magic::Rust { needs, .. })) = expand("%routing 1") else { panic!() };
        let m = needs[0].missing();
        assert!(m.contains("`trace` is not defined") && m.contains("run `%trace TEXT` before `%routing`") && m.contains("%routing [LAYER] [TRACE]"), "{m}");
        let Ok(Some(Magic::Rust { needs, .. })) = expand("%attention 1 t9") else { panic!() };
        assert!(needs[0].missing().contains("`t9` is not defined"), "{:?}", needs[0].missing());
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(expand("%routing 2x").unwrap_err().contains("`2x` is neither a layer number nor a variable name"));
        assert!(expand("%routing 1 2").unwrap_err().contains("two layer numbers"));
        assert!(expand("%attention t").unwrap_err().contains("needs a layer number"));
        assert!(expand("%bogus").unwrap_err().contains("unknown magic `%bogus`"));
        assert!(expand("%trace").unwrap_err().contains("needs the text"));
        assert!(expand("%model load").unwrap_err().contains("%model"));
        assert!(expand("%model load /m cpu f32 extra").unwrap_err().contains("--memory-budget SIZE"));
        assert!(expand("%model load /m --memory-budget").unwrap_err().contains("needs a size"));
    }
}
