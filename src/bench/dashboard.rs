//! `shoal bench dashboard`: how long the dashboard's pages take to load at scale. A control
//! actor in this process (embedded store in a temporary directory) with simulated nodes (their
//! sessions are channels; they heartbeat), jobs placed over every device and a history of
//! reported steps (loss, tokens/s, expert loads), and the coordinator's
//! HTTP router on loopback; each page is fetched whole over real HTTP/1.1 connections, one at a
//! time, and the load times reported as p50 and p99 against the goal of 300 ms.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use shoal_coordinator::actor::{Control, HEARTBEAT_MS, Registration, Session};
use shoal_coordinator::store::EmbeddedStore;
use shoal_proto::v1 as pb;
use shoal_spec::job::JobSpec;

/// The page load goal, milliseconds (p99).
const GOAL_MS: f64 = 300.0;

/// Options of `shoal bench dashboard`.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardBenchArgs {
    /// Simulated nodes.
    #[arg(long, default_value_t = 256)]
    pub nodes: usize,
    /// Devices per node.
    #[arg(long, default_value_t = 8)]
    pub devices: usize,
    /// Jobs placed (each takes an equal share of the devices: pp 2 x dp).
    #[arg(long, default_value_t = 32)]
    pub jobs: usize,
    /// Steps each job has reported (the curves keep the latest 512).
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// Loads timed per page (after five warm-up loads).
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Print one JSON line of results at the end.
    #[arg(long)]
    pub json: bool,
    /// After timing, keep serving the simulated cluster's dashboard (its URL printed) until
    /// Ctrl-C, to look at it.
    #[arg(long)]
    pub serve: bool,
    /// Loads of `/` and of a job page timed in a real browser (headless chromium, a fresh
    /// process each: the time from navigation to the load event, read from the page); 0 for
    /// none. Chromium must be on PATH (Debian's `chromium`).
    #[arg(long, default_value_t = 20)]
    pub browser_loads: usize,
}

/// The first of `chromium` and `chromium-browser` on PATH.
fn chromium() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
        .context("--browser-loads: no chromium on PATH (install Debian's chromium, or pass 0)")
}

