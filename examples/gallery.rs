//! Writes the plot gallery (one SVG and one PNG per chart type, the HTML
//! pieces and an index.html) to the directory given, by default
//! `target/gallery`. `make gallery` runs this.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "target/gallery".to_string());
    let written = deepscope::plot::gallery::write_all(&dir)?;
    println!("wrote {} files to {dir}; open {dir}/index.html", written.len());
    Ok(())
}
