//! Comms between the frontend and the widgets that live in the runner
//! (the runner side and the whole design: [`super::widgets`]).
//!
//! - Runner to frontend: `comm_open` / `comm_msg` / `comm_close` arrive as
//!   cell messages on the runner's stdout; the stdout forwarder publishes
//!   them on iopub and keeps the table of open comms here (for
//!   `comm_info_request`).
//! - Frontend to runner: the worker writes each `comm_msg` / `comm_close`
//!   for a known comm as one JSON line to the Unix socket the runner
//!   connected to, then reads the runner's stdout (patched evcxr,
//!   `forward_stdout_until`: stock evcxr reads it only during a cell) until
//!   the line that ends that event, so what the callbacks print or draw is
//!   published as it comes. The worker runs one job at a time, so events
//!   never overlap a cell or each other.
//!
//! Our own code: no crate implements kernel-side comms for a Rust kernel.
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};

pub(crate) use super::widgets::COMM_SOCKET_ENV;

/// Where the kernel with this pid listens (short: socket paths are limited
/// to 108 bytes).
pub(crate) fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("deepscope-comm-{}.sock", std::process::id()))
}

/// Removes the sockets of kernels that are gone (a kernel killed with
/// SIGKILL cannot remove its own).
fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("deepscope-comm-")?.strip_suffix(".sock")?.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

pub(crate) struct CommLink {
    path: PathBuf,
    /// The runner's connection (a restarted runner connects again).
    stream: Mutex<Option<UnixStream>>,
    connected: Condvar,
    /// comm id -> target name, for the open comms of the runner.
    table: Mutex<BTreeMap<String, String>>,
    /// Targets the runner registered (`widgets::register_target`).
    targets: Mutex<std::collections::BTreeSet<String>>,
    seq: AtomicU64,
}

impl CommLink {
    /// Listens at `path` (a stale socket of an earlier kernel with the same
    /// pid is removed first).
    pub fn bind(path: &Path) -> Result<std::sync::Arc<CommLink>> {
        let _ = std::fs::remove_file(path);
        remove_stale_sockets(path.parent().unwrap_or(Path::new(".")));
        let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
        let link = std::sync::Arc::new(CommLink {
            path: path.to_path_buf(),
            stream: Mutex::new(None),
            connected: Condvar::new(),
            table: Mutex::new(BTreeMap::new()),
            targets: Mutex::new(Default::default()),
            seq: AtomicU64::new(0),
        });
        let weak = std::sync::Arc::downgrade(&link);
        std::thread::Builder::new()
            .name("deepscope-comms".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Some(link) = weak.upgrade() else { return };
                    if let Ok(s) = stream {
                        if let Ok(mut slot) = link.stream.lock() {
                            *slot = Some(s);
                            link.connected.notify_all();
                        }
                    }
                }
            })
            .map_err(|e| Error::Kernel(format!("starting the comm listener: {e}")))?;
        Ok(link)
    }

    pub fn opened(&self, comm_id: &str, target: &str) {
        if let Ok(mut t) = self.table.lock() {
            t.insert(comm_id.to_string(), target.to_string());
        }
    }

    pub fn add_target(&self, target: &str) {
        if let Ok(mut t) = self.targets.lock() {
            t.insert(target.to_string());
        }
    }

    pub fn has_target(&self, target: &str) -> bool {
        self.targets.lock().map(|t| t.contains(target)).unwrap_or(false)
    }

    pub fn closed(&self, comm_id: &str) -> bool {
        self.table.lock().map(|mut t| t.remove(comm_id).is_some()).unwrap_or(false)
    }

    pub fn is_open(&self, comm_id: &str) -> bool {
        self.table.lock().map(|t| t.contains_key(comm_id)).unwrap_or(false)
    }

    /// The open comms, for `comm_info_reply`: `{id: {"target_name": t}}`,
    /// only those of `target` when given.
    pub fn info(&self, target: Option<&str>) -> Value {
        let mut out = serde_json::Map::new();
        if let Ok(t) = self.table.lock() {
            for (id, name) in t.iter().filter(|(_, name)| target.is_none_or(|w| w == name.as_str())) {
                out.insert(id.clone(), json!({ "target_name": name }));
            }
        }
        Value::Object(out)
    }

    /// Forgets every comm and target (the runner that held them is gone);
    /// returns the comms' ids.
    pub fn forget_all(&self) -> Vec<String> {
        if let Ok(mut s) = self.stream.lock() {
            *s = None;
        }
        if let Ok(mut t) = self.targets.lock() {
            t.clear();
        }
        self.table.lock().map(|mut t| std::mem::take(&mut *t).into_keys().collect()).unwrap_or_default()
    }

    /// Hands one event to the runner; returns the line the runner writes on
    /// stdout when it has handled it (see `widgets::event_done_marker`).
    pub fn send(&self, kind: &str, comm_id: &str, data: &Value) -> Result<String> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let line = format!("{}\n", json!({ "seq": seq, "kind": kind, "comm_id": comm_id, "data": data }));
        let poisoned = || Error::Kernel("the comm link's lock is poisoned".into());
        let guard = self.stream.lock().map_err(|_| poisoned())?;
        // the runner connects when it opens its first comm, which the
        // forwarder may have seen a moment before the listener did
        let (mut guard, _) = self.connected.wait_timeout_while(guard, Duration::from_secs(2), |s| s.is_none()).map_err(|_| poisoned())?;
        let stream = guard.as_mut().ok_or_else(|| Error::Kernel("the runner has no comm connection (it may have restarted)".into()))?;
        stream.write_all(line.as_bytes()).map_err(|e| Error::Kernel(format!("sending a comm message to the runner: {e}")))?;
        Ok(super::widgets::event_done_marker(seq))
    }
}

impl CommLink {
    /// Removes the socket file (the kernel exits without dropping its state).
    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for CommLink {
    fn drop(&mut self) {
        self.remove_socket();
    }
}
