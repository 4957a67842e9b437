//! Jupyter wire framing: `[identities..., <IDS|MSG>, signature, header,
//! parent_header, metadata, content, buffers...]`, signed with HMAC over the
//! four JSON frames, and the header every message carries. The typed
//! contents live a layer above, in `messages`, which imports this file and
//! never the other way round.
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::connection::Signer;
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


pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// A message as it travels: routing identities, parsed JSON frames, buffers.
#[derive(Clone, Debug)]
pub struct Message {
    pub identities: Vec<Bytes>,
    pub header: Header,
    /// `{}` for a message with no parent.
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

impl Message {
    /// Parses and verifies a multipart message. Any malformed input is an
    /// error naming what is wrong; a bad signature is [`Error::Protocol`]
    /// saying so, and the caller drops the message.
    pub fn decode(frames: Vec<Bytes>, signer: &Signer) -> Result<Message> {
        let split = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or_else(|| protocol("no <IDS|MSG> delimiter frame"))?;
        let identities = frames[..split].to_vec();
        let rest = &frames[split + 1..];
        if rest.len() < 5 {
            return Err(protocol(format!(
                "{} frames after the delimiter; need signature, header, parent_header, metadata, content",
                rest.len()
            )));
        }
        let (signature, header, parent, metadata, content) = (&rest[0], &rest[1], &rest[2], &rest[3], &rest[4]);
        if signer.enabled() && signature.is_empty() {
            return Err(protocol("unsigned message (empty signature) while signing is on"));
        }
        if !signer.verify(signature, [header, parent, metadata, content]) {
            return Err(protocol("signature does not match (wrong key or altered message)"));
        }
        let parse = |name: &str, b: &Bytes| -> Result<Value> {
            serde_json::from_slice(b).map_err(|e| protocol(format!("{name} frame is not JSON: {e}")))
        };
        let header_value = parse("header", header)?;
        let header: Header = serde_json::from_value(header_value)
            .map_err(|e| protocol(format!("header frame: {e}")))?;
        Ok(Message {
            identities,
            header,
            parent_header: parse("parent_header", parent)?,
            metadata: parse("metadata", metadata)?,
            content: parse("content", content)?,
            buffers: rest[5..].to_vec(),
        })
    }

    /// Frames ready to send, signed.
    pub fn encode(&self, signer: &Signer) -> Vec<Bytes> {
        let header = to_bytes(&self.header);
        let parent = to_bytes(&self.parent_header);
        let metadata = to_bytes(&self.metadata);
        let content = to_bytes(&self.content);
        let signature = signer.sign([&header, &parent, &metadata, &content]);
        let mut frames = self.identities.clone();
        frames.push(Bytes::from_static(DELIMITER));
        frames.push(Bytes::from(signature));
        frames.extend([header, parent, metadata, content].map(Bytes::from));
        frames.extend(self.buffers.iter().cloned());
        frames
    }
}

fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising a Value or a derived struct of strings cannot fail.
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}
