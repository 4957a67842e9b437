//! Typed Jupyter messages (protocol 5.3). Requests are parsed by one `match`
//! on `msg_type` into [`Request`]; every reply or broadcast is a struct that
//! knows its own wire name ([`Content::MSG_TYPE`]). Replies are built with
//! [`Message::reply`] / [`Message::child`], which carry the parent header.
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::wire::{Header, Message};
use crate::error::{Error, Result};

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
    #[serde(default)]
    pub data: Value,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CommId {
    pub comm_id: String,
}

/// `comm_msg` from the frontend (its binary buffers are not used).
#[derive(Clone, Debug, Deserialize)]
pub struct CommMsgRequest {
    pub comm_id: String,
    #[serde(default)]
    pub data: Value,
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
    CommMsg(CommMsgRequest),
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

/// `status` of a reply.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReplyStatus {
    Ok,
    Error,
    Aborted,
}

/// `execution_state` of a `status` broadcast.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionState {
    Starting,
    Busy,
    Idle,
}

/// `name` of a `stream` broadcast.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// `status` of an `is_complete_reply`.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CompletenessStatus {
    Complete,
    Incomplete,
    Invalid,
}

#[derive(Serialize)]
pub struct Status {
    pub execution_state: ExecutionState,
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
    pub status: ReplyStatus,
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
    pub name: StreamName,
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
    pub status: ReplyStatus,
    pub execution_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_expressions: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub error: Option<ErrorContent>,
    pub payload: Vec<Value>,
}

#[derive(Serialize)]
pub struct CompleteReply {
    pub status: ReplyStatus,
    pub matches: Vec<String>,
    pub cursor_start: usize,
    pub cursor_end: usize,
    pub metadata: Value,
}

#[derive(Serialize)]
pub struct InspectReply {
    pub status: ReplyStatus,
    pub found: bool,
    pub data: Value,
    pub metadata: Value,
}

#[derive(Serialize)]
pub struct IsCompleteReply {
    pub status: CompletenessStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indent: Option<String>,
}

#[derive(Serialize)]
pub struct HistoryReply {
    pub status: ReplyStatus,
    pub history: Vec<Value>,
}

#[derive(Serialize)]
pub struct CommInfoReply {
    pub status: ReplyStatus,
    pub comms: Value,
}

/// `comm_open` from the kernel (a widget the runner created; its metadata,
/// e.g. the widget protocol version, goes in the message's `metadata`).
#[derive(Serialize)]
pub struct CommOpened {
    pub comm_id: String,
    pub target_name: String,
    pub data: Value,
}

/// `comm_msg` from the kernel.
#[derive(Serialize)]
pub struct CommMessage {
    pub comm_id: String,
    pub data: Value,
}

#[derive(Serialize)]
pub struct CommClose {
    pub comm_id: String,
    pub data: Value,
}

#[derive(Serialize)]
pub struct ShutdownReply {
    pub status: ReplyStatus,
    pub restart: bool,
}

#[derive(Serialize)]
pub struct InterruptReply {
    pub status: ReplyStatus,
}

#[derive(Serialize)]
pub struct InputRequest {
    pub prompt: String,
    pub password: bool,
}

/// Reply to a request type the kernel does not know: status error.
#[derive(Serialize)]
pub struct UnknownReply {
    pub status: ReplyStatus,
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
    CommOpened => "comm_open",
    CommMessage => "comm_msg",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::connection::Signer;
    use crate::kernel::wire::DELIMITER;
    use bytes::Bytes;
    use rand::{Rng, SeedableRng};

    fn request(signer: &Signer) -> Vec<Bytes> {
        let header = Header::new("execute_request", "client");
        let msg = Message {
            identities: vec![Bytes::from_static(b"peer-1")],
            header,
            parent_header: serde_json::json!({}),
            metadata: serde_json::json!({}),
            content: serde_json::json!({"code": "1 + 1", "silent": false}),
            buffers: vec![Bytes::from_static(b"raw")],
        };
        msg.encode(signer)
    }

