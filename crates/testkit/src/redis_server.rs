//! A redis-server of the test's own, for the outage tests that kill and restart it.
// A dev-only harness: a broken test environment must fail the test loudly.
#![allow(clippy::panic)]

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a redis-server may take to accept connections before the test fails.
const START_BOUND: Duration = Duration::from_secs(20);

/// A redis-server on a free port of 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it accepts connections; `None` when there is no
    /// `redis-server` on the `PATH` (after [`crate::skip`], which fails the test under CI).
    ///
    /// # Panics
    /// When it cannot be started for another reason, or does not come up in time.
    pub fn start() -> Option<RedisServer> {
        match Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                crate::skip("no redis-server on the PATH to start and kill (install redis-server)");
                return None;
            }
            Err(e) => panic!("cannot run redis-server: {e}"),
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap_or_else(|e| panic!("no free port: {e}"))
            .port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        Some(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (empty: nothing is saved) and waits until it
    /// accepts connections; kills the running one first.
    ///
    /// # Panics
    /// When it does not start or come up within 20 s.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < START_BOUND,
                "redis-server did not accept connections within {START_BOUND:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (an outage); [`RedisServer::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
