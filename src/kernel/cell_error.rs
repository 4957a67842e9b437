//! The cell side of an error returned through `?`.
//!
//! evcxr wraps a cell's code in a closure returning `Result<(), E>` whose
//! `From` impl is generic over every error type, so `?` works on any error.
//! Stock evcxr prints the error to stderr there and tells its own caller
//! nothing, so the kernel used to answer `status: ok`. DeepScope carries a
//! small patch of evcxr (`patches/evcxr/PATCH.md`) that lets the kernel name
//! a function that generated `From` impl calls instead: [`report_cell_error`].
//!
//! The impl is generic over `T` with no bound but the one the message was
//! formatted with, so this function cannot ask `T` for its `source()` chain
//! directly. It compares `T`'s type id (lifetime-erased, so any `T` works, see
//! the `typeid` crate) against the error types a cell meets most: DeepScope's
//! [`Error`], `std::io::Error`, `anyhow::Error`, `tch::TchError`, and boxed
//! `dyn Error`s. For those it reports the variant (for DeepScope's errors) and
//! the chain of causes; any other type is reported by its name and message.

use crate::error::Error;

/// What the kernel shows for an error: its name (`ename`), the message
/// (`evalue`) and the causes under it, outermost first. It travels from the
/// cell to the kernel as the fields of an `error` cell message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CellError {
    pub ename: String,
    pub evalue: String,
    pub causes: Vec<String>,
}

/// Called by the code evcxr generates for `?` in a cell, with the error and
/// its message (formatted with evcxr's current `:efmt`). In the kernel it
/// sends the error to the kernel, which makes it the cell's `error` reply;
/// elsewhere it prints the message to stderr, as stock evcxr does.
#[doc(hidden)]
pub fn report_cell_error<T: ?Sized>(error: &T, message: &str) {
    if super::cell::in_kernel() {
        if let Ok(serde_json::Value::Object(mut m)) = serde_json::to_value(describe(error, message)) {
            m.insert("type".into(), "error".into());
            super::cell::send(serde_json::Value::Object(m));
        }
    } else {
        eprintln!("{message}");
    }
}

/// `Some(&U)` when `T` is `U` (lifetimes aside; none of the `U`s used here
/// has any, so equal ids mean equal types).
fn same_as<T: ?Sized, U>(value: &T) -> Option<&U> {
    if typeid::of::<T>() == typeid::of::<U>() {
        // SAFETY: `T` and `U` are the same type, so `T` is sized and the
        // pointer cast keeps the address of a valid `U` for the same borrow.
        Some(unsafe { &*(value as *const T).cast::<U>() })
    } else {
        None
    }
}

type DynError = dyn std::error::Error + 'static;

/// The error's name, message and causes.
pub fn describe<T: ?Sized>(error: &T, message: &str) -> CellError {
    let dyn_error: Option<&DynError> = if let Some(e) = same_as::<T, Error>(error) {
        Some(e)
    } else if let Some(e) = same_as::<T, std::io::Error>(error) {
        Some(e)
    } else if let Some(e) = same_as::<T, tch::TchError>(error) {
        Some(e)
    } else if let Some(e) = same_as::<T, anyhow::Error>(error) {
        Some(e.as_ref())
    } else if let Some(e) = same_as::<T, Box<dyn std::error::Error>>(error) {
        Some(e.as_ref())
    } else if let Some(e) = same_as::<T, Box<dyn std::error::Error + Send + Sync>>(error) {
        Some(e.as_ref())
    } else if let Some(e) = same_as::<T, Box<dyn std::error::Error + Send>>(error) {
        Some(e.as_ref())
    } else {
        None
    };
    let type_name = short_type_name(std::any::type_name::<T>());
    let Some(e) = dyn_error else {
        return CellError { ename: type_name, evalue: message.to_string(), causes: Vec::new() };
    };
    // a boxed or anyhow error that is one of DeepScope's is named by its variant
    let ename = match e.downcast_ref::<Error>() {
        Some(ours) => ours.variant().to_string(),
        None => type_name,
    };
    CellError { ename, evalue: message.to_string(), causes: causes(e, message) }
}

