//! Running cells: one worker thread owns evcxr's `CommandContext`; two
//! forwarder threads turn the runner's stdout and stderr into iopub
//! messages as they arrive (stdout lines that carry a cell message become
//! `display_data`, `update_display_data`, `clear_output`, or a panic or `?`
//! error report that the cell's reply then carries).
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use evcxr::{CommandContext, EvalCallbacks, EvalContext};
use serde_json::{json, Value};

use super::cell;
use super::cell_error::CellError;
use super::comms::CommLink;
use super::messages::{ClearOutput, CommClose, CommMessage, CommOpened, DisplayData, ErrorContent, Stream, StreamName, UpdateDisplayData};
use super::wire::Message;
use crate::error::{Error, Result};

/// What the worker needs to publish on iopub for the request being run.
pub(crate) struct Publisher {
    pub session: String,
    pub iopub: tokio::sync::mpsc::UnboundedSender<Message>,
    /// The request whose output is flowing now, and whether it is silent.
    pub parent: Mutex<Option<(Message, bool)>>,
}

impl Publisher {
    pub fn publish<C: super::messages::Content>(&self, parent: &Message, content: &C) {
        // The receiver lives as long as the kernel; a send error means shutdown.
        let _ = self.iopub.send(parent.child(&self.session, content));
    }

    /// Comm messages are never dropped: a silent request's comms still
    /// exist, and a message with no request running goes out unparented.
    pub fn publish_comm<C: super::messages::Content>(&self, content: &C) {
        self.publish_comm_with(content, json!({}));
    }

    /// The same with message-level `metadata` (a widget's `comm_open`
    /// carries the protocol version there, not in its content).
    pub fn publish_comm_with<C: super::messages::Content>(&self, content: &C, metadata: Value) {
        let parent = self.parent.lock().ok().and_then(|g| g.as_ref().map(|(p, _)| p.clone()));
        let mut m = match parent {
            Some(p) => p.child(&self.session, content),
            None => Message::orphan(&self.session, content),
        };
        m.metadata = metadata;
        let _ = self.iopub.send(m);
    }

    fn publish_current<C: super::messages::Content>(&self, content: &C) {
        if let Ok(guard) = self.parent.lock() {
            if let Some((parent, silent)) = guard.as_ref() {
                if !silent {
                    self.publish(parent, content);
                }
            }
        }
    }
}

/// State shared between the worker, the forwarders and the control channel.
pub(crate) struct Shared {
    pub publisher: Publisher,
    /// A panic reported by the running cell: (message, location).
    pub panic: Mutex<Option<(String, Option<String>)>>,
    /// An error the running cell returned through `?` (reported by
    /// `cell_error::report_cell_error`).
    pub user_error: Mutex<Option<CellError>>,
    /// The runner process (valid across evcxr's restarts of it).
    pub runner: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
    /// A cell is running now.
    pub running: AtomicBool,
    /// Serial number of the running cell, so a late interrupt timer does not
    /// kill a later cell.
    pub cell_serial: AtomicU64,
    /// Serial of the cell an interrupt arrived for (0: none).
    pub interrupted: AtomicU64,
    /// The runner was killed because the cell ignored an interrupt.
    pub runner_killed: AtomicBool,
    pub last_stderr: Mutex<Instant>,
    /// How many cells' stderr has ended (the runner's end marker, see
    /// `STDERR_END_MARKER`).
    pub stderr_ends: AtomicU64,
    /// Widget comms: the open ones, and the way events reach the runner.
    pub comms: Arc<CommLink>,
}

impl Shared {
    pub fn runner_pid(&self) -> Option<u32> {
        let handle = self.runner.lock().ok()?.clone()?;
        let child = handle.lock().ok()?;
        Some(child.id())
    }

    /// Whether the runner process is running.
    pub fn runner_alive(&self) -> bool {
        let Some(handle) = self.runner.lock().ok().and_then(|g| g.clone()) else { return false };
        let Ok(mut child) = handle.lock() else { return false };
        matches!(child.try_wait(), Ok(None))
    }

    pub fn kill_runner(&self) {
        if let Some(handle) = self.runner.lock().ok().and_then(|g| g.clone()) {
            if let Ok(mut child) = handle.lock() {
                let _ = child.kill();
            }
        }
    }
}

/// The outcome of one cell.
pub(crate) struct CellOutcome {
    /// The last expression's MIME bundle (empty when none).
    pub result: Value,
    pub error: Option<ErrorContent>,
}

/// Where evcxr builds: one slot per running kernel, locked with flock, so
/// two kernels never share a build directory. Slot 0 is the one
/// `deepscope kernel --prebuild` fills.
pub(crate) struct Slot {
    pub dir: PathBuf,
    _lock: File,
}