/// One load of `url` in a fresh headless chromium: the page's own navigation-to-load time.
fn browser_load(chromium: &std::path::Path, url: &str, run: usize) -> Result<f64> {
    let profile =
        std::env::temp_dir().join(format!("shoal-bench-chromium-{}-{run}", std::process::id()));
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1400,1000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .context("running chromium")?;
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let ms = dom
        .split("data-load-ms=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("{url}: the page did not record its load time"))?;
    Ok(ms)
}

#[derive(Debug, Serialize)]
struct PageTimes {
    path: String,
    bytes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p99 over the goal (below 1 meets it).
    p99_over_goal: f64,
}

impl PageTimes {
    /// The figures of `ms`, one load time per entry.
    fn of(path: String, bytes: usize, mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let p99 = percentile(&ms, 0.99);
        Self {
            path,
            bytes,
            p50_ms: percentile(&ms, 0.5),
            p99_ms: p99,
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
            p99_over_goal: p99 / GOAL_MS,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    devices: usize,
    jobs: usize,
    requests: usize,
    goal_ms: f64,
    pages: Vec<PageTimes>,
    /// Load times in headless chromium (empty with `--browser-loads 0`).
    browser: Vec<PageTimes>,
}

/// Runs the benchmark.
pub fn run(args: &DashboardBenchArgs) -> Result<()> {
    if args.nodes == 0 || args.devices == 0 || args.jobs == 0 || args.requests == 0 {
        bail!("--nodes, --devices, --jobs and --requests must be at least 1");
    }
    let total = args.nodes * args.devices;
    let dp = total / args.jobs / 2;
    if dp < 2 || !dp.is_multiple_of(2) {
        bail!(
            "{} devices do not give {} jobs of pp 2 x an even dp of at least 2",
            total,
            args.jobs
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(bench(args, dp))
}

/// `GET path` from `addr` over a fresh connection: the whole response's bytes.
fn get(addr: std::net::SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect(addr).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .context("read timeout")?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .context("send the request")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("read the response")?;
    if !raw.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&raw[..raw.len().min(200)]).to_string();
        bail!("GET {path}: {head}");
    }
    Ok(raw)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

async fn bench(args: &DashboardBenchArgs, dp: usize) -> Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let store = EmbeddedStore::open(&dir.path().join("store.redb"))?;
    let (control, _actor) = Control::start(store).await?;

    // Nodes: sessions whose messages are drained, heartbeating every interval.
    let mut epochs = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let name = format!("node-{i:04}");
        let (tx, mut rx): (Session, _) = tokio::sync::mpsc::channel(256);
        let epoch = control
            .register(
                Registration {
                    node: name.clone(),
                    devices: args.devices,
                    models: Vec::new(),
                    nvlink_domain: name.clone(),
                    ib_rail: (i % 8) as u32,
                    spare: false,
                    data_addr: format!("127.0.0.1:{}", 20_000 + i),
                    running: Vec::new(),
                },
                tx,
            )
            .await?;
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        epochs.push((name, epoch));
    }
    let beating = control.clone();
    let beats = epochs.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(u64::from(HEARTBEAT_MS)));
        loop {
            every.tick().await;
            for (n, e) in &beats {
                beating.heartbeat(n, *e).await;
            }
        }
    });

    // Jobs over every device, each with reported steps and expert loads.
    let model = shoal_spec::ModelConfig::preset("tiny")?;
    let moe_layers = model
        .num_hidden_layers
        .saturating_sub(model.first_k_dense_replace);
    let experts = model.n_routed_experts;
    let mut ids = Vec::with_capacity(args.jobs);
    for j in 0..args.jobs {
        let mut spec = JobSpec::from_toml(&format!("name = \"bench-{j}\""), "bench job")?;
        spec.parallelism.pp = 2;
        spec.parallelism.dp = dp;
        spec.parallelism.ep = 2;
        spec.training.batch = 2 * dp;
        spec.training.steps = args.steps * 2;
        ids.push(control.submit(spec).await?);
    }
    let started = Instant::now();
    for id in &ids {
        let rec = control.get(id).await?;
        let Some(first) = rec.placement.first() else {
            bail!("{id} was not placed: {}", rec.reason);
        };
        let epoch = epochs
            .iter()
            .find(|(n, _)| *n == first.node)
            .map(|(_, e)| *e)
            .context("the job's node")?;
        for step in 1..=args.steps {
            let loads = (0..moe_layers)
                .map(|l| pb::ExpertLoads {
                    tokens: (0..experts)
                        .map(|e| ((e * 37 + l * 11 + step as usize) % 97) as u64 + 10)
                        .collect(),
                })
                .collect();
            let status = pb::AssignmentStatus {
                job_id: id.clone(),
                state: pb::JobState::Running as i32,
                attempt: rec.attempt,
                started_step: (step == 1).then_some(0),
                step: Some(pb::StepMetrics {
                    step,
                    loss: 10.0 / (1.0 + step as f64 * 0.01),
                    main_loss: 9.0 / (1.0 + step as f64 * 0.01),
                    tokens_per_s: 50_000.0 + (step % 17) as f64 * 100.0,
                    max_vio: vec![0.3; moe_layers],
                    seconds: 0.4,
                    bubble_s: 0.05,
                    expert_loads: loads,
                }),
                ..Default::default()
            };
            control.status(&first.node, epoch, status).await;
        }
    }
    // Every status is handled before the snapshot is.
    let s = control.snapshot().await?;
    let running = s
        .jobs
        .iter()
        .filter(|j| j.state == shoal_coordinator::jobs::JobState::Running)
        .count();
    let busy: usize = s.nodes.iter().map(|n| n.busy.len()).sum();
    eprintln!(
        "{} nodes x {} devices, {} jobs ({running} running, {busy} devices held), {} steps each reported in {:.1} s",
        args.nodes,
        args.devices,
        ids.len(),
        args.steps,
        started.elapsed().as_secs_f64()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind loopback")?;
    let addr = listener.local_addr().context("address")?;
    tokio::spawn(shoal_coordinator::http::serve(
        listener,
        control.clone(),
        std::future::pending(),
    ));
    let first = ids.first().cloned().unwrap_or_default();
    let paths = vec![
        "/".to_string(),
        "/api/cluster".to_string(),
        format!("/jobs/{first}"),
        format!("/api/jobs/{first}"),
    ];
    let requests = args.requests;
    let pages = tokio::task::spawn_blocking(move || -> Result<Vec<PageTimes>> {
        let mut pages = Vec::new();
        for path in paths {
            let mut bytes = 0;
            for _ in 0..5 {
                bytes = get(addr, &path)?.len();
            }
            let mut ms = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                get(addr, &path)?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            pages.push(PageTimes::of(path, bytes, ms));
        }
        Ok(pages)
    })
    .await
    .context("the client thread")??;

    println!(
        "dashboard page loads over loopback HTTP, {} nodes x {} devices, {} jobs, {} loads each",
        args.nodes,
        args.devices,
        ids.len(),
        args.requests
    );
    println!(
        "{:<20} {:>10} {:>9} {:>9} {:>9} {:>12}",
        "page", "bytes", "p50 ms", "p99 ms", "max ms", "p99 / 300ms"
    );
    for p in &pages {
        println!(
            "{:<20} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>12.3}",
            p.path, p.bytes, p.p50_ms, p.p99_ms, p.max_ms, p.p99_over_goal
        );
    }
    let worst = pages.iter().map(|p| p.p99_ms).fold(0.0, f64::max);
    println!(
        "worst p99 {worst:.2} ms: {} the {GOAL_MS} ms goal",
        if worst < GOAL_MS { "meets" } else { "misses" }
    );
    let mut browser = Vec::new();
    if args.browser_loads > 0 {
        let chromium = chromium()?;
        let n = args.browser_loads;
        let urls = [
            format!("http://{addr}/"),
            format!("http://{addr}/jobs/{first}"),
        ];
        browser = tokio::task::spawn_blocking(move || -> Result<Vec<PageTimes>> {
            let mut pages = Vec::new();
            for (i, url) in urls.iter().enumerate() {
                // One warm-up load (the first start of chromium reads its files from disk).
                browser_load(&chromium, url, i * (n + 1))?;
                let ms = (1..=n)
                    .map(|k| browser_load(&chromium, url, i * (n + 1) + k))
                    .collect::<Result<Vec<f64>>>()?;
                let path = url
                    .rsplit_once(&addr.to_string())
                    .map_or(url.clone(), |(_, p)| p.to_string());
                pages.push(PageTimes::of(path, 0, ms));
            }
            Ok(pages)
        })
        .await
        .context("the browser thread")??;
        println!(
            "in headless chromium (navigation to the load event, as the page measures it), {n} loads each"
        );
        for p in &browser {
            println!(
                "{:<20} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>12.3}",
                p.path, "", p.p50_ms, p.p99_ms, p.max_ms, p.p99_over_goal
            );
        }
        let worst = browser.iter().map(|p| p.p99_ms).fold(0.0, f64::max);
        println!(
            "worst browser p99 {worst:.2} ms: {} the {GOAL_MS} ms goal",
            if worst < GOAL_MS { "meets" } else { "misses" }
        );
    }
    if args.json {
        let report = Report {
            nodes: args.nodes,
            devices: args.devices,
            jobs: ids.len(),
            requests: args.requests,
            goal_ms: GOAL_MS,
            pages,
            browser,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    if args.serve {
        println!("dashboard at http://{addr}/ (Ctrl-C to stop)");
        tokio::signal::ctrl_c().await.context("wait for ctrl-c")?;
    }
    control.close().await;
    Ok(())
}
