//! Fault injection for the failure tests: a node agent kills itself with a real `SIGKILL` at a
//! chosen point of training, so a test can fail a node exactly during forward, backward, the
//! expert-parallel dispatch or combine, or a checkpoint write.
//!
//! `SHOAL_FAULT=NODE:POINT@N` arms it in the agent named `NODE`: the `N`-th time (from 1) that
//! process reaches `POINT` (`forward`, `backward`, `dispatch`, `combine`, `checkpoint`), it
//! sends itself `SIGKILL`. `SHOAL_FAULT=NODE:send@N=cut` cuts the network instead: at the
//! `N`-th frame the node sends, it shuts down every TCP link of its mesh both ways (the process
//! lives on), as a network partition between it and the other nodes would.
//! `SHOAL_FAULT=NODE:write@N=enospc` fails the `N`-th checkpoint file write with "no space
//! left on device", as a full disk would. With `SHOAL_FAULT_ONCE=FILE` it fires at most once across restarts:
//! the file is created just before, and an agent that finds it does nothing. Unset (as always
//! outside tests), a point costs one atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an armed fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Kill,
    Cut,
    NoSpace,
}

struct Armed {
    point: String,
    action: Action,
    nth: u64,
    seen: AtomicU64,
    once: Option<String>,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Arms the fault named by the environment if it is for node `node` (the agent calls this
/// once at start; later calls do nothing).
pub fn arm(node: &str) {
    ARMED.get_or_init(|| {
        let spec = std::env::var("SHOAL_FAULT").ok()?;
        let (who, rest) = spec.split_once(':')?;
        let (point, nth) = rest.split_once('@')?;
        let (nth, action) = match nth.split_once('=') {
            Some((n, "cut")) => (n, Action::Cut),
            Some((n, "enospc")) => (n, Action::NoSpace),
            Some(_) => return None,
            None => (nth, Action::Kill),
        };
        if who != node {
            return None;
        }
        let once = std::env::var("SHOAL_FAULT_ONCE").ok();
        if once
            .as_ref()
            .is_some_and(|f| std::path::Path::new(f).exists())
        {
            return None;
        }
        let nth = nth.parse().ok()?;
        tracing::warn!(node, point, nth, "fault injection armed");
        Some(Armed {
            point: point.to_string(),
            action,
            nth,
            seen: AtomicU64::new(0),
            once,
        })
    });
}

/// Whether the armed fault fires here.
fn fires(name: &str, action: Action) -> bool {
    let Some(Some(a)) = ARMED.get() else {
        return false;
    };
    if a.point != name || a.action != action || a.seen.fetch_add(1, Ordering::Relaxed) + 1 != a.nth
    {
        return false;
    }
    if let Some(f) = &a.once {
        let _ = std::fs::write(f, name);
    }
    true
}

/// A point where a network cut may be injected: `true` once, when the caller must cut its
/// links.
pub fn cut(name: &str) -> bool {
    let fire = fires(name, Action::Cut);
    if fire {
        tracing::warn!(
            point = name,
            "fault injection: cutting this node's network links"
        );
    }
    fire
}

/// A point where an armed kill may fire.
pub fn point(name: &str) {
    if !fires(name, Action::Kill) {
        return;
    }
    tracing::warn!(point = name, "fault injection: killing this process");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    // The signal is on its way; nothing after this point runs.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A point where a full disk may be injected: the error to fail with, once.
pub fn no_space(name: &str) -> Option<std::io::Error> {
    fires(name, Action::NoSpace).then(|| {
        tracing::warn!(point = name, "fault injection: no space left on device");
        std::io::Error::from(std::io::ErrorKind::StorageFull)
    })
}
