//! The interrupt signal long operations check.
//!
//! When the runner process gets SIGINT, its handler increments a counter that
//! the `deepscope` executable exports as the symbol `deepscope_interrupt_count`.
//! The library finds it with `dlsym`: each cell is its own compiled library, so
//! a `static` here would not be shared between cells, but the executable's
//! symbol is one per process. Long operations take an [`Interrupt`] snapshot
//! when they start and stop with [`Error::Interrupted`] when the count moves.
//! Without the symbol (a plain program) nothing is interruptible and every
//! check is free.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Symbol the executable exports: SIGINTs received by the runner.
pub const INTERRUPT_COUNT_SYMBOL: &str = "deepscope_interrupt_count";
/// Symbol the executable exports: the count up to which interrupts were consumed.
pub const INTERRUPT_SEEN_SYMBOL: &str = "deepscope_interrupt_seen";

fn exported_counter(name: &str) -> Option<&'static AtomicU64> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT only looks the name up. The executable
    // defines the symbol as a `static AtomicU64` that lives for the whole
    // process, so a `'static` reference to it is sound.
    unsafe {
        let ptr = libc::dlsym(libc::RTLD_DEFAULT, cname.as_ptr());
        (ptr as *const AtomicU64).as_ref()
    }
}

/// A snapshot of the interrupt counter, taken when an operation starts.
#[derive(Clone, Copy)]
pub struct Interrupt {
    count: Option<&'static AtomicU64>,
    seen: Option<&'static AtomicU64>,
    start: u64,
}

impl Interrupt {
    /// Snapshot now; later [`Interrupt::check`]s fail once an interrupt arrives.
    pub fn new() -> Interrupt {
        let count = exported_counter(INTERRUPT_COUNT_SYMBOL);
        let seen = exported_counter(INTERRUPT_SEEN_SYMBOL);
        let start = count.map_or(0, |c| c.load(Ordering::SeqCst));
        Interrupt { count, seen, start }
    }

    /// `Err(Error::Interrupted)` once an interrupt arrived after the snapshot.
    pub fn check(&self) -> Result<()> {
        if let Some(c) = self.count {
            let now = c.load(Ordering::SeqCst);
            if now != self.start {
                if let Some(seen) = self.seen {
                    seen.fetch_max(now, Ordering::SeqCst);
                }
                return Err(Error::Interrupted);
            }
        }
        Ok(())
    }
}

impl Default for Interrupt {
    fn default() -> Self {
        Interrupt::new()
    }
}

/// For loops in user cells: `Err(Error::Interrupted)` if an interrupt arrived
/// that no check has consumed yet.
///
/// ```
/// use deepscope::prelude::*;
/// for _ in 0..3 {
///     check_interrupt()?; // outside the kernel: always Ok
/// }
/// # Ok::<(), deepscope::Error>(())
/// ```
pub fn check_interrupt() -> Result<()> {
    if let (Some(c), Some(seen)) = (exported_counter(INTERRUPT_COUNT_SYMBOL), exported_counter(INTERRUPT_SEEN_SYMBOL)) {
        let now = c.load(Ordering::SeqCst);
        if seen.fetch_max(now, Ordering::SeqCst) < now {
            return Err(Error::Interrupted);
        }
    }
    Ok(())
}

/// Marks every interrupt so far as consumed. The kernel calls this after a
/// cell that was interrupted but finished without checking.
pub fn reset_interrupt() {
    if let (Some(c), Some(seen)) = (exported_counter(INTERRUPT_COUNT_SYMBOL), exported_counter(INTERRUPT_SEEN_SYMBOL)) {
        seen.fetch_max(c.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

