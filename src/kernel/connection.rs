//! The connection file Jupyter writes for a kernel, and HMAC message signing.
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::error::{Error, Result};

/// What `{connection_file}` holds (Jupyter messaging spec, "Connection files").
#[derive(Clone, Debug, Deserialize)]
pub struct ConnectionInfo {
    pub ip: String,
    pub transport: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    #[serde(default)]
    pub key: String,
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
}

fn default_scheme() -> String {
    "hmac-sha256".into()
}

impl ConnectionInfo {
    pub fn from_file(path: &Path) -> Result<ConnectionInfo> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let info: ConnectionInfo =
            serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), cause: e })?;
        if info.transport != "tcp" {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "transport".into(),
                message: format!("`{}` is not supported; the DeepScope kernel speaks tcp", info.transport),
            });
        }
        if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "signature_scheme".into(),
                message: format!("`{}` is not supported; use hmac-sha256", info.signature_scheme),
            });
        }
        Ok(info)
    }

    pub fn endpoint(&self, port: u16) -> String {
        format!("{}://{}:{}", self.transport, self.ip, port)
    }
}

/// Signs and verifies messages with the connection key. An empty key means
/// signing is off (the spec's "no authentication"): signatures are empty.
#[derive(Clone)]
pub struct Signer {
    mac: Option<Hmac<Sha256>>,
}

impl Signer {
    pub fn new(key: &str) -> Signer {
        let mac = if key.is_empty() {
            None
        } else {
            // HMAC accepts keys of any length, so this cannot fail.
            Hmac::<Sha256>::new_from_slice(key.as_bytes()).ok()
        };
        Signer { mac }
    }

    pub fn enabled(&self) -> bool {
        self.mac.is_some()
    }

    /// Hex HMAC-SHA256 of the four signed frames.
    pub fn sign(&self, parts: [&[u8]; 4]) -> String {
        match &self.mac {
            None => String::new(),
            Some(mac) => {
                let mut mac = mac.clone();
                for p in parts {
                    mac.update(p);
                }
                hex::encode(mac.finalize().into_bytes())
            }
        }
    }

    /// Constant-time check of a received signature.
    pub fn verify(&self, signature: &[u8], parts: [&[u8]; 4]) -> bool {
        match &self.mac {
            None => true,
            Some(mac) => {
                let Ok(expected) = hex::decode(signature) else { return false };
                let mut mac = mac.clone();
                for p in parts {
                    mac.update(p);
                }
                mac.verify_slice(&expected).is_ok()
            }
        }
    }
}
