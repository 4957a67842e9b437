//! The channel loops: shell and control (ROUTER), iopub (PUB), stdin
//! (ROUTER) and heartbeat (REP). Requests are decoded and verified in
//! [`Message::decode`]; anything malformed or badly signed is logged on
//! stderr and dropped, never executed.
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use zeromq::{PubSocket, RepSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::completeness;
use super::connection::{ConnectionInfo, Signer};
use super::exec::{self, CellOutcome, Publisher, Shared, Worker};
use super::history::History;
use super::magics::{self, Magic, Need};
use super::messages::*;
use super::wire::{Message, PROTOCOL_VERSION};
use crate::error::{Error, Result};

pub struct KernelOptions {
    pub connection_file: PathBuf,
}

fn kernel_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Kernel(format!("{what}: {e}"))
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("[deepscope kernel] {msg}");
}

/// The outcome of a magic that cannot run: what is wrong and what to do.
fn magic_error(message: String) -> CellOutcome {
    CellOutcome { result: Value::Null, error: Some(ErrorContent { ename: "MagicError".into(), evalue: message.clone(), traceback: vec![message] }) }
}

/// Work for the evcxr thread.
enum Job {
    /// `needs`: variables a magic's code uses, checked before it compiles.
    Execute { code: String, needs: Vec<Need>, msg: Box<Message>, silent: bool, allow_stdin: bool, done: oneshot::Sender<CellOutcome> },
    Complete { code: String, cursor: usize, done: oneshot::Sender<CompleteReply> },
    Inspect { code: String, cursor: usize, done: oneshot::Sender<InspectReply> },
    /// A frontend's `comm_msg` or `comm_close` for a widget in the runner.
    Comm { msg: Box<Message>, kind: &'static str, comm_id: String, data: Value, done: oneshot::Sender<()> },
}

/// Byte offset of the `chars`-th character (Jupyter cursors count code points).
fn byte_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(b, _)| b)
}

fn char_offset(s: &str, bytes: usize) -> usize {
    s[..bytes.min(s.len())].chars().count()
}

