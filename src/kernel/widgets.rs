//! Jupyter widgets from Rust cells: sliders, dropdowns, check boxes,
//! buttons, text, HTML and output areas that JupyterLab's widget manager
//! renders, Rust callbacks that run when the user moves them, and
//! [`interact`], which redraws a chart in place whenever a control changes.
//!
//! ```
//! use deepscope::kernel::widgets::{interact, Checkbox, IntSlider};
//! let k = IntSlider::new("top-k", 2, 1, 8)?;
//! let zero = Checkbox::new("zero the bias", false);
//! let view = interact((k.clone(), zero.clone()), |(k, zero)| format!("k = {k}, zero = {zero}"))?;
//! k.set_value(3)?; // as if the user moved the slider: the output is redrawn
//! assert!(view.output().text().contains("k = 3"));
//! # Ok::<(), deepscope::Error>(())
//! ```
//!
//! # The protocol
//! Jupyter's widget messaging protocol, version 2.1.0, with the models of
//! `@jupyter-widgets/controls` 2.0.0, `@jupyter-widgets/base` 2.0.0 and
//! `@jupyter-widgets/output` 1.0.0 (ipywidgets 8, `jupyterlab_widgets` 3):
//! each widget is a comm of target `jupyter.widget` whose `comm_open`
//! carries the full state; `update` messages carry changed keys both ways;
//! `request_state` asks for the whole state again (a reloaded page); a
//! button's click arrives as `custom`. Every DOM widget gets its own layout
//! and style models, as ipywidgets creates them.
//!
//! # How a change reaches your callback, and what it costs
//! A widget lives in the runner, the process that runs the cells.
//! Messages *to* the frontend are cell messages on stdout (see
//! [`super::cell`]), so they keep their order with the cell's other output.
//! Messages *from* the frontend reach the runner over a Unix socket
//! (`DEEPSCOPE_COMM_SOCKET`) that the runner connects to when it creates
//! its first widget: a thread of the runner applies the new state, calls
//! the observers, and writes a line that tells the kernel it is done (the
//! kernel reads the runner's stdout up to that line, so what callbacks
//! print or draw shows at once). No code is compiled per
//! event, so an event costs the callback's own work plus the messaging
//! (tests/python/test_kernel_widgets.py measures it). The kernel hands over
//! one event at a time and only between cells, so a callback never runs
//! beside a cell or beside another callback.
//!
//! A callback that returns `Err` or panics does not take anything down: the
//! error is written to the runner's stderr (the frontend's log console,
//! since it belongs to no cell), and in [`interact`] it is shown in the
//! output area in place of the chart.
//!
//! # The registry
//! The kernel routes a frontend message to this process by comm id, so the
//! map from comm id to widget is per process, like stdout: it is the one
//! piece of process-wide state here. Cells share it because the kernel
//! links them against the library as one dylib (the default
//! `DEEPSCOPE_CELL_LINKING`); with `static` linking each cell would hold
//! its own copy and widgets from earlier cells would stop answering.
//! Widgets stay registered (and alive) until [`Widget::close`], since the
//! frontend may still show them after the Rust value is dropped.
//!
//! Plain comms of any target, both ways, for frontend code of your own:
//! [`Comm::open`] and [`register_target`].
//!
//! Outside a kernel (tests, scripts) widgets keep their state and run
//! their observers when set from Rust, and [`deliver`] plays the frontend.
//!
//! Why our own code: no Rust crate implements the kernel side of the widget
//! protocol (evcxr_jupyter closes every comm).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use serde_json::{json, Map, Value};

use super::cell::{in_kernel, send, RichDisplay};
use crate::error::{Error, Result};
use crate::plot::{MimeBundle, MimeType};

/// The variable that names the kernel's comm socket (set by the kernel).
pub const COMM_SOCKET_ENV: &str = "DEEPSCOPE_COMM_SOCKET";
/// The comm target of widget models.
pub const TARGET: &str = "jupyter.widget";
/// The widget messaging protocol version these widgets speak.
pub const PROTOCOL_VERSION: &str = "2.1.0";

const CONTROLS: (&str, &str) = ("@jupyter-widgets/controls", "2.0.0");
const BASE: (&str, &str) = ("@jupyter-widgets/base", "2.0.0");
const OUTPUT: (&str, &str) = ("@jupyter-widgets/output", "1.0.0");

type Callback = Arc<dyn Fn(&Value) -> std::result::Result<(), String> + Send + Sync>;
/// Checks a value the frontend sent for one key, against the current state.
type Check = fn(&str, &Value, &Map<String, Value>) -> std::result::Result<(), String>;

struct Core {
    id: String,
    /// The widget model's name, or for a plain [`Comm`] its target.
    model: String,
    /// A plain comm: messages go to its `"msg"` observers as they are.
    raw: bool,
    state: Mutex<Map<String, Value>>,
    /// (key, callback): `"click"` for a button's clicks.
    observers: Mutex<Vec<(String, Callback)>>,
    check: Check,
}

type TargetFn = Arc<dyn Fn(Comm, &Value) -> std::result::Result<(), String> + Send + Sync>;

