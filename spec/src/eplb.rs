//! Load-aware expert placement: the hierarchical policy of DeepSeek's expert-parallel load
//! balancer (EPLB).
//!
//! Given the measured load of every logical expert of every MoE layer, [`rebalance`] chooses
//! `replicas` physical expert slots per layer (`replicas - experts` of them redundant copies of
//! heavy experts) and lays them out over `nodes x gpus` so that each GPU carries about the same
//! load:
//! 1. expert groups (the `n_group` groups of node-limited routing) are packed onto nodes, the same
//!    number of groups per node, balancing the nodes' total load;
//! 2. inside each node, the expert with the highest load per copy gets one more copy, until the
//!    node's share of the slots is used;
//! 3. the node's copies (each carrying its expert's load divided by its copy count) are packed
//!    onto the node's GPUs, the same number per GPU, balancing the GPUs' load.
//!
//! When the groups cannot be split evenly over the nodes, the whole cluster is treated as one node
//! with one group. Every choice is deterministic: sorts are stable and descending, ties go to the
//! lowest index.

use serde::Serialize;

use crate::SpecError;

/// Where every physical expert slot of every layer goes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rebalance {
    /// `[layer][physical slot]` -> logical expert. Slots are numbered GPU by GPU
    /// (`replicas / gpus` consecutive slots per GPU), GPUs node by node.
    pub phy2log: Vec<Vec<usize>>,
    /// `[layer][logical expert]` -> its physical slots, in replica order.
    pub log2phy: Vec<Vec<Vec<usize>>>,
    /// `[layer][logical expert]` -> number of copies.
    pub logcnt: Vec<Vec<usize>>,
}

/// Packs `weights.len()` items into `packs` packs of equal item counts, heaviest item first into
/// the lightest pack that still has room. Returns `(pack, rank within pack)` per item.
fn balanced_packing(weights: &[f64], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = weights.len();
    let per_pack = n / packs;
    if per_pack == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Stable: equal weights keep ascending index order.
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut load = vec![0.0f64; packs];
    let mut count = vec![0usize; packs];
    let (mut pack, mut rank) = (vec![0; n], vec![0; n]);
    for item in order {
        let mut best: Option<usize> = None;
        for p in 0..packs {
            if count[p] < per_pack && best.is_none_or(|b| load[p] < load[b]) {
                best = Some(p);
            }
        }
        // `n = packs * per_pack`, so some pack always has room.
        let p = best.unwrap_or(0);
        pack[item] = p;
        rank[item] = count[p];
        load[p] += weights[item];
        count[p] += 1;
    }
    (pack, rank)
}

/// Gives `slots - weights.len()` extra copies, one at a time, to the expert with the highest load
/// per copy. Returns `(slot -> expert, slot -> replica rank, expert -> copies)`.
fn replicate(weights: &[f64], slots: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let n = weights.len();
    let mut slot2log: Vec<usize> = (0..n).collect();
    let mut rank = vec![0; n];
    let mut count = vec![1usize; n];
    for _ in n..slots {
        let mut best = 0;
        for j in 1..n {
            if weights[j] / count[j] as f64 > weights[best] / count[best] as f64 {
                best = j;
            }
        }
        slot2log.push(best);
        rank.push(count[best]);
        count[best] += 1;
    }
    (slot2log, rank, count)
}

/// One layer of the hierarchical policy: `(phy2log, phy rank, logcnt)`.
fn rebalance_layer(
    weights: &[f64],
    replicas: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let experts = weights.len();
    let group_size = experts / groups;
    let groups_per_node = groups / nodes;
    let per_node = experts / nodes;
    let slots_per_node = replicas / nodes;

    // 1. Groups onto nodes.
    let group_load: Vec<f64> = weights.chunks(group_size).map(|g| g.iter().sum()).collect();
    let (group_pack, group_rank) = balanced_packing(&group_load, nodes);
    // Node-major ("meta-logical") numbering of the experts, and back.
    let log2mlog: Vec<usize> = (0..experts)
        .map(|e| {
            let g = e / group_size;
            (group_pack[g] * groups_per_node + group_rank[g]) * group_size + e % group_size
        })
        .collect();
    let mut mlog2log = vec![0; experts];
    for (e, &m) in log2mlog.iter().enumerate() {
        mlog2log[m] = e;
    }

    let mut phy2log = Vec::with_capacity(replicas);
    let mut phy_rank = Vec::with_capacity(replicas);
    let mut mlog_count = vec![0; experts];
    for node in 0..nodes {
        let base = node * per_node;
        let local: Vec<f64> = (0..per_node).map(|j| weights[mlog2log[base + j]]).collect();
        // 2. Copies of the node's heavy experts.
        let (slot2mlog, rank, count) = replicate(&local, slots_per_node);
        mlog_count[base..base + per_node].copy_from_slice(&count);
        // 3. The node's copies onto its GPUs.
        let per_copy: Vec<f64> = slot2mlog
            .iter()
            .map(|&m| local[m] / count[m] as f64)
            .collect();
        let gpus_per_node = gpus / nodes;
        let (gpu, gpu_rank) = balanced_packing(&per_copy, gpus_per_node);
        let slots_per_gpu = slots_per_node / gpus_per_node;
        let mut placed = vec![0; slots_per_node];
        for (slot, (&g, &r)) in gpu.iter().zip(&gpu_rank).enumerate() {
            placed[g * slots_per_gpu + r] = slot;
        }
        for slot in placed {
            phy2log.push(mlog2log[base + slot2mlog[slot]]);
            phy_rank.push(rank[slot]);
        }
    }
    let logcnt = (0..experts).map(|e| mlog_count[log2mlog[e]]).collect();
    (phy2log, phy_rank, logcnt)
}