/// `deepscope kernel --prebuild`: fills build slot 0 so that kernels start warm.
pub fn prebuild() -> Result<()> {
    let _ = exec::prepare_environment();
    let settings = exec::CellSettings::from_env()?;
    let slot = exec::take_slot()?;
    eprintln!("building the DeepScope library for notebook cells in {} ...", slot.dir.display());
    let (ctx, _out, took) = exec::start_context(&slot, &settings)?;
    eprintln!("ready in {:.1} s", took.as_secs_f64());
    let t = std::time::Instant::now();
    exec::warm_checker(ctx);
    eprintln!("compile-error checks prepared in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Runs the kernel until a shutdown request.
pub fn run_kernel(opts: KernelOptions) -> Result<()> {
    let toolchain = exec::prepare_environment();
    // The kernel itself ignores SIGINT (Ctrl-C in the terminal that runs
    // JupyterLab); interrupts arrive as `interrupt_request` messages.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let info = ConnectionInfo::from_file(&opts.connection_file)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| kernel_err("starting the async runtime", e))?;
    rt.block_on(serve(info, toolchain.release))
}

struct Kernel {
    session: String,
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::Sender<Job>,
    execution_count: u32,
    history: History,
    signer: Signer,
    shutdown_requested: bool,
    /// `language_info.version`, asked of rustc once at start-up.
    rust_version: String,
}

impl Kernel {
    fn publish<C: Content>(&self, parent: &Message, c: &C) {
        self.shared.publisher.publish(parent, c);
    }

    fn status(&self, parent: &Message, state: ExecutionState) {
        self.publish(parent, &Status { execution_state: state });
    }
}

async fn bind<S: Socket>(mut socket: S, info: &ConnectionInfo, port: u16, name: &str) -> Result<S> {
    let endpoint = info.endpoint(port);
    socket.bind(&endpoint).await.map_err(|e| kernel_err(&format!("binding the {name} socket to {endpoint}"), e))?;
    Ok(socket)
}

fn frames(m: ZmqMessage) -> Vec<Bytes> {
    m.into_vec()
}

fn to_zmq(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

async fn serve(info: ConnectionInfo, rust_version: String) -> Result<()> {
    let signer = Signer::new(&info.key);
    let session = uuid::Uuid::new_v4().to_string();

    let shell = bind(RouterSocket::new(), &info, info.shell_port, "shell").await?;
    let control = bind(RouterSocket::new(), &info, info.control_port, "control").await?;
    let stdin = bind(RouterSocket::new(), &info, info.stdin_port, "stdin").await?;
    let mut iopub = bind(PubSocket::new(), &info, info.iopub_port, "iopub").await?;
    let mut hb = bind(RepSocket::new(), &info, info.hb_port, "heartbeat").await?;

    // iopub: one task owns the socket; everyone else sends through a channel,
    // which keeps the order messages were produced in.
    let (iopub_tx, mut iopub_rx) = mpsc::unbounded_channel::<Message>();
    let iopub_signer = signer.clone();
    tokio::spawn(async move {
        while let Some(mut m) = iopub_rx.recv().await {
            m.identities = vec![Bytes::from(format!("kernel.{}.{}", m.header.session, m.header.msg_type))];
            if let Some(z) = to_zmq(m.encode(&iopub_signer)) {
                if let Err(e) = iopub.send(z).await {
                    log(format!("iopub send failed: {e}"));
                }
            }
        }
    });

    tokio::spawn(async move {
        while let Ok(m) = hb.recv().await {
            if hb.send(m).await.is_err() {
                break;
            }
        }
    });

    let shared = Arc::new(Shared {
        publisher: Publisher { session: session.clone(), iopub: iopub_tx.clone(), parent: Mutex::new(None) },
        panic: Mutex::new(None),
        user_error: Mutex::new(None),
        runner: Mutex::new(None),
        running: AtomicBool::new(false),
        cell_serial: AtomicU64::new(0),
        interrupted: AtomicU64::new(0),
        runner_killed: AtomicBool::new(false),
        last_stderr: Mutex::new(Instant::now()),
        stderr_ends: AtomicU64::new(0),
        comms: super::comms::CommLink::bind(&super::comms::socket_path())?,
    });
    let _ = iopub_tx.send(Message::orphan(&session, &Status { execution_state: ExecutionState::Starting }));

    // stdin: input requests go out through the send half; replies come back
    // to the worker, which is blocked inside the cell waiting for them.
    let (stdin_send, mut stdin_recv) = stdin.split();
    let (input_out_tx, mut input_out_rx) = mpsc::unbounded_channel::<Message>();
    let (input_reply_tx, input_reply_rx) = std::sync::mpsc::channel::<String>();
    let stdin_signer = signer.clone();
    tokio::spawn(async move {
        let mut send = stdin_send;
        while let Some(m) = input_out_rx.recv().await {
            if let Some(z) = to_zmq(m.encode(&stdin_signer)) {
                let _ = send.send(z).await;
            }
        }
    });
    let stdin_signer = signer.clone();
    tokio::spawn(async move {
        while let Ok(z) = stdin_recv.recv().await {
            match Message::decode(frames(z), &stdin_signer) {
                Ok(m) if m.header.msg_type == "input_reply" => {
                    let value = m.content["value"].as_str().unwrap_or_default().to_string();
                    let _ = input_reply_tx.send(value);
                }
                Ok(m) => log(format!("stdin: ignored {}", m.header.msg_type)),
                Err(e) => log(format!("stdin: dropped a message: {e}")),
            }
        }
    });

    // Like ipykernel's parent poller: when the process that started us goes
    // away (we are re-parented), nobody can shut us down, so we stop.
    let parent = std::os::unix::process::parent_id();
    let watched = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if std::os::unix::process::parent_id() != parent {
                log("the parent process is gone; shutting down");
                shutdown(&watched).await;
            }
        }
    });

    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
    spawn_worker(shared.clone(), jobs_rx, input_out_tx, input_reply_rx, session.clone());

    let mut kernel = Kernel { session, shared, jobs: jobs_tx, execution_count: 0, history: History::default(), signer, shutdown_requested: false, rust_version };

    let (control_send, mut control_recv) = control.split();
    let (mut shell_send, mut shell_recv) = shell.split();
    let control_send = Arc::new(tokio::sync::Mutex::new(control_send));

    // Control runs on its own task so that interrupts and shutdowns are
    // answered while the shell is busy with a cell.
    let control_kernel = ControlState { session: kernel.session.clone(), shared: kernel.shared.clone(), signer: kernel.signer.clone(), rust_version: kernel.rust_version.clone() };
    let cs = control_send.clone();
    tokio::spawn(async move {
        while let Ok(z) = control_recv.recv().await {
            let msg = match Message::decode(frames(z), &control_kernel.signer) {
                Ok(m) => m,
                Err(e) => {
                    log(format!("control: dropped a message: {e}"));
                    continue;
                }
            };
            control_kernel.handle(&msg, &cs).await;
        }
    });

    let mut pending: VecDeque<Message> = VecDeque::new();
    loop {
        let msg = match pending.pop_front() {
            Some(m) => m,
            None => match shell_recv.recv().await {
                Ok(z) => match Message::decode(frames(z), &kernel.signer) {
                    Ok(m) => m,
                    Err(e) => {
                        log(format!("shell: dropped a message: {e}"));
                        continue;
                    }
                },
                Err(e) => {
                    log(format!("shell: receive failed: {e}"));
                    continue;
                }
            },
        };
        kernel.status(&msg, ExecutionState::Busy);
        let (reply, failed_execute) = kernel.handle_shell(&msg).await;
        // stop_on_error: the execute requests that were already queued when
        // the cell failed are aborted. They are collected before the error
        // reply goes out, so a client that waits for each reply before
        // sending the next request never sees its next cell aborted.
        let mut aborted = Vec::new();
        if failed_execute {
            while let Ok(Ok(z)) = tokio::time::timeout(Duration::from_millis(1), shell_recv.recv()).await {
                let Ok(m) = Message::decode(frames(z), &kernel.signer) else { continue };
                if m.header.msg_type == "execute_request" {
                    aborted.push(m);
                } else {
                    pending.push_back(m);
                }
            }
        }
        if let Some(r) = reply {
            if let Some(z) = to_zmq(r.encode(&kernel.signer)) {
                let _ = shell_send.send(z).await;
            }
        }
        kernel.status(&msg, ExecutionState::Idle);
        if kernel.shutdown_requested {
            shutdown(&kernel.shared).await;
        }
        for m in aborted {
            kernel.status(&m, ExecutionState::Busy);
            let r = m.reply(&kernel.session, &AbortedReply { status: ReplyStatus::Aborted, execution_count: kernel.execution_count });
            if let Some(z) = to_zmq(r.encode(&kernel.signer)) {
                let _ = shell_send.send(z).await;
            }
            kernel.status(&m, ExecutionState::Idle);
        }
    }
}

