//! A `dcvv-gateway serve` process of a test: the binary cargo built, started
//! on a configuration file the test wrote, its stderr (the gateway's log) in a
//! file, over plain HTTP on a local port; waited for until `/readyz` answers
//! 200, stopped with SIGTERM, killed when dropped (so a failed test leaves no
//! process behind).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::http::Answer;
use super::routes::READYZ;

/// A free local TCP port (bound, read and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `dcvv-gateway --config CONFIG serve`, stdin and stdout closed; the caller
/// adds its environment.
pub fn command(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"));
    command
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// A running `serve`.
pub struct ServeProcess {
    child: Child,
    url: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl ServeProcess {
    /// Spawns `command` (see [`command`]) with its stderr into `log` and waits
    /// up to 60 s until `/readyz` on `port` answers 200.
    pub async fn start(mut command: Command, port: u16, log: PathBuf) -> ServeProcess {
        let child = command
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut served = ServeProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = served.child.try_wait() {
                panic!("serve exited ({status}):\n{}", served.log_text());
            }
            let ready = served.send("GET", READYZ, &[], Vec::new()).await;
            if ready.is_some_and(|a| a.status == 200) {
                return served;
            }
            assert!(
                Instant::now() < deadline,
                "not ready within 60 s:\n{}",
                served.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (a `kill` name: `HUP`, `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// Exactly these headers and body; `None` while nothing answers.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Option<Answer> {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .body(body);
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        Some(Answer::of(request.send().await.ok()?).await)
    }

    /// SIGTERM, then its exit within 30 s: the status and the whole log.
    pub async fn stop(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        (status, self.log_text())
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