/// Places `replicas` physical expert slots per layer on `nodes` nodes of `gpus / nodes` GPUs each
/// (`gpus` counts all GPUs), from `loads[layer][expert]`. `groups` is the number of expert groups
/// of node-limited routing.
///
/// Refuses (naming the argument) empty or ragged loads, negative or non-finite loads, and shapes
/// that cannot be split evenly: `experts % groups`, `gpus % nodes`, `replicas % gpus` must be 0 and
/// `replicas >= experts`.
pub fn rebalance(
    loads: &[Vec<f64>],
    replicas: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> Result<Rebalance, SpecError> {
    let experts = loads.first().map_or(0, Vec::len);
    if experts == 0 {
        return Err(SpecError::invalid(
            "expert loads",
            "need at least one layer with at least one expert",
        ));
    }
    for (l, layer) in loads.iter().enumerate() {
        if layer.len() != experts {
            return Err(SpecError::invalid(
                format!("expert loads[{l}]"),
                format!("has {} experts, layer 0 has {experts}", layer.len()),
            ));
        }
        if let Some((e, v)) = layer
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(SpecError::invalid(
                format!("expert loads[{l}][{e}]"),
                format!("must be finite and >= 0, got {v}"),
            ));
        }
    }
    let positive = |name: &str, v: usize| {
        if v == 0 {
            Err(SpecError::invalid(name, "must be at least 1"))
        } else {
            Ok(())
        }
    };
    positive("groups", groups)?;
    positive("nodes", nodes)?;
    positive("gpus", gpus)?;
    if !experts.is_multiple_of(groups) {
        return Err(SpecError::invalid(
            "groups",
            format!("{groups} does not divide the {experts} experts"),
        ));
    }
    if !gpus.is_multiple_of(nodes) {
        return Err(SpecError::invalid(
            "gpus",
            format!("{gpus} GPUs cannot be split evenly over {nodes} nodes"),
        ));
    }
    if replicas < experts {
        return Err(SpecError::invalid(
            "replicas",
            format!("{replicas} slots cannot hold {experts} experts"),
        ));
    }
    if !replicas.is_multiple_of(gpus) {
        return Err(SpecError::invalid(
            "replicas",
            format!("{replicas} slots cannot be split evenly over {gpus} GPUs"),
        ));
    }
    // The hierarchical policy needs whole groups per node (and so whole experts per node).
    let (groups, nodes) = if groups.is_multiple_of(nodes) {
        (groups, nodes)
    } else {
        (1, 1)
    };
    let mut out = Rebalance {
        phy2log: Vec::with_capacity(loads.len()),
        log2phy: Vec::with_capacity(loads.len()),
        logcnt: Vec::with_capacity(loads.len()),
    };
    for layer in loads {
        let (phy2log, rank, logcnt) = rebalance_layer(layer, replicas, groups, nodes, gpus);
        let mut log2phy: Vec<Vec<usize>> = logcnt.iter().map(|&c| vec![0; c]).collect();
        for (slot, (&e, &r)) in phy2log.iter().zip(&rank).enumerate() {
            log2phy[e][r] = slot;
        }
        out.phy2log.push(phy2log);
        out.log2phy.push(log2phy);
        out.logcnt.push(logcnt);
    }
    Ok(out)
}