#[derive(serde::Serialize)]
struct AbortedReply {
    status: ReplyStatus,
    execution_count: u32,
}
impl Content for AbortedReply {
    const MSG_TYPE: &'static str = "execute_reply";
}

fn kernel_info(rust_version: &str) -> KernelInfoReply {
    KernelInfoReply {
        status: ReplyStatus::Ok,
        protocol_version: PROTOCOL_VERSION,
        implementation: "deepscope",
        implementation_version: env!("CARGO_PKG_VERSION"),
        language_info: LanguageInfo {
            name: "rust",
            version: rust_version.to_string(),
            mimetype: "text/rust",
            file_extension: ".rs",
            pygments_lexer: "rust",
            codemirror_mode: "rust",
        },
        banner: format!(
            "DeepScope {} — Rust cells (evcxr) with the DeepScope library preloaded.\n`%help` lists the magics; `use deepscope::prelude::*` is already in scope.",
            env!("CARGO_PKG_VERSION")
        ),
        help_links: vec![
            HelpLink { text: "DeepScope README".into(), url: "https://github.com/deepscope/deepscope#readme".into() },
            HelpLink { text: "Rust standard library".into(), url: "https://doc.rust-lang.org/std/".into() },
            HelpLink { text: "evcxr".into(), url: "https://github.com/evcxr/evcxr".into() },
        ],
        debugger: false,
    }
}

