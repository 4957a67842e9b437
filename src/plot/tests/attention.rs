use super::{labels, parse, tooltips, with_tooltip};
use crate::plot::{AttentionGrid, PlotError};

fn causal(n_heads: usize, t: usize) -> Vec<Vec<Vec<f32>>> {
    (0..n_heads)
        .map(|_| {
            (0..t)
                .map(|q| {
                    (0..t)
                        .map(|k| if k <= q { 1.0 / (q + 1) as f32 } else { 0.0 })
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[test]
fn grid_draws_every_cell_of_every_head_with_captions() {
    let fig = AttentionGrid::new(&causal(6, 4)).render().unwrap();
    let doc = parse(fig.to_svg());
    assert_eq!(with_tooltip(&doc, "rect").len(), 6 * 4 * 4);
    let texts = labels(&doc);
    for h in 0..6 {
        assert!(texts.contains(&format!("head {h}")), "caption of head {h}");
    }
    assert!(texts.contains(&"query".to_string()) && texts.contains(&"key".to_string()));
    assert_eq!(
        fig.to_string(),
        "attention grid 6 heads x 4x4 (query x key)"
    );
}

#[test]
fn grid_tooltips_name_the_head_query_and_key_tokens() {
    let fig = AttentionGrid::new(&causal(2, 3))
        .tokens(["The", "cat", "sat"])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let tips = tooltips(&doc);
    assert!(
        tips.contains(&"head 1\nquery 2: sat\nkey 0: The\nattention: 0.3333".to_string()),
        "{:?}",
        &tips[..3]
    );
}

#[test]
fn with_fewer_queries_than_keys_the_queries_are_the_last_tokens() {
    let heads = vec![vec![vec![0.2, 0.3, 0.5]]];
    let fig = AttentionGrid::new(&heads)
        .tokens(["a", "b", "c"])
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    assert!(tooltips(&doc)[0].contains("query 0: c"));
}

#[test]
fn grid_rejects_heads_of_different_shapes() {
    let mut heads = causal(3, 4);
    heads[2].pop();
    let err = AttentionGrid::new(&heads).render().unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, expected: 4, found: 3, .. } if what == "heads[2]"),
        "{err}"
    );
}

#[test]
fn grid_rejects_a_token_count_that_does_not_match_the_keys() {
    let err = AttentionGrid::new(&causal(1, 3))
        .tokens(["a", "b"])
        .render()
        .unwrap_err();
    assert!(
        matches!(&err, PlotError::LengthMismatch { what, .. } if what == "tokens"),
        "{err}"
    );
}

#[test]
fn grid_rejects_no_heads_and_zero_columns() {
    let none: Vec<Vec<Vec<f64>>> = vec![];
    assert!(matches!(
        AttentionGrid::new(&none).render(),
        Err(PlotError::Empty(_))
    ));
    assert!(matches!(
        AttentionGrid::new(&causal(2, 2)).columns(0).render(),
        Err(PlotError::InvalidArgument { name, .. }) if name == "columns"
    ));
}

#[test]
fn grid_from_flat_splits_heads_queries_and_keys() {
    let data: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32).collect();
    let fig = AttentionGrid::from_flat(&data, 2, 2, 3)
        .unwrap()
        .render()
        .unwrap();
    let doc = parse(fig.to_svg());
    let tips = tooltips(&doc);
    // Head 1, query 1, key 2 is the last value.
    assert!(tips.iter().any(|t| t.starts_with("head 1\nquery 1")
        && t.contains("key 2")
        && t.ends_with("attention: 11")));
    assert!(AttentionGrid::from_flat(&data, 2, 3, 3).is_err());
}

#[test]
fn grid_lays_out_many_heads_in_rows() {
    let fig16 = AttentionGrid::new(&causal(16, 2)).render().unwrap();
    let fig4 = AttentionGrid::new(&causal(4, 2)).render().unwrap();
    // 16 heads: two rows of 8; 4 heads: one row.
    assert!(fig16.height() > fig4.height());
    assert!(fig16.width() > fig4.width());
}