    #[test]
    fn round_trip_keeps_identities_content_and_buffers() {
        let signer = Signer::new("secret");
        let frames = request(&signer);
        let m = Message::decode(frames, &signer).unwrap();
        assert_eq!(m.identities, vec![Bytes::from_static(b"peer-1")]);
        assert_eq!(m.header.msg_type, "execute_request");
        assert_eq!(m.buffers, vec![Bytes::from_static(b"raw")]);
        let Request::Execute(e) = Request::parse(&m).unwrap() else { panic!("not an execute request") };
        assert_eq!(e.code, "1 + 1");
        assert!(e.store_history && e.stop_on_error, "spec defaults");
    }

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_four_frames() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let s = Signer::new("Jefe");
        let sig = s.sign([b"what do ya ", b"want ", b"for nothing", b"?"]);
        assert_eq!(sig, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn wrong_key_missing_signature_and_tampering_are_rejected() {
        let good = Signer::new("secret");
        let frames = request(&Signer::new("other"));
        let err = Message::decode(frames, &good).unwrap_err().to_string();
        assert!(err.contains("signature does not match"), "{err}");

        let frames = request(&Signer::new(""));
        let err = Message::decode(frames, &good).unwrap_err().to_string();
        assert!(err.contains("unsigned"), "{err}");

        let mut frames = request(&good);
        let content = frames.len() - 2; // [.., content, buffer]
        frames[content] = Bytes::from_static(br#"{"code": "std::process::exit(1)"}"#);
        assert!(Message::decode(frames, &good).is_err());

        // Signing off (empty key): anything well-formed is accepted.
        assert!(Message::decode(request(&Signer::new("x")), &Signer::new("")).is_ok());
    }

    #[test]
    fn malformed_frames_name_the_problem() {
        let s = Signer::new("");
        let err = Message::decode(vec![Bytes::from_static(b"x")], &s).unwrap_err().to_string();
        assert!(err.contains("delimiter"), "{err}");
        let short = vec![Bytes::from_static(DELIMITER), Bytes::new(), Bytes::from_static(b"{}")];
        assert!(Message::decode(short, &s).unwrap_err().to_string().contains("frames after the delimiter"));
        let bad_json: Vec<Bytes> = [DELIMITER, b"", b"{not json", b"{}", b"{}", b"{}"].iter().map(|b| Bytes::copy_from_slice(b)).collect();
        assert!(Message::decode(bad_json, &s).unwrap_err().to_string().contains("header frame"));
        let no_type: Vec<Bytes> = [DELIMITER, b"", br#"{"msg_id": "1"}"#, b"{}", b"{}", b"{}"].iter().map(|b| Bytes::copy_from_slice(b)).collect();
        assert!(Message::decode(no_type, &s).unwrap_err().to_string().contains("msg_type"));
    }

    #[test]
    fn content_of_the_wrong_shape_is_an_error_not_a_panic() {
        let s = Signer::new("k");
        let mut m = Message::decode(request(&s), &s).unwrap();
        m.content = serde_json::json!({"code": 5});
        assert!(Request::parse(&m).unwrap_err().to_string().contains("execute_request content"));
        m.header.msg_type = "no_such_request".into();
        assert!(matches!(Request::parse(&m), Ok(Request::Unknown(t)) if t == "no_such_request"));
    }

    #[test]
    fn replies_carry_the_parent_header_and_identities() {
        let s = Signer::new("k");
        let m = Message::decode(request(&s), &s).unwrap();
        let r = m.reply("kernel-session", &Status { execution_state: ExecutionState::Busy });
        assert_eq!(r.identities, m.identities);
        assert_eq!(r.parent_header["msg_id"], serde_json::json!(m.header.msg_id));
        assert_eq!(r.header.msg_type, "status");
        assert_eq!(r.header.version, "5.3");
        let c = m.child("kernel-session", &Status { execution_state: ExecutionState::Idle });
        assert!(c.identities.is_empty());
        assert!(Message::decode(r.encode(&s), &s).is_ok(), "what we send verifies");
    }

    /// Property test: no byte input makes decoding panic, with or without a key.
    #[test]
    fn random_frames_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid = request(&Signer::new("k"));
        for signer in [Signer::new(""), Signer::new("k")] {
            for _ in 0..3000 {
                let mut frames: Vec<Bytes> = Vec::new();
                let n = rng.random_range(0..9);
                for _ in 0..n {
                    let choice = rng.random_range(0..4);
                    let frame = match choice {
                        0 => Bytes::from_static(DELIMITER),
                        1 => valid[rng.random_range(0..valid.len())].clone(),
                        _ => {
                            let len = rng.random_range(0..64);
                            Bytes::from((0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>())
                        }
                    };
                    frames.push(frame);
                }
                // Flip bytes of a valid message too.
                if rng.random_bool(0.3) {
                    frames = valid.clone();
                    let i = rng.random_range(0..frames.len());
                    let mut f = frames[i].to_vec();
                    if !f.is_empty() {
                        let j = rng.random_range(0..f.len());
                        f[j] ^= rng.random::<u8>() | 1;
                    }
                    frames[i] = Bytes::from(f);
                }
                if let Ok(m) = Message::decode(frames, &signer) {
                    let _ = Request::parse(&m);
                }
            }
        }
    }
}
