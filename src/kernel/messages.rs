//! Typed Jupyter messages (protocol 5.3). Requests are parsed by one `match`
//! on `msg_type` into [`Request`]; every reply or broadcast is a struct that
//! knows its own wire name ([`Content::MSG_TYPE`]). Replies are built with
//! [`Message::reply`] / [`Message::child`], which carry the parent header.
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::wire::Message;
use crate::error::{Error, Result};

pub const PROTOCOL_VERSION: &str = "5.3";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub msg_id: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub date: String,
    pub msg_type: String,
    #[serde(default = "default_version")]
    pub version: String,
}

fn default_version() -> String {
    PROTOCOL_VERSION.into()
}

impl Header {
    pub fn new(msg_type: &str, session: &str) -> Header {
        Header {
            msg_id: uuid::Uuid::new_v4().to_string(),
            session: session.to_string(),
            username: "kernel".into(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            msg_type: msg_type.to_string(),
            version: PROTOCOL_VERSION.into(),
        }
    }
}

/// A message body with a fixed wire name.
pub trait Content: Serialize {
    const MSG_TYPE: &'static str;
}

impl Message {
    /// A message on another channel that belongs to this request (same
    /// parent, no routing identities): iopub broadcasts.
    pub fn child<C: Content>(&self, session: &str, content: &C) -> Message {
        Message {
            identities: Vec::new(),
            header: Header::new(C::MSG_TYPE, session),
            parent_header: serde_json::to_value(&self.header).unwrap_or(Value::Null),
            metadata: json!({}),
            content: serde_json::to_value(content).unwrap_or(Value::Null),
            buffers: Vec::new(),
        }
    }

    /// The reply to this request, routed back to its sender.
    pub fn reply<C: Content>(&self, session: &str, content: &C) -> Message {
        let mut m = self.child(session, content);
        m.identities = self.identities.clone();
        m
    }

