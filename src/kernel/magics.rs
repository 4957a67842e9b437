//! Magics: one-line shortcuts for the common moves. Each expands to the Rust
//! a user could type themselves (`%help` shows the expansions), so nothing a
//! magic does is out of reach of plain cells.

/// What a magic cell turns into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Magic {
    /// Rust code to run in place of the cell.
    Rust(String),
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
  %help                      => this text

Everything in `deepscope::prelude` is already imported. evcxr's own commands
(:vars, :dep, :help, ...) work as usual. Interrupt (the stop button) stops
long DeepScope operations with an `interrupted` error and keeps your values.";

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
            format!("let trace = model.trace({})?;\ntrace", raw_literal(args))
        }
        "routing" => {
            if args.is_empty() {
                "trace.routing_map()?".to_string()
            } else {
                format!("trace.routing_strip({})?", layer_arg("routing", args)?)
            }
        }
        "attention" => format!("trace.attention_figure({})?", layer_arg("attention", args)?),
        other => return Err(format!("unknown magic `%{other}`; `%help` lists them")),
    };
    Ok(Some(Magic::Rust(code)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansions() {
        assert_eq!(expand("let x = 1;"), Ok(None));
        assert!(matches!(expand("%help"), Ok(Some(Magic::Text(_)))));
        assert_eq!(expand("%model").unwrap(), Some(Magic::Rust("let model = Model::load_default()?;\nmodel".into())));
        let Some(Magic::Rust(code)) = expand("%trace He said \"#hi\"").unwrap() else { panic!() };
        assert_eq!(code, "let trace = model.trace(r##\"He said \"#hi\"\"##)?;\ntrace");
        let Some(Magic::Rust(code)) = expand("%model load /m cpu bf16").unwrap() else { panic!() };
        assert!(code.contains("Model::load(r#\"/m\"#") && code.contains("parse_dtype(r#\"bf16\"#)"));
        let Some(Magic::Rust(code)) = expand("%model load /m cpu --memory-budget 8GiB").unwrap() else { panic!() };
        assert!(code.contains("r#\"8GiB\"#.parse::<deepscope::model::MemoryBudget>()?") && code.contains("parse_dtype(r#\"f32\"#)"), "{code}");
        let Some(Magic::Rust(code)) = expand("%model load /m --memory-budget=512MiB").unwrap() else { panic!() };
        assert!(code.contains("r#\"512MiB\"#") && code.contains("parse_device(r#\"auto\"#)"), "{code}");
        assert_eq!(expand("%routing 2").unwrap(), Some(Magic::Rust("trace.routing_strip(2)?".into())));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(expand("%routing two").unwrap_err().contains("`two` is not a layer"));
        assert!(expand("%bogus").unwrap_err().contains("unknown magic `%bogus`"));
        assert!(expand("%trace").unwrap_err().contains("needs the text"));
        assert!(expand("%model load").unwrap_err().contains("%model"));
        assert!(expand("%model load /m cpu f32 extra").unwrap_err().contains("--memory-budget SIZE"));
        assert!(expand("%model load /m --memory-budget").unwrap_err().contains("needs a size"));
    }
}
