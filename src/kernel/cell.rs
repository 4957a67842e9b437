//! The cell side of the kernel: what code running *inside* a notebook cell
//! uses to talk to the DeepScope kernel, and the interrupt signal that long
//! library operations check.
//!
//! This module is compiled without the `kernel` feature (cells load the
//! library with default features off), so it depends on nothing but `std`,
//! `serde_json` and `libc`.
//!
//! Errors returned through `?` in a cell reach the kernel through
//! [`report_cell_error`] (see [`super::cell_error`]).
//!
//! # Display messages
//! A cell's stdout is a pipe to the kernel. A line that starts with
//! [`MESSAGE_PREFIX`] followed by one JSON object is a message for the
//! kernel rather than text for the user: a `display_data`, an
//! `update_display_data`, a `clear_output`, a panic report or an error
//! returned through `?`. The kernel turns
//! it into the matching Jupyter message the moment it arrives, so charts and
//! progress bars show *while* the cell runs. Outside the kernel (environment
//! variable `DEEPSCOPE_KERNEL` unset) the helpers print plain text instead.
//!
//! Interrupts: see [`crate::interrupt`].

use serde_json::{json, Value};

pub use crate::interrupt::{check_interrupt, reset_interrupt, Interrupt, INTERRUPT_COUNT_SYMBOL, INTERRUPT_SEEN_SYMBOL};
use crate::plot::{Figure, MimeBundle, MimeType, Table};

pub use super::cell_error::report_cell_error;

/// Marks a stdout line as a message for the kernel.
pub const MESSAGE_PREFIX: &str = "\u{1b}[deepscope-msg]";
/// Set by the kernel in its own environment, so every runner sees it.
pub const KERNEL_ENV: &str = "DEEPSCOPE_KERNEL";

/// The variable (patched evcxr, `runtime::STDERR_END_MARKER_ENV`) holding the
/// line the runner writes on stderr to end a cell's stderr, and a widget
/// event's (`widgets`): the kernel reads stdout and stderr on two threads and
/// waits for this line before it reports either done. Without it a cell's
/// last stderr lines could arrive after the reply: `make soak` found 3 of
/// ~200 `eprintln!` cells whose line was missing (it went to the next cell or
/// nowhere), once cells were fast.
pub const STDERR_END_MARKER_ENV: &str = "EVCXR_STDERR_END_MARKER";

/// Anything that can show itself as a MIME bundle in a notebook.
pub trait RichDisplay {
    fn mime_bundle(&self) -> MimeBundle;
}

impl RichDisplay for MimeBundle {
    fn mime_bundle(&self) -> MimeBundle {
        self.clone()
    }
}

impl RichDisplay for Figure {
    fn mime_bundle(&self) -> MimeBundle {
        Figure::mime_bundle(self)
    }
}

impl RichDisplay for Table {
    fn mime_bundle(&self) -> MimeBundle {
        Table::mime_bundle(self)
    }
}

impl<T: RichDisplay + ?Sized> RichDisplay for &T {
    fn mime_bundle(&self) -> MimeBundle {
        (**self).mime_bundle()
    }
}

/// True inside a DeepScope kernel's runner.
pub fn in_kernel() -> bool {
    std::env::var_os(KERNEL_ENV).is_some()
}

pub(crate) fn send(message: Value) {
    use std::io::Write;
    let line = format!("{MESSAGE_PREFIX}{message}\n");
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    // A closed stdout means the kernel is gone; nothing useful can be done.
    let _ = lock.write_all(line.as_bytes());
    let _ = lock.flush();
}

fn display_bundle(bundle: &MimeBundle, display_id: Option<&str>, update: bool) {
    if in_kernel() {
        send(json!({
            "type": "display",
            "data": bundle.to_json(),
            "display_id": display_id,
            "update": update,
        }));
    } else if let Some(text) = bundle.get(MimeType::TextPlain) {
        println!("{text}");
    }
}

/// Shows `value` now, as a `display_data` output of the running cell.
///
/// ```
/// use deepscope::prelude::*;
/// let mut t = Table::new(["expert", "load"]);
/// t.add_row(["e0".into(), 0.25.into()])?;
/// show(&t); // in a plain program: prints the text table
/// # Ok::<(), deepscope::Error>(())
/// ```
pub fn show(value: &impl RichDisplay) {
    display_bundle(&value.mime_bundle(), None, false);
}

fn text_bundle(mime: MimeType, content: &str, plain: &str) -> MimeBundle {
    let mut b = MimeBundle::new();
    b.insert(MimeType::TextPlain, plain);
    b.insert(mime, content);
    b
}