/// Load-aware expert placement for a plan's EP groups: [`rebalance`] with the shape of an EP
/// group (its nodes, `ep` devices) and `redundant_per_device` extra slots on every device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExpertPlacement {
    /// Physical expert slots per layer: routed experts plus the redundant ones.
    pub replicas: usize,
    /// Slots per device.
    pub slots_per_device: usize,
    /// Nodes one EP group spans.
    pub nodes: usize,
    /// Expert groups of node-limited routing used for the hierarchical packing.
    pub groups: usize,
    /// The placement itself.
    #[serde(flatten)]
    pub rebalance: Rebalance,
    /// Per layer: the busiest device's load over the mean, with the experts split evenly in
    /// order and no copies (the plan without loads).
    pub imbalance_before: Vec<f64>,
    /// Per layer: the same ratio after balancing.
    pub imbalance_after: Vec<f64>,
}

/// Max over mean of per-device loads, devices taking `per_device` consecutive slots.
fn imbalance(slot_loads: &[f64], per_device: usize) -> f64 {
    let devices: Vec<f64> = slot_loads
        .chunks(per_device.max(1))
        .map(|c| c.iter().sum())
        .collect();
    let mean = devices.iter().sum::<f64>() / devices.len().max(1) as f64;
    let max = devices.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 { max / mean } else { 1.0 }
}

