//! Child processes the benchmarks and the simulator run and measure: a `shoal coordinator`
//! on a free loopback port, and its CPU time and memory from `/proc`.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// A child process killed (and reaped) when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command for `program`, run pinned to `core` with `taskset` if given.
pub(crate) fn pinned(program: &Path, core: Option<usize>) -> Command {
    match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string()]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A `shoal coordinator` process on a free loopback port.
pub(crate) struct CoordinatorProcess {
    proc: Proc,
    pub(crate) url: String,
}

impl CoordinatorProcess {
    /// Starts one with its embedded store in `store`, pinned to `core` (with `taskset`) if given.
    pub(crate) fn start(exe: &Path, store: &Path, core: Option<usize>) -> Result<Self> {
        Self::start_with(exe, store, core, &[])
    }

    /// [`Self::start`] with further `shoal coordinator` arguments.
    pub(crate) fn start_with(
        exe: &Path,
        store: &Path,
        core: Option<usize>,
        extra: &[String],
    ) -> Result<Self> {
        let mut cmd = pinned(exe, core);
        cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting a coordinator process")?;
        let stdout = child.stdout.take();
        let proc = Proc(child);
        let mut reader = std::io::BufReader::new(stdout.context("coordinator stdout")?);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("reading the coordinator's address")?;
        // Keep draining so the coordinator never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .with_context(|| format!("the coordinator printed no address: {:?}", line.trim()))?
            .to_string();
        Ok(Self { proc, url })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.0.id()
    }
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) start with field 3, the state.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: unexpected format"))
    };
    // utime and stime are fields 14 and 15.
    Ok(field(11)? + field(12)?)
}

/// Resident memory of a process in MB.
pub(crate) fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// Peak resident memory of a process in MB.
pub(crate) fn peak_rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmHWM:")
}

fn status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