    /// A broadcast with no parent (the startup `status: starting`).
    pub fn orphan<C: Content>(session: &str, content: &C) -> Message {
        Message {
            identities: Vec::new(),
            header: Header::new(C::MSG_TYPE, session),
            parent_header: json!({}),
            metadata: json!({}),
            content: serde_json::to_value(content).unwrap_or(Value::Null),
            buffers: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------- requests

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
pub struct ExecuteRequest {
    pub code: String,
    #[serde(default)]
    pub silent: bool,
    #[serde(default = "yes")]
    pub store_history: bool,
    #[serde(default)]
    pub user_expressions: BTreeMap<String, String>,
    #[serde(default)]
    pub allow_stdin: bool,
    #[serde(default = "yes")]
    pub stop_on_error: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CodeAtCursor {
    pub code: String,
    /// In Unicode code points (protocol 5.2+).
    pub cursor_pos: usize,
    #[serde(default)]
    pub detail_level: u8,
}

#[derive(Clone, Debug, Deserialize)]
pub struct IsCompleteRequest {
    pub code: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HistoryRequest {
    #[serde(default)]
    pub output: bool,
    #[serde(default)]
    pub raw: bool,
    pub hist_access_type: String,
    #[serde(default)]
    pub session: i64,
    #[serde(default)]
    pub start: i64,
    #[serde(default)]
    pub stop: i64,
    #[serde(default)]
    pub n: usize,
    #[serde(default)]
    pub pattern: String,
    #[serde(default)]
    pub unique: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CommInfoRequest {
    #[serde(default)]
    pub target_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CommOpen {
    pub comm_id: String,
    pub target_name: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CommId {
    pub comm_id: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ShutdownRequest {
    #[serde(default)]
    pub restart: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InputReply {
    #[serde(default)]
    pub value: String,
}

/// Every request the kernel understands, from the shell, control or stdin channel.
#[derive(Clone, Debug)]
pub enum Request {
    KernelInfo,
    Execute(ExecuteRequest),
    Complete(CodeAtCursor),
    Inspect(CodeAtCursor),
    IsComplete(IsCompleteRequest),
    History(HistoryRequest),
    CommInfo(CommInfoRequest),
    CommOpen(CommOpen),
    CommMsg(CommId),
    CommClose(CommId),
    Shutdown(ShutdownRequest),
    Interrupt,
    InputReply(InputReply),
    /// A type this kernel does not implement (answered per the spec's rules).
    Unknown(String),
}

fn content<T: DeserializeOwned>(msg: &Message) -> Result<T> {
    serde_json::from_value(msg.content.clone())
        .map_err(|e| Error::Protocol(format!("{} content: {e}", msg.header.msg_type)))
}

impl Request {
    pub fn parse(msg: &Message) -> Result<Request> {
        Ok(match msg.header.msg_type.as_str() {
            "kernel_info_request" => Request::KernelInfo,
            "execute_request" => Request::Execute(content(msg)?),
            "complete_request" => Request::Complete(content(msg)?),
            "inspect_request" => Request::Inspect(content(msg)?),
            "is_complete_request" => Request::IsComplete(content(msg)?),
            "history_request" => Request::History(content(msg)?),
            "comm_info_request" => Request::CommInfo(content(msg)?),
            "comm_open" => Request::CommOpen(content(msg)?),
            "comm_msg" => Request::CommMsg(content(msg)?),
            "comm_close" => Request::CommClose(content(msg)?),
            "shutdown_request" => Request::Shutdown(content(msg)?),
            "interrupt_request" => Request::Interrupt,
            "input_reply" => Request::InputReply(content(msg)?),
            other => Request::Unknown(other.to_string()),
        })
    }
}

// ------------------------------------------------------- replies, broadcasts

macro_rules! wire_name {
    ($($t:ty => $name:literal),* $(,)?) => {$(
        impl Content for $t { const MSG_TYPE: &'static str = $name; }
    )*};
}

#[derive(Serialize)]
pub struct Status {
    pub execution_state: &'static str,
}

#[derive(Serialize)]
pub struct HelpLink {
    pub text: String,
    pub url: String,
}

#[derive(Serialize)]
pub struct LanguageInfo {
    pub name: &'static str,
    pub version: String,
    pub mimetype: &'static str,
    pub file_extension: &'static str,
    pub pygments_lexer: &'static str,
    pub codemirror_mode: &'static str,
}

#[derive(Serialize)]
pub struct KernelInfoReply {
    pub status: &'static str,
    pub protocol_version: &'static str,
    pub implementation: &'static str,
    pub implementation_version: &'static str,
    pub language_info: LanguageInfo,
    pub banner: String,
    pub help_links: Vec<HelpLink>,
    pub debugger: bool,
}

#[derive(Serialize)]
pub struct ExecuteInput {
    pub code: String,
    pub execution_count: u32,
}

#[derive(Serialize)]
pub struct Stream {
    pub name: &'static str,
    pub text: String,
}

#[derive(Serialize, Clone)]
pub struct DisplayData {
    pub data: Value,
    pub metadata: Value,
    pub transient: Value,
}

#[derive(Serialize, Clone)]
pub struct UpdateDisplayData(pub DisplayData);

#[derive(Serialize)]
pub struct ExecuteResult {
    pub execution_count: u32,
    pub data: Value,
    pub metadata: Value,
}

#[derive(Serialize)]
pub struct ClearOutput {
    pub wait: bool,
}

/// The `error` broadcast, and the error fields of any reply.
#[derive(Serialize, Clone, Debug)]
pub struct ErrorContent {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

#[derive(Serialize)]
pub struct ExecuteReply {
    pub status: &'static str,
    pub execution_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_expressions: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub error: Option<ErrorContent>,
    pub payload: Vec<Value>,
}

#[derive(Serialize)]
pub struct CompleteReply {
    pub status: &'static str,
    pub matches: Vec<String>,
    pub cursor_start: usize,
    pub cursor_end: usize,
    pub metadata: Value,
}

#[derive(Serialize)]
pub struct InspectReply {
    pub status: &'static str,
    pub found: bool,
    pub data: Value,
    pub metadata: Value,
}

#[derive(Serialize)]
pub struct IsCompleteReply {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indent: Option<String>,
}

#[derive(Serialize)]
pub struct HistoryReply {
    pub status: &'static str,
    pub history: Vec<Value>,
}

#[derive(Serialize)]
pub struct CommInfoReply {
    pub status: &'static str,
    pub comms: Value,
}

#[derive(Serialize)]
pub struct CommClose {
    pub comm_id: String,
    pub data: Value,
}

#[derive(Serialize)]
pub struct ShutdownReply {
    pub status: &'static str,
    pub restart: bool,
}

#[derive(Serialize)]
pub struct InterruptReply {
    pub status: &'static str,
}

#[derive(Serialize)]
pub struct InputRequest {
    pub prompt: String,
    pub password: bool,
}

/// Reply to a request type the kernel does not know: status error.
#[derive(Serialize)]
pub struct UnknownReply {
    pub status: &'static str,
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

#[derive(Serialize)]
pub struct ErrorBroadcast(pub ErrorContent);

wire_name!(
    Status => "status",
    KernelInfoReply => "kernel_info_reply",
    ExecuteInput => "execute_input",
    Stream => "stream",
    DisplayData => "display_data",
    UpdateDisplayData => "update_display_data",
    ExecuteResult => "execute_result",
    ClearOutput => "clear_output",
    ErrorBroadcast => "error",
    ExecuteReply => "execute_reply",
    CompleteReply => "complete_reply",
    InspectReply => "inspect_reply",
    IsCompleteReply => "is_complete_reply",
    HistoryReply => "history_reply",
    CommInfoReply => "comm_info_reply",
    CommClose => "comm_close",
    ShutdownReply => "shutdown_reply",
    InterruptReply => "interrupt_reply",
    InputRequest => "input_request",
    // The wire name of an unknown request's reply is set by the caller.
    UnknownReply => "error_reply",
);

/// `x_request` -> `x_reply`, for replies to unknown request types.
pub fn reply_type(request_type: &str) -> String {
    match request_type.strip_suffix("_request") {
        Some(stem) => format!("{stem}_reply"),
        None => format!("{request_type}_reply"),
    }
}
