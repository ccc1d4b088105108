//! Every log line of a test process, captured: the process-wide `tracing`
//! subscriber writing (at TRACE, without colours) into memory, for the tests
//! that look for what must never be logged or for what must be.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// What the process logged so far.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Installs the process-wide subscriber into a new capture. Only one test
    /// of a process can: call it in a test that runs in a process of its own.
    pub fn install(with_time: bool) -> Capture {
        let capture = Capture::default();
        let writer = capture.clone();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone());
        if with_time {
            builder.init();
        } else {
            builder.without_time().init();
        }
        capture
    }

    /// The log so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
