//! MLA views and activation statistics: cache arithmetic, spectra, the score
//! split, rank truncation, massive activations.

mod common;

use common::*;
use deepscope::inspect::{massive_activations, Capture, Interventions};
use deepscope::model::HookPoint;
use tch::{Device, Kind, Tensor};

fn ids() -> Vec<i64> {
    tch::manual_seed(21);
    Vec::<i64>::try_from(Tensor::randint(128, [24], (Kind::Int64, Device::Cpu))).unwrap()
}

#[test]
fn cache_accounting_matches_the_formula_for_a_tiny_config() {
    let m = load_cpu(&case("v3_base").dir);
    let c = m.cache_footprint(2);
    let cfg = &m.config;
    assert_eq!(c.absorbed_elems as usize, cfg.kv_lora_rank + cfg.qk_rope_head_dim);
    assert_eq!(c.naive_elems as usize, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim));
    let (a, _, _) = c.bytes_per_token();
    assert_eq!(a as usize, (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2);
    // GQA with every head is the naive layout; one head is MQA
    assert_eq!(c.grouped_elems(cfg.num_attention_heads as u64), c.naive_elems);
    assert_eq!(c.grouped_elems(1) as usize, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim);
    // the DeepSeek-V2 paper: MLA's cache equals GQA with 2.25 groups (d_c = 4 d_h, d_R = d_h / 2)
    let v3 = deepscope::stats::CacheFootprint::of(&deepscope::model::published::deepseek_v3().unwrap(), 2);
    assert_eq!(v3.gqa_groups_equivalent(), 2.25);
    // and what generation actually holds (f32 cache: 4 bytes)
    let mut opts = deepscope::model::GenerateOptions::greedy(&m, 3);
    opts.stop_tokens.clear();
    let g = m.generate(&[1, 2, 3, 4], &opts, |_| true).unwrap();
    assert_eq!(g.cache_bytes as u64, m.cache_footprint(4).bytes_per_token().0 * g.cache_len as u64);
}

#[test]
fn spectra_of_a_kv_b_proj_with_known_singular_values_are_recovered() {
    let m = load_cpu(&case("v3_base").dir);
    let a = &m.layers[1].self_attn;
    let (h, nope, kv) = (a.num_heads, a.nope, a.kv_lora);
    let known: Vec<f32> = (0..nope).map(|i| 10.0 / (1.0 + i as f32)).collect();
    tch::manual_seed(5);
    let _g = tch::no_grad_guard();
    for head in 0..h {
        // W_UK = U diag(s) V^T with orthonormal U [nope, nope], V [kv, nope]
        let (u, _) = Tensor::linalg_qr(&Tensor::randn([nope, nope], (Kind::Float, Device::Cpu)), "reduced");
        let (v, _) = Tensor::linalg_qr(&Tensor::randn([kv, nope], (Kind::Float, Device::Cpu)), "reduced");
        let w = u.matmul(&Tensor::from_slice(&known).diag(0)).matmul(&v.transpose(0, 1));
        a.w_uk().unwrap().get(head).copy_(&w); // w_uk is a view into kv_b_proj.weight
    }
    let s = m.latent_spectra(1).unwrap();
    for head in 0..h as usize {
        for (got, want) in s.w_uk[head].iter().zip(&known) {
            assert!((got - want).abs() < 1e-4, "head {head}: {got} vs {want}");
        }
    }
    assert_eq!(s.w_uv.len(), h as usize);
}

#[test]
fn content_plus_position_scores_give_the_attention_pattern() {
    let m = load_cpu(&case("v3_yarn").dir);
    let x = ids();
    let t = m.trace(x.clone()).unwrap();
    for layer in 0..m.layers.len() {
        let split = m.score_split(x.clone(), layer).unwrap();
        let len = x.len() as i64;
        let future = Tensor::ones([len, len], (Kind::Bool, Device::Cpu)).triu(1);
        let probs = (&split.content + &split.position).masked_fill(&future, f64::NEG_INFINITY).softmax(-1, Kind::Float);
        assert!(max_abs_diff(&probs, t.pattern(layer).unwrap()) <= 1e-5, "layer {layer}");
    }
}