pub(crate) fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEEPSCOPE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("deepscope")
}

pub(crate) fn take_slot() -> Result<Slot> {
    use std::os::fd::AsRawFd;
    let root = cache_dir().join("evcxr");
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    for n in 0..64 {
        let lock_path = root.join(format!("slot-{n}.lock"));
        let file = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        // SAFETY: flock on a file descriptor we own; released when it closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            let dir = root.join(format!("slot-{n}"));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let origin = build_origin();
            forget_other_builds(&dir, &origin)?;
            let slot0 = root.join("slot-0");
            if n > 0 && stamp_of(&slot0).as_deref() == Some(origin.as_str()) {
                seed_slot(&slot0, &dir);
                // slot 0 may have been rebuilt for another origin meanwhile
                if stamp_of(&slot0).as_deref() != Some(origin.as_str()) {
                    let target = dir.join("target");
                    std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
                }
            }
            let stamp = dir.join(STAMP);
            std::fs::write(&stamp, &origin).map_err(|e| Error::io(&stamp, e))?;
            return Ok(Slot { dir, _lock: file });
        }
    }
    Err(Error::Kernel(format!("all 64 build slots under {} are in use", root.display())))
}

/// The file in a slot that names the DeepScope source and the libtorch its
/// build was made from.
const STAMP: &str = "origin";

/// What a slot's compiled dependencies depend on beyond their own sources:
/// the DeepScope source directory and the venv (torch-sys records where
/// libtorch was when its build script ran, and cargo does not run it again
/// when only that place changes).
fn build_origin() -> String {
    format!(
        "source {}\nvenv {}\nlibtorch {}\n",
        super::install::source_dir().display(),
        super::install::venv_dir().map_or("-".into(), |v| v.display().to_string()),
        option_env!("DEEPSCOPE_LIBTORCH_LIB").unwrap_or("-"),
    )
}

fn stamp_of(slot: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(slot.join(STAMP)).ok()
}

/// Removes a slot's build made for another source or venv: measured, a slot
/// built from a clone whose venv was then deleted kept linking cells against
/// the deleted libtorch (`rust-lld: unable to find library -ltorch_cpu`)
/// until the slot was removed by hand. Returns whether it removed one; a
/// build it cannot remove is an error (and loses its stamp), never trusted.
fn forget_other_builds(slot: &std::path::Path, origin: &str) -> Result<bool> {
    let target = slot.join("target");
    let stale = match stamp_of(slot) {
        Some(s) => s != origin,
        None => target.exists(),
    };
    if stale && target.exists() {
        let _ = std::fs::remove_file(slot.join(STAMP));
        std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    }
    Ok(stale)
}

