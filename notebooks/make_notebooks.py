#!/usr/bin/env python3
"""Writes DeepScope's six teaching notebooks (without outputs).

The source of every notebook lives here, one list of cells per notebook, so a
review reads one file and the notebooks are regenerated from it:

    python notebooks/make_notebooks.py                  # writes notebooks/0*.ipynb
    python notebooks/make_notebooks.py --check FILE.rs  # the code cells as one Rust file, for `cargo check`

`--check` turns every notebook into one function whose body is its code cells
in order (magic `%` cells left out, the value a cell displays bound with
`let _ = &...;`). Put the file in `examples/` and run
`cargo check --release --example NAME`: every API a cell uses, the kernel's
display helpers (`show`, `markdown`, `Progress`, in the prelude) included, is
checked against the library. What it cannot check is evcxr's persistence of
top-level variables across cells; the cells keep to what evcxr persists (owned
values with explicit types, no top-level references or closures).

Needs the standard library and `nbformat` (in the project's .venv).
"""

import argparse
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

KERNELSPEC = {"name": "deepscope", "display_name": "Rust (DeepScope)", "language": "rust"}
LANGUAGE_INFO = {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"}


def md(text):
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(*parts):
    """A code cell made of parts (shared snippets and cell text), each dedented on its own."""
    return ("code", "\n".join(textwrap.dedent(p).strip("\n") for p in parts))


def chart(*parts):
    """A code cell that must show a chart (an SVG or PNG): tagged `chart`, which
    `make test` checks (tests/run_notebooks.py)."""
    return ("chart", code(*parts)[1])


# ---------------------------------------------------------------------------
# Shared Rust snippets
# ---------------------------------------------------------------------------

# A paired bootstrap of a mean per-token difference (03's fixed basis, 05's
# perplexity changes): one resampling, seeded, in both notebooks.
PAIRED_BOOTSTRAP = r'''
/// 95% paired-bootstrap interval of the mean of `variant - base` (same tokens,
/// `resamples` resamples, seeded).
fn mean_difference_interval(base: &[f64], variant: &[f64], resamples: i64) -> (f64, f64) {
    let n = base.len().min(variant.len()) as i64;
    let diffs = Tensor::from_slice(&variant[..n as usize]) - Tensor::from_slice(&base[..n as usize]);
    deepscope::tch::manual_seed(0);
    let idx = Tensor::randint(n, [resamples * n], (Kind::Int64, Device::Cpu));
    let means = diffs.index_select(0, &idx).view([resamples, n]).mean_dim(1, false, Kind::Double);
    let q = |p: f64| means.quantile_scalar(p, None::<i64>, false, "linear").double_value(&[]);
    (q(0.025), q(0.975))
}
'''

# Held-out text of each domain through the library's corpus reader (the split
# the default model was trained with), with a few built-in lines standing in
# when the Debian corpus packages are not installed.
CORPUS_HELPERS = r'''
/// The held-out documents (never seen in training) as (domain, text), read by
/// the same code that split the training corpus. Without the corpus packages
/// (`make corpus` installs them) a few built-in lines stand in.
fn heldout_docs() -> Vec<(Domain, String)> {
    match Corpus::load(&CorpusSources::default()) {
        Ok(corpus) => corpus.heldout().map(|d| (d.domain, d.text.clone())).collect(),
        Err(e) => {
            println!("{e}\n-> using a few built-in lines instead; the figures will be rough");
            let lines = [
                (Domain::Bible, "And he shewed me a pure river of water of life, clear as crystal, proceeding out of the throne of God and of the Lamb. In the midst of the street of it, and on either side of the river, was there the tree of life, which bare twelve manner of fruits, and yielded her fruit every month: and the leaves of the tree were for the healing of the nations. And there shall be no more curse: but the throne of God and of the Lamb shall be in it; and his servants shall serve him: And they shall see his face; and his name shall be in their foreheads. And there shall be no night there; and they need no candle, neither light of the sun; for the Lord God giveth them light: and they shall reign for ever and ever."),
                (Domain::Fortunes, "A watched build never finishes; an unwatched one fails at the last step."),
                (Domain::Fortunes, "Your lucky number is the one you forgot to write down.\n\t\t-- a fortune cookie"),
                (Domain::Fortunes, "Today is a good day to read the manual. Tomorrow you will wish you had."),
                (Domain::Jargon, "kludge: n. A clever but inelegant fix that works for reasons nobody remembers. Hackers admire a good kludge and dread maintaining one.\n\nyak shaving: n. A chain of small tasks, each needed before the next, done so that one may at last do the task one meant to do."),
            ];
            lines.iter().map(|(d, t)| (*d, t.to_string())).collect()
        }
    }
}

/// The first held-out documents of `domain`, up to about `bytes` bytes.
fn sample(docs: &[(Domain, String)], domain: Domain, bytes: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut total = 0;
    for (_, text) in docs.iter().filter(|(d, _)| *d == domain) {
        if total >= bytes {
            break;
        }
        total += text.len();
        out.push(text.clone());
    }
    out
}
'''

# Revelation 21:1-8 (the Book of Revelation is the default model's held-out Bible text).
REVELATION_21 = (
    "And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away; "
    "and there was no more sea. And I John saw the holy city, new Jerusalem, coming down from God out of heaven, "
    "prepared as a bride adorned for her husband. And I heard a great voice out of heaven saying, Behold, the "
    "tabernacle of God is with men, and he will dwell with them, and they shall be his people, and God himself "
    "shall be with them, and be their God. And God shall wipe away all tears from their eyes; and there shall be "
    "no more death, neither sorrow, nor crying, neither shall there be any more pain: for the former things are "
    "passed away. And he that sat upon the throne said, Behold, I make all things new. And he said unto me, "
    "Write: for these words are true and faithful. And he said unto me, It is done. I am Alpha and Omega, the "
    "beginning and the end. I will give unto him that is athirst of the fountain of the water of life freely. "
    "He that overcometh shall inherit all things; and I will be his God, and he shall be my son. But the "
    "fearful, and unbelieving, and the abominable, and murderers, and whoremongers, and sorcerers, and "
    "idolaters, and all liars, shall have their part in the lake which burneth with fire and brimstone: which "
    "is the second death."
)

LONG_CONST = (
    "/// Revelation 21:1-8: held out from training, and longer than the latent has dimensions.\n"
    'const LONG: &str = "' + " \\\n    ".join(textwrap.wrap(REVELATION_21, 100)) + '";'
)

# ---------------------------------------------------------------------------
# 01: a tour
# ---------------------------------------------------------------------------

TOUR = [
    md(r'''
    # A tour of DeepScope

    DeepScope runs models of the DeepSeek-V2/V3 family (multi-head latent attention and DeepSeekMoE) on
    libtorch, from Rust, and shows what happens inside them: which experts each token is sent to and why,
    how little the attention cache holds, what the activations look like, and what changes when you
    change the routing. Every cell of this notebook is Rust; results draw themselves as charts and tables.

    In eleven cells (about a minute of computing) you will:

    1. load the shipped model and read its shape;
    2. generate text;
    3. trace a prompt and see its routing;
    4. follow the router's decision for one token;
    5. run a what-if experiment: ban two experts;
    6. measure the MLA cache saving;
    7. get an overview of the activations;
    8. meet the `%` shorthands.

    The kernel starts every session with `use deepscope::prelude::*;`, which brings `Model`, `Trace`,
    `Capture`, `Interventions`, `compare` and the other common names into scope.
    '''),
    md(r'''
    ## 1. The model

    `Model::load_default()` loads `models/deepscope-tiny`, a DeepSeek-V3-shaped model trained by DeepScope
    itself on the King James Bible, fortune cookies and the Jargon File. It has 10.7M parameters, so it is
    a toy as a language model, but it has the parts of DeepSeek-V3 that shape attention and routing: MLA
    with compressed keys and queries, one dense layer, then DeepSeekMoE layers with a shared expert, 16
    routed experts, a sigmoid router with a correction bias, and group-limited top-k. It leaves out
    DeepSeek-V3's multi-token-prediction module and its YaRN long-context scaling (DeepScope loads YaRN
    checkpoints; it skips multi-token-prediction layers). A `Model` shows its summary; `model.config`
    holds every field of its `config.json`.
    '''),
    code(r'''
    let model: Model = Model::load_default()?;
    let moe_layers: Vec<usize> = model.config.moe_layers();
    let last: usize = *moe_layers.last().unwrap();
    println!("MoE layers {moe_layers:?}: top-{} of {} routed experts, from the best {} of {} groups",
        model.config.num_experts_per_tok, model.config.n_routed_experts, model.config.topk_group, model.config.n_group);
    model
    '''),
    md(r'''
    ## 2. Generate

    `generate` runs the prompt once, then one token per step; each step appends the new token's latent to
    the cache instead of recomputing the prefix. `Sampling::TopP` is seeded, so this sample is the same on
    every run; `GenerateOptions::greedy(&model, n)` supplies the other fields (stop at the model's EOS
    token; `AttnImpl::Auto`, which runs the prompt on the naive path and each new token on the absorbed
    one, whichever does fewer multiply-adds).
    '''),
    code(r'''
    const PROMPT: &str = "And the LORD said unto Moses,";
    let opts: GenerateOptions = GenerateOptions {
        sampling: Sampling::TopP { temperature: 0.8, top_p: 0.95, seed: 1 },
        ..GenerateOptions::greedy(&model, 40)
    };
    let generation: deepscope::model::Generation = model.generate(&model.encode(PROMPT)?, &opts, |_| true)?;
    println!("{PROMPT}{}", model.tokenizer()?.decode(&generation.tokens)?);
    println!("\n[{} prompt tokens, {} new tokens (stopped: {}); the cache holds {} positions in {} bytes]",
        generation.prompt.len(), generation.tokens.len(), generation.stop, generation.cache_len, generation.cache_bytes);
    // the text below: the cache holds the prompt and every new token but the last
    assert_eq!(generation.cache_len as usize, generation.prompt.len() + generation.tokens.len() - 1, "revise the text");
    '''),
    md(r'''
    **What to notice.** The cache holds one position per token the model has read: the prompt's tokens
    and every new token but the last, which was sampled and never fed back (the cell prints the counts
    and checks the sum). The prompt went through in one pass; each new token was one more pass over a
    single position, which reads the cache for all the earlier ones instead of recomputing them.
    Section 6 shows that the bytes per position are exactly the MLA arithmetic. The text is one seeded
    sample: change `seed` to see how much of it is chance.
    '''),
    md(r'''
    ## 3. Trace a prompt

    `model.trace(text)` runs one forward pass and records what each MoE router decided, the attention
    patterns and summary statistics of the residual stream. Shown as the last value of a cell, a `Trace`
    draws the text coloured by each token's first-choice expert in the last MoE layer, and one heatmap
    per MoE layer: tokens down, experts across, colour = routing weight (four experts per token).
    '''),
    chart(r'''
    const TEXT: &str = "In the beginning God created the heaven and the earth.";
    let trace: Trace = model.trace(TEXT)?;
    trace
    '''),
    code(r'''
    {
        let r = trace.routing_of(last)?;
        let k = model.config.num_experts_per_tok as i64;
        let sums = r.topk_weights.sum_dim_intlist(-1, false, Kind::Float);
        let load: Vec<i64> = r.load()?;
        let used = load.iter().filter(|&&n| n > 0).count();
        let busiest = (0..load.len()).max_by_key(|&e| load[e]).unwrap_or(0);
        println!("layer {last}: {} tokens x {} experts each; weights per token sum to {:.4} to {:.4}",
            r.topk_indices.size()[0], r.topk_indices.size()[1], sums.min().double_value(&[]), sums.max().double_value(&[]));
        println!("layer {last}: {used} of {} experts used by this text; the busiest, e{busiest}, takes {} of {} tokens",
            load.len(), load[busiest], r.topk_indices.size()[0]);
        // the text below says every token has exactly k experts whose weights sum to one
        assert_eq!(r.topk_indices.size()[1], k);
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-4, "revise the text");
    }
    '''),
    md(r'''
    **What to notice.** Every row of a heatmap (one token) has exactly four coloured cells: the router
    always picks `num_experts_per_tok` experts. Their weights sum to one, because this model normalises the
    chosen experts' scores (`norm_topk_prob`). The cell checks both. Down a column you read one expert's
    share of the text. The cell prints how many of the 16 experts this one sentence reaches in the last
    layer, and how many tokens its busiest expert takes.
    '''),
    md(r'''
    ## 4. One routing decision, step by step

    For a token with hidden state $x$, DeepSeek-V3's router computes a score per expert
    $s_i = \sigma(w_i \cdot x)$, adds a per-expert bias $b_i$ (`e_score_correction_bias`) to get the choice
    score $s_i + b_i$, ranks groups of experts by the sum of their two best choice scores, keeps the best
    `topk_group` groups and takes the top-k experts inside them. The weights are the *unbiased* scores of
    the chosen experts, normalised to sum to one (then times `routed_scaling_factor`, 1 here): the bias
    decides who is chosen, never how much each chosen expert counts. `router_step` shows each stage and
    the margin between the k-th chosen expert and the best rejected expert *in the kept groups* (an
    expert of a dropped group can score higher than the k-th chosen one; it does not count here).

    The chart draws the choice scores with the bias *centred*: the trained bias is mostly one offset
    shared by every expert (the chart's note prints its mean), and adding the same number to every choice
    score changes no choice, so only its spread matters. The cell picks the first token where an expert
    with a *higher* choice score than a chosen one was still left out, because its group was not among
    the kept groups (if the text has such a token; it prints which).
    '''),
    chart(r'''
    // from token 1: token 0 is the <|bos|> marker, not a word of the text
    let group_lesson: Option<usize> = (1..trace.tokens[0].len())
        .find(|&p| trace.router_step(last, p).map_or(false, |s| !s.outranked_by_group.is_empty()));
    let pos: usize = group_lesson.unwrap_or_else(|| trace.tokens[0].iter().position(|t| t.contains("God")).unwrap_or(1));
    let step: deepscope::inspect::RouterStep = trace.router_step(last, pos)?;
    match group_lesson {
        Some(_) => println!("token {pos} {:?}: experts {:?} had higher choice scores than a chosen expert but lost with their group",
            step.token, step.outranked_by_group),
        None => println!("no token of this text lost an expert to the group limit; showing token {pos}"),
    }
    step
    '''),
    md(r'''
    **What to notice.** The printout runs the algorithm in order, and the chart draws its first two steps
    for every expert: the raw score, and the choice score with the bias centred. The experts named as
    left out have a higher choice score than the weakest chosen expert, and lost at step 3: their
    groups scored below the kept ones. The weights of step 4 are the chosen experts' *unbiased* scores,
    normalised (compare them with line 1, not line 2), so an expert that made the cut on its bias can
    count for very little. The last line says whether the bias changed this token's set at all.
    '''),
    md(r'''
    ## 5. What if two experts were missing?

    Interventions are plain values: an `Interventions` list is passed to one forward pass and changes
    nothing else, so removing it from the list undoes it. Here the two experts that took the most tokens
    of this text in the last MoE layer are banned; `compare` reports how far the next-token distributions
    moved (KL divergence), whether the top prediction changed, and how much of the routing changed.
    '''),
    chart(r'''
    let load: Vec<i64> = trace.routing_of(last)?.load()?;
    let mut busiest: Vec<usize> = (0..load.len()).collect();
    busiest.sort_by_key(|&e| -load[e]);
    busiest.truncate(2);
    let banned: Trace = model.trace_with(TEXT, &Capture::default(), &Interventions::new().ban_experts(last, &busiest))?;
    println!("banned experts {busiest:?} of layer {last}");
    for &l in &moe_layers {
        let same = trace.routing_of(l)?.topk_indices.equal(&banned.routing_of(l)?.topk_indices);
        println!("layer {l}: routing {}", if same { "unchanged" } else { "changed" });
        // the text below says a ban changes nothing upstream of its layer
        assert!(l >= last || same, "layer {l}: revise the text");
    }
    {
        let per = model.config.n_routed_experts / model.config.n_group;
        let groups: Vec<usize> = busiest.iter().map(|e| e / per).collect();
        let before = Vec::<Vec<i64>>::try_from(&trace.routing_of(last)?.topk_indices)?;
        let after = Vec::<Vec<i64>>::try_from(&banned.routing_of(last)?.topk_indices)?;
        let lost_more = before.iter().zip(&after)
            .filter(|(x, y)| x.iter().any(|e| !busiest.contains(&(*e as usize)) && !y.contains(e))).count();
        println!("the banned experts' groups: {groups:?}; {lost_more} of {} tokens also lost an expert that was not banned",
            before.len());
        // the text below: both banned experts are in one group, and some tokens lose more than the banned experts
        assert!(groups.iter().all(|&g| g == groups[0]) && lost_more > 0, "revise the text");
    }
    compare(&trace, &banned)?
    '''),
    md(r'''
    **What to notice.** The routing of the layers before the banned one is unchanged (the cell checks it):
    an intervention acts where it is placed, and only what comes after it can move. In the banned layer
    itself, the tokens did not just swap a banned expert for their next choice. Both banned experts
    belong to one group (the cell prints the groups and checks), and a group's score is the sum of its
    two best choice scores, so the ban also lowers their group's score: a token can lose the whole
    group, and with it experts that were not banned. The cell counts the tokens that did (checked: some
    did), so the banned layer's routing moved by more than the two banned experts (the comparison's
    mean Jaccard for that layer). Notebook 05 explains the same effect for forcing an expert. The
    comparison then says how much all this moved the predictions.
    '''),
    md(r'''
    ## 6. The MLA cache

    Multi-head latent attention caches, per token and layer, only the latent $c_{kv}$ (`kv_lora_rank`
    numbers) and one RoPE key $k_{pe}$ shared by all heads (`qk_rope_head_dim` numbers). The per-head keys
    and values are linear maps of $c_{kv}$, so the absorbed path folds those maps into the query and the
    output projection and never materialises them. The first line is the arithmetic in bf16, for three
    layouts: *MLA absorbed*, what this model caches; *naive*, the per-head keys (with their RoPE part)
    and values this model's heads expand to, i.e. multi-head attention with this model's own head sizes
    (notebook 03's table calls this figure MHA); and *MHA*, a plain multi-head attention whose key and
    value are both `qk_nope_head_dim` numbers per head, with no RoPE part (the "plain MHA" of the model
    summary in section 1). The second line gives the numbers per token and layer behind each. The
    third is what generation actually held (this model runs in f32, 4 bytes per number); the last
    checks that the naive path (keys and values expanded per head) and the absorbed path give the same
    logits.
    '''),
    code(r'''
    println!("{}", model.cache_footprint(2));
    {
        let (f, c) = (model.cache_footprint(2), &model.config);
        println!("numbers per token and layer: MLA absorbed {} (kv_lora_rank + qk_rope_head_dim), naive {} ({} heads x (key {} + value {})), MHA {} (2 x {} heads x qk_nope_head_dim {})",
            f.absorbed_elems, f.naive_elems, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim,
            f.mha_elems, c.num_attention_heads, c.qk_nope_head_dim);
    }
    println!("measured: {} bytes for {} cached positions = {} bytes per position (f32)",
        generation.cache_bytes, generation.cache_len, generation.cache_bytes as i64 / generation.cache_len);
    let path_check = model.attention_path_check(TEXT)?;
    println!("{path_check}");
    // the text below says the measured cache is the arithmetic, and the two paths agree
    assert_eq!(generation.cache_bytes as u64, model.cache_footprint(4).bytes_per_token().0 * generation.cache_len as u64);
    assert!(path_check.equal(), "revise the text");
    '''),
    md(r'''
    **What to notice.** The bytes generation held are exactly the arithmetic: $c_{kv}$ and $k_{pe}$ per
    position and layer, at 4 bytes a number (the cell checks it). Nothing per head is cached. The two
    baselines are not the same thing: "naive" is multi-head attention with this model's head sizes,
    "MHA" a plainer one with keys and values of `qk_nope_head_dim` per head (the second line prints what
    each counts); the model summaries, here and in notebook 06, set MLA beside the plain one. The naive
    and absorbed paths agree to rounding: absorption is algebra, not an approximation.
    '''),
    md(r'''
    ## 7. Activations at a glance

    `activation_report` records statistics of every module's output in one pass: the residual stream
    after each layer (chart), the attention and MoE outputs, the shared experts and $c_{kv}$ (table, with
    excess kurtosis: large values mean heavy tails), and every residual entry more than 20x the median
    magnitude of its layer (a low bar for a small model: notebook 04 relates it to the *massive
    activations* of large models).
    '''),
    chart(r'''
    let report: deepscope::inspect::ActivationReport = model.activation_report(TEXT, 20.0)?;
    {
        let resid: Vec<(f64, f64)> = (0..model.config.num_hidden_layers)
            .map(|l| report.rows.iter().find(|(n, _)| *n == format!("blocks.{l}.hook_resid_post")).map_or((f64::NAN, f64::NAN), |(_, s)| (s.rms, s.max_abs)))
            .collect();
        println!("residual stream after each layer (RMS, max |x|): {resid:.2?}");
        // the text below: the RMS grows after every layer, the largest entry is far above it, routed > shared
        assert!(resid.windows(2).all(|w| w[1].0 > w[0].0), "revise the text");
        assert!(resid.iter().all(|(rms, max)| *max > 5.0 * rms), "revise the text");
        assert!(report.shared_vs_routed.iter().all(|s| s.routed_norm > s.shared_norm), "revise the text");
        match report.massive.first() {
            None => println!("no residual entry of this sentence is above 20x its layer's median |x|: the bar is not crossed here"),
            Some(m) => println!("{} residual entries above 20x their layer's median |x|; the largest is {:.0}x (layer {}, dimension {})",
                report.massive.len(), m.ratio_to_median, m.layer, m.dim),
        }
        // the text below: whatever crosses the bar is far below the thousandfold ratios of large models
        assert!(report.massive.iter().all(|m| m.ratio_to_median < 100.0), "revise the text");
    }
    report
    '''),
    md(r'''
    **What to notice.** The chart's axis is logarithmic. The RMS of the residual stream grows after every
    layer (the cell prints it and checks): each layer adds its attention and MLP outputs to the running
    sum. The largest entry stays more than five times the RMS in every layer (checked), so a few
    values stand far out of the bulk: the heavy tails that the kurtosis column measures and notebook 04
    takes apart. At the bottom of the table, in every MoE layer the routed experts' part of the output
    is larger than the shared expert's (checked), although the shared expert sees every token. The
    report's last line counts the entries above the 20x bar, and the cell's second printed line reads
    that count for this one sentence: whether any entry crosses the bar, and by how much. Whatever
    crosses it stays far below the thousandfold ratio to the median that defines the massive
    activations of large models (the cell checks: under 100x). Notebook 04 looks closer: which hidden
    dimensions hold the largest entries, and each layer's largest ratio to the median.
    '''),
    md(r'''
    ## 8. Shorthands

    A cell that starts with `%` is a magic: a one-line shortcut for Rust you could type yourself; `%help`
    lists them with their expansions. They define ordinary variables, so later cells can use them:
    `%model` loads the default model into `model`, `%trace TEXT` traces into `trace`, `%routing` draws the
    routing heatmaps of `trace` and `%routing LAYER` colours its text by each token's first-choice expert
    in that layer.
    '''),
    code(r'''
    %model
    '''),
    code(r'''
    %trace Blessed are the meek: for they shall inherit the earth.
    '''),
    code(r'''
    %routing 2
    '''),
    md(r'''
    ## What to try next

    - Trace a fortune or a Jargon File entry (`"A hacker is"`, `"You will"`) and compare its routing with
      the Bible text: the experts have specialised by domain.
    - `trace.attention_figure(0)?` draws layer 0's attention patterns; `trace.loss_strip()?` colours each
      token by the model's surprise.
    - The other notebooks go deeper: **02** the router and corpus statistics, **03** MLA compression,
      **04** activation statistics, **05** prototyping routing changes, **06** real DeepSeek checkpoints.

    ## Exercises

    <details><summary>1. The cell in section 4 names experts whose choice score beat a chosen expert's, and
    that were still left out. Why?</summary>

    Their groups were not kept. Experts form `n_group` groups; a group's score is the sum of its two best
    choice scores, and only the best `topk_group` groups stay eligible. The printed group scores show the
    left-out experts' groups below the kept ones, so no expert of theirs could be chosen, however high its
    own score.
    </details>

    <details><summary>2. Add the same number to every expert's bias. Which experts are chosen now?</summary>

    The same ones. Every choice score moves by the same amount, and every group score (a sum of two choice
    scores) by twice that amount, so no ranking changes. That is why the router chart centres the bias:
    only its spread matters.
    </details>

    <details><summary>3. The bias decides which experts are chosen. Does it change how much a chosen expert
    counts?</summary>

    No: the weights are the *unbiased* scores of the chosen experts, normalised. Compare the weights
    printed by `router_step` with the scores of the same experts.
    </details>
    '''),
]

# ---------------------------------------------------------------------------
# 02: expert routing
# ---------------------------------------------------------------------------

ROUTING = [
    md(r'''
    # Expert routing

    This notebook takes DeepSeek-V3's router apart. You will

    1. follow the router for one token and recompute its decision by hand;
    2. count expert load over held-out text and read the imbalance figures;
    3. measure how the experts specialise by domain (Bible, fortunes, Jargon File);
    4. see which experts are chosen together;
    5. replay the auxiliary-loss-free balancing rule on recorded scores, and compare its bias with the one
       training left.

    **The router.** A MoE layer's input $x$ (the residual stream after `post_attention_layernorm`) goes to
    a shared expert and to $k$ of $E$ routed experts:

    - scores: $s_i = \sigma(w_i \cdot x)$ (DeepSeek-V2 uses a softmax over experts instead);
    - choice scores: $c_i = s_i + b_i$, where $b$ is `e_score_correction_bias`;
    - group limit: the $E$ experts form `n_group` groups; a group's score is the sum of its two best $c_i$;
      only the best `topk_group` groups stay eligible;
    - top-k: the $k$ eligible experts with the largest $c_i$ form the set $S$;
    - weights: $g_i = s_i / \sum_{j \in S} s_j$ (`norm_topk_prob`) times `routed_scaling_factor`;
    - output: $\mathrm{shared}(x) + \sum_{i \in S} g_i\, E_i(x)$.

    The bias only moves the choice; the weights use the unbiased $s_i$. It is not learned by gradient
    descent but by a balancing rule (section 5). The config names this router `topk_method: noaux_tc`
    (printed below as `NoauxTc`): *no aux*iliary loss, *t*op-k with the *c*orrection bias, DeepSeek-V3's
    router. DeepSeek-V2's are `greedy` and `group_limited_greedy`, with softmax scores and no bias.
    '''),
    code(r'''
    use deepscope::inspect::{BiasReplay, RouterStep};
    use deepscope::plot::{readable_token, BarChart, Cell, Heatmap};
    use deepscope::train::corpus::{Corpus, CorpusSources, Domain};
    use deepscope::train::eval::jensen_shannon;

    let model: Model = Model::load_default()?;
    let layers: Vec<usize> = model.config.moe_layers();
    let last: usize = *layers.last().unwrap();
    {
        let c = &model.config;
        println!("MoE layers {layers:?}: {} experts in {} groups of {}, keep {} groups, top-{}, {:?} scores, {:?}",
            c.n_routed_experts, c.n_group, c.n_routed_experts / c.n_group, c.topk_group, c.num_experts_per_tok,
            c.scoring_func, c.topk_method);
        println!("norm_topk_prob {}, routed_scaling_factor {}", c.norm_topk_prob, c.routed_scaling_factor);
    }
    '''),
    md(r'''
    ## 1. One token, step by step

    `router_step(layer, position)` reads one token's routing out of a trace: the scores, the bias, the
    choice scores, the group scores and the groups kept, the chosen experts and weights, the margin
    between the k-th chosen expert and the best rejected expert in the kept groups (small margins are
    fragile choices; experts of dropped groups are left out of it, since their group, not their own
    score, excluded them), and what the router would have chosen with no bias.
    '''),
    chart(r'''
    const TEXT: &str = "And God said, Let there be light: and there was light.";
    let trace: Trace = model.trace(TEXT)?;
    let pos: usize = trace.tokens[0].iter().position(|t| t.contains("light")).unwrap_or(1);
    let step: RouterStep = trace.router_step(last, pos)?;
    step
    '''),
    md(r'''
    The same decision by hand, from the router logits $w_i \cdot x$ the trace recorded. Nothing here calls
    the library's router: if the two agree, the description above is the whole algorithm.
    '''),
    code(r'''
    {
        let cfg = &model.config;
        let r = trace.routing_of(last)?;
        // 1. scores: sigmoid of the router logits
        let logits = Vec::<f32>::try_from(r.logits.get(pos as i64))?;
        let s: Vec<f32> = logits.iter().map(|&u| 1.0 / (1.0 + (-u).exp())).collect();
        // 2. choice scores: add e_score_correction_bias
        let bias = Vec::<f32>::try_from(r.bias.as_ref().expect("a V3 router has a bias"))?;
        let c: Vec<f32> = s.iter().zip(&bias).map(|(s, b)| s + b).collect();
        // 3. groups: rank each by the sum of its two best choice scores, keep the best topk_group
        let per = cfg.n_routed_experts / cfg.n_group;
        let mut groups: Vec<(usize, f32)> = (0..cfg.n_group)
            .map(|g| {
                let mut v = c[g * per..(g + 1) * per].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (g, v[0] + v[1])
            })
            .collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        let kept: Vec<usize> = groups[..cfg.topk_group].iter().map(|g| g.0).collect();
        // 4. top-k by choice score among the experts of the kept groups
        let mut eligible: Vec<usize> = (0..cfg.n_routed_experts).filter(|e| kept.contains(&(e / per))).collect();
        eligible.sort_by(|&a, &b| c[b].total_cmp(&c[a]));
        let chosen = &eligible[..cfg.num_experts_per_tok];
        // 5. weights: the unbiased scores of the chosen experts, normalised, scaled
        let total: f32 = chosen.iter().map(|&e| s[e]).sum();
        let weights: Vec<f32> = chosen.iter().map(|&e| s[e] / total * cfg.routed_scaling_factor as f32).collect();
        println!("groups kept  by hand {kept:?}, library {:?}", step.chosen_groups.as_ref().unwrap());
        println!("experts      by hand {chosen:?}, library {:?}", step.experts);
        println!("weights      by hand {weights:.4?}");
        println!("             library {:.4?}", step.weights);
    }
    '''),
    md(r'''
    How often does the bias change the choice? Every traced token also carries the top-k the same router
    would have chosen with $b = 0$.
    '''),
    code(r'''
    {
        let n = trace.seq_len() as usize;
        let mut changed_per_layer: Vec<usize> = Vec::new();
        for &l in &layers {
            let steps: Vec<RouterStep> = (0..n).map(|p| trace.router_step(l, p)).collect::<deepscope::Result<_>>()?;
            let changed = steps.iter().filter(|s| s.bias_changed_choice).count();
            let fragile = steps.iter().map(|s| s.margin).fold(f32::INFINITY, f32::min);
            println!("layer {l}: the bias changed the expert set of {changed} of {n} tokens; smallest margin {fragile:.4}");
            changed_per_layer.push(changed);
        }
        // the text below: the bias changes more tokens' experts in the last MoE layer than in the first
        assert!(changed_per_layer[changed_per_layer.len() - 1] > changed_per_layer[0], "revise the text");
    }
    '''),
    md(r'''
    **What to notice.** In the last MoE layer the bias changes the expert set of more of this sentence's
    tokens than in the first (the cell prints the counts and checks the order). Where it changes a
    choice, it overrides the raw scores: that is the price of balance, paid in routing, while the
    weights still come from the unbiased scores. The smallest margin of each layer is how close its
    most fragile token is to swapping its k-th expert: a change of its choice scores of that size, from
    the input or from the bias, would do it.
    '''),
    md(r'''
    ## 2. Load over a corpus

    One sentence says little about load. `model.routing_stats` streams documents through the model
    (windows of 256 tokens, routing captured and nothing else) into a `RoutingStats` accumulator: tokens
    per expert, routing weight per expert, co-activation counts, the tokens each expert takes. Statistics
    of parts `merge` into the statistics of the whole, and a run can be interrupted and resumed.

    The text is *held out*: Revelation, every 67th fortune and every 67th Jargon File paragraph group,
    read with `deepscope::train::corpus`, the code that made the training split. About 8 KB of each domain
    (about three thousand tokens; the cell prints the counts) keeps this quick.
    '''),
    code(CORPUS_HELPERS, r'''
    let held: Vec<(Domain, String)> = heldout_docs();
    const BYTES: usize = 8000;
    for d in Domain::ALL {
        let docs = sample(&held, d, BYTES);
        let tokens: usize = docs.iter().map(|t| model.encode(t).map(|ids| ids.len())).sum::<deepscope::Result<usize>>()?;
        println!("{:<9} {:>3} documents, {:>5} tokens", d.name(), docs.len(), tokens);
    }
    '''),
    chart(r'''
    let mut by_domain: Vec<(Domain, RoutingStats)> = Vec::new();
    {
        let total: usize = Domain::ALL.iter().map(|&d| sample(&held, d, BYTES).len()).sum();
        let mut bar = Progress::new("routing held-out documents", total as _);
        let mut done = 0usize;
        for d in Domain::ALL {
            let docs = sample(&held, d, BYTES);
            let refs: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
            let mut stats = RoutingStats::default();
            let mut tick = |_: deepscope::inspect::CorpusProgress| {
                done += 1;
                bar.set(done as _);
            };
            model.routing_stats(&refs, &mut stats, CorpusRun { progress: Some(&mut tick), ..Default::default() })?;
            by_domain.push((d, stats));
        }
        bar.finish();
    }
    let mut all: RoutingStats = RoutingStats::default();
    for (_, s) in &by_domain {
        all.merge(s)?;
    }
    all
    '''),
    md(r'''
    **Reading the imbalance.** `max/mean` is the busiest expert's load over the mean load: 1 is perfectly
    even, and 16 would mean one of 16 experts took everything. `CV` is the standard deviation of the load
    over its mean. The entropy of the load distribution, divided by $\log_2 E$, is 1 when perfectly even.

    The bias was tuned to balance the *training mixture* (the model card,
    `models/deepscope-tiny/README.md`, gives its domain shares, measured over the training tokens). The
    sample here is different: about 8 KB of each domain, the first held-out documents of each, so the
    three domains weigh about equally (the cell above printed their token counts). Its "all" column is
    therefore not the load the balancing was tuned for, and need not match the model card's figure for
    the whole held-out split mixed as in training, which is the measurement of the balancing to quote.
    Notebook 05 samples yet another way (2 KB per domain). A single domain is less balanced: that is
    specialisation, measured next.
    '''),
    code(r'''
    let mut imbalance: Table = Table::new(["MoE layer", "all", "bible", "fortunes", "jargon"])
        .caption("max / mean expert load on held-out text (1 = perfectly even)");
    for &l in &layers {
        let mut row: Vec<Cell> = vec![l.into(), Cell::number(all.imbalance(l)?.max_over_mean, 2)];
        for (_, s) in &by_domain {
            row.push(Cell::number(s.imbalance(l)?.max_over_mean, 2));
            // the text says a single domain is less balanced than the mix
            assert!(s.imbalance(l)?.max_over_mean > all.imbalance(l)?.max_over_mean, "layer {l}: revise the text");
        }
        imbalance.add_row(row)?;
    }
    imbalance
    '''),
    md(r'''
    ### One measurement to quote

    Three figures for "how balanced is layer 3" appear in these notebooks: the model card's, this
    notebook's sample, and notebook 05's smaller sample. They differ for two reasons. The samples mix the
    domains differently from the held-out split. And max/mean is biased upward by small samples: with few
    tokens, chance alone makes some expert the busiest by a wide margin. The cell below repeats the model
    card's measurement with the same code (`deepscope::train::eval::evaluate`: every held-out document,
    windows of 256 tokens) and checks it against the card. Its table holds two of the three figures, the
    card's and this notebook's sample (notebook 05 prints its own), and sets each beside a floor: what a
    perfectly even router shows over the same number of tokens. A perfectly even router is one
    where every token picks its k experts uniformly at random; the floor is the mean of 20 simulations.
    '''),
    code(r'''
    use std::collections::BTreeMap;
    /// max/mean load of a router that picks k of e experts uniformly at random for each of n tokens
    /// (mean of `trials` simulations): the sampling floor of the max/mean figure at that sample size.
    fn even_router_floor(n: i64, e: i64, k: i64, trials: usize) -> f64 {
        deepscope::tch::manual_seed(0);
        let mut sum = 0.0;
        for _ in 0..trials {
            let picks = Tensor::rand([n, e], (Kind::Float, Device::Cpu)).topk(k, -1, true, false).1;
            let load = picks.flatten(0, -1).bincount(None::<Tensor>, e).to_kind(Kind::Double);
            sum += load.max().double_value(&[]) / load.mean(Kind::Double).double_value(&[]);
        }
        sum / trials as f64
    }
    let whole_split: Option<(i64, BTreeMap<usize, f64>)> = match Corpus::load(&CorpusSources::default()) {
        Ok(corpus) => {
            let tok = model.tokenizer()?;
            let eos = tok.token_id("<|eos|>").expect("the shipped tokenizer has <|eos|>");
            let docs = corpus.heldout().map(|d| deepscope::train::data::tokenize_doc(tok, d, eos)).collect::<deepscope::Result<Vec<_>>>()?;
            let tokens: i64 = docs.iter().map(|d| d.ids.len() as i64).sum();
            Some((tokens, deepscope::train::eval::evaluate(&model, &docs, 256)?.load_max_over_mean()))
        }
        Err(e) => {
            println!("{e}: the whole held-out split is needed for the card's measurement (make corpus)");
            None
        }
    };
    let (e, k) = (model.config.n_routed_experts as i64, model.config.num_experts_per_tok as i64);
    let mut quote: Table = Table::new(["measurement", "tokens", "layer", "max/mean", "floor of an even router"])
        .caption("Load balance, the same quantity on two samples: the whole held-out split and this notebook's sample");
    if let Some((tokens, loads)) = &whole_split {
        let card = std::fs::read_to_string(deepscope::model::model::default_model_dir().join("README.md"))?;
        let floor = even_router_floor(*tokens, e, k, 20);
        for (l, v) in loads {
            quote.add_row(["whole held-out split (model card)".into(), (*tokens).into(), (*l).into(), Cell::number(*v, 2), Cell::number(floor, 2)])?;
            // the text says this repeats the card's measurement: check it against the card
            assert!(card.contains(&format!("| {l} | {v:.2} |")), "layer {l}: {v:.2} is not the model card's figure");
        }
    }
    let sample_tokens = all.tokens as i64;
    let floor = even_router_floor(sample_tokens, e, k, 20);
    for &l in &layers {
        quote.add_row(["this notebook's sample".into(), sample_tokens.into(), l.into(), Cell::number(all.imbalance(l)?.max_over_mean, 2), Cell::number(floor, 2)])?;
    }
    let floor_2k = even_router_floor(2000, e, k, 20);
    println!("an even router's max/mean floor: {:.2} at 2,000 tokens, {:.2} at {} tokens{}", floor_2k, floor, sample_tokens,
        whole_split.as_ref().map(|(t, _)| format!(", {:.2} at {t} tokens", even_router_floor(*t, e, k, 20))).unwrap_or_default());
    // the text below says the floor falls as the sample grows
    assert!(floor_2k > floor, "revise the text");
    quote
    '''),
    md(r'''
    **What to notice.** The whole-split rows equal the model card's figures (the cell checks each against
    the card's table): that is the measurement to quote for this model. The floor column says how much of
    any max/mean is sample size alone. A perfectly even router already reads above 1, and more so the
    fewer the tokens, which is part of why small samples (this notebook's, and notebook 05's 2 KB per
    domain) read less balanced than the card. The rest of the gap is the mix: a sample with equal parts
    of each domain is not the held-out split, and each domain alone is less balanced than the mix.
    '''),
    md(r'''
    **A chart of your own, with plotters.** The built-in charts cover the usual views. For anything else,
    draw with [`plotters`](https://docs.rs/plotters) (the prelude re-exports it) and turn the drawing into
    a `Figure` with `Figure::from_plotters(width, height, |area| ...)`; it shows inline and saves as SVG or
    PNG like the built-in ones. Here: every expert's load on the held-out text, over its layer's mean,
    against the router bias `e_score_correction_bias` it was trained with, one colour per MoE layer.
    During training the balancing rule (section 5) lowered the bias of experts that were busy and raised
    it for idle ones; the cell prints, per layer, the correlation of bias and held-out load, which is
    what the points show.
    '''),
    chart(r'''
    let bias_load: Figure = {
        use plotters::prelude::*;
        let colours = [RGBColor(59, 117, 175), RGBColor(230, 120, 40), RGBColor(60, 150, 60), RGBColor(150, 90, 180)];
        let pearson = |p: &[(f64, f64)]| -> f64 {
            let n = p.len() as f64;
            let (mx, my) = (p.iter().map(|q| q.0).sum::<f64>() / n, p.iter().map(|q| q.1).sum::<f64>() / n);
            let cov: f64 = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum();
            let (vx, vy): (f64, f64) = (p.iter().map(|q| (q.0 - mx).powi(2)).sum(), p.iter().map(|q| (q.1 - my).powi(2)).sum());
            cov / (vx * vy).sqrt()
        };
        let mut series: Vec<(usize, Vec<(f64, f64)>)> = Vec::new();
        let mut correlations: Vec<f64> = Vec::new();
        for &l in &layers {
            let bias = Vec::<f32>::try_from(trace.routing_of(l)?.bias.as_ref().expect("a V3 router has a bias"))?;
            let load = &all.load[&l];
            let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
            let points: Vec<(f64, f64)> = bias.iter().zip(load).map(|(&b, &n)| (b as f64, n as f64 / mean)).collect();
            println!("layer {l}: correlation of router bias and held-out load {:+.2}", pearson(&points));
            correlations.push(pearson(&points));
            series.push((l, points));
        }
        // the text below reads a positive correlation in every layer: keep it true
        assert!(correlations.iter().all(|&c| c > 0.0), "revise the text");
        let all_points = series.iter().flat_map(|(_, p)| p.iter());
        let (x0, x1) = all_points.clone().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let y1 = all_points.fold(0.0f64, |m, p| m.max(p.1));
        let pad = 0.05 * (x1 - x0).max(1e-6);
        Figure::from_plotters(640, 400, |area| {
            area.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(area)
                .caption("Expert load against router bias", ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d((x0 - pad)..(x1 + pad), 0.0..(1.1 * y1))?;
            chart.configure_mesh().x_desc("e_score_correction_bias").y_desc("held-out load / layer mean").draw()?;
            for (i, (l, points)) in series.iter().enumerate() {
                let colour = colours[i % colours.len()];
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?
                    .label(format!("layer {l}"))
                    .legend(move |(x, y)| Circle::new((x, y), 4, colour.filled()));
            }
            chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            Ok(())
        })?
    };
    bias_load
    '''),
    md(r'''
    **What to notice.** The correlation is positive in every MoE layer: an expert with a higher bias takes
    more of the held-out tokens, not fewer (the cell checks the sign). The rule lowers the bias of busy
    experts, so one might expect busy experts to end with low biases. But at the end of training the bias
    is one of the causes of the load it balances. An expert that the raw scores rarely pick gets a large
    bias, and that bias is what brings it tokens.
    '''),
    md(r'''
    ## 3. Specialisation by domain

    Each row below is one domain's distribution of expert choices in one layer. The Jensen-Shannon
    divergence between two such distributions is 0 bits when the domains use the experts alike and 1 bit
    when they use disjoint experts.
    '''),
    chart(r'''
    let mut shares: Vec<Vec<f64>> = Vec::new();
    let mut row_names: Vec<String> = Vec::new();
    let mut jsd_by_layer: Vec<[f64; 3]> = Vec::new();
    for &l in &layers {
        for (d, s) in &by_domain {
            let load = &s.load[&l];
            let total: u64 = load.iter().sum();
            shares.push(load.iter().map(|&x| x as f64 / total as f64).collect());
            row_names.push(format!("layer {l}, {}", d.name()));
        }
        let counts = |i: usize| -> Vec<f64> { by_domain[i].1.load[&l].iter().map(|&x| x as f64).collect() };
        let jsd = [jensen_shannon(&counts(0), &counts(1)), jensen_shannon(&counts(0), &counts(2)), jensen_shannon(&counts(1), &counts(2))];
        println!("layer {l}: JSD bible-fortunes {:.3}, bible-jargon {:.3}, fortunes-jargon {:.3} bits", jsd[0], jsd[1], jsd[2]);
        jsd_by_layer.push(jsd);
    }
    // the text below: every pair of domains diverges more from each MoE layer to the next,
    // and in the last one the Bible is further from each other domain than they are from each other
    assert!(jsd_by_layer.windows(2).all(|w| (0..3).all(|i| w[1][i] > w[0][i])), "revise the text");
    assert!(jsd_by_layer.last().map_or(false, |j| j[0] > j[2] && j[1] > j[2]), "revise the text");
    let share_map: Figure = Heatmap::new(&shares)
        .x_labels((0..model.config.n_routed_experts).map(|e| format!("e{e}")))
        .y_labels(row_names.clone())
        .title("Share of each domain's expert choices going to each expert")
        .x_title("expert")
        .y_title("layer, domain")
        .value_name("share")
        .render()?;
    share_map
    '''),
    md(r'''
    **What to notice.** Each row is one domain in one layer, each column one expert, and the colour is
    the share of the domain's choices that expert takes. The three rows of the first MoE layer are the
    most alike; down the layers they pull apart: every pair's JSD grows from each MoE layer to the next
    (the cell prints them and checks). In the last layer the Bible stands apart: its JSD to the fortunes
    and to the Jargon File are both larger than theirs to each other (checked). In this model,
    specialisation by domain is something the deeper MoE layers do, and it is strongest between the
    Bible and the two other domains.
    '''),
    md(r'''
    Which tokens does a specialised expert take? Take the expert of the last layer whose share differs
    most between domains; `top_tokens(layer, expert, n)` lists the tokens routed to it most often, with
    the fraction of that token's occurrences that went to this expert.
    '''),
    code(r'''
    let specialist: usize = {
        let share = |i: usize, e: usize| -> f64 {
            let load = &by_domain[i].1.load[&last];
            load[e] as f64 / load.iter().sum::<u64>() as f64
        };
        let spread = |e: usize| -> f64 {
            let s: Vec<f64> = (0..by_domain.len()).map(|i| share(i, e)).collect();
            s.iter().cloned().fold(f64::MIN, f64::max) - s.iter().cloned().fold(f64::MAX, f64::min)
        };
        (0..model.config.n_routed_experts).max_by(|&a, &b| spread(a).total_cmp(&spread(b))).unwrap()
    };
    for (d, s) in &by_domain {
        let load = &s.load[&last];
        println!("{:<9} sends {:>5.1}% of its expert choices in layer {last} to expert {specialist}",
            d.name(), 100.0 * load[specialist] as f64 / load.iter().sum::<u64>() as f64);
    }
    let mut top: Table = Table::new(["token", "times routed to it", "share of the token's occurrences"])
        .caption(format!("The tokens expert {specialist} of layer {last} takes most"));
    let (mut formatting, mut counted) = (0u64, 0u64);
    for (id, count, share) in all.top_tokens(last, specialist, 12)? {
        let token = model.tokenizer()?.tokens(&[id])[0].clone().unwrap_or_default();
        let shown = readable_token(&token);
        // newlines, indentation, or a raw byte of a multi-byte character
        if shown.chars().all(|c| c == '↵' || c == '␣' || c == '⇥') || shown.starts_with("\\x") {
            formatting += count as u64;
        }
        counted += count as u64;
        top.add_row([shown.into(), count.into(), Cell::number(share, 2)])?;
    }
    println!("newlines, indentation and raw bytes: {:.0}% of the routings of these {counted}", 100.0 * formatting as f64 / counted as f64);
    assert!(2 * formatting > counted, "the specialist's top tokens are not mostly formatting: revise the text");
    top
    '''),
    md(r'''
    **What to notice.** The expert whose share differs most between domains is not a subject-matter
    expert. Most of what it takes among its top tokens is formatting: newlines, indentation and the raw
    bytes of multi-byte characters (the cell prints their share, and checks it is over half). So this
    "specialist" specialises in layout and byte-level pieces, which some domains use far more than others
    (the shares above), rather than in what a domain is about.
    '''),
    md(r'''
    ## 4. Co-activation

    Entry $(i, j)$ is $P(j \text{ chosen} \mid i \text{ chosen})$ for the same token. Group-limited routing
    shows as blocks: experts of one group (four consecutive experts here) are chosen together more often,
    because a token's $k$ experts come from only `topk_group` groups. Between layers, the normalised
    mutual information (NMI) of the choices says how predictable one layer's routing is from the
    previous one: 0 when independent, 1 when one determines the other. Here it is small (the cell checks
    it is under 0.2): a token's experts in one layer say little about its experts in the next.
    '''),
    chart(r'''
    for pair in layers.windows(2) {
        let nmi = all.layer_agreement(pair[0], pair[1])?;
        println!("layers {} -> {}: normalised mutual information of the choices {nmi:.3}", pair[0], pair[1]);
        assert!(nmi < 0.2, "the layers' choices are not nearly independent: revise the text");
    }
    let coactivation: Figure = all.coactivation_figure(last)?;
    coactivation
    '''),
    md(r'''
    The group limit also shows *between* domains: a token's experts come from `topk_group` of the
    `n_group` groups, so a domain that keeps some groups more than others sends its choices there. The
    cell sums each domain's expert choices in the last layer by group, and prints each domain's two most
    used groups. Compare the Bible's with the other two domains' (the cell checks that they differ).
    '''),
    code(r'''
    let per_group = model.config.n_routed_experts / model.config.n_group;
    let mut top_groups: Vec<Vec<usize>> = Vec::new();
    for (d, s) in &by_domain {
        let load = &s.load[&last];
        let total: u64 = load.iter().sum();
        let shares: Vec<f64> = (0..model.config.n_group)
            .map(|g| load[g * per_group..(g + 1) * per_group].iter().sum::<u64>() as f64 / total as f64)
            .collect();
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|&a, &b| shares[b].total_cmp(&shares[a]));
        let mut two = order[..2].to_vec();
        two.sort();
        println!("{:<9} group shares {}  -> most used groups {:?}", d.name(),
            shares.iter().enumerate().map(|(g, x)| format!("g{g} {:.0}%", 100.0 * x)).collect::<Vec<_>>().join(", "), two);
        top_groups.push(two);
    }
    assert!(top_groups[0] != top_groups[1] && top_groups[0] != top_groups[2], "the Bible keeps the same groups as another domain: revise the text");
    '''),
    md(r'''
    ## 5. Balancing without an auxiliary loss

    DeepSeek-V3 keeps experts busy evenly without a balance term in the loss: after each training step
    every expert's bias moves by a fixed step $\gamma$ towards balance,
    $b_i \leftarrow b_i + \gamma \cdot \mathrm{sign}(\bar{n} - n_i)$, where $n_i$ is the number of tokens
    expert $i$ took in the step and $\bar{n}$ the mean. Overloaded experts become less attractive,
    idle ones more. `replay_bias_balancing` replays this rule on recorded router scores, starting from
    $b = 0$: each step routes every recorded token with the current bias, counts the load and updates the
    bias. The scores never change, only the choice. This replays the *rule*, not training: the router's
    weights stay as trained, while in training they learned alongside the bias.

    The recording is one batch of held-out text: rows of 128 tokens, traced with `Capture::routing_only()`.
    With a fixed step $\gamma$ the rule cannot settle exactly: near balance each step overshoots a little,
    so the load ends up moving between values; the display says between which over the last 20 steps.
    '''),
    chart(r'''
    let batch: Tensor = {
        let mut ids: Vec<i64> = Vec::new();
        for d in Domain::ALL {
            for doc in sample(&held, d, 3000) {
                ids.extend(model.encode(&doc)?);
            }
        }
        let seq = 128.min(ids.len());
        let rows = ids.len() / seq;
        Tensor::from_slice(&ids[..rows * seq]).view([rows as i64, seq as i64])
    };
    let recorded: Trace = model.trace_with(&batch, &Capture::routing_only(), &Interventions::new())?;
    let replay: BiasReplay = model.replay_bias_balancing(&recorded, last, 0.01, 200)?;
    // the text below: the whole band of the last 20 steps is below the load at zero bias
    assert!(replay.settled_range(20).1 < replay.max_over_mean[0], "revise the text");
    replay
    '''),
    md(r'''
    **What to notice.** The first figure is this batch's load with the bias at zero: what the router's
    raw scores alone do. The sign rule brings max/mean down, and every one of the last 20 steps sits
    below where it started (the cell checks it). It then moves within a band instead of settling, as a
    fixed step predicts. The router's weights are frozen here, so the bias alone did this balancing.
    '''),
    md(r'''
    The replayed bias against the one training left in the checkpoint. Adding the same constant to every
    $b_i$ changes no choice (every choice score, and every group score, moves alike), so both are centred
    before comparing. They do not match: the cell prints their correlation and the ratio of their spreads
    (and checks that the correlation is weak). Training balanced the training mixture over 3000 steps
    while the router's weights moved with the bias; the replay balances this one batch for a frozen router.
    So the replay shows how the rule works, not how this bias came to be.
    '''),
    chart(r'''
    fn centred(v: &[f32]) -> Vec<f32> {
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        v.iter().map(|x| x - mean).collect()
    }
    /// Root mean square of a centred vector: its spread.
    fn spread(v: &[f32]) -> f64 {
        (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }
    let trained: Vec<f32> = centred(&Vec::<f32>::try_from(recorded.routing_of(last)?.bias.as_ref().unwrap())?);
    let replayed: Vec<f32> = centred(&replay.final_bias);
    let correlation: f64 = {
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
        dot(&trained, &replayed) / (dot(&trained, &trained) * dot(&replayed, &replayed)).sqrt()
    };
    println!("correlation of the trained and the replayed bias: {correlation:.2}; spread of the replayed bias / trained: {:.1}",
        spread(&replayed) / spread(&trained));
    assert!(correlation.abs() < 0.5, "the replayed and trained bias correlate: revise the text");
    let (lo, hi) = replay.settled_range(20);
    println!("the replay's last 20 steps: max/mean load between {lo:.3} and {hi:.3}");
    let bias_chart: Figure = BarChart::new((0..trained.len()).map(|e| format!("e{e}")))
        .series("trained e_score_correction_bias", &trained)
        .series("replayed from zero on this batch", &replayed)
        .title(format!("Router bias of layer {last}, centred"))
        .x_title("expert")
        .y_title("bias")
        .render()?;
    bias_chart
    '''),
    md(r'''
    ## What to try next

    - Repeat sections 1 and 5 for the first MoE layer (`layers[0]`). Section 3 already covers every
      layer: its JSDs (printed there) are smallest in the first MoE layer, where the domains use the
      experts most alike. Does that layer's router lean on its bias as often, and does the replay
      balance it as far?
    - Raise `BYTES` for sharper statistics; save them with `all.save("stats.json")?` and reload with
      `RoutingStats::load_from`. Pass `CorpusRun { cancel: Some(&f), .. }` to make a long run stoppable;
      calling `routing_stats` again with the same statistics resumes it.
    - Replay with a larger $\gamma$ (faster, but the load oscillates) or a smaller one.
    - Notebook **05** uses a replayed bias as an intervention and measures what it does to perplexity.

    ## Exercises

    <details><summary>1. Section 1 prints, for each layer, the smallest margin between the k-th chosen
    expert and the best one left out in the kept groups. What does a small margin tell you about that
    token?</summary>

    That its routing is fragile: a change of its choice scores of about that size, from the input or from
    the bias, swaps an expert. The same cell counts the tokens whose expert set the bias actually changed; tokens with small
    margins are the ones to expect there, and the ones a steering vector or a small edit will reroute
    first.
    </details>

    <details><summary>2. In the table of section 2, compare the "all" column with the three domain columns.
    How can the mixture be more even than each of its parts?</summary>

    The domains do not overload the same experts. Section 4's group shares show it for the last layer:
    the Bible sends most of its choices to other groups than the fortunes and the Jargon File do. Mixed
    together, one domain's busy experts are partly another's quiet ones, and the load evens out. Part of each domain's figure is also sampling noise, since each holds
    a third of the tokens (notebook 06 measures how this floor falls with the number of tokens).
    </details>
    '''),
]

# ---------------------------------------------------------------------------
# 03: MLA compression
# ---------------------------------------------------------------------------

MLA = [
    md(r'''
    # MLA compression

    Multi-head latent attention (DeepSeek-V2) shrinks the KV cache by caching one small latent per token
    instead of keys and values per head. This notebook measures what that buys and what it costs:

    1. the cache arithmetic for this model and for DeepSeek-V3 beside MHA, GQA and MQA, checked against
       generation;
    2. the naive and the absorbed computation give the same logits, and why RoPE would break absorption;
    3. the spectra of the up-projections $W_{UK}$ and $W_{UV}$;
    4. the effective rank of the cached latent $c_{kv}$;
    5. attention scores split into a content and a RoPE part;
    6. how many latent dimensions the model needs: rank truncation in the text's own directions and in a
       fixed basis fitted on other text.

    **The mechanism.** For a token with normalised hidden state $x$:

    - $[\,c_{kv};\ k_{pe}'\,] = W_{DKV}\, x$; $c_{kv}$ (after an RMSNorm) has `kv_lora_rank` dimensions
      (64 here, 512 in DeepSeek-V3); $k_{pe} = \mathrm{RoPE}(k_{pe}')$ has `qk_rope_head_dim` dimensions and
      is shared by all heads;
    - per head $h$: key $k^h = [\,W^h_{UK} c_{kv};\ k_{pe}\,]$, value $v^h = W^h_{UV} c_{kv}$;
    - queries $q^h = [\,q^h_{nope};\ q^h_{pe}\,]$ come from their own low-rank path;
    - score $= (q^h_{nope} \cdot W^h_{UK} c_{kv} + q^h_{pe} \cdot k_{pe}) \times$ `softmax_scale`.

    Only $c_{kv}$ and $k_{pe}$ are cached. **Absorption:** $q_{nope} \cdot (W_{UK} c) = (W_{UK}^{\top} q_{nope})
    \cdot c$, so the query can be moved into the latent space once and scored directly against the cached
    latents; likewise $\sum_s p_s W_{UV} c_s = W_{UV} \sum_s p_s c_s$ folds into the output projection. The
    naive path expands per-head keys and values from the latents; the absorbed path never does.
    '''),
    code(r'''
    use deepscope::inspect::{effective_rank, LatentBasis, LatentSpectra, RankSweep, ScoreSplit};
    use deepscope::train::corpus::{Corpus, CorpusSources, Domain};
    use deepscope::plot::{Cell, LineChart};

    let model: Model = Model::load_default()?;
    const TEXT: &str = "And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away.";
    ''', LONG_CONST, r'''
    println!("LONG is {} tokens; c_kv has {} dimensions", model.encode(LONG)?.len(), model.config.kv_lora_rank);
    '''),
    md(r'''
    ## 1. The cache, by arithmetic

    `CacheFootprint::of(&config, bytes_per_element)` counts the numbers each layout caches per token and
    layer, all with the model's own head sizes (a key of `qk_nope_head_dim + qk_rope_head_dim`, a value of
    `v_head_dim`): multi-head attention (MHA) caches a key and a value for every head, which is also what the
    naive path would hold if it cached its expanded keys; grouped-query attention (GQA) shares each key/value
    head among a group of query heads; multi-query attention (MQA) has one key/value head for all; MLA caches
    $c_{kv}$ and $k_{pe}$. The last columns restate MLA in the DeepSeek-V2 paper's unit, GQA groups of
    $2 d_h$ numbers each, and in bytes. It needs only the config, so DeepSeek-V3 is read from its published
    `config.json`.

    Two different "MHA" figures appear in these notebooks. This table's MHA column is multi-head attention
    *with the model's own head sizes* (its keys include the RoPE part): the figure notebook 01's cache line
    calls "naive". The "MHA" of that line, and the "plain MHA" of the model summaries, count a plainer
    multi-head attention whose key and value are both `qk_nope_head_dim` numbers per head, with no RoPE
    part, so they are smaller (the cell prints both for each model and checks it).
    '''),
    code(r'''
    let v3: Config = deepscope::model::published::deepseek_v3()?;
    let mut cache_table: Table = Table::new(["model", "MHA", "GQA", "MQA", "MLA", "MLA as GQA groups",
            "MLA bytes / token (bf16, all layers)", "MLA cache, 128K tokens"])
        .caption("KV-cache numbers per token and layer; GQA with 2 key/value heads for the tiny model, 8 for V3");
    let mut footprints: Vec<CacheFootprint> = Vec::new();
    for (name, cfg, gqa_heads) in [("deepscope-tiny", &model.config, 2u64), ("DeepSeek-V3", &v3, 8)] {
        let f = CacheFootprint::of(cfg, 2);
        let mla_bytes = f.bytes_per_token().0;
        cache_table.add_row([name.into(), f.naive_elems.into(), f.grouped_elems(gqa_heads).into(), f.grouped_elems(1).into(),
            f.absorbed_elems.into(), Cell::number(f.gqa_groups_equivalent(), 2), mla_bytes.into(),
            Cell::text(deepscope::stats::human_bytes(mla_bytes * 131_072))])?;
        println!("{name}: MHA with the model's head sizes (this table; notebook 01's 'naive') {}, plain MHA of qk_nope_head_dim (notebook 01's 'MHA') {}",
            f.naive_elems, f.mha_elems);
        // the text above: the plain-MHA figure is the smaller one
        assert!(f.mha_elems < f.naive_elems, "revise the text");
        footprints.push(f);
    }
    let f3: CacheFootprint = footprints[1];
    println!("DeepSeek-V3: MLA caches {} numbers per token and layer: {:.1}x fewer than MHA's {}, {:.1}x fewer than GQA-8's {}, {:.1}x more than MQA's {}",
        f3.absorbed_elems, f3.naive_elems as f64 / f3.absorbed_elems as f64, f3.naive_elems,
        f3.grouped_elems(8) as f64 / f3.absorbed_elems as f64, f3.grouped_elems(8),
        f3.absorbed_elems as f64 / f3.grouped_elems(1) as f64, f3.grouped_elems(1));
    // the text below places V3's MLA between GQA-8 and MQA: keep it true
    assert!(f3.grouped_elems(1) < f3.absorbed_elems && f3.absorbed_elems < f3.grouped_elems(8), "revise the text");
    cache_table
    '''),
    md(r'''
    **What to notice.** For DeepSeek-V3 the MLA cache sits between GQA with 8 key/value heads and MQA: it
    is much smaller than what MHA would cache for the same 128 heads, smaller than GQA-8, and larger than
    one shared key/value head (the cell prints the ratios and checks the order). In the V2 paper's unit it
    equals GQA with the number of groups in the "MLA as GQA groups" column. Size is only half the story:
    MQA and GQA make heads *share* keys and values, while every MLA head still reads its own keys and
    values out of the shared latent through its own $W^h_{UK}$ and $W^h_{UV}$ (section 3).
    '''),
    md(r'''
    The same figure measured: generation keeps exactly $c_{kv}$ and $k_{pe}$ for every position of every
    layer (in f32 here, 4 bytes per number).
    '''),
    code(r'''
    {
        let mut opts = GenerateOptions::greedy(&model, 24);
        opts.stop_tokens.clear();
        let g = model.generate(&model.encode(TEXT)?, &opts, |_| true)?;
        let per_position = model.cache_footprint(4).bytes_per_token().0;
        println!("cache after generation: {} positions, {} bytes = {} x {} bytes per position",
            g.cache_len, g.cache_bytes, g.cache_len, per_position);
        assert_eq!(g.cache_bytes as u64, per_position * g.cache_len as u64);
    }
    '''),
    md(r'''
    ## 2. Naive and absorbed: the same function

    Absorption is exact algebra, so the two paths differ only by floating-point rounding. First the
    identity itself, on one head's $W_{UK}$ with a random query and latent; then whole forward passes on
    both paths, and greedy generation on both.
    '''),
    code(r'''
    {
        let attn = &model.layers[1].self_attn;
        let w_uk = attn.w_uk()?.get(0); // head 0: [qk_nope_head_dim, kv_lora_rank]
        let q = Tensor::randn([attn.nope], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([attn.kv_lora], (Kind::Float, Device::Cpu));
        let naive = q.dot(&w_uk.mv(&c)); // q . (W_UK c): expand the key, then score
        let absorbed = w_uk.transpose(0, 1).mv(&q).dot(&c); // (W_UK^T q) . c: move the query into the latent space
        println!("q . (W_UK c) = {:.6}, (W_UK^T q) . c = {:.6}", naive.double_value(&[]), absorbed.double_value(&[]));
    }
    println!("{}", model.attention_path_check(LONG)?);
    {
        let prompt = model.encode(TEXT)?;
        let naive = GenerateOptions { attn: AttnImpl::Naive, ..GenerateOptions::greedy(&model, 20) };
        let absorbed = GenerateOptions { attn: AttnImpl::Absorbed, ..GenerateOptions::greedy(&model, 20) };
        let a = model.generate(&prompt, &naive, |_| true)?.tokens;
        let b = model.generate(&prompt, &absorbed, |_| true)?.tokens;
        println!("greedy, naive:    {:?}", model.tokenizer()?.decode(&a)?);
        println!("greedy, absorbed: {:?}", model.tokenizer()?.decode(&b)?);
        println!("same tokens: {}", a == b);
    }
    '''),
    md(r'''
    ### Why the RoPE part is kept apart

    Absorption moves one fixed matrix from the key side to the query side. Suppose the content part carried
    RoPE too: the key at position $n$ would be $R_n W_{UK} c$ and the query at position $m$ would be $R_m q$,
    where $R_p$ rotates each pair of dimensions by an angle proportional to $p$. The score is then
    $q^\top R_m^\top R_n W_{UK} c$, and the matrix between $q$ and $c$, $R_m^\top R_n W_{UK} = R_{n-m} W_{UK}$,
    changes with the distance $n - m$. The cell builds these rotations for head 0's 32 content dimensions
    and measures it: an absorbed query computed for a key at one position scores a key at another position
    wrongly, and $R_m^\top R_n$ equals $R_{n-m}$. This is why MLA rotates only the small extra $q_{pe}$ and
    $k_{pe}$ and leaves the latent unrotated, so that $W_{UK}$ can still be absorbed.
    '''),
    code(r'''
    {
        let attn = &model.layers[1].self_attn;
        let w_uk = attn.w_uk()?.get(0); // head 0: [nope, kv_lora]
        let d = attn.nope;
        // RoPE as a matrix: dimensions (2i, 2i+1) turned by p * 10000^(-2i/d)
        let rot = |p: f64| -> Tensor {
            let mut m = vec![0f32; (d * d) as usize];
            for i in 0..(d / 2) as usize {
                let a = p * 10000f64.powf(-2.0 * i as f64 / d as f64);
                let (c, s, (j, k)) = (a.cos() as f32, a.sin() as f32, (2 * i, 2 * i + 1));
                m[j * d as usize + j] = c;
                m[j * d as usize + k] = -s;
                m[k * d as usize + j] = s;
                m[k * d as usize + k] = c;
            }
            Tensor::from_slice(&m).view([d, d])
        };
        deepscope::tch::manual_seed(3);
        let q = Tensor::randn([d], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([attn.kv_lora], (Kind::Float, Device::Cpu));
        let (m, n1, n2) = (12.0, 3.0, 9.0); // query position, two key positions
        let true_score = |n: f64| rot(m).mv(&q).dot(&rot(n).mv(&w_uk.mv(&c))).double_value(&[]);
        // the query absorbed for a key at position n: W_UK^T R_n^T R_m q
        let absorbed_for = |n: f64| w_uk.transpose(0, 1).mv(&rot(n).transpose(0, 1).mv(&rot(m).mv(&q)));
        let (a1, a2) = (absorbed_for(n1), absorbed_for(n2));
        let drift = (&a1 - &a2).norm().double_value(&[]) / a1.norm().double_value(&[]);
        let exact = a1.dot(&c).double_value(&[]);
        let reused = a1.dot(&c).double_value(&[]); // the same latent, placed at n2, scored with a1
        println!("key at n={n1}: true score {:.4}, absorbed query gives {:.4}", true_score(n1), exact);
        println!("key at n={n2}: true score {:.4}, the absorbed query of n={n1} gives {:.4}", true_score(n2), reused);
        println!("the absorbed queries for n={n1} and n={n2} differ by {:.0}% of their length", 100.0 * drift);
        let rel = (rot(m).transpose(0, 1).matmul(&rot(n2)) - rot(n2 - m)).abs().max().double_value(&[]);
        println!("max |R_m^T R_n - R_(n-m)| = {rel:.1e}: the score depends on the distance n - m");
        // the text above says one absorbed query cannot serve keys at two positions: keep it true
        assert!((true_score(n1) - exact).abs() < 1e-3 * true_score(n1).abs().max(1.0));
        assert!(drift > 0.1 && (true_score(n2) - reused).abs() > 1e-2, "revise the text");
        assert!(rel < 1e-5);
    }
    '''),
    md(r'''
    ## 3. What the up-projections read

    Each head's $W^h_{UK}$ is a `qk_nope_head_dim` x `kv_lora_rank` matrix (32 x 64 here): a head's keys read
    at most a 32-dimensional subspace of the 64-dimensional latent, and its values (through $W^h_{UV}$)
    another. The singular values show how many directions each head really uses; stacking all heads
    shows how much of the latent the keys (or values) read together.
    '''),
    chart(r'''
    {
        let attn = &model.layers[1].self_attn;
        let (uk, uv) = (effective_rank(&attn.w_uk()?)?, effective_rank(&attn.w_uv()?)?);
        println!("W_UK of all heads stacked ({} x {}): {}", attn.num_heads * attn.nope, attn.kv_lora, uk);
        println!("W_UV of all heads stacked ({} x {}): {}", attn.num_heads * attn.v, attn.kv_lora, uv);
        // the text below: the heads' keys together read more directions than one head can, and more than the values
        assert!(uk.entropy_rank > attn.nope as f64 && uk.entropy_rank > uv.entropy_rank, "revise the text");
    }
    let spectra: LatentSpectra = model.latent_spectra(1)?;
    spectra
    '''),
    md(r'''
    **What to notice.** The chart draws each head's singular values, largest first, on a log axis: how
    unevenly a head weights the directions of the latent it reads. One head's $W^h_{UK}$ has at most
    `qk_nope_head_dim` of them, yet the keys of all heads stacked have an effective rank above that
    (the cell prints both stacked ranks and checks it): the heads read different subspaces of the same
    cached latent. That is what separates MLA from MQA, where every head reads the same single key. The
    values of all heads together read fewer directions than the keys (checked).
    '''),
    md(r'''
    ## 4. How many dimensions the cached latent uses

    The effective rank of $c_{kv}$ over the tokens of a text: $\exp$ of the entropy of the normalised
    singular values (Roy and Vetterli), and the number of directions holding 90% and 99% of the energy
    (squared norm). A latent that used only a few directions could be cached smaller still.
    '''),
    code(r'''
    let mut ranks: Table = Table::new(["layer", "entropy rank", "directions for 90%", "directions for 99%", "latent size"])
        .caption(format!("Effective rank of c_kv over the {} tokens of LONG", model.encode(LONG)?.len()));
    let mut spectrum: Vec<Vec<f32>> = Vec::new();
    let mut most_for_99: usize = 0;
    for l in 0..model.config.num_hidden_layers {
        let r = model.latent_effective_rank(LONG, l)?;
        ranks.add_row([l.into(), Cell::number(r.entropy_rank, 1), r.rank90.into(), r.rank99.into(), model.config.kv_lora_rank.into()])?;
        most_for_99 = most_for_99.max(r.rank99);
        spectrum.push(r.singular_values);
    }
    println!("at most {most_for_99} of {} directions hold 99% of the energy in any layer", model.config.kv_lora_rank);
    // the text below says no layer needs all of its latent for 99%: keep it true
    assert!(most_for_99 < model.config.kv_lora_rank, "revise the text");
    ranks
    '''),
    chart(r'''
    let mut chart: LineChart = LineChart::new()
        .y_log(true)
        .title("Singular values of c_kv, per layer")
        .x_title("index")
        .y_title("singular value");
    for (l, s) in spectrum.iter().enumerate() {
        chart = chart.series(format!("layer {l}"), s);
    }
    let spectrum_chart: Figure = chart.render()?;
    spectrum_chart
    '''),
    md(r'''
    **What to notice.** On this text no layer needs its whole latent: fewer than `kv_lora_rank` directions
    hold 99% of the energy in every layer (the cell prints the largest count and checks it). The spectra
    fall steeply after their first dozen or so values. Like section 6's first sweep, this is measured on
    the text itself, an upper bound on what a smaller fixed cache would keep.
    '''),
    md(r'''
    ## 5. The content part and the RoPE part

    Every pre-softmax score is a sum of two parts: the content part, $q_{nope} \cdot k_{nope}$ (through
    the latent), and the RoPE part, $q_{pe} \cdot k_{pe}$ (the decoupled rotary key). The RoPE part is not
    "position only": $q_{pe}$ and $k_{pe}$ are projections of the tokens, rotated by their positions, so it
    depends on what the tokens are *and* where they are. `score_split` returns both, per head, for causal
    (query, key) pairs; their sum is the score. Below, the two parts of layer 1's heads (the colours are
    pre-softmax score values, not attention probabilities), then for every layer and head the spread
    (standard deviation) of each part: the part that varies more does more to decide where a head looks.
    '''),
    chart(r'''
    let split: ScoreSplit = model.score_split(TEXT, 1)?;
    {
        let t = split.content.size()[2];
        let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
        for h in 0..model.config.num_attention_heads as i64 {
            let sc = split.content.get(0).get(h).masked_select(&causal).var(true).double_value(&[]).sqrt();
            let sp = split.position.get(0).get(h).masked_select(&causal).var(true).double_value(&[]).sqrt();
            println!("head {h}: std of the content part {sc:.3}, of the RoPE part {sp:.3}");
            // the text below: on this sentence too, the RoPE part spreads wider in every head
            assert!(sp > sc, "head {h}: revise the text");
        }
    }
    split
    '''),
    md(r'''
    **What to notice.** Two figures, the content part and then the RoPE part, each with one panel per
    head: queries down, keys across, so row $m$ is what token $m$ scores against every token up to
    itself; the cells above the diagonal are future keys, set to 0. Each figure has its own colour
    scale, so read the scales before the colours: in every head the RoPE part spreads wider than the
    content part (the cell prints both spreads and checks). The table below measures the same on the
    longer text, for every layer.
    '''),
    code(r'''
    let mut parts: Table = Table::new(["layer", "head", "std of content part", "std of RoPE part", "RoPE share of variance"])
        .caption("Pre-softmax score parts over the causal (query, key) pairs of LONG");
    let mut rope_shares: Vec<f64> = Vec::new();
    for l in 0..model.config.num_hidden_layers {
        let s = model.score_split(LONG, l)?;
        let t = s.content.size()[2];
        let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
        for h in 0..model.config.num_attention_heads as i64 {
            let vc = s.content.get(0).get(h).masked_select(&causal).var(true).double_value(&[]);
            let vp = s.position.get(0).get(h).masked_select(&causal).var(true).double_value(&[]);
            rope_shares.push(vp / (vc + vp));
            parts.add_row([l.into(), h.into(), Cell::number(vc.sqrt(), 3), Cell::number(vp.sqrt(), 3), Cell::number(vp / (vc + vp), 2)])?;
        }
    }
    let (least, most) = rope_shares.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    println!("RoPE share of the score variance: {least:.2} to {most:.2} over {} heads", rope_shares.len());
    // the sentence below the table says "in every head, most of the variance": keep it true
    assert!(least > 0.5, "a head where the content part varies more: revise the text");
    parts
    '''),
    md(r'''
    **What to notice.** In every head of this model the RoPE part varies more than the content part: it
    carries most of the variance of the scores (the cell prints the range and checks that the smallest
    share is above one half). So where a head looks is decided mostly by the rotated `q_pe`/`k_pe` dot
    product, which mixes relative position with the tokens' own projections, more than by the latent's
    content part. This is a measurement of this model on this text, not a rule of MLA.
    '''),
    md(r'''
    ## 6. Truncating the latent

    `truncate_latent(layers, r)` projects $c_{kv}$ onto its top $r$ singular directions (computed from this
    text's own tokens) before it is used, as if the cache held only $r$ numbers per token instead of
    `kv_lora_rank`. `rank_truncation` runs one pass per rank, every layer truncated, and compares each with
    the full model: KL divergence, agreement of the top prediction, accuracy against the actual next
    tokens. At rank 0 the latent is gone, and with it every value: attention contributes nothing.
    '''),
    chart(r'''
    let sweep: RankSweep = model.rank_truncation(LONG, &[64, 48, 32, 24, 16, 12, 8, 4, 0])?;
    sweep
    '''),
    md(r'''
    **What to notice.** The basis is fitted on the very tokens the loss is measured on: the sweep is
    *in-sample*. It shows how few directions this text needs at best, not what a fixed smaller cache would
    give on other text. That is also why the loss can come out slightly *below* the full model's at
    intermediate ranks: projecting out directions this text hardly uses can remove noise for this text.
    The cell below prints the lowest loss of the sweep, its rank, and its difference from the full latent.
    An honest test fits the basis on one text and evaluates it on another (see "What to try next").
    '''),
    code(r'''
    {
        // a block: the rows borrowed here are not kept as notebook variables
        let full_row = sweep.rows.iter().find(|r| r.rank == model.config.kv_lora_rank);
        let best_row = sweep.rows.iter().min_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
        if let (Some(full_row), Some(best_row)) = (full_row, best_row) {
            println!("full latent (rank {}): loss {:.3}; lowest loss {:.3} at rank {} ({:+.3} nats, in-sample)",
                full_row.rank, full_row.mean_loss, best_row.mean_loss, best_row.rank, best_row.mean_loss - full_row.mean_loss);
        }
    }
    '''),
    md(r'''
    ### A fixed basis, evaluated on other text

    A cache that stored only $r$ numbers per token would need its directions chosen *before* it sees the
    text. `model.latent_basis(texts)` fits every layer's directions once, on calibration text;
    `model.rank_truncation_in(text, ranks, &basis)` then projects each layer's $c_{kv}$ onto the top $r$ of
    those fixed directions. The calibration text here is held-out text of all three domains (windows of up
    to 256 tokens, Revelation 21 itself left out); the evaluation text is `LONG` again, so the two sweeps
    differ only in where the directions came from.
    '''),
    code(CORPUS_HELPERS, r'''
    let held: Vec<(Domain, String)> = heldout_docs();
    let mut calibration: Vec<Vec<i64>> = Vec::new();
    for d in Domain::ALL {
        for text in sample(&held, d, 3000).iter().filter(|t| !t.contains("a new heaven and a new earth")) {
            calibration.extend(model.encode(text)?.chunks(256).map(|c| c.to_vec()));
        }
    }
    let basis: LatentBasis = model.latent_basis(calibration.clone())?;
    println!("basis fitted on {} tokens in {} windows", basis.tokens, calibration.len());
    let fixed: RankSweep = model.rank_truncation_in(LONG, &[64, 48, 32, 24, 16, 12, 8, 4, 0], &basis)?;
    fixed
    '''),
    code(r'''
    let mut both: Table = Table::new(["rank kept", "loss, in-sample directions", "loss, fixed directions", "difference (nats)"])
        .caption("The same text, truncated in its own directions and in directions fitted on other text");
    let mut gaps: Vec<(usize, f64)> = Vec::new();
    for (a, b) in sweep.rows.iter().zip(&fixed.rows) {
        both.add_row([a.rank.into(), Cell::number(a.mean_loss, 3), Cell::number(b.mean_loss, 3), Cell::number(b.mean_loss - a.mean_loss, 3)])?;
        gaps.push((a.rank, b.mean_loss - a.mean_loss));
    }
    let full_loss = sweep.rows[0].mean_loss;
    let worse_at_low_rank = gaps.iter().filter(|(r, _)| (4..=16).contains(r)).all(|(_, g)| *g > 0.0);
    println!("full latent: loss {full_loss:.3}; fixed directions lose more than the text's own at every rank from 4 to 16: {worse_at_low_rank}");
    if let Some(best) = fixed.rows.iter().min_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss)) {
        println!("lowest loss with fixed directions: {:.3} at rank {} ({:+.3} nats against the full latent)", best.mean_loss, best.rank, best.mean_loss - full_loss);
    }
    // the text below says the in-sample sweep flatters truncation at low ranks: keep it true
    assert!(worse_at_low_rank, "revise the text");
    both
    '''),
    md(r'''
    **What to notice.** With directions fitted on other text the loss at every rank from 4 to 16 is higher
    than with the text's own directions (the cell checks it): the in-sample sweep above flattered
    truncation, as its note warned. The fixed-basis sweep is the one to read when asking how small a cache
    could be: it is what a model whose cache kept only $r$ numbers per token would face on new text, and
    the gap between the two columns is how much of the in-sample result came from fitting the text itself.
    The cell also prints the fixed sweep's lowest loss against the full latent's. If it still dips below,
    fitting the text is not the whole story, but a dip on one text of this length is a hint to test on
    more text, not a result.
    '''),
    md(r'''
    **Testing the dip on more text.** Score held-out documents that the basis was *not* fitted on (the
    ones after the calibration documents of each domain), token by token, with the full latent and with
    every layer projected onto the fixed basis at the sweep's best rank. A paired bootstrap of the
    per-token loss differences (fixed basis minus full latent, the same tokens, 2,000 resamples) says
    whether the difference is larger than the noise of this sample.
    '''),
    code(PAIRED_BOOTSTRAP, r'''
    let best_rank: usize = fixed.rows.iter().filter(|r| r.rank > 0 && r.rank < model.config.kv_lora_rank)
        .min_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss)).map_or(16, |r| r.rank);
    let (full_losses, cut_losses): (Vec<f64>, Vec<f64>) = {
        let cut = Interventions::new().project_latent(Layers::All, &basis, best_rank)?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for d in Domain::ALL {
            let calib = sample(&held, d, 3000).len();
            let mut bytes = 0;
            for text in held.iter().filter(|(dd, _)| *dd == d).map(|(_, t)| t).skip(calib) {
                if bytes >= 6000 {
                    break;
                }
                bytes += text.len();
                for w in model.encode(text)?.chunks(256).filter(|w| w.len() >= 2) {
                    let plain = model.trace_with(w, &Capture::none(), &Interventions::new())?.loss()?;
                    a.extend(Vec::<f64>::try_from(plain.flatten(0, -1).to_kind(Kind::Double))?);
                    let projected = model.trace_with(w, &Capture::none(), &cut)?.loss()?;
                    b.extend(Vec::<f64>::try_from(projected.flatten(0, -1).to_kind(Kind::Double))?);
                }
            }
        }
        (a, b)
    };
    let n = full_losses.len();
    let mean_diff = cut_losses.iter().zip(&full_losses).map(|(c, f)| c - f).sum::<f64>() / n as f64;
    let (lo, hi) = mean_difference_interval(&full_losses, &cut_losses, 2000);
    println!("{n} fresh tokens; rank {best_rank} of the fixed basis minus the full latent: {mean_diff:+.4} nats per token (95% interval {lo:+.4} to {hi:+.4})");
    println!("verdict: {}", if lo > 0.0 { "worse than the full latent, beyond the noise" } else if hi < 0.0 { "better than the full latent, beyond the noise" } else { "within the noise" });
    // the text below: on fresh text the best rank is neither better nor worse than the full latent
    assert!(lo <= 0.0 && hi >= 0.0, "revise the text");
    println!("rank {best_rank} keeps {best_rank} of {} latent numbers per token ({:.0}% of c_kv)",
        model.config.kv_lora_rank, 100.0 * best_rank as f64 / model.config.kv_lora_rank as f64);
    '''),
    md(r'''
    **What to notice.** On documents the basis never saw, the fixed basis at that rank is within the noise
    of the full latent: the interval contains zero (the cell prints it and checks). So the dip below the
    full latent on `LONG` does not reproduce as a gain; it belonged to that one text. What does reproduce is
    the other half of the story: keeping only that many fixed directions per token, the fraction of
    $c_{kv}$ the cell prints, costs this model nothing measurable on new text. That is a statement about
    this small model, whose latent is larger than it needs; on DeepSeek-V3 the same two cells would
    measure how much of its 512-dimensional latent a fixed basis can drop.
    '''),
    md(r'''
    Which layer needs its full latent most? Truncate one layer at a time to rank 8.
    '''),
    code(r'''
    let ids: Vec<i64> = model.encode(LONG)?;
    let full: Trace = model.trace_with(ids.clone(), &Capture::none(), &Interventions::new())?;
    let mut per_layer: Table = Table::new(["layer truncated to rank 8", "mean KL (nats)", "top-1 agreement", "loss change (nats)"])
        .caption("One layer's c_kv truncated at a time");
    let mut layer_kl: Vec<f64> = Vec::new();
    for l in 0..model.config.num_hidden_layers {
        let cut = model.trace_with(ids.clone(), &Capture::none(), &Interventions::new().truncate_latent(l, 8))?;
        let c = compare(&full, &cut)?;
        per_layer.add_row([l.into(), Cell::number(c.mean_kl, 4), Cell::text(format!("{:.1}%", 100.0 * c.top1_agreement)),
            Cell::number(c.mean_loss_variant - c.mean_loss_baseline, 4)])?;
        layer_kl.push(c.mean_kl);
    }
    {
        let mut order: Vec<usize> = (0..layer_kl.len()).collect();
        order.sort_by(|&a, &b| layer_kl[b].total_cmp(&layer_kl[a]));
        println!("largest KL: layer {} ({:.4}), then layer {} ({:.4}); smallest: layer {}",
            order[0], layer_kl[order[0]], order[1], layer_kl[order[1]], order[order.len() - 1]);
        // the text below: one layer stands out at over twice the next, and layer 0 needs its latent least
        assert!(layer_kl[order[0]] > 2.0 * layer_kl[order[1]] && order[order.len() - 1] == 0, "revise the text");
    }
    per_layer
    '''),
    md(r'''
    **What to notice.** One layer stands out: truncating its latent moves the predictions (mean KL) more
    than twice as much as truncating any other (the cell prints which layer and checks the gap). Layer 0
    needs its latent least of all (checked), which fits notebook 04: layer 0's attention writes almost
    nothing into the residual stream, so what its latent keeps hardly matters downstream. A negative
    loss change is the in-sample effect of section 6 again: the directions kept were fitted on this
    text.
    '''),
    md(r'''
    ## What to try next

    - Run the effective rank and the truncation on a fortune or a Jargon File paragraph: does prose of
      another domain use the latent differently?
    - Fit the basis on one domain only (say the fortunes) and evaluate on Bible text: do directions learnt
      on one kind of prose serve another? `Interventions::new().project_latent(layer, &basis, r)?` applies
      one layer's fixed projection inside any trace.
    - Capture the latents themselves: `model.trace_with(text, &Capture::none().with(HookPoint::CKv(1)).with(HookPoint::KPe(1)), &Interventions::new())?`
      then `trace.tensor(HookPoint::CKv(1))?`.
    - Time `forward_with` with `ForwardOptions { attn: AttnImpl::Naive, ..Default::default() }` against the
      absorbed path on a long input.
    - Notebook **06** does the cache arithmetic for the published models (DeepSeek-V3, V2-Lite, Moonlight,
      Kimi-K2) from their configs, and loads real or synthetic checkpoints: run this notebook's cells on a
      model loaded there to check real weights.

    ## Exercises

    <details><summary>1. Why can the content part absorb $W_{UK}$ into the query, but the RoPE part
    cannot?</summary>

    Absorption rewrites $q^\top (W_{UK} c) = (W_{UK}^\top q)^\top c$: one fixed matrix moves from the key
    side to the query side. RoPE rotates the query and the key by matrices that depend on their positions,
    $R_m q$ and $R_n k$, so the score involves $R_m^\top R_n = R_{n-m}$, which differs for every pair of
    positions: no single matrix can be folded into the query once for all cached keys. MLA therefore keeps
    a small separate rotated key $k_{pe}$ per token and absorbs $W_{UK}$ only where no rotation sits.
    </details>

    <details><summary>2. The truncation sweep's lowest loss is below the full latent's. Is the latent
    bigger than it needs to be?</summary>

    The dip is no evidence either way: the in-sample sweep's basis was fitted on the very tokens the loss
    is measured on, so it flatters truncation (with a fixed basis fitted on other text the loss is higher
    at the low ranks, as section 6 checks). The out-of-sample test of section 6 is the evidence: on
    thousands of fresh held-out tokens, a fixed basis at the sweep's best rank is within the noise of the
    full latent. So for this model, yes: keeping only that many fixed directions (the fraction of
    $c_{kv}$ the cell prints) costs nothing measurable on new text, although the gain the dip suggested
    does not reproduce.
    </details>
    '''),
]

# ---------------------------------------------------------------------------
# 04: activation statistics
# ---------------------------------------------------------------------------

ACTIVATIONS = [
    md(r'''
    # Activation statistics

    What flows through the network, layer by layer. You will

    1. read summary statistics of every module's output;
    2. look at the distribution of the residual stream and find *massive activations*;
    3. split each MoE block's output into the shared expert's and the routed experts' contributions;
    4. read the model's intermediate guesses with the logit lens.

    Vocabulary: the **residual stream** is the running sum each layer adds to
    ($h_{l} = h_{l-1} + \mathrm{attn}_l + \mathrm{mlp}_l$); **excess kurtosis** is 0 for a Gaussian and large
    for heavy tails; a **massive activation** (Sun et al., 2024) is a residual entry hundreds or thousands
    of times the typical magnitude, usually in a few fixed dimensions and at the first token.
    '''),
    code(r'''
    use deepscope::inspect::{ActivationReport, LogitLens};
    use deepscope::plot::{readable_token, Cell, LineChart};

    let model: Model = Model::load_default()?;
    let n_layers: usize = model.config.num_hidden_layers;
    let last: usize = *model.config.moe_layers().last().unwrap();
    const TEXT: &str = "Blessed are the meek: for they shall inherit the earth. Blessed are they which do hunger and thirst after righteousness: for they shall be filled.";
    '''),
    md(r'''
    ## 1. Statistics per module

    `activation_report(text, factor)` runs one pass with statistics at every module output: the
    embeddings, each attention output, each MLP or MoE output, each shared expert output, each $c_{kv}$,
    and the residual stream after each layer. The chart follows the residual stream's RMS and largest
    magnitude through the layers.
    '''),
    chart(r'''
    let report: ActivationReport = model.activation_report(TEXT, 20.0)?;
    report
    '''),
    md(r'''
    **What to notice.** Layer 0's attention writes almost nothing into the residual stream: its output's
    RMS is a small fraction of what the dense MLP of the same layer writes (the cell prints both and
    checks the attention's is under a tenth). In this model the first layer's work is done by its MLP,
    reading single tokens; from layer 1 on, attention writes an output of the same order as the MLP's
    (the cell prints layer 1's and checks it is over ten times layer 0's).
    '''),
    code(r'''
    {
        let rms = |name: &str| report.rows.iter().find(|(n, _)| n == name).map(|(_, s)| s.rms).unwrap_or(f64::NAN);
        let (attn0, mlp0) = (rms("blocks.0.hook_attn_out"), rms("blocks.0.hook_mlp_out"));
        println!("layer 0: attention output RMS {attn0:.4}, MLP output RMS {mlp0:.4} (ratio {:.3})", attn0 / mlp0);
        assert!(attn0 < 0.1 * mlp0, "layer 0's attention is not near silent: revise the text");
        let attn1 = rms("blocks.1.hook_attn_out");
        println!("layer 1: attention output RMS {attn1:.4}");
        assert!(attn1 > 10.0 * attn0, "layer 1's attention is not much louder than layer 0's: revise the text");
    }
    '''),
    md(r'''
    ## 2. The residual stream

    A `Capture` names what to keep: `Capture::none()` records nothing but logits, and `.with(point)` adds
    the full tensor at a hook point (`HookPoint::ResidPost(l)` is the residual stream leaving layer `l`).
    The histogram of the last layer's residual stream uses a log count axis, so rare large values show.
    '''),
    chart(r'''
    let mut capture: Capture = Capture::none();
    for l in 0..n_layers {
        capture = capture.with(HookPoint::ResidPost(l));
    }
    let resid: Trace = model.trace_with(TEXT, &capture, &Interventions::new())?;
    let values: Vec<f32> = Vec::<f32>::try_from(resid.tensor(HookPoint::ResidPost(n_layers - 1))?.flatten(0, -1))?;
    let histogram: Figure = deepscope::plot::Histogram::new(&values)
        .bins(80)
        .log_count(true)
        .title(format!("Residual stream after layer {} ({} values)", n_layers - 1, values.len()))
        .x_title("activation")
        .y_title("count")
        .render()?;
    histogram
    '''),
    md(r'''
    Massive activations sit in a few hidden dimensions. The largest magnitude of each dimension over all
    tokens, after each layer, shows whether some dimensions stand out.
    '''),
    chart(r'''
    let mut dims: LineChart = LineChart::new()
        .y_log(true)
        .title("Largest |x| of each hidden dimension over all tokens")
        .x_title("hidden dimension")
        .y_title("max |x|");
    for l in 0..n_layers {
        let x = resid.tensor(HookPoint::ResidPost(l))?; // [1, T, D]
        let per_dim = Vec::<f32>::try_from(x.abs().flatten(0, 1).amax(0, false))?;
        dims = dims.series(format!("after layer {l}"), &per_dim);
    }
    let dims_chart: Figure = dims.render()?;
    dims_chart
    '''),
    code(r'''
    {
        let last_resid = resid.tensor(HookPoint::ResidPost(n_layers - 1))?.flatten(0, -1).to_kind(Kind::Double);
        let z = (&last_resid - last_resid.mean(Kind::Double)) / last_resid.std(true);
        let kurtosis = z.pow_tensor_scalar(4).mean(Kind::Double).double_value(&[]) - 3.0;
        let beyond4 = z.abs().gt(4.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        println!("last layer's residual: excess kurtosis {kurtosis:.1} (a Gaussian: 0); beyond 4 standard deviations {:.3}% (a Gaussian: 0.006%)", 100.0 * beyond4);
        let mut tops: Vec<i64> = Vec::new();
        for l in 0..n_layers {
            let peak = resid.tensor(HookPoint::ResidPost(l))?.abs().flatten(0, 1).amax(0, false); // [D]
            let (v, d) = (peak.max().double_value(&[]), peak.argmax(0, false).int64_value(&[]));
            println!("after layer {l}: dimension {d} peaks highest, at {v:.2}, {:.1}x the median dimension's peak", v / peak.median().double_value(&[]));
            tops.push(d);
        }
        let repeats = tops.windows(2).filter(|w| w[0] == w[1]).count();
        println!("the same dimension peaks highest after consecutive layers {repeats} of {} times", tops.len() - 1);
        // the text below reads heavy tails and one outlier dimension: keep it true
        assert!(kurtosis > 0.0 && beyond4 > 6.3e-5 && repeats == tops.len() - 1, "revise the text");
    }
    '''),
    md(r'''
    **What to notice.** The histogram's count axis is logarithmic, so its tails are rare values. The cell
    measures them against a Gaussian: excess kurtosis (0 for a Gaussian) and the share of values beyond 4
    standard deviations (0.006% for a Gaussian). This model's residual stream is above both, so its tails
    are heavier than a Gaussian's. The same hidden dimension peaks highest after every layer. The cell
    checks all three. That is an outlier dimension, the pattern that large models show at far greater
    ratios (next cell).
    '''),
    md(r'''
    The report lists every residual entry above `factor` (here 20) times its layer's median magnitude,
    largest first. That is a low bar, set for this small model. Sun et al. (2024) call an activation
    *massive* when it is about a thousand times the median magnitude (and above 100 in absolute value),
    which large pretrained models show in a few fixed dimensions. The cell prints this model's largest
    ratio in each layer and checks the reading: by that definition, this model has no massive activation.
    '''),
    code(r'''
    for l in 0..n_layers {
        let x = resid.tensor(HookPoint::ResidPost(l))?.abs().flatten(0, -1);
        let ratio = x.max().double_value(&[]) / x.median().double_value(&[]);
        println!("after layer {l}: largest |x| is {ratio:.0}x the median |x|");
        assert!(ratio < 1000.0, "a massive activation in the paper's sense: revise the text");
    }
    let mut massive: Table = Table::new(["layer", "position", "token", "dimension", "value", "x median |x|"])
        .caption(format!("{} residual entries above 20x their layer's median |x| (largest 12)", report.massive.len()));
    for m in report.massive.iter().take(12) {
        let token = readable_token(&resid.tokens[0][m.position]);
        massive.add_row([m.layer.into(), m.position.into(), token.into(), m.dim.into(), Cell::number(m.value as f64, 2), Cell::number(m.ratio_to_median, 0)])?;
    }
    massive
    '''),
    md(r'''
    ## 3. Shared and routed experts

    A DeepSeekMoE block outputs $\mathrm{shared}(x) + \sum_{i \in S} g_i E_i(x)$: the shared expert sees
    every token, the routed ones only theirs. For each MoE layer, the mean norm per token of each
    contribution and the mean cosine between them (near 0: they write in unrelated directions; negative:
    they partly cancel).
    '''),
    code(r'''
    let mut split: Table = Table::new(["MoE layer", "shared |x|", "routed |x|", "routed / shared", "cosine"])
        .caption("Contributions to each MoE block's output (means per token)");
    for s in &report.shared_vs_routed {
        split.add_row([s.layer.into(), Cell::number(s.shared_norm, 3), Cell::number(s.routed_norm, 3),
            Cell::number(s.routed_norm / s.shared_norm, 2), Cell::number(s.cosine, 3)])?;
        // the text below: routed larger than shared, and the two nearly unrelated but not cancelling
        assert!(s.routed_norm > s.shared_norm && s.cosine > 0.0 && s.cosine < 0.3, "layer {}: revise the text", s.layer);
    }
    split
    '''),
    md(r'''
    **What to notice.** In every MoE layer the routed experts' contribution is the larger of the two
    (the cell checks it), although the shared expert is the one every token goes through. The cosine is
    small and positive in every layer (checked between 0 and 0.3): the two write in nearly unrelated
    directions, slightly aligned and never cancelling on average. The routed experts do not correct the
    shared expert's output; they add a token-specific part beside it. Size is not importance, though:
    the patch experiments below measure what each part is worth to the prediction.
    '''),
    md(r'''
    Token by token, in the last MoE layer: `HookPoint::SharedOut(l)` is the shared expert's output
    ([tokens, hidden]) and `HookPoint::MlpOut(l)` the block's whole output, so their difference is the
    weighted sum of the routed experts.
    '''),
    chart(r'''
    let moe_out: Trace = model.trace_with(TEXT, &Capture::none().with(HookPoint::SharedOut(last)).with(HookPoint::MlpOut(last)), &Interventions::new())?;
    let per_token: Figure = {
        let shared = moe_out.tensor(HookPoint::SharedOut(last))?; // [N, D]
        let total = moe_out.tensor(HookPoint::MlpOut(last))?.flatten(0, 1); // [B*T, D] = [N, D]
        let routed = &total - shared;
        let norms = |x: &Tensor| -> deepscope::Result<Vec<f32>> {
            Ok(Vec::<f32>::try_from(x.square().sum_dim_intlist(-1, false, Kind::Float).sqrt())?)
        };
        let (ns, nr) = (norms(shared)?, norms(&routed)?);
        let above = ns.iter().zip(&nr).filter(|(s, r)| r > s).count();
        println!("the routed experts' sum is the larger at {above} of {} tokens", ns.len());
        // the text below: at every token, not only on average
        assert_eq!(above, ns.len(), "revise the text");
        LineChart::new()
            .series("shared expert", &ns)
            .series("routed experts (weighted sum)", &nr)
            .title(format!("Norm of each contribution per token, MoE layer {last}"))
            .x_title("token position")
            .y_title("L2 norm")
            .render()?
    };
    per_token
    '''),
    md(r'''
    **What to notice.** Token positions run along the x axis, the norm of each contribution up the y axis.
    The table's averages hold token by token: the routed line is above the shared one at every position
    (the cell counts them and checks). Both lines rise and fall from token to token, so neither part
    writes a fixed amount; the routed sum depends on which experts each token drew and with what
    weights.
    '''),
    md(r'''
    How much does the shared expert matter? Replace its output with zeros (a `patch` intervention at
    `SharedOut`) and compare with the unchanged model. This is the last layer, so only the prediction can
    change; patch an earlier MoE layer and the routing of the layers after it changes too.
    '''),
    chart(r'''
    let without_shared: Trace = {
        let zeros = Tensor::zeros([model.encode(TEXT)?.len() as i64, model.config.hidden_size as i64], (Kind::Float, Device::Cpu));
        model.trace_with(TEXT, &Capture::default(), &Interventions::new().patch(HookPoint::SharedOut(last), &zeros))?
    };
    let last_shared_zeroed: deepscope::inspect::Comparison = compare(&model.trace(TEXT)?, &without_shared)?;
    // the text below: no token is routed differently, and the loss rises
    assert!(last_shared_zeroed.routing.values().all(|c| c.changed_fraction == 0.0), "revise the text");
    assert!(last_shared_zeroed.mean_loss_variant > last_shared_zeroed.mean_loss_baseline, "revise the text");
    last_shared_zeroed
    '''),
    md(r'''
    **What to notice.** No MoE layer routes a single token differently (the cell checks it): the patch
    sits after the last router. Everything that changed is the prediction. The loss rises (checked),
    and the top-1 agreement gives the share of positions whose most likely next token stayed the same.
    The shared expert's output is the smaller part (the table above), but smaller is not dispensable.
    '''),
    md(r'''
    The same patch in the *first* MoE layer. Its own routing cannot change (the router reads the block's
    input, not its output), but every MoE layer after it reads a residual stream without that
    contribution. The cell prints each layer's share of tokens routed differently and checks both
    statements.
    '''),
    code(r'''
    let first: usize = model.config.moe_layers()[0];
    let no_first_shared = {
        let zeros = Tensor::zeros([model.encode(TEXT)?.len() as i64, model.config.hidden_size as i64], (Kind::Float, Device::Cpu));
        compare(&model.trace(TEXT)?, &model.trace_with(TEXT, &Capture::default(), &Interventions::new().patch(HookPoint::SharedOut(first), &zeros))?)?
    };
    for (l, c) in &no_first_shared.routing {
        println!("layer {l}: {:.1}% of tokens routed differently (mean Jaccard {:.3})", 100.0 * c.changed_fraction, c.mean_jaccard);
    }
    println!("mean KL {:.4} nats, loss {:.4} -> {:.4}", no_first_shared.mean_kl, no_first_shared.mean_loss_baseline, no_first_shared.mean_loss_variant);
    assert_eq!(no_first_shared.routing[&first].changed_fraction, 0.0);
    assert!(no_first_shared.routing.iter().any(|(l, c)| *l > first && c.changed_fraction > 0.0));
    '''),
    md(r'''
    ## 4. The logit lens

    Apply the final norm and the LM head to the residual stream after each layer, as if the model stopped
    there: each column is that layer's best guess for the next token, with its probability. Read a row
    left to right to watch the prediction form.
    '''),
    code(r'''
    let lens: LogitLens = model.logit_lens(TEXT)?;
    {
        let model_guess = &lens.resid[n_layers - 1];
        let agree: Vec<usize> = lens.resid.iter().map(|g| g.iter().zip(model_guess).filter(|(a, b)| a.0 == b.0).count()).collect();
        println!("positions whose top guess is already the model's final one, after each layer: {agree:?} of {}", model_guess.len());
        // the text below: the guesses agree more with the final one after layer n-2 than after layer 0,
        // and the last layer still changes more than a quarter of them
        assert!(agree[0] < agree[n_layers - 2] && 4 * agree[n_layers - 2] < 3 * model_guess.len(), "revise the text");
    }
    lens
    '''),
    md(r'''
    **What to notice.** Each row is one position, with the token read there and the top guess after each
    layer; the last column is the model's own prediction. The guesses agree with that final one at more
    positions after the second-to-last layer than after layer 0 (the cell prints the count after every
    layer and checks it): the prediction forms over the layers. But the last layer still changes the
    top guess at more than a quarter of the positions (checked): in a model this shallow no layer is
    spare, and the final answer is settled late.
    '''),
    md(r'''
    The lens also reads each MoE contribution alone: what the shared expert's output, or the routed
    experts' output, would predict if it were the whole residual stream. It shows what each part *writes*,
    not what the model predicts. Read the columns: the shared expert's output, read alone, names its
    tokens with low probabilities, and at many positions the *same* token whatever the text around it,
    while the routed experts' output agrees with the model's own next-token guess more often. The cell
    after the table counts both and checks that reading; it also prints the shared expert's most
    frequent guess, how many positions it takes (checked: more than a third), and how many guesses
    are raw byte pieces.
    '''),
    code(r'''
    /// "token (probability)" of one lens guess.
    fn guess((token, p): &(String, f32)) -> String {
        format!("{} ({:.0}%)", readable_token(token), 100.0 * p)
    }
    let lens_parts: Table = {
        let (layer, shared) = lens.shared.last().unwrap();
        let (_, routed) = lens.routed.last().unwrap();
        let mut t = Table::new(["position", "token", "model's next token", "shared expert alone", "routed experts alone"])
            .caption(format!("Logit lens on the two contributions of MoE layer {layer}"));
        for (i, token) in lens.tokens.iter().enumerate() {
            t.add_row([i.into(), readable_token(token).into(), guess(&lens.resid[n_layers - 1][i]).into(),
                guess(&shared[i]).into(), guess(&routed[i]).into()])?;
        }
        t
    };
    lens_parts
    '''),
    code(r'''
    {
        let (_, shared) = lens.shared.last().unwrap();
        let (_, routed) = lens.routed.last().unwrap();
        let model_guess = &lens.resid[n_layers - 1];
        let agree = |part: &Vec<(String, f32)>| part.iter().zip(model_guess).filter(|(a, b)| a.0 == b.0).count();
        let mean_p = |part: &Vec<(String, f32)>| part.iter().map(|x| x.1 as f64).sum::<f64>() / part.len() as f64;
        println!("positions where the part alone guesses the model's next token: shared {} of {n}, routed {} of {n}",
            agree(shared), agree(routed), n = model_guess.len());
        println!("mean probability of the part's own top guess: shared {:.1}%, routed {:.1}%", 100.0 * mean_p(shared), 100.0 * mean_p(routed));
        assert!(agree(shared) < agree(routed) && mean_p(shared) < mean_p(routed), "revise the text about the shared expert's lens");
        let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for g in shared.iter() {
            *counts.entry(g.0.clone()).or_insert(0) += 1;
        }
        let (top_token, top_count): (String, usize) = counts.into_iter().max_by_key(|x| x.1).unwrap_or_default();
        let byte_pieces = shared.iter().filter(|g| readable_token(&g.0).starts_with("\\x")).count();
        println!("the shared expert's most frequent guess: {} at {top_count} of {} positions; raw byte pieces at {byte_pieces}",
            readable_token(&top_token), shared.len());
        // the text above: the shared expert alone names one fixed token at more than a third of the positions
        assert!(3 * top_count > shared.len(), "revise the text about the shared expert's lens");
    }
    '''),
    md(r'''
    ## What to try next

    - Swap `TEXT` for a fortune or a Jargon File entry and compare the statistics and the lens.
    - `Capture { module_stats: true, ..Capture::default() }` adds these statistics to any traced run,
      including runs with interventions: compare the statistics before and after a ban.
    - `deepscope::inspect::massive_activations(&tensor, layer, factor)` works on any captured tensor, e.g.
      `HookPoint::AttnOut(l)` or `HookPoint::CKv(l)`.
    - Zero one routed expert's contribution by banning it (notebook **05**) and read the lens again.

    ## Exercises

    <details><summary>1. Zeroing the shared expert of the last MoE layer routed no token differently;
    zeroing the first layer's did. Why the difference?</summary>

    A router reads its block's input. Zeroing a block's shared output changes the residual stream only
    from that block on, so the block's own routing stays as it was (the first cell shows it for the last
    layer, the second checks it for the first). After the
    last MoE layer no router is left to notice; after the first one, every later router reads a changed
    stream, and the second cell prints how many of their tokens moved.
    </details>

    <details><summary>2. Read alone through the logit lens, the shared expert's output almost never names
    the model's next token. Does the shared expert matter little, then?</summary>

    No. The lens shows what a part writes when read as if it were the whole residual stream; it says
    nothing about what the part contributes in context. Section 3 measures that directly: zeroing the
    last layer's shared expert raises the loss and moves the predictions (its KL and top-1 agreement are
    printed there).
    </details>
    '''),
]

# ---------------------------------------------------------------------------
# 05: prototyping routing changes
# ---------------------------------------------------------------------------

PROTOTYPING = [
    md(r'''
    # Prototyping routing changes

    Change how tokens are routed and measure the effect, without touching the weights. Read it as a study:
    each section states a hypothesis, makes one routing change, and section 5 measures every change on the
    same held-out tokens, with 95% intervals, overall and per domain. You will

    1. ban and force experts;
    2. sweep top-k and read perplexity against compute;
    3. edit the router bias: zero it, replace it, exaggerate it;
    4. write a router in Rust: first DeepSeek-V3's own, then a variant;
    5. compare every run in one table;
    6. steer a generation with a vector added to the residual stream, and check it against one pass;
    7. try every routing control at once in a live playground;
    8. see what the group limit and the shared experts are for.

    **How.** An `Interventions` value is a list of changes passed to one forward pass
    (`model.trace_with(input, &capture, &interventions)`); the model itself is never modified, so runs
    with and without a change can alternate freely. Each run below is scored on the same held-out text:
    perplexity (the exponential of the mean next-token loss; lower is better) and the imbalance of expert
    load (max / mean, 1 = even).
    '''),
    code(r'''
    use deepscope::plot::{Cell, LineChart};
    use deepscope::train::corpus::{Corpus, CorpusSources, Domain};

    let model: Model = Model::load_default()?;
    let layers: Vec<usize> = model.config.moe_layers();
    let last: usize = *layers.last().unwrap();
    '''),
    md(r'''
    The evaluation text is about 2 KB of each held-out domain (Revelation, fortunes, the Jargon File).
    `run` scores one set of interventions on it: each window of 256 tokens is traced with only routing
    captured, its loss adds to the perplexity and its routing to a `RoutingStats`.
    '''),
    code(CORPUS_HELPERS, r'''
    /// One scored run.
    struct Outcome {
        name: String,
        perplexity: f64,
        stats: RoutingStats,
        /// Next-token loss of every scored token, in the same order in every run.
        losses: Vec<f64>,
        /// Scored tokens of each document, in order (to split `losses` by document).
        doc_tokens: Vec<usize>,
    }

    impl std::fmt::Display for Outcome {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: perplexity {:.2}; max/mean load", self.name, self.perplexity)?;
            for l in self.stats.layers() {
                if let Ok(i) = self.stats.imbalance(l) {
                    write!(f, " L{l} {:.2}", i.max_over_mean)?;
                }
            }
            Ok(())
        }
    }

    /// Perplexity and routing statistics of `docs` with `interventions` applied, in one pass.
    fn run(model: &Model, docs: &[String], name: &str, interventions: &Interventions) -> deepscope::Result<Outcome> {
        let (mut nll, mut n) = (0.0, 0usize);
        let mut stats = RoutingStats::default();
        let mut losses: Vec<f64> = Vec::new();
        let mut doc_tokens: Vec<usize> = Vec::new();
        for doc in docs {
            let ids = model.encode(doc)?;
            let before = losses.len();
            for window in ids.chunks(256).filter(|w| w.len() >= 2) {
                check_interrupt()?; // the notebook's stop button ends the run here
                let t = model.trace_with(window, &Capture::routing_only(), interventions)?;
                let loss = t.loss()?;
                nll += loss.sum(Kind::Double).double_value(&[]);
                n += loss.numel();
                losses.extend(Vec::<f64>::try_from(loss.flatten(0, -1).to_kind(Kind::Double))?);
                stats.add(&t)?;
            }
            doc_tokens.push(losses.len() - before);
        }
        Ok(Outcome { name: name.to_string(), perplexity: (nll / n as f64).exp(), stats, losses, doc_tokens })
    }

    let held: Vec<(Domain, String)> = heldout_docs();
    let doc_domains: Vec<Domain> = Domain::ALL.iter().flat_map(|&d| sample(&held, d, 2000).into_iter().map(move |_| d)).collect();
    let docs: Vec<String> = Domain::ALL.iter().flat_map(|&d| sample(&held, d, 2000)).collect();
    let mut results: Vec<Outcome> = vec![run(&model, &docs, "baseline", &Interventions::new())?];
    println!("{} documents, {} tokens", docs.len(), results[0].stats.tokens);
    println!("{}", results[0]);
    '''),
    md(r'''
    ## 1. Ban and force experts

    A banned expert's choice score is set to $-\infty$, so the router takes the next best eligible expert;
    a forced expert's is set to $+\infty$, so it is chosen for every token, whatever its group. The weights
    still come from the unbiased scores. Ban the two busiest experts of the last MoE layer, then force its
    idlest one. Each cell prints the corpus run (the measurement: its interval is in section 5), then
    `compare` on one sentence for a token-level view. The sentence is some 25 tokens: its loss change can
    even have the opposite sign to the corpus's, and it is an illustration, not a result.

    **Hypotheses.** Banning the two busiest experts raises perplexity, because the tokens they took go to
    worse matches. Forcing the idlest expert on every token changes little, because a forced expert keeps
    its own (small) routing weight. Section 5 measures both.
    '''),
    chart(r'''
    const TEXT: &str = "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures.";
    let base: Trace = model.trace(TEXT)?;
    let by_load: Vec<usize> = {
        let load = &results[0].stats.load[&last];
        let mut e: Vec<usize> = (0..load.len()).collect();
        e.sort_by_key(|&i| std::cmp::Reverse(load[i]));
        e
    };
    let ban: Interventions = Interventions::new().ban_experts(last, &by_load[..2]);
    results.push(run(&model, &docs, &format!("ban experts {:?} of layer {last}", &by_load[..2]), &ban)?);
    println!("{}", results.last().unwrap());
    compare(&base, &model.trace_with(TEXT, &Capture::default(), &ban)?)?
    '''),
    chart(r'''
    let idlest: usize = *by_load.last().unwrap();
    let force: Interventions = Interventions::new().force_experts(last, &[idlest]);
    results.push(run(&model, &docs, &format!("force expert {idlest} of layer {last}"), &force)?);
    println!("{}", results.last().unwrap());
    compare(&base, &model.trace_with(TEXT, &Capture::default(), &force)?)?
    '''),
    md(r'''
    **What to notice.** If forcing only swapped one expert in for another, each token would keep $k-1$ of
    its $k$ experts, a Jaccard similarity (shared experts / experts in either set) of $(k-1)/(k+1)$ = 0.6
    for $k = 4$. The last layer's mean Jaccard is lower. A forced expert's choice score is $+\infty$, so its
    *group's* score is too, and that group is kept for every token. Where the token had not kept it, it
    pushes out one of the token's groups, and with it every expert the token had there. The cell counts
    both, and checks the reading: a mean Jaccard below 0.6 needs more than one expert replaced per token
    on average.
    '''),
    code(r'''
    {
        let forced: Trace = model.trace_with(TEXT, &Capture::default(), &force)?;
        let (a, b) = (base.routing_of(last)?, forced.routing_of(last)?);
        let (rows_a, rows_b) = (Vec::<Vec<i64>>::try_from(&a.topk_indices)?, Vec::<Vec<i64>>::try_from(&b.topk_indices)?);
        let groups_before = match &a.chosen_groups {
            Some(g) => Vec::<Vec<i64>>::try_from(g)?,
            None => vec![vec![]; rows_a.len()],
        };
        let forced_group = (idlest / (model.config.n_routed_experts / model.config.n_group)) as i64;
        let group_was_out = groups_before.iter().filter(|g| !g.contains(&forced_group)).count();
        let replaced: usize = rows_a.iter().zip(&rows_b).map(|(x, y)| x.iter().filter(|e| !y.contains(e)).count()).sum();
        let per_token = replaced as f64 / rows_a.len() as f64;
        let k = model.config.num_experts_per_tok as f64;
        let jaccard = compare(&base, &forced)?.routing[&last].mean_jaccard;
        println!("one expert swapped would give Jaccard {:.2}; measured {jaccard:.3}", (k - 1.0) / (k + 1.0));
        println!("experts replaced per token: {per_token:.2} on average; expert {idlest}'s group {forced_group} \
            was not kept for {group_was_out} of {} tokens before forcing", rows_a.len());
        assert!(jaccard < (k - 1.0) / (k + 1.0), "the text says the Jaccard is below (k-1)/(k+1): revise it");
        assert!(per_token > 1.0);
    }
    '''),
    md(r'''
    ## 2. A top-k sweep

    Each token's routed compute grows linearly with $k$, the number of experts per token (the model was
    trained with 4). `ParamCounts::of` a config with another `num_experts_per_tok` gives the parameters
    active per token. With 2 of 4 groups of 4 experts eligible, at most 8 experts can be chosen, so
    $k$ runs from 1 to 8.

    **Hypothesis.** Fewer experts than trained with costs quality; more costs compute and buys little,
    because the router's weights were trained for 4. This is the compute-against-quality axis of the study:
    the active parameters per token are in the table beside each perplexity.
    '''),
    chart(r'''
    let mut sweep: Table = Table::new(["top-k", "active parameters / token", "perplexity", "max/mean load, last layer"])
        .caption("Top-k in every MoE layer, on the held-out text");
    let mut ks: Vec<f64> = Vec::new();
    let mut perplexities: Vec<f64> = Vec::new();
    let mut sweep_loads: Vec<f64> = Vec::new();
    {
        let mut bar = Progress::new("top-k sweep", 8 as _);
        for k in 1..=8usize {
            let o = run(&model, &docs, &format!("top-{k}"), &Interventions::new().top_k(Layers::All, k))?;
            let mut cfg = model.config.clone();
            cfg.num_experts_per_tok = k;
            sweep.add_row([k.into(), ParamCounts::of(&cfg).active_per_token.into(), Cell::number(o.perplexity, 2),
                Cell::number(o.stats.imbalance(last)?.max_over_mean, 2)])?;
            ks.push(k as f64);
            perplexities.push(o.perplexity);
            sweep_loads.push(o.stats.imbalance(last)?.max_over_mean);
            bar.set(k as _);
        }
        bar.finish();
    }
    show(&sweep);
    {
        let trained = model.config.num_experts_per_tok;
        let at = |k: usize| perplexities[k - 1];
        let most_beyond = (trained..=8).map(|k| (at(k) / at(trained) - 1.0).abs()).fold(0.0, f64::max);
        println!("top-1 costs {:+.1}% against top-{trained}; from top-{trained} to top-8 perplexity moves by at most {:.1}%",
            100.0 * (at(1) / at(trained) - 1.0), 100.0 * most_beyond);
        // the text below: fewer experts than trained cost a lot, more buy little
        assert!(at(1) > 1.2 * at(trained) && most_beyond < 0.02, "revise the text");
        assert!(perplexities.iter().all(|&p| p <= at(1)), "top-1 is not the costliest: revise the text");
        assert!(sweep_loads.windows(2).all(|w| w[1] <= w[0]), "the load does not even out as k grows: revise the text");
    }
    let sweep_chart: Figure = LineChart::new()
        .series_xy("perplexity", &ks, &perplexities)
        .title("Perplexity against experts per token (trained with 4)")
        .x_title("experts per token")
        .y_title("perplexity")
        .render()?;
    sweep_chart
    '''),
    md(r'''
    **What to notice.** The curve is lopsided. Going below the trained top-4 costs a lot: top-1 costs the
    most of all (the cell prints how much against top-4, and checks that it is the highest perplexity
    of the sweep and more than 20% above top-4's). Going above it buys nothing: from 4 to 8 experts,
    perplexity moves by less than 2% while the routed compute doubles. The cell checks both. The load column evens out
    as k grows, simply because each token spreads over more experts. For compute against quality, the
    trained k is the knee of this curve: the weights were trained for it.
    '''),
    md(r'''
    ## 3. Editing the bias

    `e_score_correction_bias` moves the choice and nothing else. Three edits, in every MoE layer:

    - **zero**: route on the scores alone. This is *not* a router trained without balancing: the router's
      weights were trained together with this bias and expect it, so zeroing shows how much the trained
      bias steers this trained router;
    - **replayed**: the bias the balancing rule reaches, starting from zero (the replay of notebook 02,
      one per layer), fitted twice: on the very documents every run is scored on (in-sample), and on
      *other* held-out documents (out-of-sample), the fair test;
    - **tripled**: the trained bias times 3: is more of the same bias more balance?

    The trained bias is read from the baseline trace, which records the bias each router used.

    **Hypotheses.** The trained bias evens the load at little cost in perplexity, so zeroing it unbalances
    the load; a bias replayed on other text does what the trained one does; tripling it overshoots.
    '''),
    code(r'''
    let mut trained_bias: Vec<(usize, Vec<f32>)> = Vec::new();
    for &l in &layers {
        trained_bias.push((l, Vec::<f32>::try_from(base.routing_of(l)?.bias.as_ref().unwrap())?));
    }
    let zero: Interventions = Interventions::new().zero_bias(Layers::All);
    let mut tripled: Interventions = Interventions::new();
    for (l, b) in &trained_bias {
        tripled = tripled.bias(*l, &b.iter().map(|x| 3.0 * x).collect::<Vec<f32>>());
    }
    let mut replayed: Interventions = Interventions::new();
    let mut replayed_in_sample: Interventions = Interventions::new();
    let mut replay_out_of_sample: bool = true;
    {
        // fit on the held-out documents after the ones `docs` took, about as many bytes per domain
        let mut fit_docs: Vec<String> = Vec::new();
        for &d in Domain::ALL.iter() {
            let used = sample(&held, d, 2000).len();
            let mut bytes = 0;
            for (_, text) in held.iter().filter(|(x, _)| *x == d).skip(used) {
                if bytes >= 2000 {
                    break;
                }
                bytes += text.len();
                fit_docs.push(text.clone());
            }
        }
        if fit_docs.is_empty() {
            println!("no other held-out text: the replay is fitted on the scored text (in-sample)");
            fit_docs = docs.clone();
            replay_out_of_sample = false;
        }
        for (fit, target, what) in [(&fit_docs, &mut replayed, "other held-out documents"), (&docs, &mut replayed_in_sample, "the scored documents")] {
            let mut ids: Vec<i64> = Vec::new();
            for d in fit.iter() {
                ids.extend(model.encode(d)?);
            }
            println!("replay fitted on {what}: {} documents, {} tokens", fit.len(), ids.len());
            let seq = 128.min(ids.len());
            let batch = Tensor::from_slice(&ids[..ids.len() / seq * seq]).view([-1, seq as i64]);
            let recorded = model.trace_with(&batch, &Capture::routing_only(), &Interventions::new())?;
            for &l in &layers {
                *target = target.clone().bias(l, &model.replay_bias_balancing(&recorded, l, 0.01, 200)?.final_bias);
            }
        }
    }
    for (name, iv) in [("zero bias", &zero), ("replayed bias, in-sample", &replayed_in_sample), ("replayed bias, other text", &replayed), ("tripled bias", &tripled)] {
        results.push(run(&model, &docs, name, iv)?);
        println!("{}", results.last().unwrap());
    }
    '''),
    md(r'''
    **What to notice.** The max/mean load is the busiest expert's load over the average (1 = even). The
    cell below checks each reading against the runs:

    - fitted on the very tokens it is scored on, the replayed bias gives the most even load in every MoE
      layer, and costs perplexity;
    - fitted on other held-out documents, it does *not* even out the scored text: in at least one layer
      its load is less even than with the trained bias. The in-sample balance was fitted to the quirks of
      a few thousand tokens; this is why a fit is judged on text it has not seen;
    - tripling the trained bias leaves the last layer's load less even than the trained bias: more of the
      same bias is not more balance. The trained bias is tuned to the router it was trained with, and
      scaling it overshoots;
    - zeroing the bias: the hypothesis that this unbalances the load holds in the first MoE layer only.
      There the load is clearly less even than with the trained bias; in the later layers its max/mean
      stays within 0.1 of the trained bias's, about as even (the cell checks both; the table prints
      the figures).
    '''),
    code(r'''
    {
        let find = |name: &str| results.iter().find(|o| o.name == name);
        let runs = (find("baseline"), find("zero bias"), find("replayed bias, in-sample"), find("replayed bias, other text"), find("tripled bias"));
        if let (Some(b), Some(z), Some(ri), Some(ro), Some(t)) = runs {
            let imb = |o: &Outcome, l: usize| o.stats.imbalance(l).map(|i| i.max_over_mean).unwrap_or(f64::NAN);
            let mut t_: Table = Table::new(["layer", "trained bias", "zero", "replayed, in-sample", "replayed, other text", "tripled"])
                .caption("Max/mean expert load on the scored text");
            for &l in &layers {
                t_.add_row([l.into(), Cell::number(imb(b, l), 2), Cell::number(imb(z, l), 2), Cell::number(imb(ri, l), 2),
                    Cell::number(imb(ro, l), 2), Cell::number(imb(t, l), 2)])?;
                let others = [b, z, ro, t].iter().map(|o| imb(o, l)).fold(f64::INFINITY, f64::min);
                assert!(imb(ri, l) < others, "layer {l}: the in-sample replay is not the most even: revise the text");
            }
            assert!(ri.perplexity > b.perplexity, "the in-sample replay does not cost perplexity: revise the text");
            if replay_out_of_sample {
                assert!(layers.iter().any(|&l| imb(ro, l) > imb(b, l)), "the out-of-sample replay evens every layer: revise the text");
            }
            assert!(imb(t, last) > imb(b, last), "the tripled bias is not less even in the last layer: revise the text");
            // zeroing the bias unbalances the first MoE layer clearly, and leaves the later ones about as even
            assert!(imb(z, layers[0]) > imb(b, layers[0]) + 0.05, "zeroing the bias does not unbalance the first MoE layer: revise the text");
            assert!(layers[1..].iter().all(|&l| (imb(z, l) - imb(b, l)).abs() < 0.1), "zeroing the bias moves a later layer's load: revise the text");
            println!("perplexity: trained {:.2}, zero {:.2}, replayed in-sample {:.2}, replayed on other text {:.2}, tripled {:.2}",
                b.perplexity, z.perplexity, ri.perplexity, ro.perplexity, t.perplexity);
            println!("{t_}");
        }
    }
    '''),
    md(r'''
    ## 4. A router written in Rust

    Any value implementing `CustomRouter` (or any closure `Fn(&RouterInput) -> Result<(Tensor, Tensor)>`)
    can replace a layer's expert selection. It receives the router input `x`, the logits, the scores
    and the layer's settings, and returns the chosen experts and their weights, both `[tokens, k]`. The
    input does not carry the bias, so the router below keeps its own copy.

    First DeepSeek-V3's router, re-implemented in a dozen tensor operations; it must reproduce the
    model exactly. Then one change: no group limit (every expert eligible).

    **Hypothesis.** The group limit exists for communication between nodes (section 8), not for quality,
    so lifting it changes perplexity by less than the noise.
    '''),
    code(r'''
    #[derive(Clone)]
    struct V3Router {
        /// e_score_correction_bias per MoE layer.
        bias: Vec<(usize, Vec<f32>)>,
        /// Keep only the best `topk_group` groups (DeepSeek-V3), or let every expert compete.
        limit_groups: bool,
    }

    impl CustomRouter for V3Router {
        fn route(&self, input: &RouterInput) -> deepscope::Result<(Tensor, Tensor)> {
            let st = input.settings;
            let (n, e) = (input.scores.size()[0], input.scores.size()[1]);
            let bias = match self.bias.iter().find(|(l, _)| *l == input.layer) {
                Some((_, b)) => Tensor::from_slice(b).to_device(input.scores.device()),
                None => Tensor::zeros([e], (Kind::Float, input.scores.device())),
            };
            // choice scores: scores plus bias, [N, E]
            let mut choice = input.scores + &bias;
            if self.limit_groups && st.n_group > 1 {
                let g = st.n_group;
                let grouped = choice.view([n, g, e / g]);
                // a group's score is the sum of its two best choice scores; keep the best topk_group groups
                let group_score = grouped.topk(2, -1, true, true).0.sum_dim_intlist(-1, false, Kind::Float);
                let kept = group_score.topk(st.topk_group, -1, true, true).1;
                // 0 for kept groups, -inf for the others
                let mask = Tensor::full([n, g], f64::NEG_INFINITY, (Kind::Float, choice.device())).scatter_value(1, &kept, 0.0);
                choice = (grouped + mask.unsqueeze(-1)).view([n, e]);
            }
            let indices = choice.topk(st.top_k, -1, true, true).1; // [N, k], best first
            // weights: the unbiased scores of the chosen experts
            let mut weights = input.scores.gather(1, &indices, false);
            if st.norm_topk_prob {
                weights = &weights / weights.sum_dim_intlist(-1, true, Kind::Float);
            }
            Ok((indices, weights * st.routed_scaling_factor))
        }
    }

    let mine: Interventions = Interventions::new().router(Layers::All, V3Router { bias: trained_bias.clone(), limit_groups: true });
    print!("my router against the model's: {}", compare(&base, &model.trace_with(TEXT, &Capture::default(), &mine)?)?);
    '''),
    chart(r'''
    let no_groups: Interventions = Interventions::new().router(Layers::All, V3Router { bias: trained_bias.clone(), limit_groups: false });
    results.push(run(&model, &docs, "custom router: no group limit", &no_groups)?);
    println!("{}", results.last().unwrap());
    let no_groups_cmp: deepscope::inspect::Comparison = compare(&base, &model.trace_with(TEXT, &Capture::default(), &no_groups)?)?;
    // the text below: without the limit, at least a quarter of the sentence's tokens change experts in every MoE layer
    assert!(no_groups_cmp.routing.values().all(|c| c.changed_fraction >= 0.25), "revise the text");
    no_groups_cmp
    '''),
    md(r'''
    **What to notice.** The limit binds often: without it, at least a quarter of the sentence's tokens
    get a different expert set in every MoE layer (the cell checks it; the lines print each layer's
    share). For each of those tokens the limit had left out an expert with a higher choice score than
    one it chose, because that expert's group was not kept. Whether that costs anything is the
    hypothesis, and one sentence cannot say: section 5 measures the corpus run printed first, with its
    interval.
    '''),
    md(r'''
    ## 5. Every run in one table

    The same held-out tokens under every change above (the top-k sweep has its own table). Perplexity is
    what the change costs; the load columns say whether it unbalanced the experts.

    **How sure is a change?** A few thousand tokens is a small sample, so each change gets a 95% interval
    from a paired bootstrap: the per-token loss differences (variant minus baseline, same tokens) are
    resampled 2,000 times, and the perplexity change of each resample is $e^{\text{mean difference}} - 1$.
    A change whose interval contains 0 is within the noise of this sample and is not a result. Tokens of
    one document are not independent, so these intervals are, if anything, too narrow.
    '''),
    code(PAIRED_BOOTSTRAP, r'''
    /// 95% paired-bootstrap interval of the perplexity change of `variant` over `base` (same tokens).
    fn change_interval(base: &[f64], variant: &[f64], resamples: i64) -> (f64, f64) {
        let (lo, hi) = mean_difference_interval(base, variant, resamples);
        (lo.exp() - 1.0, hi.exp() - 1.0)
    }
    let mut headers: Vec<String> = vec!["run".into(), "perplexity".into(), "change".into(), "95% interval".into(), "beyond noise".into()];
    headers.extend(layers.iter().map(|l| format!("max/mean load, layer {l}")));
    let mut runs: Table = Table::new(headers).caption(format!("Every run over the same {} held-out tokens", results[0].stats.tokens));
    let mut within_noise: Vec<String> = Vec::new();
    for o in &results {
        let (lo, hi) = change_interval(&results[0].losses, &o.losses, 2000);
        let beyond = o.name != results[0].name && (lo > 0.0 || hi < 0.0);
        if o.name != results[0].name && !beyond {
            within_noise.push(o.name.clone());
        }
        let mut row: Vec<Cell> = vec![o.name.as_str().into(), Cell::number(o.perplexity, 2),
            Cell::text(format!("{:+.1}%", 100.0 * (o.perplexity / results[0].perplexity - 1.0))),
            Cell::text(if o.name == results[0].name { String::new() } else { format!("{:+.1}% to {:+.1}%", 100.0 * lo, 100.0 * hi) }),
            beyond.into()];
        for &l in &layers {
            row.push(Cell::number(o.stats.imbalance(l)?.max_over_mean, 2));
        }
        runs.add_row(row)?;
    }
    println!("within the noise of this sample: {}", if within_noise.is_empty() { "none".to_string() } else { within_noise.join(", ") });
    {
        // the text below: the ban and the in-sample replay cost perplexity beyond the noise,
        // and the forced expert takes every token of its layer (max/mean = E/k)
        for prefix in ["ban experts", "replayed bias, in-sample"] {
            let o = results.iter().find(|o| o.name.starts_with(prefix)).expect("a run of this notebook");
            assert!(change_interval(&results[0].losses, &o.losses, 2000).0 > 0.0, "{prefix}: revise the text");
        }
        let forced = results.iter().find(|o| o.name.starts_with("force expert")).expect("section 1's run");
        let e_over_k = model.config.n_routed_experts as f64 / model.config.num_experts_per_tok as f64;
        println!("forced expert's layer: max/mean {:.2}; E/k = {e_over_k:.2}", forced.stats.imbalance(last)?.max_over_mean);
        assert!((forced.stats.imbalance(last)?.max_over_mean - e_over_k).abs() < 1e-6, "revise the text");
    }
    runs
    '''),
    md(r'''
    **What to notice.** Two changes cost perplexity beyond the noise: banning the two busiest experts of
    the last layer, as section 1's hypothesis said, and the bias replayed on the scored text itself
    (the cell checks that both intervals lie above zero). The cell lists the runs within the noise; each
    one's hypothesis is read against that list. The load columns tell another story than perplexity.
    Forcing one expert sends every token to it, so its layer's max/mean is exactly $E/k$, the most
    uneven load top-k routing allows (the cell checks it). The in-sample replay, the most even of
    section 3's bias edits (checked there), is one of the two costly runs. Even load is a goal of
    serving, not of quality.
    '''),
    md(r'''
    **Per domain.** The same runs, each domain's tokens scored on their own: the perplexity change and its
    paired-bootstrap interval. A change can cost one kind of text and not another; a domain has a third of
    the tokens, so its intervals are wider.
    '''),
    code(r'''
    /// The losses of `o` on the documents of domain `d`, in order.
    fn domain_losses(o: &Outcome, doc_domains: &[Domain], d: Domain) -> Vec<f64> {
        let mut out = Vec::new();
        let mut at = 0;
        for (n, dd) in o.doc_tokens.iter().zip(doc_domains) {
            if *dd == d {
                out.extend_from_slice(&o.losses[at..at + n]);
            }
            at += n;
        }
        out
    }
    let mut headers: Vec<String> = vec!["run".into()];
    headers.extend(Domain::ALL.iter().map(|d| format!("{}: change (95% interval)", d.name())));
    let mut per_domain: Table = Table::new(headers).caption("Perplexity change per held-out domain");
    let mut hidden: Vec<String> = Vec::new(); // within the noise overall, beyond it in some domain
    let mut ban_by_domain: Vec<f64> = Vec::new(); // the ban's perplexity change, in the order of Domain::ALL
    for o in results.iter().skip(1) {
        let mut row: Vec<Cell> = vec![o.name.as_str().into()];
        for d in Domain::ALL {
            let (b, v) = (domain_losses(&results[0], &doc_domains, d), domain_losses(o, &doc_domains, d));
            let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
            let change = (mean(&v) - mean(&b)).exp() - 1.0;
            let (lo, hi) = change_interval(&b, &v, 2000);
            let mark = if lo > 0.0 || hi < 0.0 { " *" } else { "" };
            if !mark.is_empty() && within_noise.contains(&o.name) && !hidden.contains(&o.name) {
                hidden.push(o.name.clone());
            }
            if o.name.starts_with("ban experts") {
                ban_by_domain.push(change);
            }
            row.push(Cell::text(format!("{:+.1}% ({:+.1}% to {:+.1}%){mark}", 100.0 * change, 100.0 * lo, 100.0 * hi)));
        }
        per_domain.add_row(row)?;
    }
    // each document's losses are counted once: the domains add up to the whole
    assert_eq!(results[0].doc_tokens.iter().sum::<usize>(), results[0].losses.len());
    println!("within the noise overall, beyond it in some domain: {}", if hidden.is_empty() { "none".to_string() } else { hidden.join(", ") });
    // the text below: the ban costs the Bible least and the Jargon File most
    assert!(ban_by_domain[0] < ban_by_domain[1] && ban_by_domain[1] < ban_by_domain[2], "revise the text");
    per_domain
    '''),
    md(r'''
    **What to notice.** A `*` marks a domain whose interval excludes 0. Read each section's hypothesis
    against its rows here and in the table above: a hypothesis is supported only where its change is
    beyond the noise. The cell also lists the runs that are within the noise overall but beyond it in
    some domain. For those, the average over the three domains hides changes of opposite sign, or one
    domain's change is diluted by the other two, so "no effect overall" is not "no effect".

    The ban's cost is far from even: the Bible's change is the smallest of the three and the Jargon
    File's the largest (the cell checks the order). The two busiest experts of this mixed sample are
    the ones the Bible needs least: notebook 02's specialisation by domain, seen as a cost.
    '''),
    md(r'''
    ## 6. Steering a generation

    Interventions are not limited to one pass over a fixed text. `model.generate_with(prompt, &options,
    &capture, &interventions)` applies them in every pass of a generation: the prompt's, then one pass
    per new token over the compressed cache. It returns the new tokens and one `Trace` of every token the
    model read, routing per generated token included.

    Two kinds of intervention run *your* code or values at any hook point:

    - `add_vector_from(point, &v, p)` adds `v` to the value at `point` from position `p` on (a steering
      vector);
    - `hook(point, |ctx, x| ...)` runs a closure on the value and continues with what it returns (same
      shape and dtype, checked). `ctx` says the layer, the absolute positions of the pass
      (`ctx.positions`) and which pass it is. `point` can be a `HookPoint`, a name, or a glob such as
      `"blocks.*.mlp.hook_router_logits"`.

    The steering vector here is the difference between the mean residual stream after the first MoE
    layer on a passage of Genesis and on a few fortunes ("activation addition"). It is added from the
    first generated position on, so the prompt is read unchanged.
    '''),
    code(r'''
    /// The mean of the value at `point` over the tokens of `text` [D].
    fn mean_at(model: &Model, point: HookPoint, text: &str) -> Result<Tensor> {
        let t = model.trace_with(text, &Capture::none().with(point), &Interventions::new())?;
        Ok(t.tensor(point)?.mean_dim(&[0i64, 1][..], false, Kind::Float))
    }
    let steer_point = HookPoint::ResidPost(layers[0]);
    let genesis = "In the beginning God created the heaven and the earth. And the earth was without form, and void; \
        and darkness was upon the face of the deep. And God said, Let there be light: and there was light.";
    let fortunes = "You will be successful in your work. A new friend will bring you luck. \
        Your talents will be recognized and suitably rewarded. Today is a good day to finish what you started.";
    let direction: Tensor = mean_at(&model, steer_point, genesis)? - mean_at(&model, steer_point, fortunes)?;
    let steer_prompt = "You will";
    let prompt_len = model.encode(steer_prompt)?.len() as i64;
    let gen_opts = GenerateOptions::greedy(&model, 24);
    let plain_gen = model.generate_with(steer_prompt, &gen_opts, &Capture::routing_only(), &Interventions::new())?;
    let steering = Interventions::new().add_vector_from(steer_point, &direction, prompt_len);
    let steered_gen = model.generate_with(steer_prompt, &gen_opts, &Capture::routing_only(), &steering)?;
    println!("direction: {} features, norm {:.2}; added from position {prompt_len}", direction.size()[0], direction.norm().double_value(&[]));
    println!("plain:   {steer_prompt}{}", plain_gen.text.clone().unwrap_or_default());
    println!("steered: {steer_prompt}{}", steered_gen.text.clone().unwrap_or_default());
    let same = plain_gen.generation.tokens.iter().zip(&steered_gen.generation.tokens).take_while(|(a, b)| a == b).count();
    println!("the two generations agree on their first {same} of {} new tokens", gen_opts.max_new_tokens);
    // the text below: the steered generation parts from the plain one
    assert!(same < plain_gen.generation.tokens.len().min(steered_gen.generation.tokens.len()), "revise the text");
    '''),
    md(r'''
    **What to notice.** Both runs read the prompt unchanged, since the vector is added only from the first
    generated position, and greedy decoding makes each run deterministic. So the first tokens where
    the two lines differ are the vector's doing: the cell prints how many new tokens they share before
    they part (checked: they do part). The direction is the Genesis passage's mean residual minus the
    fortunes', so read the steered line for the Genesis passage's words. After the first difference each
    run also continues from its own text, so not every later difference is the vector's direct effect.
    '''),
    md(r'''
    The steered generation's trace colours each token it read by its top-1 expert in the last MoE layer,
    prompt and generated tokens alike:
    '''),
    code(r'''
    {
        // the text below: the prompt's tokens keep the experts they have without steering
        let n = prompt_len;
        let (plain, steered) = (plain_gen.trace.routing_of(last)?, steered_gen.trace.routing_of(last)?);
        let same_prompt = plain.topk_indices.narrow(0, 0, n).equal(&steered.topk_indices.narrow(0, 0, n));
        println!("the prompt's {n} tokens have the same experts with and without steering: {same_prompt}");
        assert!(same_prompt, "revise the text");
    }
    steered_gen.trace.routing_strip(last)?
    '''),
    md(r'''
    **What to notice.** Each token carries its first-choice expert in the last MoE layer, as a number and
    a colour, and the title counts the distinct ones. The prompt's tokens keep the experts they have in
    the plain generation (the cell checks it): the vector starts after them, and attention only looks
    back. The vector acts from the first generated position on, so from there the residual stream, and
    with it the routing, can differ from the plain run's. The generated tokens themselves only part at
    the first new token where the runs differ (the steering cell prints how many new tokens they share
    first). `plain_gen.trace.routing_strip(last)?` draws the plain run for comparison.
    '''),
    md(r'''
    **Check.** Steering over the cache must give what the same steering gives in one pass over the whole
    sequence the generation read. The cell runs that pass and compares logits and routing; it also
    watches the passes with a hook that only records `ctx.positions`.
    '''),
    code(r'''
    let read: Vec<i64> = Vec::<i64>::try_from(steered_gen.trace.ids.select(0, 0))?;
    let one_pass = model.trace_with(read.clone(), &Capture::routing_only(), &steering)?;
    let logit_diff = (&one_pass.logits - &steered_gen.trace.logits).abs().max().double_value(&[]);
    let same_routing = layers.iter().all(|&l| match (one_pass.routing_of(l), steered_gen.trace.routing_of(l)) {
        (Ok(a), Ok(b)) => a.topk_indices == b.topk_indices,
        _ => false,
    });
    println!("{} tokens read; largest logit difference, cached passes vs one pass: {logit_diff:.1e}; same experts chosen: {same_routing}", read.len());
    assert!(logit_diff < 1e-4 && same_routing);

    let passes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = passes.clone();
    let watched = steering.clone().hook(steer_point, move |ctx, x| {
        if let Ok(mut p) = log.lock() {
            p.push(ctx.positions.clone());
        }
        Ok(x)
    });
    let _ = model.generate_with(steer_prompt, &GenerateOptions::greedy(&model, 4), &Capture::none(), &watched)?;
    let seen: Vec<std::ops::Range<i64>> = passes.lock().map(|p| p.clone()).unwrap_or_default();
    println!("positions of each pass: {seen:?}");
    assert_eq!(seen.len(), 4);
    '''),
    md(r'''
    ## 7. Every control at once: the playground

    `playground(model, text)` puts the routing interventions of this notebook behind controls: the MoE
    layer (and whether the change applies to every MoE layer), top-k, the number of groups and the groups
    kept, a scale on the router bias, banned and forced experts, the scoring function, and the token
    whose router step is shown. Each time a control changes, the text is traced again with those interventions and the view
    below the controls is redrawn: the comparison with the unmodified model (KL, top-1 agreement, loss,
    tokens routed differently per layer), the routing map, and the router's step for the chosen token.
    A combination that cannot route (every expert banned, more experts forced than chosen, more groups
    kept than there are) shows its error in the same place, and the controls keep working.

    The controls need a running kernel: in a saved copy of this notebook they are drawn from the saved
    widget state but do not answer. The playground keeps the model it is given, so it gets a copy of its
    own here (the tiny model loads in well under a second).
    '''),
    code(r'''
    let pg = playground(Model::load_default()?, "And God said, Let there be light: and there was light.")?;
    pg
    '''),
    md(r'''
    The controls are ordinary Rust values, so a cell can move them as a user would and read what the
    view shows. This cell asks for top-1 routing in the last MoE layer, prints the first lines of the
    redrawn view, then puts top-k back and checks that the view says no intervention is left.
    '''),
    code(r'''
    pg.layer.set_index(layers.len() - 1)?;
    pg.top_k.set_value(1)?;
    let shown: String = pg.view.output().text();
    for line in shown.lines().take(3) {
        println!("{line}");
    }
    assert!(shown.starts_with(&format!("top-1 on layer {last}")));
    pg.top_k.set_value(model.config.num_experts_per_tok as i64)?;
    println!("top-k back to {}: {}", pg.top_k.value(), pg.view.output().text().lines().next().unwrap_or_default());
    assert!(pg.view.output().text().starts_with("No intervention"));
    let redraws: Vec<f64> = pg.view.redraw_seconds();
    println!("{} redraws so far; the slowest took {:.3} s", redraws.len(), redraws.iter().cloned().fold(0.0, f64::max));
    '''),
    md(r'''
    ## 8. Why groups, and why shared experts

    **Groups limit how far a token travels.** DeepSeek-V3 serves its 256 routed experts spread over many
    GPUs and nodes. Its router first keeps `topk_group` of `n_group` groups, then picks the top-k experts
    inside them. Place the experts so that one group sits on one node, and a token's experts are on at most
    `topk_group` nodes. Fewer nodes per token means less all-to-all traffic. The V3 report calls this
    node-limited routing. The first cell reads the limit from V3's config. Then it counts, on this model
    and the held-out text of section 5, how many groups each token's experts span, with the limit and
    without it (`groups(Layers::All, 1, 1)`: one group holding every expert).
    '''),
    code(r'''
    {
        let v3: Config = deepscope::model::published::deepseek_v3()?;
        println!("DeepSeek-V3: {} experts in {} groups of {}; keeps {} groups; top-{} -> a token reaches at most {} groups \
                  (nodes, with one group per node), {} without the limit",
            v3.n_routed_experts, v3.n_group, v3.n_routed_experts / v3.n_group, v3.topk_group, v3.num_experts_per_tok,
            v3.topk_group, v3.num_experts_per_tok.min(v3.n_group));
    }
    use std::collections::{BTreeMap, BTreeSet};
    /// Per MoE layer, how many distinct groups each token's chosen experts fall in.
    fn groups_per_token(model: &Model, docs: &[String], iv: &Interventions) -> deepscope::Result<BTreeMap<usize, Vec<usize>>> {
        let per = (model.config.n_routed_experts / model.config.n_group) as i64;
        let mut out: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for doc in docs {
            for window in model.encode(doc)?.chunks(256) {
                let t = model.trace_with(window, &Capture::routing_only(), iv)?;
                for r in t.routing.iter().flatten() {
                    let rows = Vec::<Vec<i64>>::try_from(r.topk_indices.floor_divide_scalar(per))?;
                    out.entry(r.layer).or_default().extend(rows.iter().map(|row| row.iter().collect::<BTreeSet<_>>().len()));
                }
            }
        }
        Ok(out)
    }
    let limited = groups_per_token(&model, &docs, &Interventions::new())?;
    let unlimited = groups_per_token(&model, &docs, &Interventions::new().groups(Layers::All, 1, 1))?;
    let kept = model.config.topk_group;
    let mut spans: Table = Table::new(["layer", "groups per token, limited (mean)", "most", "without the limit (mean)", "most",
            "tokens beyond the limit"])
        .caption(format!("Groups a token's {} experts fall in ({} groups, {} kept)", model.config.num_experts_per_tok, model.config.n_group, kept));
    fn mean(v: &[usize]) -> f64 {
        v.iter().sum::<usize>() as f64 / v.len().max(1) as f64
    }
    let mut wider_everywhere = true;
    for (l, a) in &limited {
        let b = &unlimited[l];
        let beyond = b.iter().filter(|&&g| g > kept).count() as f64 / b.len().max(1) as f64;
        wider_everywhere &= mean(b) > mean(a);
        assert!(a.iter().all(|&g| g <= kept), "layer {l}: the limit was not kept");
        spans.add_row([(*l).into(), Cell::number(mean(a), 2), (*a.iter().max().unwrap_or(&0)).into(),
            Cell::number(mean(b), 2), (*b.iter().max().unwrap_or(&0)).into(), Cell::text(format!("{:.0}%", 100.0 * beyond))])?;
    }
    let (no_limit_change, lo, hi) = {
        let r = results.iter().find(|o| o.name.contains("no group limit")).expect("section 4's run");
        let (lo, hi) = change_interval(&results[0].losses, &r.losses, 2000);
        (r.perplexity / results[0].perplexity - 1.0, lo, hi)
    };
    println!("perplexity without the limit: {:+.1}% ({:+.1}% to {:+.1}%)", 100.0 * no_limit_change, 100.0 * lo, 100.0 * hi);
    // the text below says tokens spread over more groups without the limit, at no cost this sample can see
    assert!(wider_everywhere && lo < 0.0 && hi > 0.0, "revise the text");
    spans
    '''),
    md(r'''
    **What to notice.** With the limit, no token's experts span more than `topk_group` groups (the cell
    checks it). Without it, tokens spread over more groups in every MoE layer, and the table gives the share
    of tokens that would have reached more nodes than the limit allows. The perplexity interval of section
    5's unlimited run contains zero: the limit costs this model nothing measurable on this text. That is
    the trade the V3 report describes: the limit buys bounded communication at little or no quality cost.
    On one CPU the limit saves nothing, because there is no network to spare.

    **The shared expert has no substitute.** Every token goes through the shared expert, and the routed
    experts only add to it. Zero the last MoE layer's shared expert (a hook on `hook_shared_out`), then,
    one at a time, ban each of its routed experts. A banned expert's tokens go to their next choice, so the
    ban measures how replaceable that expert is. Both kinds of run are scored on the same tokens.
    '''),
    code(r'''
    let no_shared: Interventions = Interventions::new().hook(HookPoint::SharedOut(last), |_ctx, x| Ok(x.zeros_like()));
    let shared_run = run(&model, &docs, &format!("zero the shared expert of layer {last}"), &no_shared)?;
    let shared_change = shared_run.perplexity / results[0].perplexity - 1.0;
    let mut worst_ban = (0usize, f64::MIN);
    for e in 0..model.config.n_routed_experts {
        let o = run(&model, &docs, "ban", &Interventions::new().ban_experts(last, &[e]))?;
        let change = o.perplexity / results[0].perplexity - 1.0;
        if change > worst_ban.1 {
            worst_ban = (e, change);
        }
    }
    let (lo, hi) = change_interval(&results[0].losses, &shared_run.losses, 2000);
    println!("zero the shared expert of layer {last}: perplexity {:+.1}% ({:+.1}% to {:+.1}%)", 100.0 * shared_change, 100.0 * lo, 100.0 * hi);
    println!("the costliest single routed expert to ban: e{} at {:+.1}%", worst_ban.0, 100.0 * worst_ban.1);
    // the text below says the shared expert costs more than any one routed expert: keep it true
    assert!(lo > 0.0 && shared_change > worst_ban.1, "revise the text");
    '''),
    md(r'''
    **What to notice.** Zeroing the shared expert costs more perplexity than banning any single routed
    expert, and its interval excludes zero. The cell prints both figures and checks their order. This is
    the DeepSeekMoE design at work. What every token needs sits in the shared expert, so the routed experts
    are free to specialise, and any one of them can be stood in for by the next choice. Notebook 04 shows
    the other side: the later layers reroute when the shared expert is gone.
    '''),
    md(r'''
    ## What to try next

    - The built-in `Interventions::new().groups(Layers::All, 1, 1)` also lifts the group limit: check
      that it routes exactly as `V3Router { limit_groups: false, .. }`.
    - `scoring(Layers::All, ScoringFunc::Softmax)` scores with DeepSeek-V2's softmax on V3 weights.
    - Ban a whole group (`ban_experts(last, &[0, 1, 2, 3])`): its group score becomes $-\infty$, so the
      group is never kept; check `chosen_groups` in the `router_step` of a trace run with that ban.
    - Write a router with a capacity: no expert takes more than a fixed share of the tokens.
    - Scale the steering vector (`&direction * 4.0`) or move it to another layer, and read where the two
      generations part; hook `blocks.*.mlp.hook_router_logits` during a generation to nudge one expert
      from a chosen position on (`ctx.from_position(&x, p)?`).
    - `Interventions::remove(i)` takes one change out of a stack; `patch(HookPoint::TopkWeights(l), &w)`
      replaces the weights while keeping the choice.

    ## Exercises

    <details><summary>1. Predict the mean Jaccard similarity for forcing one expert, if forcing only swapped
    one expert in (k = 4).</summary>

    A token would keep 3 of its 4 experts and gain the forced one: 3 shared out of 5 in either set, so
    3/5 = 0.6. Section 1 measures less, because the forced expert's group is kept for every token and
    pushes out one of the token's own groups.
    </details>

    <details><summary>2. The replayed bias evens the load when fitted on the scored text, but not when
    fitted on other held-out text. Which result describes the rule?</summary>

    The out-of-sample one. Fitted and scored on the same few thousand tokens, the rule can balance exactly
    those tokens; on new text of the same kind that balance does not carry over. A fit is judged on text
    it has not seen.
    </details>

    <details><summary>3. Which rows of the summary table are results?</summary>

    Only those marked "beyond noise": their 95% interval excludes 0. The others changed perplexity by
    less than this sample can tell apart from chance, whatever the sign of the change.
    </details>
    '''),
]

# ---------------------------------------------------------------------------
# 06: real checkpoints
# ---------------------------------------------------------------------------

REAL = [
    md(r'''
    # Real checkpoints at real scale

    DeepScope loads Hugging Face checkpoints of the DeepSeek-V2/V3 family (`config.json`, safetensors
    weights, single or sharded, bf16/f16/f32 or block-scaled FP8, and `tokenizer.json` when present) and
    matches `transformers` numerically. The models people want to look inside are far larger than the
    memory of the machines they have, so DeepScope does not need the whole model in memory:

    - **FP8 stays FP8**: block-scaled FP8 weights keep one byte per parameter and are dequantized per
      matrix product, a bounded chunk at a time;
    - **a memory budget**: weights that do not fit stay in the checkpoint files and are read when a pass
      needs them, dense weights layer by layer, routed experts only when the router picks them, kept in an
      LRU cache within the budget;
    - **a plan before anything loads**: where each part will live and what a token costs in reads.

    This notebook shows the plans of the published models from their configs alone, then loads a
    checkpoint under a budget smaller than it, traces it, and reads the cost counters.

    **Which checkpoint.** With `DEEPSCOPE_REAL_CHECKPOINT` set to a downloaded checkpoint, the cells use
    it. Without it, the notebook writes a *synthetic* checkpoint: random weights with the real shapes and
    storage layout of DeepSeek-V2-Lite, cut to its first two layers (one dense, one MoE with all 64
    experts) so that it runs in a minute on a laptop. The same cells run unchanged on a real download:

    ```sh
    huggingface-cli download deepseek-ai/DeepSeek-V3 --local-dir /data/DeepSeek-V3
    export DEEPSCOPE_REAL_CHECKPOINT=/data/DeepSeek-V3
    export DEEPSCOPE_REAL_BUDGET=8GiB       # optional: the memory budget (default: auto)
    export DEEPSCOPE_REAL_DEVICE=cuda:0     # optional; default cpu
    make lab
    ```

    To rehearse DeepSeek-V3 without the download, write a random checkpoint of its real shape (17 GB
    for the first 4 layers) and point the variable at it:
    `target/release/deepscope synth --like published:deepseek-v3 --layers 4 --out /data/v3-synth`.
    '''),
    code(r'''
    use deepscope::model::plan::{Plan, PlanOptions, Tier};
    use deepscope::model::{MemoryBudget, ForwardCost};
    use deepscope::plot::{Cell, Heatmap};
    use deepscope::stats::{human_bytes, human_count};
    use std::path::{Path, PathBuf};
    // The published config.json files of the real models ship with the library.
    let published: Vec<(&str, Config)> = deepscope::model::published::all()?;
    for (name, c) in &published {
        println!("{name:<18} {:?} family, {} layers ({} MoE), {} + {} experts, top-{}, {} groups, FP8: {}",
            c.family, c.num_hidden_layers, c.moe_layers().len(), c.n_routed_experts, c.n_shared_experts,
            c.num_experts_per_tok, c.n_group, c.quantization.is_some());
    }
    '''),
    md(r'''
    ## 1. What each model weighs, from its config

    `ParamCounts::of(&config)` counts parameters from the shapes alone; `Plan::for_config` adds how the
    published checkpoint stores them (FP8 projections with f32 block scales where the config has a
    `quantization_config`, bf16 elsewhere). The KV cache is the MLA arithmetic of notebook 03.
    '''),
    code(r'''
    let unlimited = PlanOptions { memory_budget: MemoryBudget::Unlimited, kind: Kind::BFloat16, ..Default::default() };
    let mut sizes: Table = Table::new(["model", "parameters", "active / token", "as published", "all in bf16", "KV cache / token"])
        .caption("What each model needs (from config.json alone)");
    for (name, c) in &published {
        let p = ParamCounts::of(c);
        let stored = Plan::for_config(c, Kind::BFloat16, &unlimited)?.stored_bytes();
        let (kv, _, _) = CacheFootprint::of(c, 2).bytes_per_token();
        sizes.add_row([(*name).into(), human_count(p.total).into(), human_count(p.active_per_token).into(),
            human_bytes(stored).into(), human_bytes(2 * p.total).into(), human_bytes(kv).into()])?;
    }
    sizes
    '''),
    md(r'''
    **What to notice.** The FP8 models (DeepSeek-V3, R1, Kimi-K2) are stored in about half of what the
    same parameters take in bf16; V2-Lite and Moonlight are published in bf16, so the two columns agree.
    A token uses a small share of the parameters (the "active" column): the routed experts it is not
    sent to do no work. The KV cache per token is the same for V3, R1 and K2 because their MLA latent
    sizes and layer counts are the same; the model size does not enter it.
    '''),
    md(r'''
    ## 2. Plans under a memory budget

    A plan fills the budget in the order that saves the most reads per byte held: norms and routers
    (always), room for the largest weight being read, then attention, dense MLPs and shared experts layer
    by layer and `lm_head` (all read by every pass), then the routed experts (each read by only k/E of the
    tokens): all of them if they fit, otherwise the rest of the budget becomes their cache. The embedding
    stays on disk when streaming: a pass reads only its tokens' rows.

    The table gives, for each model and a few budgets on the CPU (bf16 compute), whether everything is
    resident, and otherwise the bytes a decoded token reads from disk: the worst case (no expert found in
    the cache) and the estimate for a cache used uniformly (real routing is skewed, so a real cache does
    better than uniform).
    '''),
    code(r'''
    let budgets = ["8GiB", "24GiB", "128GiB"];
    let mut headers: Vec<String> = vec!["model".into()];
    headers.extend(budgets.iter().map(|b| format!("budget {b}")));
    let mut plans: Table = Table::new(headers).caption("Disk bytes per decoded token: no cache hits / uniformly used cache");
    for (name, c) in &published {
        let mut row: Vec<Cell> = vec![(*name).into()];
        let mut smaller_budget: (u64, u64) = (u64::MAX, u64::MAX); // (no hits, uniform cache) at the previous budget
        for b in budgets {
            let o = PlanOptions { memory_budget: b.parse()?, kind: Kind::BFloat16, ..Default::default() };
            row.push(Cell::text(match Plan::for_config(c, Kind::BFloat16, &o) {
                Ok(p) if !p.streaming() => {
                    smaller_budget = (0, 0);
                    "all resident".to_string()
                }
                Ok(p) => {
                    let (none, uniform) = (p.traffic(1, false).disk, p.traffic(1, true).disk);
                    // the text below: a larger budget never reads more, and a cache never reads more than none
                    assert!(none <= smaller_budget.0 && uniform <= smaller_budget.1 && uniform <= none, "{name} at {b}: revise the text");
                    smaller_budget = (none, uniform);
                    format!("{} / {}", human_bytes(none), human_bytes(uniform))
                }
                Err(e) => format!("does not load: {e}"),
            }));
        }
        plans.add_row(row)?;
    }
    plans
    '''),
    md(r'''
    **What to notice.** Each entry is what one decoded token reads from disk: with no expert found in the
    cache, then with a cache used uniformly. Read a row left to right: a larger budget never reads more
    (the cell checks it). The budget first goes to the weights every pass reads, which lowers the first
    figure; what is left becomes the expert cache, which lowers only the second, by the share of the
    experts it holds. Where the two figures are about equal, the budget left almost no room for a cache
    (the next cell shows DeepSeek-V3's case). This is the MoE trade at inference: a token computes with
    its active parameters only, but once the model does not fit, what it reads from disk follows the
    experts it is routed to.
    '''),
    md(r'''
    DeepSeek-V3 under 8 GiB in detail: one row per part, where it lives, and what it takes in memory.
    '''),
    code(r'''
    let v3 = deepscope::model::published::deepseek_v3()?;
    let v3_plan = Plan::for_config(&v3, Kind::BFloat16, &PlanOptions { memory_budget: "8GiB".parse()?, kind: Kind::BFloat16, ..Default::default() })?;
    {
        let experts: u64 = v3_plan.rows().iter().filter(|r| r.part == "routed experts").map(|r| r.stored).sum();
        println!("routed experts: {:.1}% of the bytes stored", 100.0 * experts as f64 / v3_plan.stored_bytes() as f64);
        // the text below: nearly all of the checkpoint is routed experts, and a token of a
        // 32-token prefill reads less than half of what a decoded token reads
        assert!(experts as f64 > 0.9 * v3_plan.stored_bytes() as f64, "revise the text");
        assert!(2 * (v3_plan.traffic(32, false).disk / 32) < v3_plan.traffic(1, false).disk, "revise the text");
        let rows = v3_plan.rows();
        let resident: Vec<usize> = rows.iter().filter(|r| r.part == "attention" && r.memory > 0).flat_map(|r| r.layers.clone()).collect();
        let mut split: Vec<usize> = rows.iter().filter(|r| r.part == "attention" && r.memory == 0)
            .flat_map(|r| r.layers.clone()).filter(|l| resident.contains(l)).collect();
        split.sort();
        split.dedup();
        println!("layers whose attention weights are partly resident, partly on disk: {split:?}");
        // the text below: the budget runs out inside some layers' attention
        assert!(!split.is_empty(), "revise the text");
    }
    v3_plan
    '''),
    md(r'''
    **What to notice.** Nearly all of what DeepSeek-V3 stores is routed experts (the cell prints the
    share and checks it is over 90%), and a token uses only `num_experts_per_tok` of each layer's 256.
    Under 8 GiB the plan keeps what every pass reads resident as far as it fits: norms and routers,
    then attention, the dense MLPs and shared experts of the first layers (the `layers` column); the
    later layers' attention and shared experts and the `lm_head` are read from disk by every pass. The
    plan places weight by weight, in layer order, and a layer's attention is several matrices: where the
    budget runs out, some of a layer's matrices still fit and others do not (a smaller one after a
    larger one may still fit), so those layers appear in both the resident and the disk row of
    attention (the cell prints which). The `cpu:` line shows what is left for the expert cache. A
    token of a 32-token prefill reads less than half of what a decoded token reads (checked): the pass
    reads each dense weight once for all its tokens, and its tokens share many experts.
    '''),
    md(r'''
    ## 3. The checkpoint

    The one named by `DEEPSCOPE_REAL_CHECKPOINT`, or a synthetic one written now (kept in the temporary
    folder, so the next run reuses it).
    '''),
    code(r'''
    let real_device: Device = deepscope::model::parse_device(&std::env::var("DEEPSCOPE_REAL_DEVICE").unwrap_or_else(|_| "cpu".to_string()))?;
    let real_given: Option<PathBuf> = std::env::var_os("DEEPSCOPE_REAL_CHECKPOINT").map(PathBuf::from).filter(|d| d.join("config.json").is_file());
    let synthetic = real_given.is_none();
    let real_dir: PathBuf = match real_given {
        Some(dir) => dir,
        None => {
            let dir = std::env::temp_dir().join("deepscope-synth-v2-lite-2-layers");
            if !dir.join("model.safetensors.index.json").is_file() {
                let started = std::time::Instant::now();
                let (v2_lite, _) = deepscope::model::published::by_name("deepseek-v2-lite")?;
                let opts = deepscope::model::synth::SynthOptions {
                    layers: Some(2), dtype: deepscope::model::synth::SynthDtype::Bf16, seed: 1, shard_bytes: 1 << 30 };
                let r = deepscope::model::synth::synth(&v2_lite, &dir, &opts, |_, _, _| {})?;
                println!("wrote {} ({} in {} shards) in {:.0} s", dir.display(), human_bytes(r.bytes), r.shards.len(),
                    started.elapsed().as_secs_f64());
            }
            dir
        }
    };
    let real_config = Config::from_dir(&real_dir)?;
    println!("{}: {:?} family, {} layers ({} MoE), {} routed experts per MoE layer",
        real_dir.display(), real_config.family, real_config.num_hidden_layers, real_config.moe_layers().len(), real_config.n_routed_experts);
    '''),
    md(r'''
    ## 4. A load under a budget smaller than the checkpoint

    `Model::plan(dir, &options)` reads only the safetensors headers and says where every weight will go;
    `Model::load` follows that plan exactly. Without `DEEPSCOPE_REAL_BUDGET`, the budget is half of
    what the synthetic checkpoint stores, so that part of it has to stream (for a checkpoint you
    downloaded it is `auto`: what this machine has available, less a margin).
    '''),
    code(r'''
    let stored_bytes = Model::plan(&real_dir, &LoadOptions { memory_budget: MemoryBudget::Unlimited, ..LoadOptions::new(real_device, Kind::BFloat16) })?.stored_bytes();
    let budget: MemoryBudget = match std::env::var("DEEPSCOPE_REAL_BUDGET") {
        Ok(b) => b.parse()?,
        Err(_) if synthetic => MemoryBudget::Bytes(stored_bytes / 2),
        Err(_) => MemoryBudget::Auto,
    };
    let real_opts = LoadOptions { memory_budget: budget, ..LoadOptions::new(real_device, Kind::BFloat16) };
    let real_plan = Model::plan(&real_dir, &real_opts)?;
    println!("budget {budget} for {} stored: {}", human_bytes(stored_bytes),
        if real_plan.streaming() { "streaming" } else { "everything resident" });
    if synthetic && std::env::var_os("DEEPSCOPE_REAL_BUDGET").is_none() {
        // the text below: only the embedding and the routed experts stay on disk, and their cache
        // holds part of the experts (the uniform-cache estimate is below the no-hit figure)
        let mut on_disk: Vec<&str> = real_plan.rows().iter().filter(|r| r.memory == 0).map(|r| r.part).collect();
        on_disk.sort();
        on_disk.dedup();
        assert_eq!(on_disk, ["embed_tokens", "routed experts"], "revise the text");
        assert!(real_plan.traffic(1, true).disk < real_plan.traffic(1, false).disk, "revise the text");
    }
    real_plan
    '''),
    code(r'''
    let started = std::time::Instant::now();
    let real: Model = Model::load(&real_dir, real_opts.clone())?;
    println!("loaded in {:.1} s", started.elapsed().as_secs_f64());
    for note in &real.load_notes {
        println!("note: {note}");
    }
    real
    '''),
    md(r'''
    **What to notice.** With the synthetic checkpoint and its half budget, the plan keeps resident what
    every pass reads (norms, attention, the dense MLP, the shared experts, `lm_head`) and leaves two
    parts on disk (the cell checks it): the embedding, of which a pass reads only its tokens' rows, and
    the routed experts, with the rest of the budget as their cache (the `cpu:` line). That cache holds
    only part of the experts, so the plan's estimate for a uniformly used cache is below its figure with
    no hits (checked). The load notes say what the load kept resident and what it will read as passes
    need it. With a checkpoint of your own, the same lines say where its weights went under your budget.
    '''),
    md(r'''
    ## 5. A trace, and what it cost

    Every pass records its cost (`trace.cost`, `ForwardOutput::cost`): time, bytes read from disk, and
    the expert cache's hits, misses and evictions (counted per expert weight: each routed expert is two,
    `gate_up_proj` and `down_proj`). The prompt is the tokenizer's encoding of a sentence when the
    checkpoint has a `tokenizer.json`, else fixed token ids.

    The cache keeps what a pass uses while there is room, and a pass never evicts what it has itself
    used: when one pass needs more experts than fit, the overflow is read and dropped. A second trace of
    the same prompt then finds the expert weights the first one kept (the cell prints how many), less
    any that its own misses displaced, least recently used first.
    '''),
    code(r'''
    const REAL_PROMPT: &str = "The capital of France is Paris. The capital of Japan is";
    let real_ids: Vec<i64> = if real.tokenizer.is_some() {
        real.encode(REAL_PROMPT)?
    } else {
        (0..16).map(|i| (i * 7919 + 13) % real.config.vocab_size as i64).collect()
    };
    let first = real.trace_with(real_ids.clone(), &Capture::routing_only(), &Interventions::new())?;
    let (_, _, kept) = real.streamer.as_ref().map_or((0, 0, 0), |s| s.cache_usage(real.device));
    println!("expert weights in the cache after the first trace: {kept}");
    let second = real.trace_with(real_ids.clone(), &Capture::routing_only(), &Interventions::new())?;
    let mut costs: Table = Table::new(["pass", "seconds", "loading", "read from disk", "expert hits", "misses", "evictions"])
        .caption(format!("Two traces of the same {} tokens", real_ids.len()));
    for (name, c) in [("first", &first.cost), ("second", &second.cost)] {
        let t = &c.traffic;
        costs.add_row([name.into(), Cell::number(c.seconds, 2), Cell::number(t.load_seconds, 2), human_bytes(t.disk_bytes).into(),
            t.expert_hits.to_string().into(), t.expert_misses.to_string().into(), t.expert_evictions.to_string().into()])?;
    }
    if first.cost.traffic.disk_bytes > 0 {
        // streaming: the second pass finds experts the first one kept, and reads less
        assert!(second.cost.traffic.expert_hits > 0 && second.cost.traffic.disk_bytes < first.cost.traffic.disk_bytes);
    }
    costs
    '''),
    md(r'''
    **What to notice.** When the model streams, the second trace of the same tokens has expert hits
    and reads less from disk than the first (the cell checks both); its remaining misses are experts
    the cache had no room to keep. The "loading" column is the part of each pass spent waiting for
    reads.
    '''),
    md(r'''
    Streaming changes where the weights live, not the numbers: the same prompt through a fully resident
    load (when it fits in this machine's memory) gives the same logits and the same experts.
    '''),
    code(r'''
    let resident_plan = Model::plan(&real_dir, &LoadOptions { memory_budget: MemoryBudget::Auto, ..real_opts.clone() })?;
    if resident_plan.streaming() {
        println!("skipped: the whole checkpoint does not fit in this machine's available memory");
    } else {
        let resident = Model::load(&real_dir, LoadOptions { memory_budget: MemoryBudget::Auto, ..real_opts.clone() })?;
        let again = resident.trace_with(real_ids.clone(), &Capture::routing_only(), &Interventions::new())?;
        let diff = (&again.logits - &first.logits).abs().max().double_value(&[]);
        let layer = *real.config.moe_layers().last().unwrap();
        let same = again.routing_of(layer)?.topk_indices.sort(-1, false).0.equal(&first.routing_of(layer)?.topk_indices.sort(-1, false).0);
        println!("resident vs streamed: max |logit difference| = {diff:e}; same experts in layer {layer}: {same}");
    }
    '''),
    md(r'''
    The routing of the last MoE layer: which of its experts each token went to, the experts the reads
    above brought in.
    '''),
    chart(r'''
    let routing_figure = {
        let map = first.routing_map()?;
        let (l, weights) = map.layers.last().unwrap();
        Heatmap::new(weights)
            .y_labels(map.tokens.iter().map(|s| deepscope::plot::readable_token(s)))
            .title(format!("Routing weights, layer {l} (tokens x {} experts)", real.config.n_routed_experts))
            .x_title("expert")
            .y_title("token")
            .value_name("weight")
            .render()?
    };
    if synthetic && real_plan.streaming() && real.config.moe_layers().len() == 1 {
        // the text below: with one MoE layer, the experts in this map are exactly the ones the first trace looked up
        let r = first.routing_of(real.config.moe_layers()[0])?;
        let mut used: Vec<i64> = Vec::<i64>::try_from(r.topk_indices.flatten(0, -1))?;
        used.sort();
        used.dedup();
        let looked_up = first.cost.traffic.expert_hits + first.cost.traffic.expert_misses;
        println!("{} distinct experts in the map; the first trace looked up {looked_up} expert weights", used.len());
        assert_eq!(2 * used.len() as u64, looked_up, "revise the text");
    }
    routing_figure
    '''),
    md(r'''
    **What to notice.** Tokens down, experts across, colour the routing weight: each row has
    `num_experts_per_tok` coloured cells. Each column that lights up at least once is an expert the
    first trace had to have. With the synthetic checkpoint's single MoE layer, streamed, those columns
    are exactly what the first trace looked up, two weights per expert (the cell counts both and
    checks). The
    synthetic router's weights are random, so which columns light up means nothing else here. On a real
    checkpoint, a column lit by many tokens is an expert that the cache pays off for.
    '''),
    md(r'''
    ## 6. Decoding: the cache at work

    Greedy decoding, one token per pass over the compressed KV cache. A decoded token reads the
    weights the plan left on disk and the experts it is routed to that are not in the cache; the table
    shows each step's cost.
    '''),
    code(r'''
    let mut kv = real.new_cache();
    let prompt = Tensor::from_slice(&real_ids).view([1, -1]);
    let out = real.forward_with(&prompt, Some(&mut kv), ForwardOptions::default())?;
    let mut next = out.logits.select(1, -1).argmax(-1, true);
    let mut steps: Table = Table::new(["step", "token", "ms", "read from disk", "expert hits", "misses"]).caption("Greedy decoding under the budget");
    let mut read_by_misses: Vec<(u64, u64)> = Vec::new();
    for step in 0..6 {
        let out = real.forward_with(&next, Some(&mut kv), ForwardOptions::default())?;
        let t = out.cost.traffic;
        steps.add_row([step.to_string().into(), next.int64_value(&[0, 0]).to_string().into(), Cell::number(1e3 * out.cost.seconds, 0),
            human_bytes(t.disk_bytes).into(), t.expert_hits.to_string().into(), t.expert_misses.to_string().into()])?;
        read_by_misses.push((t.expert_misses, t.disk_bytes));
        next = out.logits.select(1, -1).argmax(-1, true);
    }
    // more misses, more bytes read: the step's other reads are the same every step
    read_by_misses.sort();
    assert!(read_by_misses.windows(2).all(|w| w[0].0 == w[1].0 || w[0].1 <= w[1].1));
    {
        let per_miss: Vec<f64> = read_by_misses.iter().filter(|r| r.0 > 0).map(|r| r.1 as f64 / r.0 as f64).collect();
        println!("bytes read per miss, step by step (sorted by misses): {}",
            per_miss.iter().map(|b| human_bytes(*b as u64)).collect::<Vec<_>>().join(", "));
        if synthetic && std::env::var_os("DEEPSCOPE_REAL_BUDGET").is_none() {
            // the text below: in this plan a step reads one expert's bytes per miss and nothing constant besides
            let (lo, hi) = per_miss.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
            assert!(!per_miss.is_empty() && hi < 1.01 * lo, "revise the text");
        }
    }
    steps
    '''),
    md(r'''
    **What to notice.** The bytes a step reads rise with its misses (the cell checks that, sorted by
    misses, the reads never fall): what a decoded token costs is decided by which experts it is routed
    to and whether the cache holds them. With the synthetic checkpoint and its default budget, the reads
    are in proportion to the misses: every step reads the same bytes per miss, one expert's weights
    (the cell prints them and checks they agree within 1%), and nothing else worth counting. In this
    plan nothing dense is left on disk but the embedding, of which a step reads one row. A constant part
    per step appears only where dense weights stream, as in section 2's DeepSeek-V3 plan under 8 GiB,
    whose later layers' attention and shared experts every decoded token reads from disk.
    '''),
    md(r'''
    The model's own display sums up the weights in memory and all the traffic so far:
    '''),
    code(r'''
    real
    '''),
    md(r'''
    ## 7. Routing at serving scale: an engine's record

    Questions about routing over millions of tokens are answered where the model is served, by an engine
    that already records expert choices. DeepScope reads those records into the same `RoutingStats` a
    local corpus run produces (notebook 02), so the same tables, charts and methods apply:

    - **SGLang**, `--expert-distribution-recorder-mode` `stat` (expert load per pass), `per_pass`
      (physical expert counts per pass and rank) or `per_token` (every token's experts in every layer),
      dumped by `/dump_expert_distribution_record`: `RoutingStats::from_sglang`;
    - **SGLang**, per request with `return_routed_experts`: `RoutingStats::from_routed_experts`;
    - **vLLM**, the expert load of its EPLB state: `RoutingStats::from_vllm`.

    Engines that replicate busy experts record *physical* experts; the record's physical-to-logical map
    turns them back into the model's experts. Ranks that recorded the same pass (tensor parallelism) are
    counted once.

    **Which record.** With `DEEPSCOPE_ROUTING_RECORD` set to a folder of SGLang dumps, the cells read
    those. Without it they read a **synthetic** `per_token` dump that `make lab` writes
    (`tests/gen_routing_records.py`): SGLang's exact structure and DeepSeek-V3's shape (61 layers, the
    first 3 dense, 256 experts, 32 redundant replicas, two ranks), with expert choices drawn at random
    from skewed per-layer popularities. Its numbers describe that generator, not DeepSeek-V3.
    '''),
    code(r'''
    use deepscope::inspect::import::{EplbOptions, ImportOptions};
    let record_given = std::env::var_os("DEEPSCOPE_ROUTING_RECORD").map(PathBuf::from);
    let record_dir: PathBuf = record_given.clone().unwrap_or_else(|| PathBuf::from("../target/records/sglang_per_token"));
    let mut record_files: Vec<PathBuf> = std::fs::read_dir(&record_dir)
        .map_err(|e| deepscope::Error::Input(format!("{}: {e} (run `make records`, or set DEEPSCOPE_ROUTING_RECORD)", record_dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pt"))
        .collect();
    record_files.sort();
    let served = RoutingStats::from_sglang(&record_files, &v3, &ImportOptions::default().token_layers([3]))?;
    println!("{} file(s), {} tokens, MoE layers {}..={}", record_files.len(), served.tokens,
        served.layers()[0], served.layers().last().unwrap());
    '''),
    md(r'''
    The load of every expert in every MoE layer, as a multiple of its layer's mean (a heatmap, since 58 x
    256 bars would not read), and the imbalance per layer:
    '''),
    chart(r'''
    served
    '''),
    md(r'''
    **How much of that imbalance is just too few tokens?** With k of E experts per token, a layer's mean
    load is tokens x k / E. When that is small, even perfectly even routing leaves some experts with
    several times the mean by chance. The cell draws uniform routing of the same number of tokens 200
    times and reports its max/mean next to the record's: an imbalance close to the uniform figure says
    nothing about the router, only about the sample size.
    '''),
    code(r'''
    let uniform_max_over_mean = {
        let (n, e, k) = (served.tokens as i64, v3.n_routed_experts as i64, v3.num_experts_per_tok as i64);
        deepscope::tch::manual_seed(0);
        let mut sum = 0.0;
        for _ in 0..200 {
            let picks = Tensor::rand([n, e], (Kind::Float, Device::Cpu)).topk(k, -1, true, false).1.flatten(0, -1);
            let load = picks.bincount::<Tensor>(None, e).to_kind(Kind::Double);
            sum += (load.max() / load.mean(Kind::Double)).double_value(&[]);
        }
        sum / 200.0
    };
    let record_mean: f64 = served.layers().iter().map(|&l| served.imbalance(l).map(|i| i.max_over_mean)).sum::<deepscope::Result<f64>>()?
        / served.layers().len() as f64;
    println!("mean load per expert and layer: {:.1} token-slots", served.tokens as f64 * v3.num_experts_per_tok as f64 / v3.n_routed_experts as f64);
    println!("max / mean, record (mean over layers): {record_mean:.2}");
    println!("max / mean, uniform routing of as many tokens: {uniform_max_over_mean:.2}");
    if record_given.is_none() {
        // the text below: at the synthetic record's size even uniform routing is far from even,
        // and the record is more than twice as uneven as that
        assert!(uniform_max_over_mean > 1.5 && record_mean > 2.0 * uniform_max_over_mean, "revise the text");
    }
    '''),
    md(r'''
    **What to notice.** The first line is the mean load per expert. When it is a few token-slots, as in
    the synthetic record, chance alone makes some expert several times busier than the mean, and uniform
    routing's max/mean (the last line) is far above 1. The synthetic record's own figure is more than
    twice the uniform one (the cell checks both), so part of its imbalance is the generator's skewed
    popularities, not sample size alone. At this sample size, though, neither figure is a balance
    measurement to quote. With a record of your own, the same two lines say how much of its imbalance
    the router made.
    '''),
    md(r'''
    The floor falls as the record grows. The same simulation at a few token counts (20 draws each, from
    another seed than the 200 draws above, so the 143-token row differs a little from the figure above:
    that difference is the simulation's own noise):
    '''),
    code(r'''
    let floor_rows: Vec<(i64, f64)> = {
        let (e, k) = (v3.n_routed_experts as i64, v3.num_experts_per_tok as i64);
        deepscope::tch::manual_seed(1);
        [143i64, 1_000, 10_000, 100_000].iter().map(|&n| {
            let mut sum = 0.0;
            for _ in 0..20 {
                let picks = Tensor::rand([n, e], (Kind::Float, Device::Cpu)).topk(k, -1, true, false).1.flatten(0, -1);
                let load = picks.bincount::<Tensor>(None, e).to_kind(Kind::Double);
                sum += (load.max() / load.mean(Kind::Double)).double_value(&[]);
            }
            (n, sum / 20.0)
        }).collect()
    };
    let mut floor: Table = Table::new(["tokens", "mean load per expert", "max / mean of uniform routing"])
        .caption("The sampling floor of max / mean at DeepSeek-V3's 256 experts, top-8");
    for (n, m) in &floor_rows {
        floor.add_row([(*n).into(), Cell::number(*n as f64 * 8.0 / 256.0, 1), Cell::number(*m, 3)])?;
    }
    // the floor falls with every tenfold increase in tokens
    assert!(floor_rows.windows(2).all(|w| w[1].1 < w[0].1));
    floor
    '''),
    md(r'''
    ### Next to a local run

    The tiny model over held-out text, counted by `model.routing_stats` as in notebook 02, gives the same
    kind of object; one table puts the two side by side.
    '''),
    code(CORPUS_HELPERS, r'''
    use deepscope::train::corpus::{Corpus, CorpusSources, Domain};
    let tiny = Model::load_default()?;
    let mut local = RoutingStats::default();
    {
        let held: Vec<(Domain, String)> = heldout_docs();
        let docs: Vec<String> = Domain::ALL.iter().flat_map(|&d| sample(&held, d, 3000)).collect();
        let refs: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
        tiny.routing_stats(&refs, &mut local, CorpusRun::default())?;
    }
    let mut side: Table = Table::new(["", "MoE layers", "experts", "top-k", "tokens", "mean max/mean", "worst max/mean", "mean entropy / max"])
        .caption("A served record and a local run, in the same statistics");
    for (name, s, c) in [("record (SGLang per_token)", &served, &v3), ("tiny model, held-out text", &local, &tiny.config)] {
        let imb: Vec<_> = s.layers().iter().map(|&l| s.imbalance(l)).collect::<deepscope::Result<_>>()?;
        let n = imb.len() as f64;
        side.add_row([name.into(), s.layers().len().into(), s.num_experts.into(), c.num_experts_per_tok.into(), s.tokens.into(),
            Cell::number(imb.iter().map(|i| i.max_over_mean).sum::<f64>() / n, 2),
            Cell::number(imb.iter().map(|i| i.max_over_mean).fold(0.0, f64::max), 2),
            Cell::number(imb.iter().map(|i| i.normalized_entropy).sum::<f64>() / n, 3)])?;
        println!("{name}: mean load per expert and layer {:.1} token-slots",
            s.tokens as f64 * c.num_experts_per_tok as f64 / s.num_experts as f64);
    }
    side
    '''),
    md(r'''
    **What to notice.** The two rows are the same statistics at very different scales (with the
    synthetic record: many layers and experts but few tokens in one, few layers and experts but many
    tokens in the other). Compare the mean loads per expert the cell prints before the max/mean
    columns: a max/mean measured over a few token-slots per expert sits on a high sampling floor (the
    table above), one measured over hundreds on a much lower one. So a gap between the two rows'
    max/mean says as much about sample size as about either router: compare routers at equal mean load
    per expert, or each against its own floor.
    '''),
    md(r'''
    ### Where the experts should live: EPLB

    The question a serving engineer asks next: with this load, how should experts be spread over GPUs,
    and which ones deserve a replica? DeepSeek's expert-parallel load balancer (EPLB, also used by SGLang
    and vLLM) packs expert groups onto nodes, gives redundant replicas to the experts with the most load
    per replica, and packs the replicas onto GPUs, each time heaviest first onto the lightest place with
    room. `stats.eplb(options)` computes that plan from any statistics (DeepScope's tests check it
    against SGLang's own implementation) and reports the busiest GPU's load over the mean, for the plan
    and for the static placement (GPU g holds the g-th contiguous block of E/G experts, no replicas).

    The deployment below is the prefill unit of the DeepSeek-V3 report: 4 nodes of 8 GPUs with 32
    redundant experts, the 256 experts in 8 groups. The first line counts the layers where the plan's
    busiest GPU carries less than the static placement's.
    '''),
    chart(r'''
    let served_plan = served.eplb(EplbOptions::new(32).nodes(4).groups(8).redundant(32))?;
    let better = served_plan.layers.values().filter(|p| p.balance() < p.balance_static()).count();
    println!("layers where the plan's busiest GPU is below the static placement's: {better} of {}", served_plan.layers.len());
    if record_given.is_none() {
        // the text below: for the synthetic record the plan beats the static placement in every layer
        assert_eq!(better, served_plan.layers.len(), "revise the text");
    }
    served_plan
    '''),
    md(r'''
    **What to notice.** Each row is one MoE layer: the busiest GPU's load over the mean under the static
    placement and under the plan (1 = every GPU equally busy), and the expert given the most replicas.
    For the synthetic record the plan's busiest GPU is below the static placement's in every layer (the
    first line; the cell checks it). The redundant slots go to the experts with the most load per
    replica, so a hot enough expert gets several (the last column). Replicas split a hot expert's
    tokens between GPUs; the static placement can only leave them where its block falls.
    '''),
    md(r'''
    The tiny model's local statistics plan the same way, here for 4 GPUs with 4 redundant experts and
    its own 4 groups; the chart shows one layer's GPUs, before and after:
    '''),
    chart(r'''
    let local_plan = local.eplb(EplbOptions::new(4).groups(tiny.config.n_group).redundant(4))?;
    println!("{local_plan}");
    // the text below: in every layer the plan's busiest GPU is below the static placement's
    assert!(local_plan.layers.values().all(|p| p.balance() < p.balance_static()), "revise the text");
    local_plan.layer_figure(local.layers()[0])?
    '''),
    md(r'''
    **What to notice.** The chart shows the first MoE layer: one pair of bars per GPU, its tokens under
    the static placement and under the plan, with each one's mean drawn across. The static placement
    puts the g-th block of experts on GPU g, which here is exactly group g, so a GPU's load is its
    group's load: whatever makes the router prefer some groups (notebook 02 found the domains doing it
    in the last layer) loads their GPUs. In every layer the plan's busiest GPU is below the static
    placement's (the table; the cell checks it): the plan gives the busiest experts a second replica
    and packs experts onto GPUs by load rather than by block.
    '''),
    md(r'''
    Which experts got the redundant slots? Each slot went, at its turn, to the expert with the most load
    per replica at that moment, so an expert with c replicas carried, with one replica fewer, at least
    as much load per replica as any expert carries in the end. The cell checks that in every layer of
    the tiny model's plan (one node, so one pool of slots):
    '''),
    code(r'''
    for (l, p) in &local_plan.layers {
        let load = &local.load[l];
        let final_max = (0..load.len()).map(|e| load[e] as f64 / p.count[e] as f64).fold(0.0, f64::max);
        for e in (0..load.len()).filter(|&e| p.count[e] > 1) {
            assert!(load[e] as f64 / (p.count[e] - 1) as f64 >= final_max);
        }
        let replicated: Vec<String> = (0..load.len()).filter(|&e| p.count[e] > 1).map(|e| format!("e{e} (load {}, x{})", load[e], p.count[e])).collect();
        let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
        println!("layer {l}: mean load {mean:.0}; replicated: {}", replicated.join(", "));
    }
    '''),
    md(r'''
    ## What to try next

    - `deepscope plan --model published:deepseek-v3 --memory-budget 8GiB` prints section 2's plan in a
      terminal; `--device cuda` plans for a GPU (experts that do not fit in its memory go to host memory
      and are copied over on demand), `--device-map balanced` splits the layers over several GPUs.
    - Set `DEEPSCOPE_REAL_BUDGET` lower and watch the disk reads and the cache hit rate change; with
      `DEEPSCOPE_REAL_CHECKPOINT` on a real download the hit rate is itself a routing statistic: how
      concentrated the experts a text uses are.
    - `deepscope import sglang DUMP_DIR --config published:deepseek-v3 --eplb 32,4,8,32 --out stats.json`
      reads a folder of SGLang dumps in a terminal (also `routed-experts` and `vllm`); the JSON loads back
      with `RoutingStats::load_from`.
    - `make bench-scale` measures streaming at real dimensions (the DeepSeek-V3 shape cut to 4 layers,
      and the whole DeepSeek-V2-Lite shape) against the disk's own read speed; the figures are in
      `docs/benchmarks.md`.
    - Any analysis of notebooks 02 to 05 runs on `real` as on the tiny model; keep inputs short and
      captures small (`Capture::routing_only()`, `Capture::none().with(point)`).

    ## Exercises

    <details><summary>1. In the record, single experts carry several times their layer's mean load, yet the
    static placement's busiest GPU is much closer to the mean. Why?</summary>

    A GPU holds a block of experts (256 / 32 = 8 here), so its load is a sum of several experts' loads and
    the extremes average out. Compare the record's mean max/mean per expert (printed under section 7) with
    the EPLB table's static max/mean per GPU.
    </details>

    <details><summary>2. How many tokens must a record of this shape hold before a max/mean of 1.3 says
    something about the router rather than about the sample?</summary>

    At least as many as the first row of the sampling-floor table whose uniform max/mean is below 1.3.
    Fewer tokens than that, and perfectly even routing would already look that uneven. Read the table
    rather than a rule of thumb: the floor depends on E and k.
    </details>

    <details><summary>3. Before running the last cells, predict which of the tiny model's experts get the
    4 redundant slots.</summary>

    The busiest ones, one slot at a time to whichever expert has the most load per replica at that moment.
    A second slot for the same expert needs its load per replica, once halved, to still lead every other
    expert. The replica check above prints the experts replicated in each layer with their loads, next to
    the layer's mean.
    </details>
    '''),
]


# ---------------------------------------------------------------------------
# 07: training dynamics
# ---------------------------------------------------------------------------

TRAINING = [
    md(r'''
    # Training dynamics: how the router learns to balance

    DeepSeek-V3 keeps its experts' loads even without an auxiliary loss: after each training step, every
    expert's routing bias moves by a fixed step $\gamma$, up for experts that took fewer tokens than the
    mean, down for those that took more (the bias only affects *which* experts are chosen, not their
    weights). It adds a small sequence-wise balance loss (weight $\alpha$) against extreme imbalance
    inside one sequence. This notebook reads how that played out in the shipped model's training logs,
    then retrains the same architecture from scratch for a few steps, four ways, and watches the
    balance as it trains:

    1. the shipped model's logs: loss, load max/mean, sequence balance, held-out bits per byte;
    2. four short retrains: $\gamma$ = 0.01 (the shipped setting), $\gamma$ = 0 (no balancing),
       $\gamma$ = 0.001 (DeepSeek-V3's value), and no bias but a sequence-wise loss; and what balance
       cost in loss;
    3. the bias moving in steps of exactly $\gamma$;
    4. why this model uses a larger $\gamma$ than DeepSeek-V3.

    **Measures.** *Load max/mean* is the busiest expert's share of the routed tokens over the mean share,
    in one training batch, averaged over the MoE layers (1 = perfectly even). *Sequence balance* is the same idea inside each sequence,
    as the sequence-wise loss measures it (1 = even).
    '''),
    code(r'''
    use deepscope::plot::{Cell, LineChart};
    use deepscope::train::corpus::{Corpus, CorpusSources};
    use deepscope::train::data::TrainStream;
    use deepscope::train::trainer::{TrainSettings, Trainer};
    use std::collections::HashMap;

    /// The rows of a CSV log, each as column name -> text.
    fn read_csv(path: &std::path::Path) -> Result<Vec<HashMap<String, String>>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Input(format!("reading {}: {e}", path.display())))?;
        let mut lines = text.lines();
        let header: Vec<String> = lines.next().unwrap_or_default().split(',').map(str::to_string).collect();
        Ok(lines.map(|l| header.iter().cloned().zip(l.split(',').map(str::to_string)).collect()).collect())
    }
    /// One numeric column.
    fn column(rows: &[HashMap<String, String>], name: &str) -> Vec<f64> {
        rows.iter().filter_map(|r| r.get(name)?.parse().ok()).collect()
    }
    /// Means of consecutive windows of `w` values.
    fn window_means(xs: &[f64], w: usize) -> Vec<f64> {
        xs.chunks(w).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect()
    }
    fn mean(xs: &[f64]) -> f64 {
        xs.iter().sum::<f64>() / xs.len().max(1) as f64
    }

    let model_dir = deepscope::model::model::default_model_dir();
    let train_log = read_csv(&model_dir.join("train_log.csv"))?;
    let eval_log = read_csv(&model_dir.join("eval_log.csv"))?;
    let loss = column(&train_log, "loss");
    let load = column(&train_log, "load_max_over_mean");
    let seq_bal = column(&train_log, "seq_balance");
    println!("{} logged steps; {} held-out evaluations", loss.len(), eval_log.len());
    '''),
    md(r'''
    ## 1. The shipped model's training

    The log has one row per step. The chart shows means over windows of 50 steps, so that each point is
    not one batch's noise.
    '''),
    chart(r'''
    let w = 50;
    let steps_axis: Vec<f64> = (0..loss.len().div_ceil(w)).map(|i| (i * w) as f64).collect();
    let fig: Figure = LineChart::new()
        .title("Shipped model: load max/mean and sequence balance per step (means of 50 steps)")
        .x_title("step")
        .y_title("ratio (1 = even)")
        .series_xy("load max/mean", &steps_axis, &window_means(&load, w))
        .series_xy("sequence balance", &steps_axis, &window_means(&seq_bal, w))
        .render()?;
    fig
    '''),
    code(r'''
    let early_peak = window_means(&load[..load.len().min(500)], w).into_iter().fold(0.0, f64::max);
    let last_load = mean(&load[load.len() - 500..]);
    let (first_loss, last_loss) = (mean(&loss[..50]), mean(&loss[loss.len() - 50..]));
    println!("load max/mean: highest 50-step mean in the first 500 steps {early_peak:.2}; mean of the last 500 steps {last_load:.2}");
    println!("loss: {first_loss:.2} over the first 50 steps, {last_loss:.2} over the last 50");
    assert!(last_load < early_peak && last_loss < first_loss);
    {
        let first = &load[..load.len().min(60)];
        let (peak_step, peak) = first.iter().copied().enumerate().fold((0, f64::MIN), |b, (i, x)| if x > b.1 { (i, x) } else { b });
        println!("load max/mean of each of the first {} steps: {first:.2?}", first.len());
        println!("step 0: {:.2}; highest of these: {peak:.2} at step {peak_step}", first[0]);
        // the text below: the raw load rises within the first steps, before the bias pulls it down
        assert!(peak > 1.3 * first[0], "no early rise in the raw load: revise the text");
    }
    '''),
    md(r'''
    **What to notice.** Load imbalance rises in the first few dozen steps, while the router's scores are
    still close to random and a few experts happen to win, and the bias then pulls it back down. The
    rise is too quick for the chart, whose first point already averages the first 50 steps, so the
    cell prints the raw values of the first 60 steps. It checks both parts: the highest of those steps
    is well above step 0's value, and the last 500 steps are more even than the worst early 50-step
    stretch. (A batch holds 16 sequences of 256 tokens, so even perfectly balanced routing shows some
    max/mean above 1: the last 500 steps' figure is not all router.)

    The held-out text was scored every 500 steps, per domain, in bits per byte (lower is better). Each
    of these evaluations scores only the first few held-out documents of each domain (the cell prints
    how many tokens), with the weights as they were during training (f32). The model card's figures,
    which the other notebooks cite, score every held-out document with the shipped bf16 weights, so
    the curves' last points are not the card's figures:
    '''),
    chart(r'''
    let mut domains: Vec<String> = eval_log.iter().filter_map(|r| r.get("domain").cloned()).collect();
    domains.sort();
    domains.dedup();
    let mut chart = LineChart::new().title("Held-out bits per byte during training").x_title("step").y_title("bits per byte");
    let mut improved = Vec::new();
    let mut curves: Vec<(String, Vec<f64>)> = Vec::new();
    let mut eval_tokens: Vec<f64> = Vec::new();
    for d in &domains {
        let rows: Vec<HashMap<String, String>> = eval_log.iter().filter(|r| r.get("domain") == Some(d)).cloned().collect();
        let (steps, bpb) = (column(&rows, "step"), column(&rows, "bits_per_byte"));
        improved.push((d.clone(), bpb[0], *bpb.last().unwrap_or(&bpb[0])));
        eval_tokens.push(column(&rows, "tokens").last().copied().unwrap_or(0.0));
        chart = chart.series_xy(d.clone(), &steps, &bpb);
        curves.push((d.clone(), bpb));
    }
    for ((d, first, last), tokens) in improved.iter().zip(&eval_tokens) {
        println!("{d}: {first:.3} -> {last:.3} bits per byte, scoring {tokens} held-out tokens each time");
    }
    assert!(improved.iter().all(|(_, first, last)| last < first));
    {
        let curve = |name: &str| curves.iter().find(|(d, _)| d == name).map(|(_, v)| v.clone()).unwrap_or_default();
        let (bible, fortunes, jargon) = (curve("bible"), curve("fortunes"), curve("jargon"));
        let gain = |v: &Vec<f64>| v[0] - v[v.len() - 1];
        // the text below: at every evaluation the Bible is the easiest domain and the fortunes the
        // hardest, and the Jargon File gains the most from the first evaluation to the last
        assert!(!bible.is_empty() && bible.len() == fortunes.len() && bible.len() == jargon.len(), "the three domains' evaluations differ");
        assert!((0..bible.len()).all(|i| bible[i] < jargon[i] && jargon[i] < fortunes[i]), "revise the text");
        assert!(gain(&jargon) > gain(&bible) && gain(&jargon) > gain(&fortunes), "revise the text");
    }
    let bpb_chart: Figure = chart.render()?;
    bpb_chart
    '''),
    md(r'''
    **What to notice.** Training steps run along the x axis, held-out bits per byte up the y axis, one
    line per domain. Every domain ends lower than it started (the cell prints first and
    last and checks). The order of the lines never changes: the Bible is the easiest text at every
    evaluation and the fortunes the hardest (checked), plausibly because short, unrelated fortunes give
    the model the least context to predict from. The Jargon File gains the most between the first
    evaluation and the last (checked).
    '''),
    md(r'''
    ## 2. Four short retrains

    The same architecture, from the same random initialisation and on the same batches, trained for 80
    steps of 8 sequences of 128 tokens, four ways. Everything but the balancing is identical, so the
    differences are the balancing's. The chart under the cell redraws every 10 steps while it trains
    (a live output area; the stop button ends the run between steps). Expect a few minutes on two cores.
    '''),
    code(r'''
    let tok = deepscope::model::Tokenizer::from_file(&model_dir.join("tokenizer.json"))?;
    let corpus = Corpus::load(&CorpusSources::default())?;
    let eos = tok.token_id("<|eos|>").ok_or_else(|| Error::Input("the tokenizer has no <|eos|>".into()))?;
    let stream = TrainStream::new(&tok, &corpus, eos)?;
    let cfg = deepscope::train::tiny_config(tok.inner.get_vocab_size(true));
    let steps: u64 = 80;
    let variants: Vec<(&str, f64, f64)> = vec![
        ("gamma 0.01 (shipped)", 0.01, 0.0),
        ("gamma 0 (no balancing)", 0.0, 0.0),
        ("gamma 0.001 (DeepSeek-V3)", 0.001, 0.0),
        ("no bias, sequence loss alpha 0.01", 0.0, 0.01),
    ];
    /// One retrain's per-step figures.
    struct Run { name: String, loss: Vec<f64>, load: Vec<f64>, seq_bal: Vec<f64>, bias_steps: Vec<f64> }
    let live = widgets::Output::new();
    show(&live);
    let mut progress = Progress::new("steps", steps * variants.len() as u64);
    let mut runs: Vec<Run> = Vec::new();
    for (name, gamma, alpha) in &variants {
        let dir = std::env::temp_dir().join(format!("deepscope-retrain-{}-{}", std::process::id(), runs.len()));
        deepscope::train::checkpoint::init_checkpoint(&cfg, &dir, 0.02, 0)?;
        std::fs::copy(model_dir.join("tokenizer.json"), dir.join("tokenizer.json")).map_err(|e| Error::Input(e.to_string()))?;
        let m = Model::load(&dir, LoadOptions::new(Device::Cpu, Kind::Float))?;
        let settings = TrainSettings { steps, batch_size: 8, seq_len: 128, warmup_steps: 10, bias_update_rate: *gamma, seq_balance_alpha: *alpha, ..Default::default() };
        let mut trainer = Trainer::new(&m, settings.clone())?;
        let last_moe = *m.config.moe_layers().last().unwrap_or(&1);
        let bias_of = |m: &Model| -> Option<Tensor> { m.layers[last_moe].moe()?.gate.e_score_correction_bias.as_ref().map(|b| b.copy()) };
        let mut run = Run { name: name.to_string(), loss: vec![], load: vec![], seq_bal: vec![], bias_steps: vec![] };
        for step in 0..steps {
            check_interrupt()?;
            let before = bias_of(&m);
            let (x, y) = stream.batch(0, step, settings.batch_size, settings.seq_len)?;
            let st = trainer.step(&x, &y)?;
            if let (Some(b0), Some(b1)) = (before, bias_of(&m)) {
                // the largest and smallest change of any expert's bias in this step
                let d = (&b1 - &b0).abs();
                run.bias_steps.push(d.max().double_value(&[]));
                run.bias_steps.push(d.min().double_value(&[]));
            }
            run.loss.push(st.loss);
            run.load.push(st.load_max_over_mean);
            run.seq_bal.push(st.seq_balance);
            progress.inc(1);
            if step % 10 == 9 {
                let mut chart = LineChart::new().title("Load max/mean while training (live)").x_title("step").y_title("load max/mean");
                for r in runs.iter().chain(std::iter::once(&run)) {
                    chart = chart.series(r.name.clone(), &r.load);
                }
                live.show(&chart.render()?);
            }
        }
        drop(trainer);
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
        runs.push(run);
    }
    progress.finish();
    '''),
    code(r'''
    /// Mean over the last 20 steps, and the standard error of that mean.
    fn tail(xs: &[f64]) -> (f64, f64) {
        let t = &xs[xs.len() - 20..];
        let m = mean(t);
        let var = t.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (t.len() - 1) as f64;
        (m, (var / t.len() as f64).sqrt())
    }
    let mut table = Table::new(["run", "load max/mean", "sequence balance", "loss", "± (s.e.)"]);
    for r in &runs {
        let (l, _) = tail(&r.load);
        let (s, _) = tail(&r.seq_bal);
        let (x, e) = tail(&r.loss);
        table.add_row([r.name.clone().into(), Cell::number(l, 2), Cell::number(s, 3), Cell::number(x, 3), Cell::number(e, 3)])?;
    }
    table
    '''),
    md(r'''
    Each figure is the mean over the last 20 of the 80 steps. The cell below prints what the comparison
    says and checks the directions named here:

    - without balancing ($\gamma$ = 0) routing stays concentrated on a few experts;
    - $\gamma$ = 0.01 brings the load back towards even within these 80 steps, and so does the sequence-wise
      loss without any bias;
    - $\gamma$ = 0.001 moves the bias ten times more slowly, and in 80 steps balances less than
      $\gamma$ = 0.01 does.
    '''),
    code(r'''
    let loads: Vec<f64> = runs.iter().map(|r| tail(&r.load).0).collect();
    println!("load max/mean, last 20 steps: gamma 0.01 {:.2}, gamma 0 {:.2}, gamma 0.001 {:.2}, sequence loss {:.2}",
        loads[0], loads[1], loads[2], loads[3]);
    assert!(loads[1] > loads[0] && loads[1] > loads[3], "no balancing should leave the load less even");
    assert!(loads[2] > loads[0], "gamma 0.001 should balance less than 0.01 in 80 steps");
    let (l0, e0) = tail(&runs[0].loss);
    let (l1, e1) = tail(&runs[1].loss);
    let gap = l0 - l1;
    let noise = 2.0 * (e0 * e0 + e1 * e1).sqrt();
    println!("loss with balancing minus without: {gap:+.3} nats (two standard errors: {noise:.3})");
    println!("{}", if gap.abs() <= noise { "within the noise of 20 steps: no cost of balancing can be seen here" } else if gap > 0.0 { "balancing cost loss here" } else { "balancing lowered the loss here" });
    '''),
    md(r'''
    **What to notice.** Whether balancing cost loss is read against the noise: the gap between the two
    runs' last-20-step mean losses is compared with two standard errors of that difference, and the cell
    prints which side it falls on rather than assuming one. The DeepSeek-V3 report's argument for the
    bias is that it steers the *choice* of experts without adding a gradient that competes with the
    language-model loss, as an auxiliary balance loss does.

    ## 3. The bias moves in steps of exactly $\gamma$

    During the retrains the cell recorded, after every step, the largest and smallest change of any
    expert's bias in the last MoE layer.
    '''),
    code(r'''
    for r in &runs {
        let biggest = r.bias_steps.iter().cloned().fold(0.0, f64::max);
        let smallest = r.bias_steps.iter().cloned().fold(f64::INFINITY, f64::min);
        println!("{:<36} bias change per step per expert: between {smallest:.5} and {biggest:.5}", r.name);
    }
    for (r, (_, gamma, _)) in runs.iter().zip(&variants) {
        assert!(r.bias_steps.iter().all(|d| (d - gamma).abs() < 1e-6 || *d < 1e-9), "{}: a bias step other than 0 or gamma", r.name);
    }
    '''),
    md(r'''
    Every expert's bias moved by $\gamma$ or not at all at every step: the update is a sign, not a
    gradient, so its size never depends on how unbalanced the batch was. An expert can only drift by
    $\gamma$ per step, which is why the step size must fit the length of the run.

    ## 4. Why $\gamma$ = 0.01 here and 0.001 in DeepSeek-V3

    The cell compares how far apart the shipped model's trained biases ended up (only the spread
    matters for the choice: a shift common to all experts changes nothing) with how far each step size
    lets a bias travel over the run, and compares the run lengths. DeepSeek-V3's step count is worked out
    from its report: $\gamma$ = 0.001 for the first 14.3T of its 14.8T training tokens, in batches of
    15,360 sequences of 4,096 tokens.
    '''),
    code(r'''
    let shipped = Model::load_default()?;
    let mut spread: f64 = 0.0;
    for l in shipped.config.moe_layers() {
        if let Some(b) = shipped.layers[l].moe().and_then(|m| m.gate.e_score_correction_bias.as_ref()) {
            spread = spread.max((b.max() - b.min()).double_value(&[]));
        }
    }
    let shipped_steps = loss.len() as f64;
    let v3_steps = 14.3e12 / (15360.0 * 4096.0);
    println!("shipped model: bias spread (max - min, widest layer) {spread:.3}");
    println!("shipped run: {shipped_steps:.0} steps; total travel gamma x steps: {:.1} at 0.01, {:.1} at 0.001", shipped_steps * 0.01, shipped_steps * 0.001);
    println!("DeepSeek-V3: about {v3_steps:.0} steps, {:.0} times as many; travel at 0.001: {:.0}", v3_steps / shipped_steps, v3_steps * 0.001);
    assert!(spread < shipped_steps * 0.001);
    '''),
    md(r'''
    Distance is not the constraint: even $\gamma$ = 0.001 lets a bias travel further over 3,000 steps
    than the shipped biases ended up apart (checked). Speed is: the bias corrects an imbalance by at most
    $\gamma$ per step, and in the retrain $\gamma$ = 0.001 left the load less even after 80 steps than
    $\gamma$ = 0.01 (checked in section 2). A run of a few thousand steps spends a large share of its
    steps in that early phase; DeepSeek-V3's run has many times more steps (printed), so a finer step
    costs it a much smaller share, and each of its steps disturbs the routing less.

    ## Exercises

    <details><summary>1. Why does load max/mean rise in the first steps of every run, balanced or
    not?</summary>

    At initialisation the router's scores differ little between experts, and the bias starts at zero.
    The first gradient steps make some experts slightly better for many tokens at once; they win more
    tokens, get more gradient, and pull further ahead. The bias needs many steps of $\gamma$ to catch up
    with that drift.
    </details>

    <details><summary>2. The sequence-wise loss balanced this short run without any bias. Why does
    DeepSeek-V3 give it a tiny weight (α = 0.0001) instead of relying on it?</summary>

    A loss term pushes the router's weights, so it competes with the language-model loss for the same
    parameters; the bias does not touch the weights' gradients. DeepSeek-V3 keeps the loss only as a
    guard against extreme imbalance inside single sequences.
    </details>
    '''),
]

NOTEBOOKS = [
    ("01-tour.ipynb", TOUR),
    ("02-expert-routing.ipynb", ROUTING),
    ("03-mla-compression.ipynb", MLA),
    ("04-activations.ipynb", ACTIVATIONS),
    ("05-routing-prototyping.ipynb", PROTOTYPING),
    ("06-real-checkpoints.ipynb", REAL),
    ("07-training-dynamics.ipynb", TRAINING),
]


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def notebook(name, cells):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    stem = name.split(".")[0]
    for i, (kind, text) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        if kind == "chart":
            cell.metadata["tags"] = ["chart"]
        cell.id = f"{stem}-{i:02d}"  # stable ids: regenerating changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def write_notebooks(out_dir):
    import nbformat

    for name, cells in NOTEBOOKS:
        path = os.path.join(out_dir, name)
        nbformat.write(notebook(name, cells), path)
        print(f"wrote {path} ({sum(1 for k, _ in cells if k in ('code', 'chart'))} code cells)")


# ---------------------------------------------------------------------------
# The Rust check file
# ---------------------------------------------------------------------------

def displayed_value(cell):
    """A cell's code with its displayed last expression bound to `_`."""
    lines = cell.rstrip().split("\n")
    last = lines[-1].strip()
    if last and not last.endswith((";", "}", "{")) and not last.startswith("//"):
        indent = lines[-1][: len(lines[-1]) - len(lines[-1].lstrip())]
        lines[-1] = f"{indent}let _ = &{last};"
    return "\n".join(lines)


def rust_check():
    out = [
        "//! Generated by notebooks/make_notebooks.py --check: every notebook's code cells",
        "//! as one function, for `cargo check`. Do not edit; do not commit.",
        "#![allow(unused, clippy::all)]",
        "use deepscope::prelude::*;",
        "",
        "fn main() {}",
    ]
    for name, cells in NOTEBOOKS:
        fname = "nb_" + name.split(".")[0].replace("-", "_")
        out.append("")
        out.append(f"// ---- {name}")
        out.append(f"fn {fname}() -> deepscope::Result<()> {{")
        for i, (kind, text) in enumerate(cells):
            if kind not in ("code", "chart") or text.lstrip().startswith("%"):
                continue
            out.append(f"    // cell {i}")
            out.append(textwrap.indent(displayed_value(text), "    "))
        out.append("    Ok(())")
        out.append("}")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE, help="folder for the notebooks (default: this script's folder)")
    ap.add_argument("--check", metavar="FILE.rs", help="write the code cells as one Rust file instead")
    args = ap.parse_args()
    if args.check:
        with open(args.check, "w") as f:
            f.write(rust_check())
        print(f"wrote {args.check}")
    else:
        write_notebooks(args.out)


if __name__ == "__main__":
    sys.exit(main())