#[test]
fn rank_truncation_is_harmless_at_full_rank_and_leaves_only_position_at_rank_zero() {
    let m = load_cpu(&case("v3_base").dir);
    let x = ids();
    let full = m.config.kv_lora_rank;
    let sweep = m.rank_truncation(x.clone(), &[full, 8, 0]).unwrap();
    assert!(sweep.rows[0].mean_kl < 1e-8 && sweep.rows[0].top1_agreement == 1.0, "{sweep}");
    assert!(sweep.rows[2].mean_kl > sweep.rows[0].mean_kl);
    // rank 0: the content part of the scores is gone, only q_pe . k_pe is left
    let layer = 1;
    let split = m.score_split(x.clone(), layer).unwrap();
    let t = m
        .trace_with(x.clone(), &Capture::default(), &Interventions::new().truncate_latent(deepscope::inspect::Layers::All, 0))
        .unwrap();
    // layer 0's residual differs after truncation, so compare layer 0 only
    let split0 = m.score_split(x.clone(), 0).unwrap();
    let len = x.len() as i64;
    let future = Tensor::ones([len, len], (Kind::Bool, Device::Cpu)).triu(1);
    let position_only = split0.position.masked_fill(&future, f64::NEG_INFINITY).softmax(-1, Kind::Float);
    assert!(max_abs_diff(&position_only, t.pattern(0).unwrap()) <= 1e-5);
    let _ = split;
}

#[test]
fn naive_and_absorbed_check_reports_equality() {
    let m = load_cpu(&case("v2_group_limited").dir);
    let c = m.attention_path_check(ids()).unwrap();
    assert!(c.max_abs_logit_diff <= 1e-4 * c.max_abs_logit.max(1.0), "{c}");
    assert!(c.to_string().contains("equal"));
}

#[test]
fn effective_rank_of_c_kv_is_bounded_by_the_latent_size() {
    let m = load_cpu(&case("v3_base").dir);
    let r = m.latent_effective_rank(ids(), 1).unwrap();
    assert!(r.entropy_rank > 1.0 && r.entropy_rank <= m.config.kv_lora_rank as f64);
    assert!(r.rank90 <= r.rank99 && r.rank99 <= r.singular_values.len());
    let low = Tensor::randn([50, 3], (Kind::Float, Device::Cpu)).matmul(&Tensor::randn([3, 32], (Kind::Float, Device::Cpu)));
    let lr = deepscope::inspect::effective_rank(&low).unwrap();
    assert!(lr.rank99 <= 3 && lr.entropy_rank <= 3.0 + 1e-6, "a rank-3 matrix: {lr}");
    assert!(lr.singular_values[3] < 1e-3 * lr.singular_values[0]);
}

#[test]
fn a_planted_massive_activation_is_found() {
    tch::manual_seed(2);
    let x = Tensor::randn([1, 10, 64], (Kind::Float, Device::Cpu));
    let _ = x.get(0).get(7).get(13).fill_(250.0);
    let found = massive_activations(&x, 2, 50.0).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].layer, found[0].position, found[0].dim), (2, 7, 13));
    let m = load_cpu(&case("v3_base").dir);
    let report = m.activation_report(ids(), 100.0).unwrap();
    assert!(report.rows.iter().any(|(n, _)| n == &HookPoint::ResidPost(2).to_string()));
    assert_eq!(report.shared_vs_routed.len(), m.config.moe_layers().len());
}

#[test]
fn bad_mla_requests_are_refused() {
    let m = load_cpu(&case("v3_base").dir);
    assert!(m.latent_spectra(9).unwrap_err().to_string().contains("out of range"));
    assert!(m.score_split(ids(), 9).unwrap_err().to_string().contains("out of range"));
    let too_big = m.config.kv_lora_rank + 1;
    assert!(m.rank_truncation(ids(), &[too_big]).unwrap_err().to_string().contains("kv_lora_rank"));
}