/// A second kernel running at the same time gets its own slot. An empty one
/// is seeded with a copy of slot 0's compiled dependencies (their files do not
/// change once built), which takes seconds instead of a cold build.
fn seed_slot(from: &std::path::Path, to: &std::path::Path) {
    let (src, dst) = (from.join("target"), to.join("target"));
    if dst.exists() || !src.is_dir() {
        return;
    }
    let tmp = to.join("target.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let copied = std::process::Command::new("cp").arg("-a").arg(&src).arg(&tmp).status();
    if copied.is_ok_and(|s| s.success()) {
        let _ = std::fs::rename(&tmp, &dst);
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

/// Environment the runner and evcxr's cargo need to build and load tch:
/// the venv's python first on PATH (torch-sys asks it where libtorch is).
pub(crate) fn prepare_environment() -> Toolchain {
    let toolchain = Toolchain::detect();
    // SAFETY (set_var): called from `main`'s thread before any other thread starts.
    if let Some(venv) = super::install::venv_dir() {
        let bin = venv.join("bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = vec![bin];
        paths.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(paths) {
            std::env::set_var("PATH", joined);
        }
        std::env::set_var("VIRTUAL_ENV", &venv);
    }
    // The runner loads each cell as a shared library linked against the
    // toolchain's libstd and against libtorch: put both on the loader path.
    let mut libs: Vec<PathBuf> = Vec::new();
    if let Some(sysroot) = &toolchain.sysroot {
        libs.push(sysroot.join("lib"));
        libs.push(sysroot.join("lib").join("rustlib").join(&toolchain.host).join("lib"));
    }
    if let Some(torch) = option_env!("DEEPSCOPE_LIBTORCH_LIB") {
        libs.push(PathBuf::from(torch));
    }
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        libs.extend(std::env::split_paths(&old));
    }
    if let Ok(joined) = std::env::join_paths(libs) {
        std::env::set_var("LD_LIBRARY_PATH", joined);
    }
    if std::env::var_os("LIBTORCH").is_none() {
        std::env::set_var("LIBTORCH_USE_PYTORCH", "1");
    }
    std::env::set_var(cell::KERNEL_ENV, "1");
    // widgets in the runner connect here (src/kernel/comms.rs)
    std::env::set_var(super::comms::COMM_SOCKET_ENV, super::comms::socket_path());
    // patched evcxr: the runner ends each cell's stderr with this line
    std::env::set_var(STDERR_END_MARKER_ENV, STDERR_END_MARKER);
    // the runner dies with this process (src/bin/deepscope.rs, die_with_the_kernel)
    std::env::set_var("DEEPSCOPE_KERNEL_PID", std::process::id().to_string());
    // patched evcxr: cargo's rustc wrapper is the small program built beside
    // this one (src/bin/deepscope-rustc.rs) instead of this executable, which
    // takes ~0.4 s to start because it links libtorch (without it: evcxr's default)
    if let Some(wrapper) = rustc_wrapper() {
        std::env::set_var(evcxr::RUSTC_WRAPPER_PATH_ENV, wrapper);
    }
    toolchain
}

/// `deepscope-rustc` next to the running executable, if it is there.
fn rustc_wrapper() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let wrapper = exe.parent()?.join(format!("deepscope-rustc{}", std::env::consts::EXE_SUFFIX));
    wrapper.is_file().then_some(wrapper)
}

/// The Rust toolchain that compiles the cells, asked once at start-up.
pub(crate) struct Toolchain {
    pub sysroot: Option<PathBuf>,
    pub host: String,
    /// e.g. `1.95.0` (the kernel_info `language_info.version`).
    pub release: String,
}

impl Toolchain {
    fn detect() -> Toolchain {
        let rustc = |args: &[&str]| -> Option<String> {
            let out = std::process::Command::new("rustc").args(args).output().ok()?;
            String::from_utf8(out.stdout).ok()
        };
        let vv = rustc(&["-vV"]).unwrap_or_default();
        let field = |name: &str| vv.lines().find_map(|l| l.strip_prefix(name).map(str::to_string));
        Toolchain {
            sysroot: rustc(&["--print", "sysroot"]).map(|s| PathBuf::from(s.trim())),
            host: field("host: ").unwrap_or_else(|| "x86_64-unknown-linux-gnu".into()),
            release: field("release: ").unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// How the cells get the DeepScope library (`DEEPSCOPE_CELL_LINKING`).
///
/// evcxr links every dependency statically into each cell's shared object,
/// so each cell re-links the library it calls and the runner keeps every
/// copy mapped: measured 6.6 MB per `.so` and 0.28 s of rustc per trivial
/// cell, 0.18 s of it the link. `Dylib` (the default) builds the library
/// once as a Rust `dylib` through a one-line wrapper crate in the slot, and
/// each cell links only against it: 0.17 MB per `.so`, 0.16 s of rustc.
/// evcxr's own switch for this (`:allow_static_linking 0`) turns every crate
/// into a dylib and fails on rustc 1.95 (kernel-notes.md); one dylib for the
/// one library is enough. `Static` keeps evcxr's way, for comparison
/// (tests/bench_kernel.py measures both in one run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CellLinking {
    Dylib,
    Static,
}

pub(crate) const CELL_LINKING_ENV: &str = "DEEPSCOPE_CELL_LINKING";

impl CellLinking {
    fn from_env() -> Result<CellLinking> {
        match std::env::var(CELL_LINKING_ENV).as_deref() {
            Err(_) | Ok("") | Ok("dylib") => Ok(CellLinking::Dylib),
            Ok("static") => Ok(CellLinking::Static),
            Ok(other) => Err(Error::Kernel(format!("{CELL_LINKING_ENV}={other:?}: expected \"dylib\" or \"static\""))),
        }
    }
}

/// How cells are built, from the environment; read before a slot is taken,
/// so that a bad setting is an error at once, naming the variable.
pub(crate) struct CellSettings {
    pub linking: CellLinking,
    pub opt_level: String,
}

impl CellSettings {
    pub(crate) fn from_env() -> Result<CellSettings> {
        Ok(CellSettings { linking: CellLinking::from_env()?, opt_level: cell_opt_level()? })
    }
}

/// The opt-level the library and every other dependency are built at inside
/// evcxr (evcxr's own default, under which slots were always built).
const DEPENDENCY_OPT_LEVEL: &str = "2";

pub(crate) const CELL_OPT_LEVEL_ENV: &str = "DEEPSCOPE_CELL_OPT_LEVEL";

/// The opt-level of the cells' own code: 0 unless `DEEPSCOPE_CELL_OPT_LEVEL`
/// says otherwise. Measured on a `model.trace` cell (rustc alone, 2 cores):
/// 1.17 s at evcxr's default 2, 0.95 s at 1, 0.33 s at 0, most of the
/// difference LLVM's work on code that runs once. The model's work runs in
/// the library, which stays at 2; a cell with a heavy loop of its own can
/// ask for `:opt 2`.
fn cell_opt_level() -> Result<String> {
    match std::env::var(CELL_OPT_LEVEL_ENV) {
        Err(_) => Ok("0".into()),
        Ok(v) if ["0", "1", "2", "3", "s", "z"].contains(&v.as_str()) => Ok(v),
        Ok(v) => Err(Error::Kernel(format!("{CELL_OPT_LEVEL_ENV}={v:?}: expected 0, 1, 2, 3, s or z"))),
    }
}

/// The wrapper crate's package name; the cells still call it `deepscope`.
const CELLS_CRATE: &str = "deepscope-cells";

/// Writes the wrapper crate that makes the library a Rust dylib for the
/// cells (`pub use` of the whole library, so every path a cell writes is
/// unchanged). Files are rewritten only when their content changes, so cargo
/// does not rebuild the dylib at every start.
fn write_cells_crate(slot: &std::path::Path, src: &std::path::Path) -> Result<PathBuf> {
    let dir = slot.join(CELLS_CRATE);
    let manifest = format!(
        "# Written by the DeepScope kernel (src/kernel/exec.rs, CellLinking): the library as one\n\
         # Rust dylib that every cell links against, instead of a static copy per cell.\n\
         [package]\nname = \"{CELLS_CRATE}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [lib]\nname = \"deepscope\"\ncrate-type = [\"dylib\"]\npath = \"lib.rs\"\n\n\
         [dependencies]\ndeepscope_lib = {{ package = \"deepscope\", path = \"{}\", default-features = false }}\n",
        src.display()
    );
    let lib = "pub use deepscope_lib::*;\n";
    for (name, content) in [("Cargo.toml", manifest.as_str()), ("lib.rs", lib)] {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(content) {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            std::fs::write(&path, content).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(dir)
}

use super::cell::STDERR_END_MARKER_ENV;
const STDERR_END_MARKER: &str = "\u{1}deepscope: end of the cell's stderr\u{1}";

/// How long a cell's reply waits for the end of its stderr.
const STDERR_END_WAIT: Duration = Duration::from_secs(2);

/// The function the code evcxr generates for `?` calls (patches/evcxr/PATCH.md).
const ERROR_REPORTER: &str = "deepscope::kernel::cell::report_cell_error";

const SETUP_CODE: &str = "use deepscope::prelude::*;\ndeepscope::kernel::cell::install_panic_hook();";

/// Creates the evaluation context with the DeepScope library and prelude.
pub(crate) fn start_context(slot: &Slot, settings: &CellSettings) -> Result<(CommandContext, evcxr::EvalContextOutputs, Duration)> {
    let t0 = Instant::now();
    std::env::set_var("EVCXR_TMPDIR", &slot.dir);
    let (mut ctx, outputs) = EvalContext::new().map_err(|e| Error::Kernel(format!("starting evcxr: {e}")))?;
    let mut state = ctx.state();
    // patched evcxr: `?` in a cell calls this instead of printing to stderr
    state.set_error_reporter(Some(ERROR_REPORTER.to_string()));
    // patched evcxr: cells are wrapped for `?` from the start, so the first
    // cell that uses `?` is not compiled twice
    state.set_allow_question_mark(true);
    // The library and its dependencies stay optimised; the cells' own code is
    // compiled at CELL_OPT_LEVEL (see there); `:opt 2` in a cell raises it.
    state.set_dependency_opt_level(Some(DEPENDENCY_OPT_LEVEL));
    state.set_opt_level(&settings.opt_level).map_err(|e| Error::Kernel(format!("{CELL_OPT_LEVEL_ENV}: {e}")))?;
    let src = super::install::source_dir();
    let dep = match settings.linking {
        CellLinking::Dylib => {
            let dir = write_cells_crate(&slot.dir, &src)?;
            format!("{{ package = \"{CELLS_CRATE}\", path = \"{}\" }}", dir.display())
        }
        CellLinking::Static => format!("{{ path = \"{}\", default-features = false }}", src.display()),
    };
    state.add_dep("deepscope", &dep).map_err(|e| Error::Kernel(format!("adding the deepscope library ({dep}): {e}")))?;
    ctx.eval_with_state(SETUP_CODE, state)
        .map_err(|e| Error::Kernel(format!("building the DeepScope library inside evcxr (in {}): {}", slot.dir.display(), build_failure(&e))))?;
    Ok((CommandContext::with_eval_context(ctx), outputs, t0.elapsed()))
}

/// Builds, once per slot, what evcxr's `cargo check` needs. When
/// rust-analyzer cannot type a cell's variables (a typo, an unknown method),
/// evcxr asks `cargo check` for the errors, and the first check in a slot
/// builds check metadata for every dependency: measured 23-30 s for the
/// user's first mistake. `--prebuild` pays it instead, with a cell that
/// fails that way on purpose (an error is the expected result).
pub(crate) fn warm_checker(mut ctx: CommandContext) {
    let _ = ctx.execute("let deepscope_prebuild_check = deepscope_prebuild_no_such_function();");
}

/// What a failed build of the library says, with the cause: evcxr's
/// `Display` gives each diagnostic's first line only, which for a failed
/// link is "linking with `cc` failed" without the linker's own messages
/// (e.g. `unable to find library -ltorch_cpu`).
fn build_failure(e: &evcxr::Error) -> String {
    match e {
        evcxr::Error::CompilationErrors(errors) => errors
            .iter()
            .map(|c| {
                let mut out = c.message();
                for line in diagnostic_detail(&c.rendered()) {
                    out.push_str("\n  ");
                    out.push_str(&line);
                }
                out
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// The lines of a rendered rustc diagnostic after its headline, without the
/// linker command line (thousands of characters of arguments), each cut to
/// 300 characters, at most 20.
fn diagnostic_detail(rendered: &str) -> Vec<String> {
    rendered
        .lines()
        .skip(1)
        .map(|l| l.trim().trim_start_matches("= note:").trim())
        .filter(|l| !l.is_empty() && *l != "|" && !l.starts_with("\"cc\"") && !l.starts_with("some arguments are omitted"))
        .map(|l| l.chars().take(300).collect())
        .take(20)
        .collect()
}

/// Drains a runner output channel into iopub; answers flush requests once
/// everything received so far has been published.
pub(crate) fn spawn_forwarder(
    shared: Arc<Shared>,
    lines: Receiver<String>,
    flush: Receiver<Sender<()>>,
    is_stdout: bool,
) {
    std::thread::spawn(move || {
        let name = if is_stdout { StreamName::Stdout } else { StreamName::Stderr };
        loop {
            select! {
                recv(lines) -> line => {
                    let Ok(line) = line else { return };
                    let mut batch = vec![line];
                    batch.extend(lines.try_iter());
                    forward(&shared, name, batch);
                }
                recv(flush) -> ack => {
                    let Ok(ack) = ack else { return };
                    let batch: Vec<String> = lines.try_iter().collect();
                    if !batch.is_empty() {
                        forward(&shared, name, batch);
                    }
                    let _ = ack.send(());
                }
            }
        }
    });
}

fn forward(shared: &Shared, name: StreamName, batch: Vec<String>) {
    let p = &shared.publisher;
    if name == StreamName::Stderr {
        if let Ok(mut t) = shared.last_stderr.lock() {
            *t = Instant::now();
        }
    }
    let mut text = String::new();
    let flush_text = |text: &mut String| {
        if !text.is_empty() {
            p.publish_current(&Stream { name, text: std::mem::take(text) });
        }
    };
    for line in batch {
        if name == StreamName::Stderr && line == STDERR_END_MARKER {
            flush_text(&mut text);
            shared.stderr_ends.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let message = if name == StreamName::Stdout { cell::parse_message(&line) } else { None };
        let Some(m) = message else {
            text.push_str(&line);
            text.push('\n');
            continue;
        };
        flush_text(&mut text);
        match m["type"].as_str() {
            Some("display") => {
                let mut transient = json!({});
                if let Some(id) = m["display_id"].as_str() {
                    transient = json!({ "display_id": id });
                }
                let d = DisplayData { data: m["data"].clone(), metadata: json!({}), transient };
                if m["update"].as_bool() == Some(true) {
                    p.publish_current(&UpdateDisplayData(d));
                } else {
                    p.publish_current(&d);
                }
            }
            Some("clear_output") => p.publish_current(&ClearOutput { wait: m["wait"].as_bool().unwrap_or(false) }),
            Some("comm_open") => {
                let (id, target) = (m["comm_id"].as_str().unwrap_or_default(), m["target_name"].as_str().unwrap_or_default());
                shared.comms.opened(id, target);
                let metadata = if m["metadata"].is_object() { m["metadata"].clone() } else { json!({}) };
                p.publish_comm_with(&CommOpened { comm_id: id.into(), target_name: target.into(), data: m["data"].clone() }, metadata);
            }
            Some("comm_target") => shared.comms.add_target(m["target_name"].as_str().unwrap_or_default()),
            Some("comm_msg") => {
                p.publish_comm(&CommMessage { comm_id: m["comm_id"].as_str().unwrap_or_default().into(), data: m["data"].clone() });
            }
            Some("comm_close") => {
                let id = m["comm_id"].as_str().unwrap_or_default();
                shared.comms.closed(id);
                p.publish_comm(&CommClose { comm_id: id.into(), data: json!({}) });
            }
            Some("error") => {
                // a message of another shape leaves the generic `?` error (Worker::run)
                if let (Ok(e), Ok(mut slot)) = (serde_json::from_value::<CellError>(m.clone()), shared.user_error.lock()) {
                    *slot = Some(e);
                }
            }
            Some("panic") => {
                let message = m["message"].as_str().unwrap_or("panic").to_string();
                let location = m["location"].as_str().map(str::to_string);
                if let Ok(mut slot) = shared.panic.lock() {
                    *slot = Some((message, location));
                }
            }
            _ => {}
        }
    }
    flush_text(&mut text);
}

/// The worker's view of evcxr: runs cells, completes, inspects.
pub(crate) struct Worker {
    pub ctx: CommandContext,
    pub shared: Arc<Shared>,
    pub flush_stdout: Sender<Sender<()>>,
    pub flush_stderr: Sender<Sender<()>>,
}

fn error(ename: &str, evalue: impl Into<String>, traceback: Vec<String>) -> ErrorContent {
    let evalue = evalue.into();
    let traceback = if traceback.is_empty() { vec![format!("{ename}: {evalue}")] } else { traceback };
    ErrorContent { ename: ename.into(), evalue, traceback }
}

const RED: &str = "\u{1b}[0;31m";
const DIM: &str = "\u{1b}[2m";
const RESET: &str = "\u{1b}[0m";

/// The sentence that says which of the cell's values were lost.
fn not_stored(how: &str, names: &[String]) -> String {
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.sort_unstable();
    let lost = match names.as_slice() {
        [] => String::new(),
        [one] => format!(" `{one}`, defined in this cell, was not stored."),
        many => format!(" {}, defined in this cell, were not stored.", many.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")),
    };
    format!("{DIM}The cell {how}, so it stopped there.{lost} Values from earlier cells are kept.{RESET}")
}

/// The reply for an error a cell returned through `?`: its name, message and
/// causes, coloured like other kernels' tracebacks.
fn returned_error(e: CellError, unstored: &[String]) -> ErrorContent {
    let mut tb = vec![format!("{RED}{}{RESET}: {}", e.ename, e.evalue)];
    for cause in &e.causes {
        tb.push(format!("  caused by: {cause}"));
    }
    tb.push(not_stored("returned an error through `?`", unstored));
    ErrorContent { ename: e.ename, evalue: e.evalue, traceback: tb }
}

fn compile_error(errors: &[evcxr::CompilationError]) -> ErrorContent {
    let first = errors.first().map(|e| e.message()).unwrap_or_else(|| "compilation failed".into());
    let mut traceback = Vec::new();
    for e in errors {
        let mut text = if e.is_from_user_code() { e.rendered() } else { e.message() };
        for h in e.help() {
            text.push_str(&format!("\nhelp: {h}"));
        }
        traceback.push(text);
    }
    error("CompileError", first, traceback)
}

impl Worker {
    /// Waits for the end of the cell's stderr when the runner ran code
    /// (`ends_before`: the count of ended cells before it; see
    /// `STDERR_END_MARKER`), else until stderr has been quiet briefly; then
    /// makes both forwarders publish everything they hold.
    fn flush(&self, ends_before: Option<u64>) {
        let start = Instant::now();
        loop {
            let done = match ends_before {
                Some(before) => self.shared.stderr_ends.load(Ordering::SeqCst) > before || start.elapsed() >= STDERR_END_WAIT,
                None => {
                    let quiet = self.shared.last_stderr.lock().map(|t| t.elapsed()).unwrap_or_default();
                    quiet >= Duration::from_millis(15) || start.elapsed() >= Duration::from_millis(150)
                }
            };
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for f in [&self.flush_stdout, &self.flush_stderr] {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if f.send(tx).is_ok() {
                let _ = rx.recv_timeout(Duration::from_secs(5));
            }
        }
    }

    /// Runs one cell (already magic-expanded) with `parent` as the request
    /// its output belongs to.
    pub fn run(&mut self, code: &str, parent: &Message, silent: bool, input: &dyn Fn(evcxr_input_request::Req) -> String) -> CellOutcome {
        if let Ok(mut p) = self.shared.panic.lock() {
            *p = None;
        }
        if let Ok(mut e) = self.shared.user_error.lock() {
            *e = None;
        }
        let serial = self.start_job(parent, silent);
        let mut callbacks =
            EvalCallbacks { input_reader: &|r| input(evcxr_input_request::Req { prompt: r.prompt, password: r.is_password }) };
        let ends_before = self.shared.stderr_ends.load(Ordering::SeqCst);
        let result = self.ctx.execute_with_callbacks(code, &mut callbacks);
        self.shared.running.store(false, Ordering::SeqCst);
        self.flush(ran_code(&result).then_some(ends_before));
        let interrupted = self.shared.interrupted.load(Ordering::SeqCst) == serial;
        let killed = self.shared.runner_killed.load(Ordering::SeqCst);
        let panic = self.shared.panic.lock().ok().and_then(|mut p| p.take());
        let user_error = self.shared.user_error.lock().ok().and_then(|mut e| e.take());
        let outcome = match result {
            Err(evcxr::Error::CompilationErrors(errors)) => CellOutcome { result: Value::Null, error: Some(compile_error(&errors)) },
            Err(evcxr::Error::SubprocessTerminated(msg)) => {
                let err = if killed {
                    error(
                        "Interrupted",
                        "the cell did not stop within 3 s of the interrupt, so the Rust runner was restarted: all variables were lost",
                        vec![],
                    )
                } else {
                    error("RunnerCrashed", format!("the Rust runner stopped: {msg}. All variables were lost."), vec![])
                };
                self.reinstall_setup();
                self.close_runner_comms();
                CellOutcome { result: Value::Null, error: Some(err) }
            }
            Err(evcxr::Error::TypeRedefinedVariablesLost(vars)) => CellOutcome {
                result: Value::Null,
                error: Some(error("VariablesLost", format!("a type was redefined, so these variables were lost: {}", vars.join(", ")), vec![])),
            },
            Err(e) => CellOutcome { result: Value::Null, error: Some(error("EvcxrError", e.to_string(), vec![])) },
            Ok(outputs) => {
                let mut data = serde_json::Map::new();
                for (mime, content) in &outputs.content_by_mime_type {
                    // `application/json`, a widget view: JSON, not a string
                    let json_value = if mime.ends_with("json") { serde_json::from_str(content).ok() } else { None };
                    data.insert(mime.clone(), json_value.unwrap_or_else(|| Value::String(content.clone())));
                }
                let err = if let Some((message, location)) = panic {
                    let mut tb = vec![format!("{RED}Panic{RESET}: {message}")];
                    if let Some(l) = location {
                        tb.push(format!("  at {l}"));
                    }
                    tb.push(not_stored("panicked", &outputs.unstored_variables));
                    Some(error("Panic", message, tb))
                } else if user_error.is_some() || outputs.user_error {
                    let e = user_error.unwrap_or_else(|| CellError {
                        ename: "Error".into(),
                        evalue: "the cell returned an error through `?`; its message is in the stderr output above".into(),
                        causes: Vec::new(),
                    });
                    Some(returned_error(e, &outputs.unstored_variables))
                } else if interrupted {
                    Some(error("Interrupted", "interrupted: the cell stopped at the interrupt request; values defined before it are kept", vec![]))
                } else {
                    None
                };
                // A cell ending in a call that returns `()` has no result
                // worth showing (like Python's None).
                let unit = data.len() == 1 && data.get("text/plain").and_then(Value::as_str) == Some("()");
                let show = err.is_none() && !data.is_empty() && !unit;
                CellOutcome { result: if show { Value::Object(data) } else { Value::Null }, error: err }
            }
        };
        self.finish_job(serial);
        outcome
    }

    /// Starts running code for `parent` in the runner (a cell or a widget
    /// event): its output belongs to `parent`, and interrupts reach it.
    /// Returns its serial number.
    fn start_job(&mut self, parent: &Message, silent: bool) -> u64 {
        if let Ok(mut p) = self.shared.publisher.parent.lock() {
            *p = Some((parent.clone(), silent));
        }
        self.shared.runner_killed.store(false, Ordering::SeqCst);
        let serial = self.shared.cell_serial.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.running.store(true, Ordering::SeqCst);
        serial
    }

    /// Ends the job `serial`, once `running` is cleared and its output
    /// flushed: an interrupt no check consumed must not stop a later cell.
    fn finish_job(&mut self, serial: u64) {
        let interrupted = self.shared.interrupted.load(Ordering::SeqCst) == serial;
        if interrupted && !self.shared.runner_killed.load(Ordering::SeqCst) {
            self.execute_internal("deepscope::kernel::cell::reset_interrupt();");
        }
        if let Ok(mut p) = self.shared.publisher.parent.lock() {
            *p = None;
        }
    }

    /// Loads rust-analyzer's view of the library before the first cell
    /// needs it. evcxr asks rust-analyzer for the type of every variable a
    /// cell defines; its first answer in a session costs 6-9 s here (the
    /// library and its dependencies are read), which the first `let` cell
    /// paid. A completion request on a typed variable takes that cost with
    /// no cell run and no state changed. The worker calls this the first
    /// time it is idle (src/kernel/server.rs).
    pub fn warm_analyzer(&mut self) {
        let code = "let deepscope_warm_up = Model::load_default(); deepscope_warm_up.";
        let _ = self.ctx.completions(code, code.len());
    }

    /// The runner that held the widgets is gone: the frontend closes them.
    fn close_runner_comms(&self) {
        for id in self.shared.comms.forget_all() {
            self.shared.publisher.publish_comm(&CommClose { comm_id: id, data: json!({}) });
        }
    }

    /// Hands a frontend's `comm_msg` (`kind` "msg") or `comm_close`
    /// ("close") to the widget in the runner and waits until its callbacks
    /// are done; what they print or draw belongs to `parent`. Interrupts
    /// work as for a cell.
    pub fn comm_event(&mut self, parent: &Message, kind: &str, comm_id: &str, data: &Value) {
        let serial = self.start_job(parent, false);
        let ends_before = self.shared.stderr_ends.load(Ordering::SeqCst);
        let outcome = self.shared.comms.send(kind, comm_id, data).and_then(|marker| {
            self.ctx.forward_stdout_until(&marker).map_err(|e| Error::Kernel(format!("the runner stopped while handling a widget event: {e}")))
        });
        self.shared.running.store(false, Ordering::SeqCst);
        // a handled event ended its stderr with the marker (widgets.rs), so
        // an error it printed is published before the event's idle status
        self.flush(outcome.is_ok().then_some(ends_before));
        if let Err(e) = outcome {
            self.shared.publisher.publish_current(&Stream { name: StreamName::Stderr, text: format!("deepscope widgets: {e}\n") });
            if !self.shared.runner_alive() {
                self.close_runner_comms();
            }
        }
        // a callback's panic was reported where it happened (widgets.rs);
        // it must not be charged to the next cell
        if let Ok(mut p) = self.shared.panic.lock() {
            *p = None;
        }
        self.finish_job(serial);
    }

    fn reinstall_setup(&mut self) {
        self.execute_internal(SETUP_CODE);
    }

    /// Runs the kernel's own code in the runner and publishes what it printed.
    fn execute_internal(&mut self, code: &str) {
        let before = self.shared.stderr_ends.load(Ordering::SeqCst);
        let result = self.ctx.execute(code);
        self.flush(ran_code(&result).then_some(before));
    }
}

/// Whether evcxr compiled and ran code for this execution (so the runner
/// wrote the end of its stderr): not for a compile error, a crash, or a cell
/// of `:` commands only.
fn ran_code(result: &std::result::Result<evcxr::EvalOutputs, evcxr::Error>) -> bool {
    result.as_ref().is_ok_and(|o| o.phases.iter().any(|p| p.name == "Final compile"))
}

/// An input request from a cell, in the kernel's terms.
pub(crate) mod evcxr_input_request {
    pub struct Req {
        pub prompt: String,
        pub password: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_link_says_what_the_linker_said() {
        // the shape of rustc's rendered diagnostic for a failed link
        let rendered = "error: linking with `cc` failed: exit status: 1\n  |\n  = note:  \"cc\" \"-Wl,--version-script\" \"-m64\" \"-ltorch_cpu\"\n  = note: some arguments are omitted. use `--verbose` to show all linker arguments\n  = note: rust-lld: error: unable to find library -ltorch_cpu\n          collect2: error: ld returned 1 exit status\n\n";
        let lines = diagnostic_detail(rendered);
        assert_eq!(lines, vec!["rust-lld: error: unable to find library -ltorch_cpu", "collect2: error: ld returned 1 exit status"]);
        assert!(diagnostic_detail("error: one line only").is_empty());
    }

    #[test]
    fn a_slot_built_for_another_source_or_venv_is_rebuilt() {
        let slot = std::env::temp_dir().join(format!("deepscope-slot-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&slot);
        std::fs::create_dir_all(slot.join("target/debug")).unwrap();
        // a build without a stamp (made before stamps) is not trusted
        assert!(forget_other_builds(&slot, "source a\n").unwrap());
        assert!(!slot.join("target").exists());
        // the same origin keeps its build, another one loses it
        std::fs::create_dir_all(slot.join("target/debug")).unwrap();
        std::fs::write(slot.join(STAMP), "source a\n").unwrap();
        assert!(!forget_other_builds(&slot, "source a\n").unwrap());
        assert!(slot.join("target/debug").exists());
        assert!(forget_other_builds(&slot, "source b\n").unwrap());
        assert!(!slot.join("target").exists());
        assert!(stamp_of(&slot).is_none(), "the old stamp goes with its build");
        let _ = std::fs::remove_dir_all(&slot);
    }
}
