//! Helpers for Shoal's multi-process integration tests (the tests live in `tests/tests/`).

pub mod certs;
pub mod otlp;

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
        Self::start_env(args, &[])
    }

    /// [`Background::start`] with environment variables `env` set.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = Command::new(shoal_bin())
            .args(args)
            .envs(env.iter().copied())
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

/// A node agent `name` of two CPU devices attached to the coordinator at `url`.
pub fn start_worker(url: &str, name: &str) -> Background {
    Background::start(&[
        "worker",
        "--coordinator",
        url,
        "--node",
        name,
        "--devices",
        "cpu:2",
    ])
}

/// A coordinator on a free loopback port with an embedded store in `dir`; returns it and its URL.
pub fn start_coordinator(dir: &std::path::Path) -> (Background, String) {
    let store = dir.join("store");
    start_coordinator_with(&["--store", store.to_str().expect("utf-8 path")])
}

/// A coordinator on a free loopback port with more options (`--store`, ...); returns it and its
/// URL.
pub fn start_coordinator_with(args: &[&str]) -> (Background, String) {
    let mut all = vec!["coordinator", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut c = Background::start(&all);
    let url = url_in(&c.first_line());
    (c, url)
}

/// The `http://` URL in a coordinator's first line (`coordinator listening on URL ...`).
pub fn url_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
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

/// A free TCP port on loopback (free when asked; bound again by the caller's process soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An etcd server (Debian's `etcd-server`, or `SHOAL_ETCD_BIN`) on free loopback ports, killed
/// when dropped.
pub struct Etcd {
    child: std::process::Child,
    /// `HOST:PORT` of its client endpoint (`shoal coordinator --store etcd://<this>`).
    pub endpoint: String,
    dir: std::path::PathBuf,
    ports: (u16, u16),
}

impl Etcd {
    /// Starts etcd with its data under `dir` and waits (up to 20 s) until it is healthy.
    pub fn start(dir: &std::path::Path) -> Self {
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("127.0.0.1:{client}");
        let child = Self::spawn(dir, client, peer);
        let etcd = Self {
            child,
            endpoint,
            dir: dir.to_path_buf(),
            ports: (client, peer),
        };
        etcd.wait_healthy();
        etcd
    }

    /// Kills etcd with SIGKILL and starts it again on the same ports and data (what a crash
    /// and a restart by its supervisor look like), waiting until it is healthy.
    pub fn restart(&mut self, down: std::time::Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(&self.dir, self.ports.0, self.ports.1);
        self.wait_healthy();
    }

    fn spawn(dir: &std::path::Path, client: u16, peer: u16) -> std::process::Child {
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let bin = std::env::var("SHOAL_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        Command::new(&bin)
            .args([
                "--name",
                "shoal-test",
                "--data-dir",
                dir.join("etcd").to_str().expect("utf-8 path"),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("shoal-test={peer_url}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin} (install Debian's etcd-server; scripts/test.sh does): {e}"
                )
            })
    }

    fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !self.healthy() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not become healthy at {}",
                self.endpoint
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Whether etcd answers `GET /health` with `"health":"true"` (it has a leader and serves).
    fn healthy(&self) -> bool {
        self.http("GET", "/health", "")
            .is_ok_and(|r| r.contains("\"health\":\"true\""))
    }

    /// Whether `key` exists, asked through etcd's JSON gateway (`POST /v3/kv/range`).
    pub fn has_key(&self, key: &str) -> bool {
        let body = format!(
            "{{\"key\":\"{}\",\"keys_only\":true}}",
            base64(key.as_bytes())
        );
        let r = self
            .http("POST", "/v3/kv/range", &body)
            .unwrap_or_else(|e| panic!("etcd at {}: {e}", self.endpoint));
        assert!(
            r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
            "{r}"
        );
        r.contains("\"kvs\"")
    }

    /// One HTTP/1.0 request (so the answer is never chunked); the whole response.
    fn http(&self, method: &str, path: &str, body: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let addr: std::net::SocketAddr = self
            .endpoint
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // Generous: a loaded machine can keep etcd's JSON gateway waiting for seconds.
        let timeout = std::time::Duration::from_secs(10);
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.endpoint,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        Ok(response)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 with padding (what etcd's JSON gateway takes for bytes).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET url` (`http://host:port/path`) over a plain HTTP/1.1 connection: the status code and
/// the body (the tests' servers answer with a length or close the connection).
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s =
        std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Chromium for the dashboard's browser tests: `chromium` or `chromium-browser` on `PATH`.
/// Panics when neither is there (`scripts/test.sh` installs Debian's `chromium`): the browser
/// tests fail rather than skip.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no chromium or chromium-browser on PATH: install Debian's chromium (scripts/test.sh does)"
    )
}

/// Runs headless Chromium on `url` with `extra` arguments (a fresh profile, no sandbox, no
/// GPU) and returns its stdout; panics if it fails or takes over 90 s.
pub fn headless(url: &str, extra: &[&str]) -> String {
    use std::io::Read;
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let profile = std::env::temp_dir().join(format!(
        "shoal-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start chromium: {e}"));
    let mut out = child.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut err = child.stderr.take().expect("stderr piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for chromium") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium on {url} took over 90 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(status.success(), "chromium on {url}: {status}\n{stderr}");
    stdout
}

/// The DOM of `url` as headless Chromium has it after `budget_ms` of virtual time (scripts
/// and their fetches have run).
pub fn rendered_dom(url: &str, budget_ms: u64) -> String {
    headless(
        url,
        &["--dump-dom", &format!("--virtual-time-budget={budget_ms}")],
    )
}

/// A screenshot of `url` by headless Chromium, `width` x `height`, written to `path`.
pub fn screenshot(url: &str, path: &std::path::Path, width: u32, height: u32) {
    let _ = std::fs::remove_file(path);
    headless(
        url,
        &[
            &format!("--screenshot={}", path.display()),
            &format!("--window-size={width},{height}"),
            "--virtual-time-budget=3000",
        ],
    );
    let png = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1000,
        "{} is not a PNG",
        path.display()
    );
}

/// The value of the sample `series` (its name and labels exactly as written) in Prometheus
/// text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

/// Writes `toml` to `dir/NAME.toml` (NAME = `name`, with `{dir}` in `toml` replaced by
/// `dir/NAME`, the job's directory) and submits it to the coordinator at `url` with `extra`
/// flags; returns the job id (panics unless `shoal submit` succeeds).
pub fn submit_toml(
    url: &str,
    dir: &std::path::Path,
    name: &str,
    toml: &str,
    extra: &[&str],
) -> String {
    let path = dir.join(format!("{name}.toml"));
    let text = toml.replace("{dir}", &dir.join(name).display().to_string());
    std::fs::write(&path, text).expect("write the job file");
    let mut args = vec![
        "submit",
        path.to_str().expect("utf-8 path"),
        "--coordinator",
        url,
    ];
    args.extend_from_slice(extra);
    let o = run_shoal(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"shoal/live/n1"), "c2hvYWwvbGl2ZS9uMQ==");
    }
}