struct Hub {
    widgets: Mutex<HashMap<String, Arc<Core>>>,
    /// Comm targets the frontend may open comms to ([`register_target`]).
    targets: Mutex<HashMap<String, TargetFn>>,
    next: AtomicU64,
    /// Whether the runner listens to the kernel's comm socket (connected
    /// once, when the first widget is made inside a kernel).
    listening: OnceLock<std::result::Result<(), String>>,
}

static HUB: OnceLock<Hub> = OnceLock::new();

fn hub() -> &'static Hub {
    HUB.get_or_init(|| Hub { widgets: Mutex::new(HashMap::new()), targets: Mutex::new(HashMap::new()), next: AtomicU64::new(0), listening: OnceLock::new() })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a callback panicked while holding it; the
    // data (a JSON map, a list) is still whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_id() -> String {
    let n = hub().next.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{:08x}{:012x}{:012x}", std::process::id(), t as u64 & 0xffff_ffff_ffff, n)
}

/// Connects the runner to the kernel's comm socket (once per process) and
/// starts the thread that applies the frontend's messages.
fn listen() {
    if !in_kernel() {
        return;
    }
    let outcome = hub().listening.get_or_init(|| {
        let path = std::env::var_os(COMM_SOCKET_ENV).ok_or_else(|| format!("{COMM_SOCKET_ENV} is not set"))?;
        let stream = std::os::unix::net::UnixStream::connect(&path)
            .map_err(|e| format!("connecting to the kernel's comm socket {}: {e}", std::path::Path::new(&path).display()))?;
        std::thread::Builder::new()
            .name("deepscope-widgets".into())
            .spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    handle_event(&line);
                }
            })
            .map_err(|e| format!("starting the widget thread: {e}"))?;
        Ok(())
    });
    if let Err(e) = outcome {
        eprintln!("deepscope widgets: controls will show but not answer: {e}");
    }
}

/// One event from the kernel: `{"seq", "kind": "msg"|"close", "comm_id", "data"}`.
fn handle_event(line: &str) {
    let event: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("deepscope widgets: an event that is not JSON ({e})");
            return;
        }
    };
    let comm_id = event["comm_id"].as_str().unwrap_or_default();
    let outcome = match event["kind"].as_str() {
        Some("close") => {
            let gone = lock(&hub().widgets).remove(comm_id);
            if let Some(core) = gone.filter(|c| c.raw) {
                Widget { core }.notify(&[("close".to_string(), event["data"].clone())]);
            }
            Ok(())
        }
        Some("open") => accept(comm_id, event["data"]["target_name"].as_str().unwrap_or_default(), &event["data"]["data"]),
        _ => deliver(comm_id, &event["data"]),
    };
    if let Err(e) = outcome {
        eprintln!("deepscope widgets: {e}");
    }
    // stderr and stdout reach the kernel through two pipes: the end of this
    // event's stderr first, so that the kernel publishes an error above
    // before it reports the event handled (as it does for a cell)
    if let Some(end) = std::env::var_os(super::cell::STDERR_END_MARKER_ENV) {
        eprintln!("{}", end.to_string_lossy());
    }
    println!("{}", event_done_marker(event["seq"].as_u64().unwrap_or_default()));
}

/// The stdout line that tells the kernel the event `seq` is handled (the
/// kernel reads the runner's stdout up to it; it is never shown).
pub fn event_done_marker(seq: u64) -> String {
    format!("\u{1}deepscope: widget event {seq} done\u{1}")
}

/// Applies a message from the frontend to the widget with `comm_id`, as the
/// kernel does for each `comm_msg`: `update` (new values; observers run),
/// `request_state` (the whole state is sent back) or `custom` (a button's
/// click). Tests call it to act as the frontend.
pub fn deliver(comm_id: &str, data: &Value) -> Result<()> {
    let core = lock(&hub().widgets).get(comm_id).cloned();
    let core = core.ok_or_else(|| Error::Input(format!("a comm message for comm {comm_id:?}, which is not an open widget")))?;
    let w = Widget { core };
    if w.core.raw {
        w.notify(&[("msg".to_string(), data.clone())]);
        return Ok(());
    }
    match data["method"].as_str() {
        Some("update") => {
            let Some(state) = data["state"].as_object() else {
                return Err(w.bad("an update without a `state` object"));
            };
            {
                let current = lock(&w.core.state);
                for (k, v) in state {
                    (w.core.check)(k, v, &current).map_err(|e| w.bad(&format!("`{k}` = {v}: {e}")))?;
                }
            }
            w.apply(state.clone(), false);
            Ok(())
        }
        Some("request_state") => {
            w.send_update(&w.state());
            Ok(())
        }
        Some("custom") => {
            w.notify(&[("click".to_string(), data["content"].clone())]);
            Ok(())
        }
        other => Err(w.bad(&format!("unknown method {other:?} (expected update, request_state or custom)"))),
    }
}

/// A widget model: the generic handle every typed widget wraps. Clones
/// share the model.
#[derive(Clone)]
pub struct Widget {
    core: Arc<Core>,
}

impl std::fmt::Debug for Widget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.core.model, self.core.id)
    }
}

fn any_value(_: &str, _: &Value, _: &Map<String, Value>) -> std::result::Result<(), String> {
    Ok(())
}