/// The messages of `e.source()` and its sources, each left out when the
/// message above it already contains it (thiserror's `#[error("...: {0}")]`
/// with `#[from]` repeats its source in its own message).
fn causes(e: &DynError, message: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut above = message.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !above.contains(&text) {
            out.push(text.clone());
        }
        above = text;
        next = cause.source();
        if out.len() >= 32 {
            break;
        }
    }
    out
}

/// A type's name as a user would write it: `std::io::error::Error` →
/// `io::Error`, `serde_json::error::Error` → `serde_json::Error`,
/// `alloc::string::String` → `String`, `alloc::boxed::Box<dyn
/// core::error::Error>` → `Box<dyn Error>`.
pub fn short_type_name(full: &str) -> String {
    let mut out = String::new();
    let mut path = String::new();
    let flush = |path: &mut String, out: &mut String| {
        if path.is_empty() {
            return;
        }
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let last = segments.last().copied().unwrap_or("");
        let std_crate = matches!(segments.first(), Some(&"std" | &"core" | &"alloc"));
        let name = if last == "Error" && segments.len() >= 2 {
            if std_crate {
                // `core::error::Error` is the trait itself; `std::io::error::Error` is io's
                if segments[1] == "error" { "Error".to_string() } else { format!("{}::Error", segments[1]) }
            } else {
                format!("{}::Error", segments[0])
            }
        } else {
            last.to_string()
        };
        out.push_str(&name);
        path.clear();
    };
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            path.push(c);
        } else {
            flush(&mut path, &mut out);
            out.push(c);
        }
    }
    flush(&mut path, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_read_as_written() {
        assert_eq!(short_type_name("std::io::error::Error"), "io::Error");
        assert_eq!(short_type_name("serde_json::error::Error"), "serde_json::Error");
        assert_eq!(short_type_name("alloc::string::String"), "String");
        assert_eq!(short_type_name("&str"), "&str");
        assert_eq!(short_type_name("alloc::boxed::Box<dyn core::error::Error>"), "Box<dyn Error>");
        assert_eq!(short_type_name("core::num::error::ParseIntError"), "ParseIntError");
        assert_eq!(short_type_name("deepscope::error::Error"), "deepscope::Error");
    }

    #[test]
    fn deepscope_errors_are_named_by_variant_with_their_causes() {
        let e = Error::Input("layer 99 out of range".into());
        let d = describe(&e, &e.to_string());
        assert_eq!(d.ename, "Input");
        assert_eq!(d.evalue, "invalid input: layer 99 out of range");
        assert!(d.causes.is_empty());

        // through anyhow, with context above it: the variant of the root is not
        // the error's; the chain lists the DeepScope error under the context
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let ours = Error::Io { path: "/nonexistent/ckpt".into(), cause: io };
        let wrapped = anyhow::Error::new(ours).context("loading the model");
        let d = describe(&wrapped, &wrapped.to_string());
        assert_eq!(d.ename, "anyhow::Error");
        assert_eq!(d.causes, vec!["cannot read /nonexistent/ckpt: no such file".to_string()]);

        // a boxed DeepScope error keeps its variant
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(Error::Interrupted);
        assert_eq!(describe(&boxed, &boxed.to_string()).ename, "Interrupted");
    }

    #[test]
    fn a_source_repeated_in_the_message_is_not_listed_again_and_others_are() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "reading the tokenizer failed")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let outer: Box<dyn std::error::Error> = Box::new(Outer(std::io::Error::other("disk on fire")));
        let d = describe(&outer, &outer.to_string());
        assert_eq!(d.ename, "Box<dyn Error>");
        assert_eq!(d.causes, vec!["disk on fire".to_string()]);

        let torch = Error::Torch(tch::TchError::Kind("bad kind".into()));
        let d = describe(&torch, &torch.to_string());
        assert_eq!(d.ename, "Torch");
        assert!(d.causes.is_empty(), "the source is already in the message: {:?}", d.causes);
    }

    #[test]
    fn other_types_are_named_by_their_type() {
        let d = describe("just text", "just text");
        assert_eq!(d.ename, "str");
        let s = String::from("owned");
        assert_eq!(describe(&s, &s).ename, "String");
        let n = "x".parse::<i32>().unwrap_err();
        assert_eq!(describe(&n, &n.to_string()).ename, "ParseIntError");
    }
}
