//! Helpers for Shoal's multi-process integration tests (the tests live in `tests/tests/`).

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `shoal` binary built for this workspace (`target/<profile>/shoal`).
///
/// The integration crate cannot use `CARGO_BIN_EXE_shoal` (the binary belongs to another
/// package), so the test command builds it first and the path is derived from this test's own
/// executable, which lives in `target/<profile>/deps/`.
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    profile_dir.join(format!("shoal{}", std::env::consts::EXE_SUFFIX))
}

/// Runs `shoal` with `args` to completion and returns its output.
pub fn run_shoal(args: &[&str]) -> Output {
    let bin = shoal_bin();
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p shoal)",
        bin.display()
    );
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()))
}

/// A `shoal` process running in the background, killed (SIGKILL) when dropped.
pub struct Background {
    /// The process.
    pub child: std::process::Child,
}

impl Background {
    /// Starts `shoal` with `args`, stdout piped (stderr inherited).
    pub fn start(args: &[&str]) -> Self {
        let child = Command::new(shoal_bin())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start shoal {args:?}: {e}"));
        Self { child }
    }

    /// The first line the process printed on stdout.
    pub fn first_line(&mut self) -> String {
        use std::io::BufRead;
        let out = self.child.stdout.take().expect("stdout piped");
        let mut reader = std::io::BufReader::new(out);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read first line");
        // Keep draining so the process never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        line.trim().to_string()
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator on a free loopback port with an embedded store in `dir`; returns it and its URL.
pub fn start_coordinator(dir: &std::path::Path) -> (Background, String) {
    let store = dir.join("store");
    let mut c = Background::start(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--store",
        store.to_str().expect("utf-8 path"),
    ]);
    let line = c.first_line();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (c, url)
}

/// Polls `shoal nodes --json` until `n` nodes are healthy (panics after 20 s).
pub fn wait_for_nodes(url: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = run_shoal(&["nodes", "--coordinator", url, "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if text.matches("\"healthy\"").count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for {n} healthy nodes; last: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