impl Widget {
    /// Opens a widget model of `model` (e.g. `IntSliderModel`) from
    /// `model_module`, shown by `view` from `view_module`, with `state` (the
    /// frontend fills keys left out with the model's defaults).
    fn open(model: &str, model_module: (&str, &str), view: &str, view_module: (&str, &str), state: Map<String, Value>, check: Check) -> Widget {
        let mut state = state;
        for (k, v) in [
            ("_model_name", model),
            ("_model_module", model_module.0),
            ("_model_module_version", model_module.1),
            ("_view_name", view),
            ("_view_module", view_module.0),
            ("_view_module_version", view_module.1),
        ] {
            state.insert(k.into(), Value::String(v.into()));
        }
        let core = Arc::new(Core { id: new_id(), model: model.into(), raw: false, state: Mutex::new(state.clone()), observers: Mutex::new(Vec::new()), check });
        lock(&hub().widgets).insert(core.id.clone(), core.clone());
        if in_kernel() {
            listen();
            send(json!({
                "type": "comm_open",
                "comm_id": core.id,
                "target_name": TARGET,
                "data": { "state": state, "buffer_paths": [] },
                "metadata": { "version": PROTOCOL_VERSION },
            }));
        }
        Widget { core }
    }

    /// A DOM widget of `@jupyter-widgets/controls` (or output) with its own
    /// layout model and, when `style` names one, its style model.
    fn dom(model: &str, module: (&str, &str), view: &str, style: Option<&str>, mut state: Map<String, Value>, check: Check) -> Widget {
        let layout = Widget::open("LayoutModel", BASE, "LayoutView", BASE, Map::new(), any_value);
        state.insert("layout".into(), Value::String(layout.reference()));
        if let Some(style) = style {
            let s = Widget::open(style, CONTROLS, "StyleView", BASE, Map::new(), any_value);
            state.insert("style".into(), Value::String(s.reference()));
        }
        Widget::open(model, module, view, module, state, check)
    }

    /// The comm id (the widget's model id in the frontend).
    pub fn id(&self) -> &str {
        &self.core.id
    }

    /// The model name, e.g. `IntSliderModel`.
    pub fn model_name(&self) -> &str {
        &self.core.model
    }

    /// How other widgets' state refers to this one (`IPY_MODEL_<id>`).
    pub fn reference(&self) -> String {
        format!("IPY_MODEL_{}", self.core.id)
    }

    /// The whole state.
    pub fn state(&self) -> Map<String, Value> {
        lock(&self.core.state).clone()
    }

    /// One key of the state (`Null` when absent).
    pub fn get(&self, key: &str) -> Value {
        lock(&self.core.state).get(key).cloned().unwrap_or(Value::Null)
    }

    /// Sets keys of the state: the frontend is updated and the observers of
    /// the keys that changed run.
    pub fn set(&self, state: Map<String, Value>) {
        self.apply(state, true);
    }

    /// Runs `f` with the new value whenever `key` changes (from the
    /// frontend or from Rust). An `Err` from it is reported, not raised.
    pub fn observe<R: CallbackResult>(&self, key: &str, f: impl Fn(&Value) -> R + Send + Sync + 'static) {
        let cb: Callback = Arc::new(move |v: &Value| f(v).into_result());
        lock(&self.core.observers).push((key.to_string(), cb));
    }

    /// Closes the widget: the frontend removes its views, and messages for
    /// it are refused from now on.
    pub fn close(&self) {
        lock(&hub().widgets).remove(&self.core.id);
        if in_kernel() {
            send(json!({ "type": "comm_close", "comm_id": self.core.id }));
        }
    }

    /// The MIME bundle that displays this widget.
    pub fn mime_bundle(&self) -> MimeBundle {
        let mut b = MimeBundle::new();
        b.insert(MimeType::TextPlain, self.describe());
        b.insert(MimeType::WidgetView, json!({ "version_major": 2, "version_minor": 0, "model_id": self.core.id }).to_string());
        b
    }

    /// Shows this widget inline (evcxr's display hook).
    pub fn evcxr_display(&self) {
        self.mime_bundle().evcxr_display();
    }

    fn describe(&self) -> String {
        let s = self.state();
        let name = self.core.model.trim_end_matches("Model");
        match (s.get("description").and_then(Value::as_str), s.get("value")) {
            (Some(d), Some(v)) if !d.is_empty() => format!("{name}({d:?}, value={v})"),
            (_, Some(v)) if !v.is_string() || v.as_str().is_some_and(|t| t.len() < 60) => format!("{name}(value={v})"),
            _ => format!("{name}()"),
        }
    }

    fn bad(&self, what: &str) -> Error {
        Error::Input(format!("widget {} ({}): {what}", self.core.id, self.core.model.trim_end_matches("Model")))
    }

    fn send_update(&self, state: &Map<String, Value>) {
        if in_kernel() {
            send(json!({
                "type": "comm_msg",
                "comm_id": self.core.id,
                "data": { "method": "update", "state": state, "buffer_paths": [] },
            }));
        }
    }