struct ControlState {
    session: String,
    shared: Arc<Shared>,
    signer: Signer,
    rust_version: String,
}

impl ControlState {
    async fn handle(&self, msg: &Message, send: &tokio::sync::Mutex<zeromq::RouterSendHalf>) {
        let p = &self.shared.publisher;
        p.publish(msg, &Status { execution_state: ExecutionState::Busy });
        let reply = match Request::parse(msg) {
            Ok(Request::Interrupt) => {
                self.interrupt();
                Some(msg.reply(&self.session, &InterruptReply { status: ReplyStatus::Ok }))
            }
            Ok(Request::Shutdown(r)) => {
                let reply = msg.reply(&self.session, &ShutdownReply { status: ReplyStatus::Ok, restart: r.restart });
                if let Some(z) = to_zmq(reply.encode(&self.signer)) {
                    let _ = send.lock().await.send(z).await;
                }
                p.publish(msg, &Status { execution_state: ExecutionState::Idle });
                shutdown(&self.shared).await
            }
            Ok(Request::KernelInfo) => Some(msg.reply(&self.session, &kernel_info(&self.rust_version))),
            Ok(other) => Some(unknown_reply(msg, &self.session, &format!("{other:?}"))),
            Err(e) => Some(unknown_reply(msg, &self.session, &e.to_string())),
        };
        if let Some(r) = reply {
            if let Some(z) = to_zmq(r.encode(&self.signer)) {
                let _ = send.lock().await.send(z).await;
            }
        }
        p.publish(msg, &Status { execution_state: ExecutionState::Idle });
    }

    /// SIGINT to the runner; if the cell is still running 3 s later, the
    /// runner is killed (evcxr restarts it) and the cell's error says so.
    fn interrupt(&self) {
        if !self.shared.running.load(Ordering::SeqCst) {
            return;
        }
        let serial = self.shared.cell_serial.load(Ordering::SeqCst);
        self.shared.interrupted.store(serial, Ordering::SeqCst);
        if let Some(pid) = self.shared.runner_pid() {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid as i32, libc::SIGINT);
            }
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            if shared.running.load(Ordering::SeqCst) && shared.cell_serial.load(Ordering::SeqCst) == serial {
                shared.runner_killed.store(true, Ordering::SeqCst);
                shared.kill_runner();
            }
        });
    }
}

async fn shutdown(shared: &Shared) -> ! {
    shared.kill_runner();
    shared.comms.remove_socket();
    // Let iopub deliver the last status messages.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::process::exit(0)
}

fn unknown_reply(msg: &Message, session: &str, what: &str) -> Message {
    let mut r = msg.reply(
        session,
        &UnknownReply {
            status: ReplyStatus::Error,
            ename: "UnsupportedRequest".into(),
            evalue: format!("the DeepScope kernel does not handle {what}"),
            traceback: vec![],
        },
    );
    r.header.msg_type = reply_type(&msg.header.msg_type);
    r
}

