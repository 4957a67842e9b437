//! Every inspection object shows itself: a text face and a rich face whose
//! HTML holds the expected charts and tables.

mod common;

use common::*;
use deepscope::inspect::{compare, Capture, Interventions, RoutingStats};
use deepscope::plot::MimeType;
use tch::{Device, Kind, Tensor};

fn ids(n: i64) -> Vec<i64> {
    tch::manual_seed(31);
    Vec::<i64>::try_from(Tensor::randint(128, [n], (Kind::Int64, Device::Cpu))).unwrap()
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

fn rich(b: &deepscope::plot::MimeBundle) -> (String, String) {
    (b.get(MimeType::TextPlain).unwrap_or_default().to_string(), b.get(MimeType::TextHtml).unwrap_or_default().to_string())
}

#[test]
fn a_trace_shows_a_routing_heatmap_per_moe_layer() {
    let m = load_cpu(&case("v3_base").dir);
    let t = m.trace(ids(9)).unwrap();
    let (text, html) = rich(&t.mime_bundle());
    assert!(text.starts_with("Trace: 1 x 9 tokens"));
    let moe = m.config.moe_layers().len();
    assert_eq!(count(&html, "<svg"), moe, "one heatmap per MoE layer");
    // every heatmap cell carries a tooltip: 9 tokens x 8 experts per layer
    assert!(count(&html, "<title>") >= moe * 9 * 8);
    assert!(html.contains("Top-1 expert per token"));
    let fig = t.attention_figure(0).unwrap();
    assert!(fig.to_svg().contains("head 3"));
}

#[test]
fn router_step_stats_and_comparisons_have_charts_and_tables() {
    let m = load_cpu(&case("v3_base").dir);
    let x = ids(20);
    let t = m.trace(x.clone()).unwrap();
    let (text, html) = rich(&t.router_step(1, 3).unwrap().mime_bundle());
    assert!(text.contains("Router of layer 1"));
    assert!(html.contains("<svg") && html.contains("<table"));

    let mut stats = RoutingStats::default();
    stats.add(&t).unwrap();
    let (_, html) = rich(&stats.mime_bundle());
    assert!(html.contains("Expert load over 20 tokens") && html.contains("max/mean"));
    assert!(stats.coactivation_figure(1).unwrap().to_svg().contains("<svg"));

    let v = m.trace_with(x.clone(), &Capture::default(), &Interventions::new().ban_experts(1, &[0])).unwrap();
    let (text, html) = rich(&compare(&t, &v).unwrap().mime_bundle());
    assert!(text.contains("mean KL") && html.contains("<table"));

    let replay = m.replay_bias_balancing(&t, 1, 0.01, 10).unwrap();
    assert!(rich(&replay.mime_bundle()).1.contains("<svg"));
    let sweep = m.rank_truncation(x.clone(), &[32, 4, 0]).unwrap();
    assert!(rich(&sweep.mime_bundle()).1.contains("<svg"));
    assert!(rich(&m.latent_spectra(1).unwrap().mime_bundle()).1.contains("W_UK head 0"));
    assert!(rich(&m.score_split(x.clone(), 1).unwrap().mime_bundle()).1.contains("content"));
    assert!(rich(&m.activation_report(x.clone(), 50.0).unwrap().mime_bundle()).1.contains("<table"));
    assert!(rich(&m.logit_lens(x).unwrap().mime_bundle()).1.contains("after layer 2"));
}

#[test]
fn evcxr_display_strings_follow_the_content_convention() {
    let m = load_cpu(&case("v3_base").dir);
    let t = m.trace(ids(5)).unwrap();
    let s = t.mime_bundle().to_evcxr_string();
    assert!(s.starts_with("EVCXR_BEGIN_CONTENT text/plain\n"));
    assert!(s.contains("EVCXR_BEGIN_CONTENT text/html\n"));
    assert_eq!(count(&s, "EVCXR_BEGIN_CONTENT"), count(&s, "EVCXR_END_CONTENT"));
}