/// Balances the routed experts of a plan's EP groups from measured `loads[layer][expert]`.
/// Every EP group spans `plan.ep_groups[0].nodes` nodes (groups of one plan have one shape) and
/// `ep` devices; each device gets `redundant_per_device` redundant slots.
pub fn expert_placement(
    model: &crate::ModelConfig,
    plan: &crate::plan::Plan,
    loads: &[Vec<f64>],
    redundant_per_device: usize,
) -> Result<ExpertPlacement, SpecError> {
    let experts = model.n_routed_experts;
    if let Some((l, layer)) = loads.iter().enumerate().find(|(_, l)| l.len() != experts) {
        return Err(SpecError::invalid(
            format!("expert loads[{l}]"),
            format!(
                "has {} experts, the model has {experts} routed experts",
                layer.len()
            ),
        ));
    }
    let ep = plan.parallelism.ep;
    let nodes = plan.ep_groups.first().map_or(1, |g| g.nodes.len().max(1));
    // Hierarchical packing needs the routing groups to split over the nodes and the devices
    // over the nodes; otherwise the group is treated as one node.
    let (groups, nodes) = if model.n_group.is_multiple_of(nodes) && ep.is_multiple_of(nodes) {
        (model.n_group, nodes)
    } else {
        (1, 1)
    };
    let replicas = redundant_per_device
        .checked_mul(ep)
        .and_then(|r| r.checked_add(experts))
        .ok_or_else(|| SpecError::invalid("redundant experts", "too many"))?;
    let r = rebalance(loads, replicas, groups, nodes, ep)?;
    let slots_per_device = replicas / ep;
    let imbalance_before = loads
        .iter()
        .map(|layer| imbalance(layer, experts / ep))
        .collect();
    let imbalance_after = loads
        .iter()
        .zip(&r.phy2log)
        .zip(&r.logcnt)
        .map(|((layer, phy), cnt)| {
            let slots: Vec<f64> = phy.iter().map(|&e| layer[e] / cnt[e] as f64).collect();
            imbalance(&slots, slots_per_device)
        })
        .collect();
    Ok(ExpertPlacement {
        replicas,
        slots_per_device,
        nodes,
        groups,
        rebalance: r,
        imbalance_before,
        imbalance_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Vec<Vec<f64>> {
        vec![
            vec![
                90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0,
            ],
            vec![
                20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0,
            ],
        ]
    }

    #[test]
    fn reproduces_the_reference_example() {
        let r = rebalance(&example(), 16, 4, 2, 8).unwrap();
        assert_eq!(
            r.phy2log,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
            ]
        );
        for (l, layer) in r.phy2log.iter().enumerate() {
            for e in 0..12 {
                let copies = layer.iter().filter(|&&x| x == e).count();
                assert_eq!(r.logcnt[l][e], copies);
                assert_eq!(r.log2phy[l][e].len(), copies);
                for &slot in &r.log2phy[l][e] {
                    assert_eq!(layer[slot], e);
                }
            }
        }
    }

    fn max_gpu_load(loads: &[f64], r: &Rebalance, gpus: usize) -> f64 {
        let per_gpu = r.phy2log[0].len() / gpus;
        r.phy2log[0]
            .chunks(per_gpu)
            .map(|slots| {
                slots
                    .iter()
                    .map(|&e| loads[e] / r.logcnt[0][e] as f64)
                    .sum::<f64>()
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn redundant_copies_of_a_hot_expert_even_the_gpus_out() {
        // One expert carries most of the load.
        let loads = vec![vec![1000.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]];
        let plain = rebalance(&loads, 8, 4, 1, 4).unwrap();
        let replicated = rebalance(&loads, 16, 4, 1, 4).unwrap();
        assert_eq!(plain.logcnt[0], vec![1; 8]);
        // The hot expert gets every spare slot: its load per copy stays the highest.
        assert_eq!(replicated.logcnt[0][0], 9);
        let (before, after) = (
            max_gpu_load(&loads[0], &plain, 4),
            max_gpu_load(&loads[0], &replicated, 4),
        );
        assert_eq!(before, 1010.0);
        // Nine copies of 1000 / 9 on four GPUs of four slots: some GPU holds three of them and
        // one light expert, 343.3, the best any placement can do.
        assert!(
            (after - (3000.0 / 9.0 + 10.0)).abs() < 1e-9,
            "max GPU load {after}"
        );
        // Every GPU holds 16 / 4 slots, each copy of expert 0 on its own slot.
        assert_eq!(replicated.log2phy[0][0].len(), 9);
    }

    #[test]
    fn groups_stay_on_their_node() {
        // Two groups of four experts on two nodes: each node's slots hold only its group.
        let loads = vec![vec![1000.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]];
        let r = rebalance(&loads, 16, 2, 2, 4).unwrap();
        let (node0, node1) = r.phy2log[0].split_at(8);
        let g0 = node0.iter().all(|&e| e < 4) && node1.iter().all(|&e| e >= 4);
        let g1 = node0.iter().all(|&e| e >= 4) && node1.iter().all(|&e| e < 4);
        assert!(g0 || g1, "{:?}", r.phy2log[0]);
    }

    #[test]
    fn groups_that_do_not_split_over_nodes_fall_back_to_the_global_policy() {
        let r = rebalance(&example(), 12, 3, 2, 4).unwrap();
        assert_eq!(r.logcnt[0].iter().sum::<usize>(), 12);
        assert!(r.logcnt[0].iter().all(|&c| c == 1));
    }

    #[test]
    fn bad_shapes_and_loads_are_named() {
        let ex = example();
        let cases: Vec<(Result<Rebalance, SpecError>, &str)> = vec![
            (rebalance(&[], 16, 4, 2, 8), "expert loads"),
            (
                rebalance(&[vec![1.0; 12], vec![1.0; 11]], 16, 4, 2, 8),
                "loads[1]",
            ),
            (rebalance(&[vec![f64::NAN; 12]], 16, 4, 2, 8), "loads[0][0]"),
            (rebalance(&[vec![-1.0; 12]], 16, 4, 2, 8), "loads[0][0]"),
            (rebalance(&ex, 16, 5, 2, 8), "groups"),
            (rebalance(&ex, 16, 4, 3, 8), "gpus"),
            (rebalance(&ex, 8, 4, 2, 8), "replicas"),
            (rebalance(&ex, 20, 4, 2, 8), "replicas"),
            (rebalance(&ex, 16, 0, 2, 8), "groups"),
            (rebalance(&ex, 16, 4, 0, 8), "nodes"),
        ];
        for (r, field) in cases {
            let err = r.unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn a_plans_ep_groups_get_balanced_expert_slots() {
        let model = crate::ModelConfig::deepseek_v3_671b();
        let par = crate::plan::Parallelism {
            pp: 16,
            dp: 128,
            ep: 64,
            schedule: crate::plan::Schedule::DualPipe,
            micro_batches: 32,
            micro_batch_size: 1,
            seq_len: 4096,
        };
        let plan = crate::plan::plan(&model, &par, &crate::plan::Cluster::uniform(256, 8)).unwrap();
        // Skewed loads: expert e carries (e % 17 + 1)^2, one expert is very hot.
        let mut layer: Vec<f64> = (0..256)
            .map(|e| ((e % 17 + 1) * (e % 17 + 1)) as f64)
            .collect();
        layer[3] = 5000.0;
        let loads = vec![layer.clone(), layer.iter().rev().copied().collect()];
        let p = expert_placement(&model, &plan, &loads, 1).unwrap();
        assert_eq!(
            (p.replicas, p.slots_per_device, p.nodes, p.groups),
            (320, 5, 8, 8)
        );
        for l in 0..2 {
            assert!(p.imbalance_after[l] < p.imbalance_before[l], "{p:?}");
            assert!(p.imbalance_after[l] >= 1.0);
            // Every logical expert has at least one slot, and the slot count adds up.
            assert!(p.rebalance.logcnt[l].iter().all(|&c| c >= 1));
            assert_eq!(p.rebalance.logcnt[l].iter().sum::<usize>(), 320);
        }
        // The hot expert got the most copies.
        let cnt = &p.rebalance.logcnt[0];
        assert_eq!(cnt.iter().max(), Some(&cnt[3]));
        // Loads of the wrong width are refused by name.
        let e = expert_placement(&model, &plan, &[vec![1.0; 10]], 1).unwrap_err();
        assert!(e.to_string().contains("expert loads[0]"), "{e}");
    }
}