#[test]
fn mla_and_activation_results_export_to_safetensors_and_json() {
    use deepscope::inspect::{ToJson, ToTensors};
    let m = load_cpu(&case("v3_base").dir);
    let dir = std::env::temp_dir().join(format!("deepscope-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let spectra = m.latent_spectra(1).unwrap();
    let path = dir.join("spectra.safetensors");
    spectra.save_safetensors(&path).unwrap();
    let back: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    let uk = &back["w_uk"];
    assert_eq!(uk.size(), vec![spectra.w_uk.len() as i64, spectra.w_uk[0].len() as i64]);
    assert_eq!(uk.double_value(&[1, 0]) as f32, spectra.w_uk[1][0]);
    let json = spectra.to_json().unwrap();
    assert_eq!(json["layer"], 1);
    assert_eq!(json["w_uv"][0].as_array().unwrap().len(), spectra.w_uv[0].len());

    let report = m.activation_report(ids(), 20.0).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = report.tensors().unwrap().into_iter().collect();
    let (name, first) = &report.rows[0];
    let stats = &tensors[&format!("{name}.stats")];
    assert_eq!(stats.double_value(&[2]), first.rms);
    assert_eq!(tensors["shared_vs_routed"].size()[0] as usize, report.shared_vs_routed.len());
    let json_path = dir.join("report.json");
    report.save_json(&json_path).unwrap();
    let text = std::fs::read_to_string(&json_path).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["rows"].as_array().unwrap().len(), report.rows.len());

    let split = m.score_split(ids(), 0).unwrap();
    let j = split.to_json().unwrap();
    assert_eq!(j["content"].as_array().unwrap().len() as i64, split.content.size()[1]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fixed_latent_basis_fitted_on_the_same_text_equals_in_sample_truncation_and_on_other_text_does_not() {
    let m = load_cpu(&case("v3_base").dir);
    let full = m.config.kv_lora_rank;
    tch::manual_seed(5);
    let text = Vec::<i64>::try_from(Tensor::randint(128, [48], (Kind::Int64, Device::Cpu))).unwrap();
    let other = Vec::<i64>::try_from(Tensor::randint(128, [48], (Kind::Int64, Device::Cpu))).unwrap();
    // fitted on the text itself: the same directions as in-sample truncation
    // (layer 0 only: truncating a layer changes the latents of the layers
    // after it, which the in-sample intervention then refits)
    let own = m.latent_basis([text.clone()]).unwrap();
    assert_eq!(own.tokens, 48);
    assert_eq!(own.directions.len(), m.config.num_hidden_layers);
    let none = Interventions::new();
    for r in [8, 3] {
        let a = m.trace_with(text.clone(), &Capture::none(), &none.clone().truncate_latent(0, r)).unwrap();
        let b = m.trace_with(text.clone(), &Capture::none(), &none.clone().project_latent(0, &own, r).unwrap()).unwrap();
        assert!(max_abs_diff(&a.logits, &b.logits) <= 1e-4, "rank {r}: {:e}", max_abs_diff(&a.logits, &b.logits));
    }
    let in_sample = m.rank_truncation(text.clone(), &[full, 8, 0]).unwrap();
    assert_eq!(in_sample.basis_tokens, None);
    // fitted on other text: harmless at full rank, the same at rank 0, and
    // further from the full model at rank 8 than the text's own directions
    let basis = m.latent_basis([other.clone(), other[..20].to_vec()]).unwrap();
    assert_eq!(basis.tokens, 68);
    let out = m.rank_truncation_in(text.clone(), &[full, 8, 0], &basis).unwrap();
    assert!(out.rows[0].mean_kl < 1e-8, "{out}");
    assert!((out.rows[2].mean_loss - in_sample.rows[2].mean_loss).abs() < 1e-4);
    assert!(out.rows[1].mean_kl > in_sample.rows[1].mean_kl, "{out}\n{in_sample}");
    assert!(out.to_string().contains("fitted on 68 calibration tokens"));
    // too little calibration text, and a rank beyond the latent, are errors
    let err = m.latent_basis([text[..8].to_vec()]).unwrap_err().to_string();
    assert!(err.contains("8 calibration tokens") && err.contains("use more text"), "{err}");
    let err = deepscope::inspect::Interventions::new().project_latent(deepscope::inspect::Layers::All, &basis, full + 1).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    // a basis with fewer layers than the model is another model's, even for one layer
    let short = deepscope::inspect::LatentBasis { directions: vec![basis.directions[0].shallow_clone()], singular_values: vec![], tokens: 1 };
    let iv = Interventions::new().project_latent(0, &short, 4).unwrap();
    let err = m.trace_with(text.clone(), &Capture::none(), &iv).unwrap_err().to_string();
    assert!(err.contains("another model's"), "{err}");
}
