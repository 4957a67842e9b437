//! Jupyter wire framing: `[identities..., <IDS|MSG>, signature, header,
//! parent_header, metadata, content, buffers...]`, signed with HMAC over the
//! four JSON frames.
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::connection::Signer;
use super::messages::Header;
use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::messages::{Request, Status};
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
        let r = m.reply("kernel-session", &Status { execution_state: "busy" });
        assert_eq!(r.identities, m.identities);
        assert_eq!(r.parent_header["msg_id"], serde_json::json!(m.header.msg_id));
        assert_eq!(r.header.msg_type, "status");
        assert_eq!(r.header.version, "5.3");
        let c = m.child("kernel-session", &Status { execution_state: "idle" });
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
