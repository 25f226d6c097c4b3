//! TLS of the control plane as processes: a coordinator serving TLS with a certificate made at
//! test time (`rcgen`), a node agent (`shoal worker`) attaching over TLS, clients with and
//! without the CA, mutual TLS, and the coordinator's TLS flags refused when incomplete.

use std::path::{Path, PathBuf};

use rcgen::ExtendedKeyUsagePurpose;
use shoal_tests::certs::TestCa;
use shoal_tests::{Background, run_shoal};

/// A CA whose certificate is written to `<dir>/<name>-ca.pem`, and whose leaves are written
/// next to it.
struct Ca {
    pem: PathBuf,
    ca: TestCa,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Self {
        let ca = TestCa::new(name);
        Self {
            pem: ca.write(dir, name),
            ca,
        }
    }

    /// A leaf certificate for `names`, written to `<dir>/<file>.pem` and `<dir>/<file>.key`.
    fn leaf(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        self.ca.leaf(names, usage).write(dir, file)
    }

    fn server(&self, dir: &Path) -> (PathBuf, PathBuf) {
        self.ca.server().write(dir, "server")
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A coordinator started with `tls_args`; returns it and the `https://` URL it printed.
fn start_tls_coordinator(dir: &Path, tls_args: &[&str]) -> (Background, String) {
    let store = dir.join("store");
    let mut args = vec![
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--store",
        s(&store),
    ];
    args.extend_from_slice(tls_args);
    let mut c = Background::start(&args);
    let line = c.first_line();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap_or_else(|| panic!("no https:// address in {line:?}"))
        .to_string();
    (c, url)
}

/// `shoal nodes --json` through `tls` options; the healthy nodes' names once `want` of them
/// are (panics after 20 s).
fn wait_for_healthy(url: &str, tls: &[&str], want: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut args = vec!["nodes", "--coordinator", url, "--json"];
        args.extend_from_slice(tls);
        let out = run_shoal(&args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            let nodes: serde_json::Value = serde_json::from_str(&text).expect("json");
            let healthy: Vec<String> = nodes
                .as_array()
                .expect("array")
                .iter()
                .filter(|n| n["state"] == "healthy")
                .map(|n| n["name"].as_str().expect("name").to_string())
                .collect();
            if healthy.len() >= want {
                return healthy;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for {want} healthy nodes; last: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_node_agent_attaches_over_tls_and_runs_a_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "shoal");
    let (cert, key) = ca.server(dir.path());
    let (_coordinator, url) =
        start_tls_coordinator(dir.path(), &["--tls-cert", s(&cert), "--tls-key", s(&key)]);
    let trust = ["--tls-ca", s(&ca.pem)];

    let _w = Background::start(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "tls-node",
        "--tls-ca",
        s(&ca.pem),
    ]);
    assert_eq!(wait_for_healthy(&url, &trust, 1), ["tls-node"]);

    // A job through the TLS API, run by the agent over its TLS session.
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"over-tls\"\nprecision = \"fp32\"\n[training]\nsteps = 2\nseq_len = 32\nbatch = 2\n[parallelism]\nmicro_batches = 1\n[checkpointing]\ndir = \"{}\"\n",
            dir.path().join("run").display()
        ),
    )
    .expect("write job");
    let out = run_shoal(&[
        "submit",
        s(&job),
        "--coordinator",
        &url,
        "--tls-ca",
        s(&ca.pem),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = run_shoal(&["watch", &id, "--coordinator", &url, "--tls-ca", s(&ca.pem)]);
    assert!(out.status.success(), "watch {id}: {}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("succeeded"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Without the CA the client refuses to dial https://; with another CA the handshake fails;
    // over plaintext the connection is dropped.
    let out = run_shoal(&["jobs", "--coordinator", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--tls-ca"), "{}", stderr(&out));
    let other = Ca::new(dir.path(), "other");
    let out = run_shoal(&["jobs", "--coordinator", &url, "--tls-ca", s(&other.pem)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid peer certificate: UnknownIssuer"),
        "{}",
        stderr(&out)
    );
    let plain = url.replacen("https://", "http://", 1);
    for args in [
        vec!["jobs", "--coordinator", &plain],
        vec!["worker", "--coordinator", &plain, "--node", "plain"],
    ] {
        let out = run_shoal(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("closed the connection") && stderr(&out).contains("https://"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // The CA with an http:// URL is refused rather than ignored.
    let out = run_shoal(&["jobs", "--coordinator", &plain, "--tls-ca", s(&ca.pem)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not https://"), "{}", stderr(&out));

    // Still one node, still serving.
    assert_eq!(wait_for_healthy(&url, &trust, 1), ["tls-node"]);
}

#[test]
fn mutual_tls_admits_only_agents_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = Ca::new(dir.path(), "server");
    let client_ca = Ca::new(dir.path(), "clients");
    let (cert, key) = server_ca.server(dir.path());
    let (_coordinator, url) = start_tls_coordinator(
        dir.path(),
        &[
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&client_ca.pem),
        ],
    );
    let (agent_cert, agent_key) = client_ca.leaf(
        dir.path(),
        "agent",
        &["agent-1"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let id = [
        "--tls-ca",
        s(&server_ca.pem),
        "--tls-cert",
        s(&agent_cert),
        "--tls-key",
        s(&agent_key),
    ];

    // No client certificate: the agent cannot attach and exits.
    let out = run_shoal(&[
        "worker",
        "--coordinator",
        &url,
        "--node",
        "anonymous",
        "--tls-ca",
        s(&server_ca.pem),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--tls-cert and --tls-key"),
        "{}",
        stderr(&out)
    );

    let mut args = vec!["worker", "--coordinator", &url, "--node", "admitted"];
    args.extend_from_slice(&id);
    let _w = Background::start(&args);
    assert_eq!(wait_for_healthy(&url, &id, 1), ["admitted"]);

    // A client certificate needs its key.
    let out = run_shoal(&[
        "nodes",
        "--coordinator",
        &url,
        "--tls-ca",
        s(&server_ca.pem),
        "--tls-cert",
        s(&agent_cert),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--tls-key"), "{}", stderr(&out));
}

#[test]
fn incomplete_or_unreadable_tls_options_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "shoal");
    let (cert, key) = ca.server(dir.path());
    let store = dir.path().join("store");
    let base = [
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--store",
        s(&store),
    ];

    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run_shoal(&args)
    };
    let out = run(&["--tls-cert", s(&cert)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--tls-key"), "{}", stderr(&out));
    let out = run(&["--tls-key", s(&key)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--tls-cert"), "{}", stderr(&out));
    let out = run(&["--tls-client-ca", s(&ca.pem)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--tls-cert"), "{}", stderr(&out));

    let missing = dir.path().join("missing.pem");
    let out = run(&["--tls-cert", s(&cert), "--tls-key", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains(&format!("--tls-key {}", missing.display())),
        "{e}"
    );

    // A key that is not the certificate's: refused before listening.
    let (_, other_key) = ca.leaf(
        dir.path(),
        "other",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let out = run(&["--tls-cert", s(&cert), "--tls-key", s(&other_key)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr(&out).contains("--tls-cert"), "{}", stderr(&out));
}