impl Kernel {
    /// Handles one shell request; returns the reply and whether it was an
    /// execute that failed with `stop_on_error`.
    async fn handle_shell(&mut self, msg: &Message) -> (Option<Message>, bool) {
        let request = match Request::parse(msg) {
            Ok(r) => r,
            Err(e) => {
                log(format!("shell: {e}"));
                return (Some(unknown_reply(msg, &self.session, &e.to_string())), false);
            }
        };
        let s = self.session.clone();
        match request {
            Request::KernelInfo => (Some(msg.reply(&s, &kernel_info(&self.rust_version))), false),
            Request::Execute(r) => {
                let (reply, failed) = self.execute(msg, r).await;
                (Some(reply), failed)
            }
            Request::IsComplete(r) => {
                let c = completeness::check(&r.code);
                (Some(msg.reply(&s, &IsCompleteReply { status: c.status(), indent: c.indent() })), false)
            }
            Request::History(r) => (Some(msg.reply(&s, &HistoryReply { status: ReplyStatus::Ok, history: self.history.query(&r) })), false),
            Request::CommInfo(r) => {
                let comms = self.shared.comms.info(r.target_name.as_deref());
                (Some(msg.reply(&s, &CommInfoReply { status: ReplyStatus::Ok, comms })), false)
            }
            Request::CommOpen(c) if self.shared.comms.has_target(&c.target_name) => {
                // a target registered in the runner: its function decides
                // (and closes the comm again if it refuses)
                self.shared.comms.opened(&c.comm_id, &c.target_name);
                self.comm_event(msg, "open", c.comm_id, json!({ "target_name": c.target_name, "data": c.data })).await;
                (None, false)
            }
            Request::CommOpen(c) => {
                // No such target: close it again, as the spec asks. (The
                // widget manager's `jupyter.widget.control` lands here too;
                // it then falls back to comm_info + request_state.)
                log(format!("comm_open for target {:?}, which is not registered: closed", c.target_name));
                self.publish(msg, &CommClose { comm_id: c.comm_id, data: json!({}) });
                (None, false)
            }
            Request::CommMsg(c) => {
                self.comm_event(msg, "msg", c.comm_id, c.data).await;
                (None, false)
            }
            Request::CommClose(c) => {
                if self.shared.comms.closed(&c.comm_id) {
                    self.comm_event(msg, "close", c.comm_id, Value::Null).await;
                }
                (None, false)
            }
            Request::Complete(r) => {
                let fallback = CompleteReply { status: ReplyStatus::Ok, matches: vec![], cursor_start: r.cursor_pos, cursor_end: r.cursor_pos, metadata: json!({}) };
                let reply = self.ask(|done| Job::Complete { code: r.code, cursor: r.cursor_pos, done }, fallback).await;
                (Some(msg.reply(&s, &reply)), false)
            }
            Request::Inspect(r) => {
                let fallback = InspectReply { status: ReplyStatus::Ok, found: false, data: json!({}), metadata: json!({}) };
                let reply = self.ask(|done| Job::Inspect { code: r.code, cursor: r.cursor_pos, done }, fallback).await;
                (Some(msg.reply(&s, &reply)), false)
            }
            Request::Shutdown(r) => {
                self.shutdown_requested = true;
                (Some(msg.reply(&s, &ShutdownReply { status: ReplyStatus::Ok, restart: r.restart })), false)
            }
            Request::Interrupt | Request::InputReply(_) | Request::Unknown(_) => {
                (Some(unknown_reply(msg, &s, &format!("`{}` on the shell channel", msg.header.msg_type))), false)
            }
        }
    }

