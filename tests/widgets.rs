//! Widgets outside a kernel: state, observers, `interact`, and the frontend's
//! messages through `deliver` (the kernel side is tests/python/test_kernel_widgets.py).
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use deepscope::kernel::widgets::{deliver, interact, AsWidget, Button, Checkbox, Dropdown, FloatSlider, IntSlider, Output, SelectMultiple, Text, VBox};
use deepscope::Error;
use serde_json::json;

#[test]
fn a_slider_reports_changes_from_the_frontend_and_from_rust() {
    let s = IntSlider::new("top-k", 2, 1, 8).unwrap();
    let seen = Arc::new(AtomicI64::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (seen2, calls2) = (seen.clone(), calls.clone());
    s.on_change(move |v| {
        seen2.store(v, Ordering::SeqCst);
        calls2.fetch_add(1, Ordering::SeqCst);
    });
    deliver(s.widget().id(), &json!({ "method": "update", "state": { "value": 5 }, "buffer_paths": [] })).unwrap();
    assert_eq!((s.value(), seen.load(Ordering::SeqCst)), (5, 5));
    s.set_value(7).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 7);
    // the same value again is no change: no call
    s.set_value(7).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn bad_values_and_unknown_comms_are_clear_errors_and_change_nothing() {
    let s = IntSlider::new("layer", 1, 1, 3).unwrap();
    let e = deliver(s.widget().id(), &json!({ "method": "update", "state": { "value": 9 } })).unwrap_err();
    assert!(matches!(e, Error::Input(_)) && e.to_string().contains("outside 1..=3"), "{e}");
    let e = deliver(s.widget().id(), &json!({ "method": "update", "state": { "value": "three" } })).unwrap_err();
    assert!(e.to_string().contains("expected an integer"), "{e}");
    let e = deliver(s.widget().id(), &json!({ "method": "update", "state": 3 })).unwrap_err();
    assert!(e.to_string().contains("without a `state` object"), "{e}");
    let e = deliver(s.widget().id(), &json!({ "method": "frobnicate" })).unwrap_err();
    assert!(e.to_string().contains("unknown method"), "{e}");
    assert_eq!(s.value(), 1);
    let e = deliver("no-such-comm", &json!({ "method": "update", "state": {} })).unwrap_err();
    assert!(e.to_string().contains("no-such-comm"), "{e}");
    assert!(s.set_value(0).is_err() && s.value() == 1);
    assert!(IntSlider::new("k", 9, 1, 8).is_err());
    assert!(FloatSlider::new("scale", 1.0, 0.0, 2.0, 0.0).is_err());
    assert!(Dropdown::new("scoring", &["sigmoid", "softmax"], 2).is_err());
    let d = Dropdown::new("scoring", &["sigmoid", "softmax"], 0).unwrap();
    assert!(deliver(d.widget().id(), &json!({ "method": "update", "state": { "index": 2 } })).is_err());
    // a closed widget no longer takes messages
    s.close();
    assert!(deliver(s.widget().id(), &json!({ "method": "update", "state": { "value": 2 } })).is_err());
}

#[test]
fn selection_widgets_read_as_labels_and_indices() {
    let d = Dropdown::new("scoring", &["sigmoid", "softmax"], 0).unwrap();
    deliver(d.widget().id(), &json!({ "method": "update", "state": { "index": 1 } })).unwrap();
    assert_eq!((d.index(), d.value().as_str()), (1, "softmax"));
    let m = SelectMultiple::new("ban", &["e0", "e1", "e2", "e3"], &[]).unwrap();
    deliver(m.widget().id(), &json!({ "method": "update", "state": { "index": [3, 1] } })).unwrap();
    assert_eq!(m.indices(), vec![1, 3]);
    let c = Checkbox::new("zero the bias", false);
    assert!(deliver(c.widget().id(), &json!({ "method": "update", "state": { "value": 1 } })).is_err());
    deliver(c.widget().id(), &json!({ "method": "update", "state": { "value": true } })).unwrap();
    assert!(c.value());
    let t = Text::new("text", "hello");
    t.set_value("world");
    assert_eq!(t.value(), "world");
}

#[test]
fn a_button_click_runs_its_callbacks() {
    let b = Button::new("run");
    let clicks = Arc::new(AtomicUsize::new(0));
    let c2 = clicks.clone();
    b.on_click(move || {
        c2.fetch_add(1, Ordering::SeqCst);
    });
    deliver(b.widget().id(), &json!({ "method": "custom", "content": { "event": "click" } })).unwrap();
    b.click();
    assert_eq!(clicks.load(Ordering::SeqCst), 2);
}

#[test]
fn interact_redraws_on_every_change_and_shows_errors_in_place() {
    let k = IntSlider::new("k", 2, 1, 8).unwrap();
    let zero = Checkbox::new("zero", false);
    let view = interact((k.clone(), zero.clone()), |(k, zero)| -> deepscope::Result<String> {
        if k == 4 {
            return Err(Error::Input(format!("k = {k} is not allowed")));
        }
        if k == 5 {
            panic!("k = 5 panics");
        }
        Ok(format!("k = {k}, zero = {zero}"))
    })
    .unwrap();
    assert_eq!(view.output().text(), "k = 2, zero = false");
    deliver(zero.widget().id(), &json!({ "method": "update", "state": { "value": true } })).unwrap();
    assert_eq!(view.output().text(), "k = 2, zero = true");
    k.set_value(4).unwrap();
    assert_eq!(view.output().text(), "Input: invalid input: k = 4 is not allowed");
    assert_eq!(view.output().outputs()[0]["output_type"], "error");
    k.set_value(5).unwrap();
    assert!(view.output().text().starts_with("Panic: panicked: k = 5 panics"), "{}", view.output().text());
    // the controls keep working after an error and a panic
    k.set_value(3).unwrap();
    assert_eq!(view.output().text(), "k = 3, zero = true");
    assert_eq!(view.redraw_seconds().len(), 5);
    // the view is a box of the two controls and the output area
    let children = view.widget().get("children");
    assert_eq!(children.as_array().map(Vec::len), Some(3));
    assert_eq!(children[0], json!(k.widget().reference()));
}

#[test]
fn widgets_display_as_widget_views_with_their_layout_and_style() {
    let s = IntSlider::new("top-k", 2, 1, 8).unwrap();
    let b = deepscope::kernel::cell::RichDisplay::mime_bundle(&s).to_json();
    assert_eq!(b["application/vnd.jupyter.widget-view+json"]["model_id"], s.widget().id());
    assert_eq!(b["application/vnd.jupyter.widget-view+json"]["version_major"], 2);
    let state = s.widget().state();
    assert_eq!(state["_model_name"], "IntSliderModel");
    assert_eq!(state["_model_module"], "@jupyter-widgets/controls");
    assert!(state["layout"].as_str().is_some_and(|r| r.starts_with("IPY_MODEL_")));
    assert!(state["style"].as_str().is_some_and(|r| r.starts_with("IPY_MODEL_")));
    let out = Output::new();
    out.show(&"hello".to_string());
    assert_eq!(out.outputs()[0]["data"]["text/plain"], "hello");
    let v = VBox::new(&[&s, &out]);
    assert_eq!(v.widget().get("children").as_array().map(Vec::len), Some(2));
}

#[test]
fn the_playground_redraws_with_each_intervention_and_reports_bad_combinations_in_place() {
    use deepscope::prelude::*;
    let model = Model::load_default().unwrap();
    let text = "And God said, Let there be light: and there was light.";
    let pg = playground(model, text).unwrap();
    let first = pg.view.output().text();
    assert!(first.starts_with("No intervention"), "{first}");
    assert!(first.contains("mean KL 0.0000"), "{first}");
    pg.top_k.set_value(1).unwrap();
    let k1 = pg.view.output().text();
    assert!(k1.starts_with("top-1 on layer 1,"), "{k1}");
    assert!(!k1.contains("mean KL 0.0000"), "top-1 routing changed nothing: {k1}");
    // banning an expert on every MoE layer: two interventions, every layer named
    pg.every_layer.set_value(true);
    pg.banned.set_indices(&[0]).unwrap();
    let banned = pg.view.output().text();
    assert!(banned.starts_with("top-1; ban e0 on every MoE layer,"), "{banned}");
    // the output is one bundle with the comparison, routing map and router step as HTML
    let html = pg.view.output().outputs()[0]["data"]["text/html"].as_str().unwrap().to_string();
    assert!(html.matches("<div>").count() >= 4, "{}", &html[..html.len().min(300)]);
    // group-limited routing lifted (one group), then more groups kept than there are: an error in place
    let one = pg.groups.widget().get("_options_labels").as_array().unwrap().iter().position(|l| l == "1").unwrap();
    pg.groups.set_index(one).unwrap();
    assert_eq!(pg.view.output().outputs()[0]["output_type"], "error", "{}", pg.view.output().text());
    assert!(pg.view.output().text().contains("n_group 1 / topk_group 2 invalid"), "{}", pg.view.output().text());
    pg.groups_kept.set_value(1).unwrap();
    assert!(pg.view.output().text().starts_with("top-1; keep 1 of 1 groups"), "{}", pg.view.output().text());
    pg.groups.set_index(one + 2).unwrap(); // 4 groups, the model's own
    pg.groups_kept.set_value(2).unwrap();
    // bias scaled to zero on the V3-style router
    pg.bias_scale.set_value(0.0).unwrap();
    assert!(pg.view.output().text().starts_with("top-1; bias × 0; ban e0 on"), "{}", pg.view.output().text());
    // a ban of every expert cannot route: an error in the output, the controls still work
    let all: Vec<usize> = (0..pg.banned.widget().get("_options_labels").as_array().unwrap().len()).collect();
    pg.banned.set_indices(&all).unwrap();
    assert_eq!(pg.view.output().outputs()[0]["output_type"], "error", "{}", pg.view.output().text());
    assert!(pg.view.output().text().contains("fewer than 1 experts are left"), "{}", pg.view.output().text());
    pg.banned.set_indices(&[]).unwrap();
    pg.bias_scale.set_value(1.0).unwrap();
    pg.every_layer.set_value(false);
    pg.top_k.set_value(pg.top_k.widget().get("value").as_i64().unwrap()).unwrap();
    assert_eq!(pg.view.output().outputs()[0]["output_type"], "display_data", "{}", pg.view.output().text());
}

#[test]
fn a_plain_comm_hands_messages_to_its_callbacks() {
    use deepscope::kernel::widgets::Comm;
    let c = Comm::open("my.frontend", json!({ "a": 1 }));
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    c.on_msg(move |d| g.lock().unwrap().push(d.clone()));
    deliver(c.id(), &json!({ "anything": [1, 2] })).unwrap();
    assert_eq!(*got.lock().unwrap(), vec![json!({ "anything": [1, 2] })]);
    assert_eq!(c.target(), "my.frontend");
    c.close();
    assert!(deliver(c.id(), &json!({})).is_err());
}