    /// Stores the keys that changed; tells the frontend when the change came
    /// from Rust; then runs their observers.
    fn apply(&self, state: Map<String, Value>, from_rust: bool) {
        let mut changed = Map::new();
        {
            let mut current = lock(&self.core.state);
            for (k, v) in state {
                if current.get(&k) != Some(&v) {
                    current.insert(k.clone(), v.clone());
                    changed.insert(k, v);
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        if from_rust {
            self.send_update(&changed);
        }
        let events: Vec<(String, Value)> = changed.into_iter().collect();
        self.notify(&events);
    }

    fn notify(&self, events: &[(String, Value)]) {
        let observers: Vec<(String, Callback)> = lock(&self.core.observers).clone();
        for (key, value) in events {
            for (k, cb) in observers.iter().filter(|(k, _)| k == key) {
                let outcome = catch_unwind(AssertUnwindSafe(|| cb(value)));
                let problem = match outcome {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e,
                    Err(p) => panic_text(&p),
                };
                eprintln!("deepscope widgets: the `{k}` callback of {} failed: {problem}", self.describe());
            }
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".into()
    }
}

/// What a callback may return: `()` or a `Result` whose error displays.
pub trait CallbackResult {
    fn into_result(self) -> std::result::Result<(), String>;
}

impl CallbackResult for () {
    fn into_result(self) -> std::result::Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Display> CallbackResult for std::result::Result<(), E> {
    fn into_result(self) -> std::result::Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// Anything that is a widget: the typed widgets, boxes, [`Interactive`].
pub trait AsWidget {
    fn widget(&self) -> &Widget;
}

impl AsWidget for Widget {
    fn widget(&self) -> &Widget {
        self
    }
}

impl RichDisplay for Widget {
    fn mime_bundle(&self) -> MimeBundle {
        Widget::mime_bundle(self)
    }
}

macro_rules! typed_widget {
    ($($t:ident),*) => {$(
        impl AsWidget for $t {
            fn widget(&self) -> &Widget {
                &self.0
            }
        }
        impl RichDisplay for $t {
            fn mime_bundle(&self) -> MimeBundle {
                self.0.mime_bundle()
            }
        }
        impl $t {
            /// Shows this widget inline (evcxr's display hook).
            pub fn evcxr_display(&self) {
                self.0.evcxr_display();
            }
            /// The underlying widget model.
            pub fn widget(&self) -> &Widget {
                &self.0
            }
            /// Closes the widget (see [`Widget::close`]).
            pub fn close(&self) {
                self.0.close();
            }
        }
    )*};
}

typed_widget!(IntSlider, FloatSlider, Dropdown, SelectMultiple, Checkbox, Button, Text, Html, Output, HBox, VBox);

fn map(pairs: Vec<(&str, Value)>) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn invalid(what: String) -> Error {
    Error::Input(what)
}

// ------------------------------------------------------------------ sliders

fn check_int(key: &str, v: &Value, s: &Map<String, Value>) -> std::result::Result<(), String> {
    if key != "value" {
        return Ok(());
    }
    let x = v.as_i64().ok_or("expected an integer")?;
    let (lo, hi) = (s["min"].as_i64().unwrap_or(i64::MIN), s["max"].as_i64().unwrap_or(i64::MAX));
    if x < lo || x > hi {
        return Err(format!("outside {lo}..={hi}"));
    }
    Ok(())
}

/// A slider over integers.
#[derive(Clone, Debug)]
pub struct IntSlider(Widget);

impl IntSlider {
    /// A slider from `min` to `max` (inclusive) at `value`.
    pub fn new(description: &str, value: i64, min: i64, max: i64) -> Result<IntSlider> {
        if min > max || value < min || value > max {
            return Err(invalid(format!("IntSlider {description:?}: value {value} must lie in min..=max = {min}..={max}")));
        }
        let state = map(vec![("description", json!(description)), ("value", json!(value)), ("min", json!(min)), ("max", json!(max)), ("step", json!(1))]);
        Ok(IntSlider(Widget::dom("IntSliderModel", CONTROLS, "IntSliderView", Some("SliderStyleModel"), state, check_int)))
    }

    /// Whether the value changes while dragging (`true`) or on release.
    pub fn continuous_update(self, on: bool) -> IntSlider {
        self.0.set(map(vec![("continuous_update", json!(on))]));
        self
    }

    pub fn value(&self) -> i64 {
        self.0.get("value").as_i64().unwrap_or_default()
    }

    /// Moves the slider (observers run); a value outside its range is an error.
    pub fn set_value(&self, value: i64) -> Result<()> {
        check_int("value", &json!(value), &self.0.state()).map_err(|e| self.0.bad(&format!("value {value}: {e}")))?;
        self.0.set(map(vec![("value", json!(value))]));
        Ok(())
    }

    /// Runs `f` with the new value whenever it changes.
    pub fn on_change<R: CallbackResult>(&self, f: impl Fn(i64) -> R + Send + Sync + 'static) {
        self.0.observe("value", move |v| f(v.as_i64().unwrap_or_default()));
    }
}

fn check_float(key: &str, v: &Value, s: &Map<String, Value>) -> std::result::Result<(), String> {
    if key != "value" {
        return Ok(());
    }
    let x = v.as_f64().ok_or("expected a number")?;
    let (lo, hi) = (s["min"].as_f64().unwrap_or(f64::MIN), s["max"].as_f64().unwrap_or(f64::MAX));
    if !(lo..=hi).contains(&x) {
        return Err(format!("outside {lo}..={hi}"));
    }
    Ok(())
}

/// A slider over real numbers.
#[derive(Clone, Debug)]
pub struct FloatSlider(Widget);

impl FloatSlider {
    /// A slider from `min` to `max` in steps of `step`, at `value`.
    pub fn new(description: &str, value: f64, min: f64, max: f64, step: f64) -> Result<FloatSlider> {
        if !(min <= max && (min..=max).contains(&value) && step > 0.0 && step.is_finite()) {
            return Err(invalid(format!("FloatSlider {description:?}: needs min <= value <= max and a positive step (got {min}, {value}, {max}, step {step})")));
        }
        let state = map(vec![("description", json!(description)), ("value", json!(value)), ("min", json!(min)), ("max", json!(max)), ("step", json!(step))]);
        Ok(FloatSlider(Widget::dom("FloatSliderModel", CONTROLS, "FloatSliderView", Some("SliderStyleModel"), state, check_float)))
    }

    /// Whether the value changes while dragging (`true`) or on release.
    pub fn continuous_update(self, on: bool) -> FloatSlider {
        self.0.set(map(vec![("continuous_update", json!(on))]));
        self
    }

    pub fn value(&self) -> f64 {
        self.0.get("value").as_f64().unwrap_or_default()
    }

    pub fn set_value(&self, value: f64) -> Result<()> {
        check_float("value", &json!(value), &self.0.state()).map_err(|e| self.0.bad(&format!("value {value}: {e}")))?;
        self.0.set(map(vec![("value", json!(value))]));
        Ok(())
    }

    pub fn on_change<R: CallbackResult>(&self, f: impl Fn(f64) -> R + Send + Sync + 'static) {
        self.0.observe("value", move |v| f(v.as_f64().unwrap_or_default()));
    }
}

// ---------------------------------------------------------------- selection

fn check_index(key: &str, v: &Value, s: &Map<String, Value>) -> std::result::Result<(), String> {
    if key != "index" {
        return Ok(());
    }
    let n = s["_options_labels"].as_array().map_or(0, Vec::len) as u64;
    let ok = |x: &Value| x.as_u64().is_some_and(|i| i < n);
    let fine = match v {
        Value::Array(items) => items.iter().all(ok),
        Value::Null => true,
        x => ok(x),
    };
    if fine {
        Ok(())
    } else {
        Err(format!("expected an option index below {n}"))
    }
}

fn labels(options: &[&str]) -> Value {
    Value::Array(options.iter().map(|o| Value::String((*o).to_string())).collect())
}

/// A drop-down list: one option of several.
#[derive(Clone, Debug)]
pub struct Dropdown(Widget);

impl Dropdown {
    /// A list of `options` with the one at `index` selected.
    pub fn new(description: &str, options: &[&str], index: usize) -> Result<Dropdown> {
        if index >= options.len() {
            return Err(invalid(format!("Dropdown {description:?}: index {index} but {} options", options.len())));
        }
        let state = map(vec![("description", json!(description)), ("_options_labels", labels(options)), ("index", json!(index))]);
        Ok(Dropdown(Widget::dom("DropdownModel", CONTROLS, "DropdownView", Some("DescriptionStyleModel"), state, check_index)))
    }

    pub fn index(&self) -> usize {
        self.0.get("index").as_u64().unwrap_or_default() as usize
    }

    /// The selected option's label.
    pub fn value(&self) -> String {
        self.0.get("_options_labels")[self.index()].as_str().unwrap_or_default().to_string()
    }

    pub fn set_index(&self, index: usize) -> Result<()> {
        check_index("index", &json!(index), &self.0.state()).map_err(|e| self.0.bad(&format!("index {index}: {e}")))?;
        self.0.set(map(vec![("index", json!(index))]));
        Ok(())
    }

    /// Runs `f` with the selected option's label whenever it changes.
    pub fn on_change<R: CallbackResult>(&self, f: impl Fn(String) -> R + Send + Sync + 'static) {
        let w = self.clone();
        self.0.observe("index", move |_| f(w.value()));
    }
}

/// A list in which several options can be selected.
#[derive(Clone, Debug)]
pub struct SelectMultiple(Widget);

impl SelectMultiple {
    pub fn new(description: &str, options: &[&str], selected: &[usize]) -> Result<SelectMultiple> {
        if let Some(i) = selected.iter().find(|&&i| i >= options.len()) {
            return Err(invalid(format!("SelectMultiple {description:?}: index {i} but {} options", options.len())));
        }
        let rows = options.len().clamp(2, 6);
        let state = map(vec![
            ("description", json!(description)),
            ("_options_labels", labels(options)),
            ("index", json!(selected)),
            ("rows", json!(rows)),
        ]);
        Ok(SelectMultiple(Widget::dom("SelectMultipleModel", CONTROLS, "SelectMultipleView", Some("DescriptionStyleModel"), state, check_index)))
    }

    /// The indices of the selected options, ascending.
    pub fn indices(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.0.get("index").as_array().map(|a| a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect()).unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn set_indices(&self, selected: &[usize]) -> Result<()> {
        check_index("index", &json!(selected), &self.0.state()).map_err(|e| self.0.bad(&format!("indices {selected:?}: {e}")))?;
        self.0.set(map(vec![("index", json!(selected))]));
        Ok(())
    }

    pub fn on_change<R: CallbackResult>(&self, f: impl Fn(Vec<usize>) -> R + Send + Sync + 'static) {
        let w = self.clone();
        self.0.observe("index", move |_| f(w.indices()));
    }
}

fn check_bool(key: &str, v: &Value, _: &Map<String, Value>) -> std::result::Result<(), String> {
    if key == "value" && !v.is_boolean() {
        return Err("expected true or false".into());
    }
    Ok(())
}

/// A check box.
#[derive(Clone, Debug)]
pub struct Checkbox(Widget);

impl Checkbox {
    pub fn new(description: &str, value: bool) -> Checkbox {
        let state = map(vec![("description", json!(description)), ("value", json!(value))]);
        Checkbox(Widget::dom("CheckboxModel", CONTROLS, "CheckboxView", Some("CheckboxStyleModel"), state, check_bool))
    }

    pub fn value(&self) -> bool {
        self.0.get("value").as_bool().unwrap_or_default()
    }

    pub fn set_value(&self, value: bool) {
        self.0.set(map(vec![("value", json!(value))]));
    }

    pub fn on_change<R: CallbackResult>(&self, f: impl Fn(bool) -> R + Send + Sync + 'static) {
        self.0.observe("value", move |v| f(v.as_bool().unwrap_or_default()));
    }
}

/// A button.
#[derive(Clone, Debug)]
pub struct Button(Widget);

impl Button {
    pub fn new(label: &str) -> Button {
        Button(Widget::dom("ButtonModel", CONTROLS, "ButtonView", Some("ButtonStyleModel"), map(vec![("description", json!(label))]), any_value))
    }

    /// Runs `f` at each click.
    pub fn on_click<R: CallbackResult>(&self, f: impl Fn() -> R + Send + Sync + 'static) {
        self.0.observe("click", move |_| f());
    }

    /// Clicks the button from Rust (the click callbacks run).
    pub fn click(&self) {
        self.0.notify(&[("click".to_string(), json!({ "event": "click" }))]);
    }
}

fn check_text(key: &str, v: &Value, _: &Map<String, Value>) -> std::result::Result<(), String> {
    if key == "value" && !v.is_string() {
        return Err("expected a string".into());
    }
    Ok(())
}

/// A one-line text box.
#[derive(Clone, Debug)]
pub struct Text(Widget);

impl Text {
    pub fn new(description: &str, value: &str) -> Text {
        let state = map(vec![("description", json!(description)), ("value", json!(value)), ("continuous_update", json!(false))]);
        Text(Widget::dom("TextModel", CONTROLS, "TextView", Some("TextStyleModel"), state, check_text))
    }

    pub fn value(&self) -> String {
        self.0.get("value").as_str().unwrap_or_default().to_string()
    }

    pub fn set_value(&self, value: &str) {
        self.0.set(map(vec![("value", json!(value))]));
    }

    /// Runs `f` with the text when it changes (on Enter or leaving the box).
    pub fn on_change<R: CallbackResult>(&self, f: impl Fn(String) -> R + Send + Sync + 'static) {
        self.0.observe("value", move |v| f(v.as_str().unwrap_or_default().to_string()));
    }
}

/// A piece of HTML (a label, a caption, a small table).
#[derive(Clone, Debug)]
pub struct Html(Widget);

impl Html {
    pub fn new(html: &str) -> Html {
        Html(Widget::dom("HTMLModel", CONTROLS, "HTMLView", Some("HTMLStyleModel"), map(vec![("value", json!(html))]), check_text))
    }

    pub fn value(&self) -> String {
        self.0.get("value").as_str().unwrap_or_default().to_string()
    }

    pub fn set_value(&self, html: &str) {
        self.0.set(map(vec![("value", json!(html))]));
    }
}

/// An output area inside a widget layout: shows any displayable value
/// (charts, tables, text) and is replaced in place by the next one.
#[derive(Clone, Debug)]
pub struct Output(Widget);

impl Default for Output {
    fn default() -> Output {
        Output::new()
    }
}

impl Output {
    pub fn new() -> Output {
        Output(Widget::dom("OutputModel", OUTPUT, "OutputView", None, map(vec![("outputs", json!([])), ("msg_id", json!(""))]), any_value))
    }

    /// Replaces what the area shows with `value`.
    pub fn show(&self, value: &impl RichDisplay) {
        self.set_bundle(&value.mime_bundle());
    }

    /// Replaces what the area shows with a MIME bundle.
    pub fn set_bundle(&self, bundle: &MimeBundle) {
        let out = json!([{ "output_type": "display_data", "data": bundle.to_json(), "metadata": {} }]);
        self.0.set(map(vec![("outputs", out)]));
    }

    /// Shows an error in the area, as a cell's error output looks.
    pub fn show_error(&self, ename: &str, evalue: &str) {
        let out = json!([{ "output_type": "error", "ename": ename, "evalue": evalue, "traceback": [format!("\u{1b}[0;31m{ename}\u{1b}[0m: {evalue}")] }]);
        self.0.set(map(vec![("outputs", out)]));
    }

    pub fn clear(&self) {
        self.0.set(map(vec![("outputs", json!([]))]));
    }

    /// The outputs shown now, in the notebook format (`output_type`, `data`, ...).
    pub fn outputs(&self) -> Vec<Value> {
        self.0.get("outputs").as_array().cloned().unwrap_or_default()
    }

    /// The plain-text face of what is shown (an error's name and message).
    pub fn text(&self) -> String {
        self.outputs()
            .iter()
            .map(|o| match o["output_type"].as_str() {
                Some("error") => format!("{}: {}", o["ename"].as_str().unwrap_or_default(), o["evalue"].as_str().unwrap_or_default()),
                _ => o["data"]["text/plain"].as_str().unwrap_or_default().to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn children(items: &[&dyn AsWidget]) -> Value {
    Value::Array(items.iter().map(|w| Value::String(w.widget().reference())).collect())
}

/// Widgets side by side.
#[derive(Clone, Debug)]
pub struct HBox(Widget);

impl HBox {
    pub fn new(items: &[&dyn AsWidget]) -> HBox {
        HBox(Widget::dom("HBoxModel", CONTROLS, "HBoxView", None, map(vec![("children", children(items))]), any_value))
    }
}

/// Widgets one above the other.
#[derive(Clone, Debug)]
pub struct VBox(Widget);

impl VBox {
    pub fn new(items: &[&dyn AsWidget]) -> VBox {
        VBox(Widget::dom("VBoxModel", CONTROLS, "VBoxView", None, map(vec![("children", children(items))]), any_value))
    }
}

// -------------------------------------------------------------- plain comms

/// A comm of any target, for frontend extensions of your own: JSON messages
/// both ways, no widget state. Open one from Rust with [`Comm::open`], or
/// let the frontend open them to a target named with [`register_target`].
#[derive(Clone)]
pub struct Comm {
    core: Arc<Core>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm({}, target {:?})", self.core.id, self.core.model)
    }
}

impl Comm {
    fn registered(id: String, target: &str) -> Comm {
        let core = Arc::new(Core {
            id,
            model: target.to_string(),
            raw: true,
            state: Mutex::new(Map::new()),
            observers: Mutex::new(Vec::new()),
            check: any_value,
        });
        lock(&hub().widgets).insert(core.id.clone(), core.clone());
        Comm { core }
    }

    /// Opens a comm to the frontend's `target` with `data`.
    pub fn open(target: &str, data: Value) -> Comm {
        let comm = Comm::registered(new_id(), target);
        if in_kernel() {
            listen();
            send(json!({ "type": "comm_open", "comm_id": comm.core.id, "target_name": target, "data": data, "metadata": {} }));
        }
        comm
    }

    pub fn id(&self) -> &str {
        &self.core.id
    }

    /// The target the comm was opened for.
    pub fn target(&self) -> &str {
        &self.core.model
    }

    /// Sends `data` to the frontend.
    pub fn send(&self, data: Value) {
        if in_kernel() {
            send(json!({ "type": "comm_msg", "comm_id": self.core.id, "data": data }));
        }
    }

    /// Runs `f` with the data of each message from the frontend.
    pub fn on_msg<R: CallbackResult>(&self, f: impl Fn(&Value) -> R + Send + Sync + 'static) {
        Widget { core: self.core.clone() }.observe("msg", f);
    }

    /// Runs `f` when the frontend closes the comm.
    pub fn on_close<R: CallbackResult>(&self, f: impl Fn() -> R + Send + Sync + 'static) {
        Widget { core: self.core.clone() }.observe("close", move |_| f());
    }

    /// Closes the comm.
    pub fn close(&self) {
        Widget { core: self.core.clone() }.close();
    }
}

/// Lets the frontend open comms to `target`: `f` gets each new [`Comm`] and
/// the data it was opened with. An `Err` from `f` closes the comm again.
/// Registering the same target again replaces its function.
pub fn register_target<R: CallbackResult>(target: &str, f: impl Fn(Comm, &Value) -> R + Send + Sync + 'static) {
    let cb: TargetFn = Arc::new(move |c: Comm, v: &Value| f(c, v).into_result());
    lock(&hub().targets).insert(target.to_string(), cb);
    if in_kernel() {
        listen();
        send(json!({ "type": "comm_target", "target_name": target }));
    }
}

/// The frontend opened comm `comm_id` to `target` (the kernel checked that
/// the target is registered; it may have been replaced meanwhile).
fn accept(comm_id: &str, target: &str, data: &Value) -> Result<()> {
    let f = lock(&hub().targets).get(target).cloned();
    let refuse = |why: String| {
        lock(&hub().widgets).remove(comm_id);
        if in_kernel() {
            send(json!({ "type": "comm_close", "comm_id": comm_id }));
        }
        Error::Input(why)
    };
    let Some(f) = f else {
        return Err(refuse(format!("no comm target {target:?} is registered")));
    };
    let comm = Comm::registered(comm_id.to_string(), target);
    match catch_unwind(AssertUnwindSafe(|| f(comm, data))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(refuse(format!("the function of comm target {target:?} refused comm {comm_id}: {e}"))),
        Err(p) => Err(refuse(format!("the function of comm target {target:?} {}", panic_text(&p)))),
    }
}

// ----------------------------------------------------------------- interact

/// A control whose value a function can take: the typed widgets.
pub trait Control: AsWidget + Clone + Send + Sync + 'static {
    type Value;
    fn current(&self) -> Self::Value;
}

impl Control for IntSlider {
    type Value = i64;
    fn current(&self) -> i64 {
        self.value()
    }
}
impl Control for FloatSlider {
    type Value = f64;
    fn current(&self) -> f64 {
        self.value()
    }
}
impl Control for Dropdown {
    type Value = String;
    fn current(&self) -> String {
        self.value()
    }
}
impl Control for SelectMultiple {
    type Value = Vec<usize>;
    fn current(&self) -> Vec<usize> {
        self.indices()
    }
}
impl Control for Checkbox {
    type Value = bool;
    fn current(&self) -> bool {
        self.value()
    }
}
impl Control for Text {
    type Value = String;
    fn current(&self) -> String {
        self.value()
    }
}

/// Several controls whose values a function takes as one tuple.
pub trait Controls: Clone + Send + Sync + 'static {
    type Values;
    fn values(&self) -> Self::Values;
    fn widgets(&self) -> Vec<Widget>;
}

impl<C: Control> Controls for C {
    type Values = C::Value;
    fn values(&self) -> C::Value {
        self.current()
    }
    fn widgets(&self) -> Vec<Widget> {
        vec![self.widget().clone()]
    }
}

macro_rules! controls_tuple {
    ($($c:ident $i:tt),*) => {
        impl<$($c: Control),*> Controls for ($($c,)*) {
            type Values = ($($c::Value,)*);
            fn values(&self) -> Self::Values {
                ($(self.$i.current(),)*)
            }
            fn widgets(&self) -> Vec<Widget> {
                vec![$(self.$i.widget().clone()),*]
            }
        }
    };
}

controls_tuple!(A 0);
controls_tuple!(A 0, B 1);
controls_tuple!(A 0, B 1, C 2);
controls_tuple!(A 0, B 1, C 2, D 3);
controls_tuple!(A 0, B 1, C 2, D 3, E 4);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
controls_tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

/// What an [`interact`] function may return: anything displayable, or a
/// `Result` of it (an `Err` is shown in the output area).
pub trait Shown {
    fn shown(self) -> std::result::Result<MimeBundle, (String, String)>;
}

impl<T: RichDisplay> Shown for T {
    fn shown(self) -> std::result::Result<MimeBundle, (String, String)> {
        Ok(self.mime_bundle())
    }
}

impl<T: RichDisplay, E: std::fmt::Display> Shown for std::result::Result<T, E> {
    fn shown(self) -> std::result::Result<MimeBundle, (String, String)> {
        self.map(|v| v.mime_bundle()).map_err(|e| {
            let message = e.to_string();
            // named as a cell's `?` error would be: DeepScope's by variant
            (super::cell_error::describe(&e, &message).ename, message)
        })
    }
}

impl RichDisplay for String {
    fn mime_bundle(&self) -> MimeBundle {
        let mut b = MimeBundle::new();
        b.insert(MimeType::TextPlain, self.as_str());
        b
    }
}

/// Controls, an output area, and the function that fills it: the result of
/// [`interact`]. Displays as the controls above the output.
#[derive(Clone, Debug)]
pub struct Interactive {
    root: VBox,
    output: Output,
    /// How long each redraw took, last first (seconds), at most 64.
    timings: Arc<Mutex<Vec<f64>>>,
}

impl AsWidget for Interactive {
    fn widget(&self) -> &Widget {
        &self.root.0
    }
}

impl RichDisplay for Interactive {
    fn mime_bundle(&self) -> MimeBundle {
        self.root.mime_bundle()
    }
}

impl Interactive {
    /// Shows the controls and output inline (evcxr's display hook).
    pub fn evcxr_display(&self) {
        self.root.evcxr_display();
    }

    /// The output area.
    pub fn output(&self) -> &Output {
        &self.output
    }

    /// Seconds the function took at each redraw, the latest first.
    pub fn redraw_seconds(&self) -> Vec<f64> {
        lock(&self.timings).clone()
    }

    /// Closes the controls and the output.
    pub fn close(&self) {
        self.root.close();
        self.output.close();
    }
}

/// Builds a live view: `f` is called with the values of `controls` (one
/// control or a tuple of up to 8) now and again whenever one of them
/// changes, and what it returns replaces the output area's content. An
/// `Err` (or a panic) shows in the output area instead; the controls keep
/// working.
pub fn interact<C, R, F>(controls: C, f: F) -> Result<Interactive>
where
    C: Controls,
    R: Shown,
    F: Fn(C::Values) -> R + Send + Sync + 'static,
{
    let output = Output::new();
    let timings = Arc::new(Mutex::new(Vec::new()));
    let redraw: Arc<dyn Fn() + Send + Sync> = {
        let (output, controls, timings) = (output.clone(), controls.clone(), timings.clone());
        Arc::new(move || {
            let t = std::time::Instant::now();
            match catch_unwind(AssertUnwindSafe(|| f(controls.values()).shown())) {
                Ok(Ok(bundle)) => output.set_bundle(&bundle),
                Ok(Err((name, message))) => output.show_error(&name, &message),
                Err(p) => output.show_error("Panic", &panic_text(&p)),
            }
            let mut tm = lock(&timings);
            tm.insert(0, t.elapsed().as_secs_f64());
            tm.truncate(64);
        })
    };
    let widgets = controls.widgets();
    for w in &widgets {
        let key = if w.get("index").is_null() && !w.get("value").is_null() { "value" } else { "index" };
        let r = redraw.clone();
        w.observe(key, move |_| r());
    }
    redraw();
    let mut items: Vec<&dyn AsWidget> = widgets.iter().map(|w| w as &dyn AsWidget).collect();
    items.push(&output);
    let root = VBox::new(&items);
    Ok(Interactive { root, output, timings })
}