    async fn execute(&mut self, msg: &Message, r: ExecuteRequest) -> (Message, bool) {
        let s = self.session.clone();
        if !r.silent && r.store_history {
            self.execution_count += 1;
        }
        let count = self.execution_count;
        if !r.silent {
            self.publish(msg, &ExecuteInput { code: r.code.clone(), execution_count: count });
        }
        if r.store_history && !r.silent {
            self.history.push(count, &r.code);
        }
        let outcome = match magics::expand(&r.code) {
            Err(e) => magic_error(e),
            Ok(Some(Magic::Text(text))) => {
                if !r.silent {
                    self.publish(msg, &Stream { name: StreamName::Stdout, text: format!("{text}\n") });
                }
                CellOutcome { result: Value::Null, error: None }
            }
            Ok(Some(Magic::Rust { code, needs })) => self.run_cell(code, needs, msg, &r).await,
            Ok(None) if r.code.trim().is_empty() => CellOutcome { result: Value::Null, error: None },
            Ok(None) => self.run_cell(r.code.clone(), vec![], msg, &r).await,
        };
        if let Some(err) = &outcome.error {
            if !r.silent {
                self.publish(msg, &ErrorBroadcast(err.clone()));
            }
            let reply = ExecuteReply { status: ReplyStatus::Error, execution_count: count, user_expressions: None, error: Some(err.clone()), payload: vec![] };
            return (msg.reply(&s, &reply), r.stop_on_error);
        }
        if !outcome.result.is_null() && !r.silent {
            if let Some(text) = outcome.result["text/plain"].as_str() {
                self.history.set_output(count, text);
            }
            let mut data = outcome.result.clone();
            if data.get("text/plain").is_none() {
                data["text/plain"] = json!("");
            }
            self.publish(msg, &ExecuteResult { execution_count: count, data, metadata: json!({}) });
        }
        let mut user_expressions = serde_json::Map::new();
        for (name, expr) in &r.user_expressions {
            let sub = ExecuteRequest { code: expr.clone(), silent: true, store_history: false, user_expressions: Default::default(), allow_stdin: false, stop_on_error: false };
            let o = self.run_cell(expr.clone(), vec![], msg, &sub).await;
            let v = match o.error {
                Some(e) => json!({ "status": "error", "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback }),
                None => json!({ "status": "ok", "data": if o.result.is_null() { json!({}) } else { o.result }, "metadata": {} }),
            };
            user_expressions.insert(name.clone(), v);
        }
        let reply = ExecuteReply {
            status: ReplyStatus::Ok,
            execution_count: count,
            user_expressions: Some(Value::Object(user_expressions)),
            error: None,
            payload: vec![],
        };
        (msg.reply(&s, &reply), false)
    }

    /// Sends a job to the evcxr worker and waits for its answer; `fallback`
    /// when the worker is gone (its setup failed, or it stopped).
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job, fallback: T) -> T {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(job(tx)).is_err() {
            return fallback;
        }
        rx.await.unwrap_or(fallback)
    }

    /// A message for a widget: handed to the runner, or, for a comm that
    /// is not open, an error on stderr (the spec says to ignore it; saying
    /// so helps whoever sent it).
    async fn comm_event(&mut self, msg: &Message, kind: &'static str, comm_id: String, data: Value) {
        if kind == "msg" && !self.shared.comms.is_open(&comm_id) {
            log(format!("comm_msg for comm {comm_id:?}, which is not open"));
            self.publish(msg, &Stream { name: StreamName::Stderr, text: format!("deepscope: a comm message for comm {comm_id:?}, which is not open, was ignored\n") });
            return;
        }
        let msg = Box::new(msg.clone());
        self.ask(|done| Job::Comm { msg, kind, comm_id, data, done }, ()).await;
    }

    async fn run_cell(&mut self, code: String, needs: Vec<Need>, msg: &Message, r: &ExecuteRequest) -> CellOutcome {
        let lost = CellOutcome {
            result: Value::Null,
            error: Some(ErrorContent { ename: "KernelError".into(), evalue: "the evcxr worker has stopped".into(), traceback: vec![] }),
        };
        let (msg, silent, allow_stdin) = (Box::new(msg.clone()), r.silent, r.allow_stdin);
        self.ask(|done| Job::Execute { code, needs, msg, silent, allow_stdin, done }, lost).await
    }
}

fn spawn_worker(
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::Receiver<Job>,
    input_out: mpsc::UnboundedSender<Message>,
    input_reply: std::sync::mpsc::Receiver<String>,
    session: String,
) {
    std::thread::spawn(move || {
        let started = exec::CellSettings::from_env()
            .and_then(|settings| exec::take_slot().and_then(|slot| exec::start_context(&slot, &settings).map(|c| (slot, c))));
        let (_slot, (ctx, outputs, took)) = match started {
            Ok(x) => x,
            Err(e) => {
                let why = e.to_string();
                log(format!("setup failed: {why}"));
                for job in jobs {
                    match job {
                        Job::Execute { done, .. } => {
                            let _ = done.send(CellOutcome {
                                result: Value::Null,
                                error: Some(ErrorContent { ename: "KernelSetupError".into(), evalue: why.clone(), traceback: vec![why.clone()] }),
                            });
                        }
                        Job::Complete { .. } | Job::Inspect { .. } | Job::Comm { .. } => {}
                    }
                }
                return;
            }
        };
        log(format!("ready in {:.1} s", took.as_secs_f64()));
        if let Ok(mut r) = shared.runner.lock() {
            *r = Some(ctx.process_handle());
        }
        let (flush_out_tx, flush_out_rx) = crossbeam_channel::unbounded();
        let (flush_err_tx, flush_err_rx) = crossbeam_channel::unbounded();
        exec::spawn_forwarder(shared.clone(), outputs.stdout, flush_out_rx, true);
        exec::spawn_forwarder(shared.clone(), outputs.stderr, flush_err_rx, false);
        let mut worker = Worker { ctx, shared: shared.clone(), flush_stdout: flush_out_tx, flush_stderr: flush_err_tx };
        // Code analysis is warmed the first time the kernel is idle (no cell
        // waiting), so that a user who types a `let` does not wait for it.
        let mut analyzer_warm = false;
        loop {
            let job = match jobs.try_recv() {
                Ok(job) => job,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    if !analyzer_warm {
                        analyzer_warm = true;
                        let t = std::time::Instant::now();
                        worker.warm_analyzer();
                        log(format!("code analysis warmed in {:.1} s", t.elapsed().as_secs_f64()));
                        continue;
                    }
                    match jobs.recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                }
            };
            match job {
                Job::Execute { code, needs, msg, silent, allow_stdin, done } => {
                    let defined: Vec<&str> = worker.ctx.variables_and_types().map(|(name, _)| name).collect();
                    if let Some(need) = needs.iter().find(|n| !defined.contains(&n.variable.as_str())) {
                        let _ = done.send(magic_error(need.missing()));
                        continue;
                    }
                    let input = |req: exec::evcxr_input_request::Req| -> String {
                        if !allow_stdin {
                            return String::new();
                        }
                        while input_reply.try_recv().is_ok() {}
                        let _ = input_out.send(msg.reply(&session, &InputRequest { prompt: req.prompt, password: req.password }));
                        loop {
                            match input_reply.recv_timeout(Duration::from_millis(100)) {
                                Ok(v) => return v,
                                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                    if shared.interrupted.load(Ordering::SeqCst) == shared.cell_serial.load(Ordering::SeqCst) {
                                        return String::new();
                                    }
                                }
                                Err(_) => return String::new(),
                            }
                        }
                    };
                    let outcome = worker.run(&code, &msg, silent, &input);
                    let _ = done.send(outcome);
                }
                Job::Comm { msg, kind, comm_id, data, done } => {
                    worker.comm_event(&msg, kind, &comm_id, &data);
                    let _ = done.send(());
                }
                Job::Complete { code, cursor, done } => {
                    let pos = byte_offset(&code, cursor);
                    let reply = match worker.ctx.completions(&code, pos) {
                        Ok(c) => CompleteReply {
                            status: ReplyStatus::Ok,
                            matches: c.completions.iter().map(|m| m.code.clone()).collect(),
                            cursor_start: char_offset(&code, c.start_offset),
                            cursor_end: char_offset(&code, c.end_offset),
                            metadata: json!({}),
                        },
                        Err(_) => CompleteReply { status: ReplyStatus::Ok, matches: vec![], cursor_start: cursor, cursor_end: cursor, metadata: json!({}) },
                    };
                    let _ = done.send(reply);
                }
                Job::Inspect { code, cursor, done } => {
                    let mut end = byte_offset(&code, cursor);
                    while let Some(c) = code[end..].chars().next() {
                        if c.is_alphanumeric() || c == '_' {
                            end += c.len_utf8();
                        } else {
                            break;
                        }
                    }
                    let reply = match worker.ctx.hover_at(&code, end) {
                        Ok((plain, html)) if !plain.trim().is_empty() => InspectReply {
                            status: ReplyStatus::Ok,
                            found: true,
                            data: json!({ "text/plain": plain, "text/html": html }),
                            metadata: json!({}),
                        },
                        _ => InspectReply { status: ReplyStatus::Ok, found: false, data: json!({}), metadata: json!({}) },
                    };
                    let _ = done.send(reply);
                }
            }
        }
    });
}
