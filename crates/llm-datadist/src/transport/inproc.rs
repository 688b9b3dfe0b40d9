//! In-process byte streams (a connected pair of pipes), so the protocol and request handler
//! can be exercised without sockets.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Pipe {
    buf: Mutex<(VecDeque<u8>, bool)>,
    ready: Condvar,
}

impl Pipe {
    fn close(&self) {
        self.buf.lock().expect("pipe lock").1 = true;
        self.ready.notify_all();
    }
}

/// One end of an in-process duplex stream.
pub struct MemStream {
    rx: Arc<Pipe>,
    tx: Arc<Pipe>,
    read_timeout: Mutex<Option<Duration>>,
}

impl MemStream {
    /// Two connected ends.
    pub fn pair() -> (MemStream, MemStream) {
        let (a, b) = (Arc::new(Pipe::default()), Arc::new(Pipe::default()));
        let end = |rx: &Arc<Pipe>, tx: &Arc<Pipe>| MemStream {
            rx: rx.clone(),
            tx: tx.clone(),
            read_timeout: Mutex::new(None),
        };
        (end(&a, &b), end(&b, &a))
    }

    /// Reads block at most this long (None = forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) {
        *self.read_timeout.lock().expect("timeout lock") = t;
    }

    /// Closes the sending direction only: the peer reads EOF after the buffered bytes, and
    /// its replies can still be received.
    pub fn close_write(&self) {
        self.tx.close();
    }

    /// Closes both directions; the peer reads EOF.
    pub fn shutdown(&self) {
        self.rx.close();
        self.tx.close();
    }
}

impl Drop for MemStream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Read for MemStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let timeout = *self.read_timeout.lock().expect("timeout lock");
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.rx.buf.lock().expect("pipe lock");
        loop {
            if !g.0.is_empty() {
                let n = out.len().min(g.0.len());
                for (o, b) in out.iter_mut().zip(g.0.drain(..n)) {
                    *o = b;
                }
                return Ok(n);
            }
            if g.1 {
                return Ok(0);
            }
            g = match deadline {
                None => self.rx.ready.wait(g).expect("pipe lock"),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    self.rx.ready.wait_timeout(g, d - now).expect("pipe lock").0
                }
            };
        }
    }
}

impl Write for MemStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut g = self.tx.buf.lock().expect("pipe lock");
        if g.1 {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        g.0.extend(data);
        self.tx.ready.notify_all();
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
