//! Waiting without the GIL, interruptibly: the wait runs in short slices with the GIL
//! released, and between slices pending signals are handled (Ctrl-C raises
//! `KeyboardInterrupt` in the caller).

use std::time::Duration;

use pyo3::prelude::*;

/// How long one slice of a wait lasts.
const TICK: Duration = Duration::from_millis(50);

/// Calls `poll(TICK)` with the GIL released until it returns `Some`; checks for signals
/// between calls and returns their exception, if any.
pub fn interruptibly<T: Send>(
    py: Python<'_>,
    mut poll: impl FnMut(Duration) -> Option<T> + Send,
) -> PyResult<T> {
    loop {
        if let Some(v) = py.detach(|| poll(TICK)) {
            return Ok(v);
        }
        py.check_signals()?;
    }
}

/// Waits for `rx` (a tokio channel) in slices on `rt`; `None` when the sender is gone.
pub fn recv<T: Send>(
    py: Python<'_>,
    rt: &tokio::runtime::Runtime,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
) -> PyResult<Option<T>> {
    interruptibly(py, |tick| {
        rt.block_on(async { tokio::time::timeout(tick, rx.recv()).await })
            .ok()
    })
}
