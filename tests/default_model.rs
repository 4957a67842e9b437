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

#[test]
fn held_out_revelation_loss_matches_the_model_card() {
    let m = Model::load_default().unwrap();
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deepscope::model::model::default_model_dir().join("eval_report.json")).unwrap(),
    )
    .unwrap();
    let card = std::fs::read_to_string(deepscope::model::model::default_model_dir().join("README.md")).unwrap();
    let corpus = Corpus::load(&CorpusSources::default()).unwrap();
    let tok = m.tokenizer().unwrap();
    let eos = tok.token_id("<|eos|>").unwrap();
    let docs: Vec<_> = corpus
        .heldout()
        .filter(|d| d.domain == Domain::Bible)
        .map(|d| tokenize_doc(tok, d, eos).unwrap())
        .collect();
    let seq = report["settings"]["seq_len"].as_u64().unwrap() as usize;
    let r = evaluate(&m, &docs, seq).unwrap();
    let bpb = r.per_domain["bible"].bits_per_byte();
    let reported = report["per_domain"]["bible"]["bits_per_byte"].as_f64().unwrap();
    assert!((bpb - reported).abs() < 1e-3, "measured {bpb}, card says {reported}");
    assert!(card.contains(&format!("{reported:.3} bits per byte")), "README.md does not state {reported:.3}");
}
