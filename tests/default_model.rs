//! The shipped default model: loads with `Model::load_default`, and its
//! held-out figures equal the ones its model card reports.

use deepscope::model::Model;
use deepscope::train::corpus::{Corpus, CorpusSources, Domain};
use deepscope::train::data::tokenize_doc;
use deepscope::train::eval::evaluate;

#[test]
fn default_model_loads_with_its_tokenizer() {
    let m = Model::load_default().expect("models/deepscope-tiny");
    assert!(m.tokenizer.is_some());
    assert_eq!(m.config.moe_layers().len(), m.config.num_hidden_layers - 1);
    let ids = m.encode("In the beginning").unwrap();
    assert_eq!(ids[0], 0);
}

/// The shipped model with its eval_report.json and card, evaluated on the
/// held-out documents of `domains` (tokenized with its own tokenizer).
fn evaluate_shipped(domains: &[Domain]) -> (deepscope::train::eval::EvalReport, serde_json::Value, String) {
    let m = Model::load_default().unwrap();
    let dir = deepscope::model::model::default_model_dir();
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("eval_report.json")).unwrap()).unwrap();
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let corpus = Corpus::load(&CorpusSources::default()).unwrap();
    let tok = m.tokenizer().unwrap();
    let eos = tok.token_id("<|eos|>").unwrap();
    let docs: Vec<_> = corpus
        .heldout()
        .filter(|d| domains.contains(&d.domain))
        .map(|d| tokenize_doc(tok, d, eos).unwrap())
        .collect();
    let seq = report["settings"]["seq_len"].as_u64().unwrap() as usize;
    (evaluate(&m, &docs, seq).unwrap(), report, card)
}

#[test]
fn held_out_revelation_loss_matches_the_model_card() {
    let (r, report, card) = evaluate_shipped(&[Domain::Bible]);
    let bpb = r.per_domain["bible"].bits_per_byte();
    let reported = report["per_domain"]["bible"]["bits_per_byte"].as_f64().unwrap();
    assert!((bpb - reported).abs() < 1e-3, "measured {bpb}, card says {reported}");
    assert!(card.contains(&format!("{reported:.3} bits per byte")), "README.md does not state {reported:.3}");
}

#[test]
fn held_out_load_balance_and_domain_divergence_match_the_model_card() {
    let (r, report, card) = evaluate_shipped(&Domain::ALL);
    for (layer, measured) in r.load_max_over_mean() {
        let reported = report["load_max_over_mean"][layer.to_string()].as_f64().unwrap();
        assert!((measured - reported).abs() < 0.01, "layer {layer}: max/mean load {measured}, report says {reported}");
        assert!(card.contains(&format!("| {layer} | {reported:.2} |")), "README.md has no row for layer {layer} with {reported:.2}");
    }
    for (layer, pairs) in r.domain_jsd() {
        for (pair, measured) in pairs {
            let reported = report["domain_jsd_bits"][layer.to_string()][&pair].as_f64().unwrap();
            assert!((measured - reported).abs() < 0.005, "layer {layer} {pair}: JSD {measured}, report says {reported}");
        }
    }
}

#[test]
fn corpus_routing_runs_can_be_interrupted_and_resumed() {
    use deepscope::inspect::{CorpusRun, RoutingStats};
    let m = Model::load_default().unwrap();
    let docs = ["In the beginning God created the heaven and the earth.", "A fool and his money are soon parted.",
        "hacker: a person who enjoys exploring the details of programmable systems.", "And God said, Let there be light."];
    // one window per pass throughout: the same passes, so the same rounding,
    // whether the run is whole or resumed
    let mut whole = RoutingStats::default();
    m.routing_stats(&docs, &mut whole, CorpusRun { batch: 1, ..Default::default() }).unwrap();
    assert_eq!(whole.docs_done, 4);

    let mut partial = RoutingStats::default();
    let seen = std::cell::Cell::new(0);
    let cancel = || { seen.set(seen.get() + 1); seen.get() > 2 };
    let err = m.routing_stats(&docs, &mut partial, CorpusRun { cancel: Some(&cancel), batch: 1, ..Default::default() }).unwrap_err();
    assert!(matches!(err, deepscope::Error::Interrupted));
    assert_eq!(partial.docs_done, 2);
    let mut progress = vec![];
    let mut record = |p: deepscope::inspect::CorpusProgress| progress.push(p.docs_done);
    m.routing_stats(&docs, &mut partial, CorpusRun { progress: Some(&mut record), batch: 1, ..Default::default() }).unwrap();
    assert_eq!(progress, vec![3, 4]);
    assert_eq!(partial, whole);
}

#[test]
fn corpus_routing_counts_equal_traces_window_by_window_and_batched_windows_agree() {
    use deepscope::inspect::{Capture, CorpusRun, Interventions, RoutingStats};
    let m = Model::load_default().unwrap();
    let doc = "In the beginning God created the heaven and the earth. And the earth was without form, and void; \
               and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. \
               And God said, Let there be light: and there was light. And God saw the light, that it was good.";
    let ids = m.encode(doc).unwrap();
    let window = 16;
    assert!(ids.len() > 4 * window && ids.len() % window != 0, "{} tokens: want several full windows and a short one", ids.len());
    let run = |batch| {
        let mut s = RoutingStats::default();
        m.routing_stats(&[doc], &mut s, CorpusRun { window, batch, ..Default::default() }).unwrap();
        s
    };
    // one window per pass: the counts of a trace of each window, exactly
    let mut traced = RoutingStats::default();
    for w in ids.chunks(window) {
        traced.add(&m.trace_with(w, &Capture::routing_only(), &Interventions::new()).unwrap()).unwrap();
    }
    let one = run(1);
    assert_eq!(one.tokens, ids.len() as u64);
    assert_eq!((&one.load, &one.coactivation, &one.transitions, &one.token_expert), (&traced.load, &traced.coactivation, &traced.transitions, &traced.token_expert));
    // full windows four to a pass: the same tokens, and the same choices up to
    // near ties that a different matmul blocking can flip
    let four = run(4);
    assert_eq!(four.tokens, one.tokens);
    for (l, a) in &one.load {
        let b = &four.load[l];
        let moved: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).sum::<u64>() / 2;
        let total: u64 = a.iter().sum();
        assert_eq!(b.iter().sum::<u64>(), total, "layer {l}");
        assert!(moved * 100 <= total, "layer {l}: {moved} of {total} choices differ between batch 1 and batch 4");
    }
}
