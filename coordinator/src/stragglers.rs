//! Straggler detection: in a synchronous job every node waits at each collective for the
//! slowest, so a slow node shows as the one whose devices compute longest (and wait least).
//! Each node reports, with its steps, its busiest device's compute seconds; a node whose
//! figure exceeds `factor` times the median of its peers' latest figures in `window` reports
//! in a row is flagged, once per run of slow reports. Peers are the nodes holding the same
//! pipeline ranks (different stages do different work, and wait for each other by design).
//! Judging each report against the peers' latest, rather than step by step, lets nodes
//! coalesce their reports.

use std::collections::BTreeMap;

/// Steps in a row a node must be slow for.
pub const DEFAULT_WINDOW: u32 = 5;
/// How much slower than the median of its peers a node must be.
pub const DEFAULT_FACTOR: f64 = 1.5;

/// A flagged node.
#[derive(Clone, Debug, PartialEq)]
pub struct Straggler {
    /// The node.
    pub node: String,
    /// The step that completed the run.
    pub step: u64,
    /// Its compute seconds in that step.
    pub busy_s: f64,
    /// The median of the other nodes' in that step.
    pub peers_busy_s: f64,
    /// Consecutive slow steps.
    pub steps: u32,
}

/// One job attempt's detector.
#[derive(Debug)]
pub struct Detector {
    window: u32,
    factor: f64,
    /// Each node's peer group (the pipeline ranks it holds).
    groups: BTreeMap<String, Vec<usize>>,
    /// Each node's latest figure.
    latest: BTreeMap<String, f64>,
    /// Per node, slow reports in a row, and whether this run was flagged already.
    runs: BTreeMap<String, (u32, bool)>,
}

impl Detector {
    /// A detector for an attempt whose ranks sit as `placement` says: `(node, pp_rank)` per
    /// rank.
    pub fn new<'a>(
        placement: impl IntoIterator<Item = (&'a str, usize)>,
        window: u32,
        factor: f64,
    ) -> Self {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (node, pp) in placement {
            let g = groups.entry(node.to_string()).or_default();
            if !g.contains(&pp) {
                g.push(pp);
                g.sort_unstable();
            }
        }
        Self {
            window: window.max(1),
            factor,
            groups,
            latest: BTreeMap::new(),
            runs: BTreeMap::new(),
        }
    }

    /// `node`'s figure for `step`; returns the node as a straggler when this report completes
    /// a run of `window` slow ones. Nothing is judged until every peer has reported, nor for
    /// a node without peers.
    pub fn observe(&mut self, node: &str, step: u64, busy_s: f64) -> Option<Straggler> {
        let group = self.groups.get(node)?;
        if !(busy_s.is_finite() && busy_s > 0.0) {
            return None;
        }
        self.latest.insert(node.to_string(), busy_s);
        let peers: Vec<&String> = self
            .groups
            .iter()
            .filter(|(n, g)| *g == group && n.as_str() != node)
            .map(|(n, _)| n)
            .collect();
        let mut others: Vec<f64> = peers
            .iter()
            .filter_map(|n| self.latest.get(*n).copied())
            .collect();
        if others.is_empty() || others.len() < peers.len() {
            return None;
        }
        others.sort_by(f64::total_cmp);
        let median = *others.get(others.len() / 2)?;
        let run = self.runs.entry(node.to_string()).or_insert((0, false));
        if busy_s <= self.factor * median {
            *run = (0, false);
            return None;
        }
        run.0 += 1;
        if run.0 < self.window || run.1 {
            return None;
        }
        run.1 = true;
        Some(Straggler {
            node: node.to_string(),
            step,
            busy_s,
            peers_busy_s: median,
            steps: run.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> [(&'static str, usize); 3] {
        [("a", 0), ("b", 0), ("c", 0)]
    }

    fn feed(d: &mut Detector, step: u64, figures: &[(&str, f64)]) -> Vec<Straggler> {
        figures
            .iter()
            .filter_map(|(n, b)| d.observe(n, step, *b))
            .collect()
    }

    #[test]
    fn a_node_slow_for_the_window_is_flagged_once() {
        let mut d = Detector::new(three(), 5, 1.5);
        let mut flagged = Vec::new();
        for step in 1..=12 {
            flagged.extend(feed(&mut d, step, &[("a", 1.0), ("b", 1.05), ("c", 2.0)]));
        }
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        let s = &flagged[0];
        assert_eq!((s.node.as_str(), s.step, s.steps), ("c", 5, 5));
        assert!((s.peers_busy_s - 1.05).abs() < 1e-12);
        // It recovers, then slows down again: a new run, flagged again.
        for step in 13..=14 {
            assert!(feed(&mut d, step, &[("a", 1.0), ("b", 1.0), ("c", 1.0)]).is_empty());
        }
        let again: Vec<_> = (15..=19)
            .flat_map(|s| feed(&mut d, s, &[("a", 1.0), ("b", 1.0), ("c", 3.0)]))
            .collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].step, 19);
    }

    #[test]
    fn noise_short_runs_and_partial_steps_are_not_flagged() {
        let mut d = Detector::new(three(), 5, 1.5);
        for step in 1..=20u64 {
            // Slow every third step only.
            let c = if step % 3 == 0 { 2.0 } else { 1.1 };
            assert!(feed(&mut d, step, &[("a", 1.0), ("b", 1.2), ("c", c)]).is_empty());
        }
        // Nothing is judged before every node has reported once.
        let mut fresh = Detector::new(three(), 1, 1.5);
        assert!(fresh.observe("c", 1, 9.0).is_none());
        assert!(fresh.observe("a", 1, 1.0).is_none());
        assert!(fresh.observe("b", 1, 1.0).is_none());
        assert_eq!(fresh.observe("c", 2, 9.0).map(|x| x.step), Some(2));
        // One node alone has no peers.
        let mut one = Detector::new([("a", 0)], 1, 1.5);
        assert!(one.observe("a", 1, 9.0).is_none());
        // Nodes of different pipeline stages are not peers: a heavier stage is no straggler.
        let mut stages = Detector::new([("a", 0), ("b", 1)], 1, 1.5);
        assert!(stages.observe("a", 1, 1.0).is_none());
        assert!(stages.observe("b", 1, 5.0).is_none());
        assert!(stages.observe("b", 2, 5.0).is_none());
        // A node the attempt does not use is ignored.
        assert!(stages.observe("z", 2, 5.0).is_none());
        // Zero or non-finite figures (nodes that do not measure) are ignored.
        assert!(d.observe("b", 31, 0.0).is_none());
        assert!(d.observe("b", 31, f64::NAN).is_none());
    }
}