/// Shows an HTML fragment.
pub fn html(content: &str) {
    display_bundle(&text_bundle(MimeType::TextHtml, content, content), None, false);
}

/// Shows an SVG image.
pub fn svg(content: &str) {
    display_bundle(&text_bundle(MimeType::ImageSvg, content, "<svg image>"), None, false);
}

/// Shows Markdown text.
pub fn markdown(content: &str) {
    display_bundle(&text_bundle(MimeType::TextMarkdown, content, content), None, false);
}

/// Asks the user for a line of text (an `input_request` in the notebook;
/// the front end must allow stdin). Outside the kernel: reads stdin.
pub fn input(prompt: &str) -> String {
    read_line(prompt, false)
}

/// Like [`input`], with the typed text hidden.
pub fn password(prompt: &str) -> String {
    read_line(prompt, true)
}

fn read_line(prompt: &str, hidden: bool) -> String {
    use std::io::Write;
    if in_kernel() {
        // evcxr's input protocol: the kernel answers on the runner's stdin.
        let cmd = if hidden { "EVCXR_INPUT_REQUEST_PASSWORD" } else { "EVCXR_INPUT_REQUEST" };
        println!("{cmd}:{prompt}");
    } else {
        print!("{prompt}");
        let _ = std::io::stdout().flush();
    }
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    line.trim_end_matches(['\r', '\n']).to_string()
}

/// Clears the cell's output (`wait`: only when new output arrives).
pub fn clear_output(wait: bool) {
    if in_kernel() {
        send(json!({ "type": "clear_output", "wait": wait }));
    }
}

/// Reports a panic to the kernel with its message and location. The kernel
/// installs this as the panic hook of every runner, so a panic becomes a
/// proper `error` reply (ename `Panic`) instead of stray stderr text.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_string()
        };
        let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        if in_kernel() {
            send(json!({ "type": "panic", "message": message, "location": location }));
        } else {
            eprintln!("panicked at {}: {message}", location.unwrap_or_default());
        }
    }));
}

/// A live progress bar: one output that updates in place
/// (`display_data` with a display id, then `update_display_data`).
///
/// ```
/// use deepscope::prelude::*;
/// let mut p = Progress::new("windows", 3);
/// for _ in 0..3 { p.inc(1); }
/// p.finish();
/// ```
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    id: String,
    last: std::time::Instant,
    start: std::time::Instant,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Progress {
        let now = std::time::Instant::now();
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let id = format!("deepscope-progress-{}-{:x}", std::process::id(), since_epoch.as_nanos());
        let mut p = Progress { label: label.to_string(), total, done: 0, id, last: now, start: now };
        p.render(false);
        p
    }

    /// Sets the number of finished steps.
    pub fn set(&mut self, done: u64) {
        self.done = done.min(self.total);
        // At most ~10 updates a second: each one is a message to the browser.
        if self.last.elapsed().as_millis() >= 100 || self.done == self.total {
            self.render(true);
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.set(self.done + n);
    }

    pub fn finish(&mut self) {
        self.done = self.total;
        self.render(true);
    }

    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }

    fn render(&mut self, update: bool) {
        self.last = std::time::Instant::now();
        if !in_kernel() {
            return;
        }
        let pct = 100.0 * self.fraction();
        let secs = self.start.elapsed().as_secs_f64();
        let text = format!("{}: {}/{} ({pct:.0}%, {secs:.1} s)", self.label, self.done, self.total);
        let html = format!(
            "<div style=\"font-family:sans-serif;font-size:12px\">{}<div style=\"width:300px;height:10px;background:#e5e5e5;border-radius:3px\"><div style=\"width:{pct:.1}%;height:10px;background:#3b75af;border-radius:3px\"></div></div></div>",
            crate::plot::svg::escape(&text)
        );
        let mut b = MimeBundle::new();
        b.insert(MimeType::TextPlain, text);
        b.insert(MimeType::TextHtml, html);
        display_bundle(&b, Some(&self.id), update);
    }
}

/// Parses one stdout line of a runner: `Some(message)` when it is a kernel message.
pub fn parse_message(line: &str) -> Option<Value> {
    let rest = line.strip_prefix(MESSAGE_PREFIX)?;
    serde_json::from_str(rest).ok()
}

impl RichDisplay for crate::plot::TokenStrip {
    fn mime_bundle(&self) -> MimeBundle {
        crate::plot::TokenStrip::mime_bundle(self)
    }
}
