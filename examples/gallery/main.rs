//! Writes the plot gallery (one SVG and one PNG per chart type, the HTML
//! pieces and an index.html) to the directory given, by default
//! `target/gallery`. `make gallery` runs this; `cargo test` runs its test.

mod charts;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "target/gallery".to_string());
    let written = charts::write_all(&dir)?;
    println!("wrote {} files to {dir}; open {dir}/index.html", written.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::charts as gallery;

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("deepscope-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn gallery_writes_an_svg_and_a_png_per_chart_and_an_index() {
        let dir = scratch_dir("gallery");
        let written = gallery::write_all(&dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        for chart in [
            "heatmap",
            "bars_grouped",
            "bars_stacked",
            "histogram_log",
            "lines_spectrum",
            "attention_grid",
        ] {
            assert!(
                names.contains(&format!("{chart}.svg")) && names.contains(&format!("{chart}.png")),
                "{chart}"
            );
        }
        for piece in ["token_strip.html", "table.html", "table.txt", "index.html"] {
            assert!(names.contains(&piece.to_string()), "{piece}");
        }
        for path in &written {
            assert!(
                std::fs::metadata(path).unwrap().len() > 100,
                "{}",
                path.display()
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
